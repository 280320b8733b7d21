# Sourced by the scripts in this folder: make .venv (Python 3.11+) with the project in it.
# Reinstalls only when a pyproject.toml changes, so a second run starts at once.
#
# How the project is "installed": its dependencies (and the dev tools) are installed
# normally, and the project itself is put on the path by a .pth file of plain path
# entries (this tree, and clients/python for the client package), with the
# `geins-broker` command written here. Edits take effect at once, as with an editable
# install, but without one's costs: setuptools' default editable mode adds an import
# hook that costs ~20 ms on every Python start in the venv (and so on every
# `geins-broker token`), and its "compat" mode, which avoids the hook, prints a
# deprecation notice a screen long at every install.
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
stamp=".venv/.installed-$(cat pyproject.toml clients/python/pyproject.toml scripts/_venv.sh broker/cli/geins-broker | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "setting up .venv (once, and again when a pyproject.toml changes)" >&2
    .venv/bin/python -m pip install --quiet --upgrade pip
    # An older venv may hold the project as an editable install: its .pth and
    # finder would shadow or duplicate the entries written below.
    if .venv/bin/python -m pip show --quiet geins-broker >/dev/null 2>&1; then
        .venv/bin/python -m pip uninstall --quiet --yes geins-broker
    fi
    # Every requirement of both pyproject.toml files, dev tools included.
    .venv/bin/python - <<'EOF' >.venv/requirements.txt
import tomllib

for path in ("pyproject.toml", "clients/python/pyproject.toml"):
    with open(path, "rb") as handle:
        project = tomllib.load(handle)["project"]
    for requirement in project.get("dependencies", []):
        print(requirement)
    if path == "pyproject.toml":
        for requirement in project["optional-dependencies"]["dev"]:
            print(requirement)
# The build backend too: it builds the C hot path in place (below).
with open("pyproject.toml", "rb") as handle:
    for requirement in tomllib.load(handle)["build-system"]["requires"]:
        print(requirement)
EOF
    .venv/bin/python -m pip install --quiet --requirement .venv/requirements.txt
    site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    rm -f "$site/geins-broker-client.pth"  # the name an older version of this script used
    printf '%s\n' "$PWD" "$PWD/clients/python" >"$site/geins-broker.pth"
    # The command's launcher, as pip installs it: the first line pointed at this venv.
    sed "1s|^#!python\$|#!$PWD/.venv/bin/python|" broker/cli/geins-broker >.venv/bin/geins-broker
    chmod 755 .venv/bin/geins-broker
    rm -f .venv/.installed-*
    touch "$stamp"
fi

# The broker socket's optional C hot path (broker/rpc/_fastpath.c), built in place, again
# whenever its source changes. Without a C compiler or Python's headers it is not built,
# this says so once, and the daemon serves every request in Python.
fastpath_stamp=".venv/.fastpath-$(cat broker/rpc/_fastpath.c setup.py | sha256sum | cut -c1-16)"
if [ ! -f "$fastpath_stamp" ]; then
    rm -f .venv/.fastpath-* broker/rpc/_fastpath.*.so
    .venv/bin/python setup.py -q build_ext --inplace --build-temp .venv/build >/dev/null 2>.venv/fastpath-build.log || true
    if ls broker/rpc/_fastpath.*.so >/dev/null 2>&1; then
        touch "$fastpath_stamp"
    else
        echo "!!! the C hot path (broker/rpc/_fastpath.c) was not built: the daemon serves in Python" >&2
        echo "!!! (needs a C compiler and Python's headers; see .venv/fastpath-build.log)" >&2
    fi
fi
