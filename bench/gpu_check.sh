#!/usr/bin/env bash
# The one call to make on a lent GPU machine (the device tool's `run`): installs fastalign
# offline, runs the CUDA test subset (real Triton, no interpreter), sweeps the kernels' tiles,
# runs the GPU benchmarks, and prints a short table last. Full CSVs and logs go under $OUT.
# Budget: about 6 minutes on an H100/H200 (token_logprobs alone took 95 s on an H200).
#
#   device run:  bash bench/gpu_check.sh          (carry .whl for the peers' wheels, see README)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1
start=$(date +%s)
step() { echo; echo "=== $1 ($(( $(date +%s) - start )) s)"; }

step "install"
if compgen -G ".whl/*.whl" >/dev/null; then  # peers (TRL) as wheels: the machine has no network
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warning | tail -3
python3 -c "import fastalign.kernels, torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  || { echo "fastalign did not install"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

step "CUDA tests"
timeout 240 python3 -P -m pytest tests -q -m "not slow" -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -25

step "tile sweeps"
timeout 150 python3 bench/tune_token_logprobs.py --csv "$OUT/tune_token_logprobs_cuda.csv" 2>&1 | tee "$OUT/tune.log"
timeout 150 python3 bench/tune_linear_logprobs.py --csv "$OUT/tune_linear_logprobs_cuda.csv" 2>&1 | tee "$OUT/tune_linear.log"

step "benchmarks"
timeout 240 python3 bench/bench_token_logprobs.py --device cuda --batch 8 --compile-vocab 128256 \
  --csv "$OUT/token_logprobs_cuda.csv" --plot "$OUT/token_logprobs_cuda.png" 2>&1 | tee "$OUT/bench.log" | tail -3
# Llama-3 (D=4096, V=128256) and Gemma-2-2B (D=2304, V=256000) heads, N=8192, bf16, beside
# TRL, Liger and Cut Cross-Entropy (their wheels in .whl/).
timeout 300 python3 bench/bench_linear_logprobs.py --device cuda --shapes llama3 gemma2 --tokens 8192 \
  --csv "$OUT/linear_logprobs_cuda.csv" --plot "$OUT/linear_logprobs_cuda.png" 2>&1 | tee "$OUT/bench_linear.log" | tail -3
timeout 150 python3 bench/bench_linear_logprobs.py --op kl --device cuda --shapes llama3 --tokens 8192 \
  --csv "$OUT/linear_kl_cuda.csv" --plot "$OUT/linear_kl_cuda.png" 2>&1 | tee "$OUT/bench_kl.log" | tail -3

step "summary"
grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
grep -E "copy bandwidth|best:" "$OUT/tune.log"
grep -E "cuBLAS|best:" "$OUT/tune_linear.log"
python3 bench/summarize.py "$OUT/token_logprobs_cuda.csv"
python3 bench/summarize.py "$OUT/linear_logprobs_cuda.csv"
python3 bench/summarize.py "$OUT/linear_kl_cuda.csv"
