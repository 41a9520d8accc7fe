#!/usr/bin/env bash
# The CPU benchmark behind the CPU table of docs/performance.md: every explainer vs shap and the bare model.
# Usage: bash bench/cpu.sh [OUTFILE]   (about 30 minutes on 2 cores)
set -u
out="${1:-bench-cpu.txt}"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
b() { "$py" bench/compare.py --device cpu "$@" 2>&1 | grep -v -e Warning -e "it/s" -e "s/it" | tee -a "$out"; }
b --explainer gradient --model lite0 --images 2 --repeats 3
b --explainer gradient --model lite0 --images 2 --repeats 3 --layer input
b --explainer deep --model vgg11 --images 2 --repeats 3 --layer input
b --explainer deep --model lite0 --images 2 --repeats 3 --layer input
b --explainer partition --model lite0 --images 2 --repeats 3
b --explainer partition --model lite0 --images 2 --repeats 3 --mask inpaint_telea
b --explainer kernel --model lite0 --images 1 --repeats 3
"$py" bench/memory.py 2>&1 | tee -a "$out"
