"""Under LOG_FORMAT=json every line a process writes is one JSON object: the libraries' own handlers and warnings
included, and user text cut short."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import logging, sys, warnings
from infra.logging import configure_logging
from infra.settings import Settings
configure_logging("info", "json")
from models.diffusion import ImageGenerator, GenerationParams
settings = Settings.from_env({"MODEL_PROFILE": "tiny", "MODEL_CACHE_DIR": sys.argv[1]})
generator = ImageGenerator.load(settings)
prompt = "a very long prompt about " + "lighthouses and harbours " * 400
generator.generate(GenerationParams(prompt, None, 64, 64, 1, 5.0, 1))
warnings.warn("a library warning " + "x" * 5000)
logging.getLogger("transformers.some.module").warning("through the library's logger: %s", prompt)
"""


def test_every_line_of_a_generation_run_is_json_and_user_text_is_cut(model_cache):
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(model_cache)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert lines, "the run logged something"
    records = []
    for line in lines:
        records.append(json.loads(line))
        assert len(line) < 3000, line[:200]
    events = " ".join(str(record.get("event", "")) for record in records)
    assert "truncated" in events or "77" in events, "the text encoder's truncation warning came through as JSON"
    assert "a library warning" in events
    assert "through the library's logger" in events
