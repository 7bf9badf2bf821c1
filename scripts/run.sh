#!/usr/bin/env bash
# Install what is missing, start a local RabbitMQ node (unless AMQP_URL is set) and serve on port 8000:
# API and processor in one process, embedded object store and embedded Qdrant under ./app.
# Every setting is an environment variable (see README.md), e.g. MODEL_PROFILE=tiny ./scripts/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install.sh

started_broker=""
if [ -z "${AMQP_URL:-}" ]; then
  port="${RABBITMQ_PORT:-5672}"
  if ! scripts/local-rabbitmq.sh status; then
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "run.sh: port $port is already in use; using the broker listening there" >&2
    else
      echo "run.sh: starting a local RabbitMQ node on port $port (data in .run/)" >&2
      scripts/local-rabbitmq.sh start
      started_broker="$(scripts/local-rabbitmq.sh pid)"
    fi
  fi
  export AMQP_URL="amqp://guest:guest@localhost:$port/"
fi
if [ -n "$started_broker" ]; then
  # stop the node this script started, not one that another run started in its place meanwhile
  trap '[ "$(scripts/local-rabbitmq.sh pid || true)" != "$started_broker" ] || scripts/local-rabbitmq.sh stop' EXIT
fi

.venv/bin/python -m launcher
