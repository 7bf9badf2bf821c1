#!/usr/bin/env bash
# Start or stop a private RabbitMQ node (Debian's rabbitmq-server) whose data lives under .run/rabbitmq.
#   scripts/local-rabbitmq.sh start   # prints nothing on success; the node listens on RABBITMQ_PORT (5672)
#   scripts/local-rabbitmq.sh stop
#   scripts/local-rabbitmq.sh status  # exit 0 when running
#   scripts/local-rabbitmq.sh pid     # the running node's process id (exit 1 when none runs)
set -euo pipefail
cd "$(dirname "$0")/.."

port="${RABBITMQ_PORT:-5672}"
base="$PWD/.run/rabbitmq-$port"
node="ams-$port@localhost"
bin=/usr/lib/rabbitmq/bin

export RABBITMQ_MNESIA_BASE="$base/mnesia" RABBITMQ_LOG_BASE="$base/log" RABBITMQ_NODE_PORT="$port" \
       RABBITMQ_NODENAME="$node" RABBITMQ_DIST_PORT="$((port + 20000))" RABBITMQ_PID_FILE="$base/pid" \
       RABBITMQ_ENABLED_PLUGINS_FILE="$base/enabled_plugins" RABBITMQ_CONFIG_FILE="$base/rabbitmq"

running() { "$bin/rabbitmqctl" -q -n "$node" ping >/dev/null 2>&1; }

case "${1:-start}" in
  start)
    if running; then exit 0; fi
    mkdir -p "$base/mnesia" "$base/log"
    [ -f "$base/enabled_plugins" ] || echo '[].' > "$base/enabled_plugins"
    cp infra/rabbitmq/rabbitmq.conf "$base/rabbitmq.conf"
    setsid "$bin/rabbitmq-server" > "$base/server.log" 2>&1 < /dev/null &
    for _ in $(seq 1 90); do
      if "$bin/rabbitmqctl" -q -n "$node" await_startup --timeout 5 >/dev/null 2>&1; then
        # a routing key no queue takes goes to ams.unrouted, where a processor dead-letters it (README)
        "$bin/rabbitmqctl" -q -n "$node" set_policy --apply-to exchanges ams-unrouted '^ams\.jobs$' \
          '{"alternate-exchange": "ams.unrouted"}' >/dev/null
        exit 0
      fi
      sleep 1
    done
    echo "RabbitMQ node $node did not start in 90 s; see $base/server.log" >&2
    tail -n 20 "$base/server.log" >&2 || true
    exit 1
    ;;
  stop)
    if running; then "$bin/rabbitmqctl" -q -n "$node" stop >/dev/null; fi
    ;;
  status)
    running
    ;;
  pid)
    running && cat "$base/pid"
    ;;
  *)
    echo "usage: $0 start|stop|status|pid" >&2
    exit 2
    ;;
esac
