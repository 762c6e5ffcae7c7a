#!/usr/bin/env bash
# Wheels of the pure-Python packages the GPU machine's image lacks, into .whl/ (kept out of git
# through .git/info/exclude; carried to the GPU machine, where run_gpu_bench.sh installs them).
# Needs network access to the package index; run on the development machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
pip="${PIP:-.venv/bin/pip}"
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
"$pip" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  diffusers==0.42.1 transformers==5.23.0 open-clip-torch==3.3.0 hpsv2==1.2.0 \
  simple-aesthetics-predictor==0.1.2 ftfy==6.3.1 wcwidth==0.2.13 \
  regex==2026.11.19  # transformers 5.23 refuses regex releases before 2025.10.22 at import
# clint and its one dependency are published as source only: build pure-Python wheels.
"$pip" wheel -q --no-deps -w .whl clint==0.5.1 args==0.1.0
du -sh .whl
