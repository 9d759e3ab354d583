#!/usr/bin/env bash
# Download the pure-Python wheels listed in bench/gpu_wheels.txt, for Python 3.12, into a
# folder git ignores (default .wheels/ in the repo root), for the GPU machine, which has
# no network. Run here, on the CPU machine; it never fetches torch or any CUDA package.
#   bash bench/gpu_wheels.sh [DIR]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${1:-$ROOT/.wheels}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
mapfile -t PINS < <(grep -Ev '^\s*(#|$)' "$ROOT/bench/gpu_wheels.txt")
for pin in "${PINS[@]}"; do
    name=${pin%%==*}
    if [[ $name == antlr4-python3-runtime ]]; then
        # Published only as an sdist: build its (pure-Python) wheel here.
        "$PY" -m pip wheel -q --no-deps --no-binary=:all: -w "$DIR" "$pin"
    else
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
            --abi none --platform any -d "$DIR" "$pin"
    fi
done
ls -l "$DIR"
