#!/usr/bin/env bash
# Install what is missing (Debian packages, .venv with test extras) and run the test suite.
# Tests start their own RabbitMQ node and S3 server and stop them afterwards. Extra arguments go to pytest.
# Two workers (TEST_WORKERS), each with its own node and server, take whole test files (-n 0: one process).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install.sh --test
.venv/bin/python -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
