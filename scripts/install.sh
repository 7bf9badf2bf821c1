#!/usr/bin/env bash
# Install what the server needs on Debian/Ubuntu, doing only what is missing (safe to re-run):
#   - Debian packages: rabbitmq-server (unless AMQP_URL points at a broker), and with --test also sox and
#     espeak-ng (test clips) and chromium (the web page's browser tests); python3-venv when the venv module is
#     missing
#   - the Python environment in .venv: torch, torchvision, torchaudio, then this project with its processor
#     extras (diffusers, qwen-tts; with --test also the test extras)
# Runs apt-get as root, or through sudo.
set -euo pipefail
cd "$(dirname "$0")/.."

mode="run"
if [ "${1:-}" = "--test" ]; then mode="test"; fi

TORCH_PACKAGES=(torch==2.14.1 torchvision==0.29.1 torchaudio==2.11.0)

sudo_cmd=()
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null; then sudo_cmd=(sudo); else
    echo "install.sh: need root or sudo to install Debian packages" >&2; exit 1
  fi
fi

packages=()
if [ "$mode" = test ] || [ -z "${AMQP_URL:-}" ]; then
  [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || packages+=(rabbitmq-server)
fi
if [ "$mode" = test ]; then
  command -v sox >/dev/null || packages+=(sox)
  command -v espeak-ng >/dev/null || packages+=(espeak-ng)
  command -v chromium >/dev/null || packages+=(chromium)
fi
python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "install.sh: Python 3.11 or newer is needed (found: $("$python" --version 2>&1)); set PYTHON=..." >&2
  exit 1
fi
"$python" -c 'import ensurepip, venv' 2>/dev/null || packages+=(python3-venv)

# Debian's rabbitmq-server enables and starts its system service on 5672 when installed; scripts/run.sh runs a node
# of its own under .run/ (with infra/rabbitmq/rabbitmq.conf and the ams-unrouted policy), so the service that this
# install started is stopped and disabled. A rabbitmq-server installed before is never touched.
stop_system_rabbitmq() {
  local stopped=""
  if [ -d /run/systemd/system ] && systemctl cat rabbitmq-server.service >/dev/null 2>&1; then
    "${sudo_cmd[@]}" systemctl disable --now --quiet rabbitmq-server.service && stopped=1
  elif [ -s /var/run/rabbitmq/pid ] && [ -x /etc/init.d/rabbitmq-server ]; then  # started by its init script
    "${sudo_cmd[@]}" /etc/init.d/rabbitmq-server stop >/dev/null && stopped=1
    "${sudo_cmd[@]}" update-rc.d rabbitmq-server disable >/dev/null 2>&1 || true
  else
    return 0  # no service was started (no systemd, or a policy-rc.d that forbids it, as in containers)
  fi
  if [ -n "$stopped" ]; then
    echo "install.sh: stopped and disabled the rabbitmq-server system service that its package started" \
      "(scripts/run.sh runs a node of its own)"
  else
    echo "install.sh: could not stop the rabbitmq-server system service that its package started; scripts/run.sh" \
      "would use it on 5672 instead of a node of its own: stop and disable it" >&2
  fi
}

if [ "${#packages[@]}" -gt 0 ]; then
  echo "install.sh: installing Debian packages: ${packages[*]}"
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${packages[@]}" >/dev/null
  if [[ " ${packages[*]} " == *" rabbitmq-server "* ]]; then stop_system_rabbitmq; fi
fi

extras="[processor]"
if [ "$mode" = test ]; then extras="[processor,test]"; fi
stamp=".venv/.installed"
project="$(sha256sum < pyproject.toml | cut -d' ' -f1)"
want="$project ${extras} ${TORCH_PACKAGES[*]}"
with_tests="$project [processor,test] ${TORCH_PACKAGES[*]}"  # a test install serves a run too
if [ -f "$stamp" ] && { [ "$(cat "$stamp")" = "$want" ] || [ "$(cat "$stamp")" = "$with_tests" ]; }; then
  exit 0
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
echo "install.sh: installing the Python environment in .venv (torch is large; the first time takes a while)"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${TORCH_PACKAGES[@]}"
.venv/bin/python -m pip install -q -e ".${extras}"
echo "$want" > "$stamp"
