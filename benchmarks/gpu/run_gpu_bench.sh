#!/usr/bin/env bash
# Scoring (and SDXL generation) benchmark on one CUDA GPU; BENCHMARKS.md says how to run it.
#   benchmarks/gpu/run_gpu_bench.sh [--cpu-smoke] [--json PATH] [other gpu_bench options]
#
# Python: $PYTHON if set, else the project's .venv, else python3 (the GPU image's, which holds
# torch, transformers, torchvision, pandas, pyarrow). Packages that python lacks (diffusers,
# open-clip-torch, hpsv2, simple-aesthetics-predictor, ftfy, clint, ...) are installed from the
# wheels in .whl/ when that folder is there (benchmarks/gpu/fetch_wheels.sh makes it).
set -euo pipefail
cd "$(dirname "$0")/../.."

if [[ -n "${PYTHON:-}" ]]; then py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then py=.venv/bin/python
else py=python3
fi

needed="import diffusers, transformers, open_clip, hpsv2, aesthetics_predictor, ftfy, clint, pandas, pyarrow"
if ! "$py" -c "$needed" 2>/dev/null && [[ -d .whl ]]; then
  site=/tmp/flexyface-site
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# hpsv2's open_clip has an unused `from turtle import forward`; turtle needs tkinter, which a
# headless Python may lack. Only then, an empty stand-in module satisfies that import.
if ! "$py" -c "import turtle" 2>/dev/null; then
  stub=/tmp/flexyface-stubs
  mkdir -p "$stub"
  printf '"""Stand-in for turtle (hpsv2 imports it, never uses it)."""\n\n\ndef forward(*args, **kwargs):\n    raise NotImplementedError("turtle graphics are not available")\n' > "$stub/turtle.py"
  export PYTHONPATH="$stub${PYTHONPATH:+:$PYTHONPATH}"
fi
"$py" -c "$needed" || { echo "missing packages: run benchmarks/gpu/fetch_wheels.sh and carry .whl" >&2; exit 2; }

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$py" -m benchmarks.gpu.gpu_bench "$@"
