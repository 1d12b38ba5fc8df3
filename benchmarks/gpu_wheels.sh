#!/usr/bin/env bash
# Wheels for what the lent GPU machines' image lacks (it reaches no package index): gymnasium
# (arq.search), farama-notifications (its one dependency the image lacks) and torchao (the
# pt2e baseline of bench_e2e), for that machine's Python 3.12 and torch 2.11. Run here, before
# the device call, then name `.whl` in its `carry`; benchmarks/gpu_check.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p "$(git rev-parse --git-path info)"
grep -qxF '/.whl/' "$(git rev-parse --git-path info/exclude)" 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-path info/exclude)"
mkdir -p .whl
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "gymnasium>=1.0" farama-notifications "torchao==${TORCHAO_VERSION:-0.17.0}"
ls -l .whl
