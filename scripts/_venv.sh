# Sourced by the scripts in this folder: make .venv (Python 3.11+) with the project in it.
# Reinstalls only when pyproject.toml changes, so a second run starts at once.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python=${PYTHON:-}
if [ -z "$python" ]; then
    for candidate in python3.11 python3.12 python3.13 python3; do
        if command -v "$candidate" >/dev/null 2>&1; then python=$candidate; break; fi
    done
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "geins-broker needs Python 3.11 or newer (set PYTHON=...)" >&2
    exit 2
fi
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
stamp=".venv/.installed-$(cat pyproject.toml clients/python/pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    # "compat" editable mode puts plain path entries in a .pth file instead of an
    # import hook, which would add ~20 ms to every Python start in the venv (and so
    # to `geins-broker token`); the client package lives in clients/python.
    .venv/bin/python -m pip install --quiet -e ".[dev]" --config-settings editable_mode=compat
    site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$PWD/clients/python" > "$site/geins-broker-client.pth"
    rm -f .venv/.installed-*
    touch "$stamp"
fi
