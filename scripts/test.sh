#!/usr/bin/env bash
# Install what is missing (Debian packages, .venv with test extras) and run the test suite.
# Tests start their own RabbitMQ node and S3 server and stop them afterwards. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install.sh --test
.venv/bin/python -m pytest "$@"
