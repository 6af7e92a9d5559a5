#!/usr/bin/env bash
# Fetch the wheels the lent GPU machine lacks into .whl/ (git-ignored), on a machine whose pip
# reaches PyPI; scripts/gpu_check.sh installs them there (the device run carries the folder:
# the run tool's `carry: [".whl"]`). Usage, from anywhere:
#
#     bash scripts/fetch_gpu_wheels.sh
#
# The GPU image has Python 3.12, torch (which requires setuptools, typing-extensions, ...),
# transformers (numpy, packaging, pyyaml, tqdm), pytest, safetensors, tensorboard, and no
# network. megatron-core 0.19.2 is the one missing piece: a cp312 manylinux wheel (it carries a
# compiled dataset helper, so the Python version must match), 2.4 MB, whose required
# dependencies (torch, numpy, packaging) are all in the image; everything else it lists is an
# extra we do not use. Transformer Engine is NOT fetched (far over the 64 MiB carry limit; the
# check runs the local spec without it). The script ends by checking the wheels' requirements
# and the carried total (repository tracked + untracked files + .whl/) against 64 MiB.
#
# PIP: the pip command (default: .venv/bin/python -m pip, else python3 -m pip).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

pip="${PIP:-}"
if [ -z "$pip" ]; then
    if [ -x .venv/bin/python ]; then pip=".venv/bin/python -m pip"; else pip="python3 -m pip"; fi
fi
mkdir -p .whl
# shellcheck disable=SC2086  # $pip is a command with arguments
$pip download megatron-core==0.19.2 --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --platform manylinux_2_28_x86_64 --dest .whl

echo "Requires-Dist without extras (must be in the GPU image: torch, numpy, packaging):"
for wheel in .whl/*.whl; do
    python3 - "$wheel" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    lines = wheel.read(name).decode().splitlines()
needs = [l.split(":", 1)[1].strip() for l in lines if l.startswith("Requires-Dist:") and "extra ==" not in l]
print(f"  {sys.argv[1].split('/')[-1]}: {', '.join(needs) or 'none'}")
EOF
done

wheels=$(find .whl -name '*.whl' -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')
repo=$(git ls-files -co --exclude-standard -z | xargs -0 -r stat -c %s 2>/dev/null \
    | awk '{ s += $1 } END { print s + 0 }')
total=$((wheels + repo))
awk -v w="$wheels" -v r="$repo" -v t="$total" 'BEGIN {
    printf "carried: wheels %.1f MiB + repository %.1f MiB = %.1f MiB of 64 MiB\n",
        w / 1048576, r / 1048576, t / 1048576 }'
if [ "$total" -ge $((64 * 1024 * 1024)) ]; then
    echo "fetch_gpu_wheels.sh: error: over the 64 MiB a device run carries" >&2
    exit 1
fi
