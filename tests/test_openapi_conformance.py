"""The OpenAPI document is the truth: schemathesis, with every check it has, against the real server (tiny models,
real broker, R2 on the S3 server, API keys on, generation and voice bounded small). A bounded run; the long one
is `scripts/fuzz.sh` (README, docs/operations.md)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from openapi_spec_validator import validate

from tests.support.server import running_server

ST = Path(sys.executable).with_name("st")
CONFIG = Path(__file__).with_name("schemathesis.toml")
ADMIN_KEY = "conformance-admin-key-0123456789"


async def test_every_operation_conforms_to_the_document(make_settings, s3, tmp_path):
    settings = make_settings(
        r2_bucket=s3.new_bucket(),
        endpoint=s3.endpoint,
        IMAGE_ENABLED="1",
        VOICE_ENABLED="1",
        IMAGE_MAX_PIXEL_STEPS=str(64 * 64 * 2),
        VOICE_MAX_TEXT_CHARS="40",
        API_KEYS=f"admin:{ADMIN_KEY}",
    )
    async with running_server(settings) as server:
        validate((await server.client.get("/schema/openapi.json")).json())  # a valid OpenAPI 3.1 document
        process = await asyncio.create_subprocess_exec(
            str(ST),
            "--config-file",
            str(CONFIG),
            "run",
            f"{server.base_url}/schema/openapi.json",
            "--checks",
            "all",
            "--max-examples",
            os.environ.get("CONFORMANCE_EXAMPLES", "8"),
            "--seed",
            "1",
            "--header",
            f"Authorization: Bearer {ADMIN_KEY}",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=tmp_path,
            env={**os.environ, "NO_COLOR": "1"},
        )
        output, _ = await process.communicate()
    text = output.decode(errors="replace")
    assert process.returncode == 0, text
