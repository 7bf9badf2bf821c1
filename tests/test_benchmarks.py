"""The latency benchmark keeps running: a short run of bench/overhead.py on the session's broker prints its table,
the floors it measured, and a breakdown whose timeline holds the model call. Its figures are not checked here
(performance claims come from full runs, reported in docs/benchmarks.md)."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# | path | model | request | overhead median | overhead p95 | RabbitMQ median | RabbitMQ p95 | flushed write | HTTP |
_MS = r"(-?[\d.]+) ms"
ROW = re.compile(r"^\| (\w+) \| " + r" \| ".join([_MS] * 8))


async def test_the_overhead_benchmark_runs_and_reports_every_path_asked(make_env, tmp_path):
    env = make_env()
    run_env = {
        **os.environ,
        "AMQP_URL": env["AMQP_URL"],
        "MODEL_PROFILE": "tiny",
        "MODEL_CACHE_DIR": env["MODEL_CACHE_DIR"],
        "TMPDIR": str(tmp_path),
    }
    bench = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.overhead",
        "--runs",
        "3",
        "--warmup",
        "1",
        "--paths",
        "generate,upload",
        "--breakdown",
        cwd=ROOT,
        env=run_env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output = (await asyncio.wait_for(bench.communicate(), 240))[0].decode()
    assert bench.returncode == 0, output
    rows = {match[1]: match for line in output.splitlines() if (match := ROW.match(line))}
    assert set(rows) == {"generate", "upload"}, output
    for path, row in rows.items():
        model, request = float(row[2]), float(row[3])
        assert 0 < model < request, f"{path}: the model call is timed inside the request\n{output}"
        assert all(float(row[column]) > 0 for column in (6, 8, 9)), f"{path}: the floors were measured\n{output}"
    timeline = output.split("generate: the request with the median overhead", 1)[1]
    assert "MODEL" in timeline and "store.put" in timeline and "answer read by the client" in timeline, output
