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

if [ "${#packages[@]}" -gt 0 ]; then
  echo "install.sh: installing Debian packages: ${packages[*]}"
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}" \
    >/dev/null
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
