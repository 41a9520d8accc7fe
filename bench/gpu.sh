#!/usr/bin/env bash
# The GPU benchmark run (device machine): every explainer vs shap and the bare model, one table each.
# Usage: bash bench/gpu.sh OUTFILE   (wheels for packages missing there are installed from .whl/ if present)
set -u
out="${1:-bench-gpu.txt}"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
nvidia-smi -L | tee -a "$out"
b() { timeout "$1" python3 bench/compare.py --device cuda "${@:2}" 2>&1 | grep -v Warning | tee -a "$out"; }
b 50 --explainer gradient --model lite0 --images 4 --repeats 1
b 40 --explainer gradient --model lite0 --images 4 --repeats 1 --layer input
b 30 --explainer deep --model vgg11 --images 4 --repeats 1 --layer input
b 25 --explainer deep --model lite0 --images 4 --repeats 1 --layer input
b 40 --explainer partition --model lite0 --images 4 --repeats 1
b 50 --explainer kernel --model lite0 --images 1 --repeats 1
