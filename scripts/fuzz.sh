#!/usr/bin/env bash
# The long schemathesis run: every check, N examples per operation (default 200), against the real server that the
# test suite starts (RabbitMQ node, S3 server, tiny models, API keys on), then the clip and image decoders on
# mutated files (FUZZ_MEDIA_SECONDS each). Usage: scripts/fuzz.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install.sh --test
CONFORMANCE_EXAMPLES="${1:-200}" .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_openapi_conformance.py
# then the decoders of clips and images on mutated files, a minute each (tests/fuzz_media.py)
.venv/bin/python -m tests.fuzz_media --seconds "${FUZZ_MEDIA_SECONDS:-60}" --keep .run/mutants
