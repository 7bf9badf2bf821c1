#!/usr/bin/env bash
# The indexing benchmark on a lent GPU machine, which has torch but not this project's other packages and no
# network (docs/benchmarks.md, "Indexing throughput").
#
#   bench/device.sh wheels        # here, with the package registry: Python 3.12 wheels into .whl/ (about 35 MB)
#   bash bench/device.sh run      # there, with .whl/ carried beside the tree: install them into /tmp/site, then
#                                 # bench.index --no-broker (and its batch-128 row without thumbnails at index
#                                 # time) and the stage timings (about 4 minutes on an H100); each part's output
#                                 # also in $OUT/<part>.txt, and a part that fails does not stop the next
#
# Extra arguments after `run` go to bench.index (default: --images 512 --batch-sizes 1,8,32,64,128).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 msgspec==0.22.0 structlog==26.1.0 tenacity==9.2.1
  aio-pika==10.2.1 aiormq==7.2.4 pamqp==4.0.1 aiobotocore==3.10.0 botocore==1.43.117 boto3==1.43.117
  s3transfer==0.19.3 jmespath==1.1.0 aioitertools==0.13.0 qdrant-edge-py==0.9.0 prometheus-client==0.26.0
)

case "${1:-}" in
  wheels)
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "${WHEELS[@]}"
    ls .whl
    ;;
  run)
    shift
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    args=("$@")
    if [ ${#args[@]} -eq 0 ]; then args=(--images 512 --batch-sizes 1,8,32,64,128); fi
    # each part runs whatever became of the one before (one lent session may be all there is), its output kept
    # in $OUT/<part>.txt (the device tool brings $OUT back); the exit status says whether every part ran
    out="${OUT:-/tmp/device-bench}"
    mkdir -p "$out"
    failed=()
    part() {
      local name=$1
      shift
      echo "== $name: $*"
      if ! "$@" 2>&1 | tee "$out/$name.txt"; then failed+=("$name"); fi
    }
    part index python3 -m bench.index --no-broker "${args[@]}"
    part index-no-thumbnails python3 -m bench.index --no-broker --no-thumbnails --images 512 --batch-sizes 128
    part stages python3 -m bench.index_stages --images 512 --batch 128 --threads "$(nproc)"
    if [ ${#failed[@]} -gt 0 ]; then
      echo "== failed: ${failed[*]}"
      exit 1
    fi
    ;;
  *)
    sed -n '2,11p' "$0"
    exit 2
    ;;
esac
