#!/usr/bin/env bash
# Create the project's virtual environment and install megatron-rectify with its test extras.
#
# megatron-core 0.19 needs Python >= 3.12. We look on PATH first (python3.13, python3.12,
# python3), then in pyenv's versions folder (where these machines keep a 3.12 that is installed
# but not selected), and stop with a clear message when there is none.
set -euo pipefail

venv="${1:-.venv}"
extras="${EXTRAS:-test}"

is_suitable() {
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

find_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3.13 python3.12 python3; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 && is_suitable "$candidate"; then
            command -v "$candidate"
            return 0
        fi
    done
    local root=""
    if command -v pyenv >/dev/null 2>&1; then
        root="$(pyenv root 2>/dev/null || true)"
    fi
    root="${root:-${PYENV_ROOT:-$HOME/.pyenv}}"
    for candidate in $(ls -d "$root"/versions/3.1[2-9]*/bin/python3 2>/dev/null | sort -rV); do
        if is_suitable "$candidate"; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

if ! python_bin="$(find_python)"; then
    echo "error: megatron-rectify needs Python >= 3.12 (megatron-core 0.19 requires it)." >&2
    echo "       None was found on PATH or under pyenv's versions folder." >&2
    echo "       Install one (e.g. 'pyenv install 3.12') or point PYTHON=/path/to/python3.12." >&2
    exit 1
fi

echo "setup: using $python_bin ($("$python_bin" --version 2>&1)) -> $venv"
if [ ! -x "$venv/bin/python" ]; then
    "$python_bin" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -e ".[${extras}]"
"$venv/bin/python" -c "import megatron.core, megatron.rectify; print('setup: megatron-core', megatron.core.__version__, '+ megatron-rectify', megatron.rectify.__version__)" 2>/dev/null
touch "$venv/.setup-stamp"
