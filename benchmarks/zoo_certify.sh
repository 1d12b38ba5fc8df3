#!/usr/bin/env bash
# The zoo's certified-accuracy table (README): arq certify at n = 100,000, alpha = 0.001 on
# every 20th MNIST test image (500 images) for each shipped model. Resumable: rerun to continue.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/zoo-certify
mkdir -p "$out"
for sigma in ${SIGMAS:-0.25 0.50 1.00}; do
  name=mnist-lenet-sigma$sigma
  resume=""; [ -s "$out/$name.tsv" ] && resume="--resume"
  ${PYTHON:-.venv/bin/python} -m arq.cli.main certify mnist "$name" "$out/$name.tsv" \
    --N0 100 --N 100000 --alpha 0.001 --batch 1000 --skip 20 --seed 0 $resume
done
