#!/usr/bin/env bash
# Wheels for what the lent GPU machine's python3 (3.12, torch and rich already there)
# lacks to run metatrain: hydra-core, omegaconf and antlr4-python3-runtime, into the
# git-ignored .whl/ that the device call carries. The versions are the ones this
# checkout's .venv runs (so the GPU runs the tested stack), else the defaults below.
# antlr4-python3-runtime 4.9.3 (omegaconf pins 4.9.*) is published as source only: it
# is pure Python, so a wheel built here (py3-none-any) installs there.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${WHEELS_DIR:-.whl}
PY=${PY:-python3}

version() {  # the .venv's version of $1, else $2
    local v
    v=$(.venv/bin/python -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p') || true
    echo "${v:-$2}"
}

rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$DEST" \
    "hydra-core==$(version hydra-core 1.3.2)" "omegaconf==$(version omegaconf 2.3.0)"
"$PY" -m pip wheel -q --no-deps -w "$DEST" \
    "antlr4-python3-runtime==$(version antlr4-python3-runtime 4.9.3)"
ls -l "$DEST"
du -sh "$DEST"
