#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine with Python 3.11 or 3.12: FFCV's system libraries (apt), a virtual
# environment in .venv with the pinned dependencies of requirements.lock, FFCV, and this project (editable).
set -euo pipefail
cd "$(dirname "$0")/.."

# pip warns once per package about local mirror folders it does not find; that is noise, not a problem.
quiet_pip() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

apt_packages="libturbojpeg0-dev libopencv-dev pkg-config"
missing=""
for package in $apt_packages; do
    dpkg -s "$package" >/dev/null 2>&1 || missing="$missing $package"
done
if [ -n "$missing" ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "setup: installing system packages:$missing"
    $sudo apt-get update -qq
    # Recommends (OpenCV's Java bindings, GTK, video drivers, ~40 packages) are not needed to build or run FFCV.
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# A supported interpreter (pyproject's requires-python: 3.11 or 3.12; the lock is made on 3.11): $PYTHON if set,
# else the first of python3.11, python3.12, python3 that is one of them.
supported() { "$1" -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] < (3, 13)))' 2>/dev/null; }
python=${PYTHON:-}
if [ -z "$python" ]; then
    for candidate in python3.11 python3.12 python3; do
        if command -v "$candidate" >/dev/null 2>&1 && supported "$candidate"; then
            python=$candidate
            break
        fi
    done
fi
if [ -z "$python" ] || ! supported "$python"; then
    echo "setup: needs Python 3.11 or 3.12 (found: ${python:-none of python3.11, python3.12, python3});" \
        "install one (Debian: apt-get install python3.11 python3.11-venv) or set PYTHON=/path/to/python3.11" >&2
    exit 1
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv

# Reinstall only when the pins change.
stamp=".venv/.installed-$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "setup: installing pinned Python packages into .venv (first run downloads torch, a few minutes)"
    quiet_pip .venv/bin/python -m pip install -q --upgrade pip
    # uv installs the pinned wheels (torch's ~3.5 GB among them) in parallel: 17 s from an empty cache on 2 cores,
    # against pip's 91 s. It also compiles their bytecode (38 s more); leaving that to the first import was no
    # faster (`make test` from a fresh clone: 621 s, against 570-612 s), as Ray's processes that start together each
    # compile the same modules. It reads no pip configuration and takes PyPI's files; pip installs the same pins if
    # uv cannot.
    if ! { quiet_pip .venv/bin/python -m pip install -q uv==0.13.9 &&
        .venv/bin/uv pip install -q --python .venv/bin/python --compile-bytecode -r requirements.lock; }; then
        echo "setup: uv could not install requirements.lock; installing it with pip"
        quiet_pip .venv/bin/python -m pip install -q -r requirements.lock
    fi
    # FFCV compiles against the apt libraries and the numpy/numba already installed.
    quiet_pip .venv/bin/python -m pip install -q --no-build-isolation ffcv==1.0.2 opencv-python==5.0.0.93 \
        fastargs==1.2.0 assertpy==1.1 terminaltables==3.1.10 pytorch_pfn_extras==0.9.0
    quiet_pip .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
    rm -f .venv/.installed-*
    touch "$stamp"
fi
