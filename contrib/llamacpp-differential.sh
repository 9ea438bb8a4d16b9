#!/usr/bin/env bash
# llama.cpp's own server test suite, direct and through paddler (one and two
# upstreams), compared test by test; prints the table (docs/llamacpp.md).
#
#   contrib/llamacpp-differential.sh [--modes direct,paddler1,paddler2] [--out DIR] [unit/test_x.py ...]
#
# Builds llama-server on first use (tests/llamacpp/build-llama-server) and
# unpacks the suite from the same pinned sdist. Exits 1 when a test differs
# that tests/llamacpp/differential-allowed.txt does not list. A whole run
# takes several minutes on 2 cores (docs/llamacpp.md has the figure).
set -euo pipefail
cd "$(dirname "$0")/.."
. contrib/venv.sh
exec "$VENV/bin/python" -m tests.llamacpp.differential "$@"
