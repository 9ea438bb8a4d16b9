#!/usr/bin/env bash
# Set up a virtualenv with paddler and run the balancer in the foreground.
# With no --upstream/--config (nor PADDLER_UPSTREAMS/PADDLER_CONFIG), it also
# starts a small simulated llama.cpp fleet in the same process. Extra
# arguments go to `paddler balancer`.
set -euo pipefail
cd "$(dirname "$0")/.."
PADDLER_EXTRAS="" . contrib/venv.sh
args=("$@")
if [[ " $* " != *" --upstream"* && " $* " != *" --config"* && " $* " != *" -c "* \
      && -z "${PADDLER_UPSTREAMS:-}" && -z "${PADDLER_CONFIG:-}" && -z "${PADDLER_SIMULATED_FLEET:-}" \
      && " $* " != *" --simulated-fleet"* ]]; then
    args+=(--simulated-fleet 2)
fi
echo "paddler: proxy on http://127.0.0.1:8086 (unless --listen says otherwise),"
echo "         dashboard on http://127.0.0.1:8085/dashboard, Prometheus on http://127.0.0.1:8085/metrics."
echo "         Try: curl http://127.0.0.1:8086/health   (Ctrl-C stops)"
exec "$VENV/bin/paddler" balancer "${args[@]}"
