# Sourced by the contrib scripts: make .venv with paddler installed (editable).
# A .pth line puts the checkout itself on sys.path, so that twistd finds
# twisted/plugins/paddler_plugin.py (editable finders do not expose it).
set -e
VENV="${PADDLER_VENV:-$PWD/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV" 2>/dev/null || {
        rm -rf "$VENV"
        python3 -m pip install --user --quiet virtualenv
        python3 -m virtualenv --quiet "$VENV"
    }
fi
if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    "$VENV/bin/python" -m ensurepip --upgrade >/dev/null 2>&1 || {
        rm -rf "$VENV"
        python3 -m pip install --user --quiet virtualenv
        python3 -m virtualenv --quiet "$VENV"
    }
fi
extras="${PADDLER_EXTRAS-[test]}"
stamp="$VENV/.paddler-installed${extras:+-test}"
if [ -z "$extras" ] && [ -f "$VENV/.paddler-installed-test" ] && [ ! setup.cfg -nt "$VENV/.paddler-installed-test" ]; then
    stamp="$VENV/.paddler-installed-test"
fi
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
    rm -f "$stamp"
    echo "Installing paddler and its dependencies into $VENV (log: $VENV/pip.log)" >&2
    if ! { "$VENV/bin/python" -m pip install --upgrade pip &&
           "$VENV/bin/python" -m pip install -e ".$extras"; } >"$VENV/pip.log" 2>&1; then
        tail -n 30 "$VENV/pip.log" >&2
        echo "pip install failed; see $VENV/pip.log" >&2
        exit 1
    fi
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$PWD" > "$site/paddler-checkout.pth"
    touch "$stamp"
fi
