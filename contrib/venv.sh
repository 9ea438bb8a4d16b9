# Sourced by the contrib scripts: create .venv with paddler installed (editable).
VENV="${PADDLER_VENV:-$PWD/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV" 2>/dev/null || {
        python3 -m pip install --user --quiet virtualenv
        python3 -m virtualenv --quiet "$VENV"
    }
fi
stamp="$VENV/.paddler-installed"
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e ".${PADDLER_EXTRAS:-[test]}"
    touch "$stamp"
fi
