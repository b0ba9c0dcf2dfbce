#!/usr/bin/env bash
# The one call to make on a lent GPU machine (the device tool's `run`): installs fastalign
# offline, runs the CUDA test subset (real Triton, no interpreter), then the benchmarks, most
# important first: the fused-linear kernels (linear_logprobs on both matmul paths beside the GEMM
# floor and the peers, then the fused DPO/GRPO losses, the distillation loss, the fused KL), then
# the trainer-level steps measured in earlier runs. Each step packs its CSV as it ends, so a run
# cut short by the device tool's 600 s limit still returns what it finished; the summary last.
# Budget: 4 min 10 s measured on an H100 (2026-11-27) for the install, tests (70 s) and kernel
# benchmarks of that day; the cuBLAS path's providers, the distillation step (11 fresh worker
# processes, timeout 240 s) and the trainer steps (~2.5 min) come on top, untimed: on a short
# lease the last steps may be cut.
#
#   device run:  FASTALIGN_COMMIT=$(git rev-parse --short HEAD) bash bench/gpu_check.sh
#   (carry .whl: the peers' wheels, see README)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
# Every CSV, plot and log goes to $RUN; after each step they are packed into $OUT/results.tar.gz
# (the device tool returns at most 8 files), so a run cut short still returns what it finished.
RUN=$(mktemp -d)
pack() { tar -czf "$OUT/results.tar.gz" -C "$RUN" .; }
export PYTHONUNBUFFERED=1
# The native C++ kernels are for CPU tensors: do not spend GPU-machine minutes compiling them.
export FASTALIGN_NATIVE=0
start=$(date +%s)
step() { pack; echo; echo "=== $1 ($(( $(date +%s) - start )) s)"; }

step "install"
if compgen -G ".whl/*.whl" >/dev/null; then  # peers (TRL, Liger, CCE): the machine has no network
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warning | tail -3
python3 -c "import fastalign.kernels, torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  || { echo "fastalign did not install"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$RUN/gpu.txt"

step "CUDA tests"
timeout 240 python3 -P -m pytest tests -q -rfE --tb=short -m "not slow" -p no:cacheprovider 2>&1 | tee "$RUN/tests.log" | tail -25

step "fused-linear log-probs: Llama-3 and Gemma-2-2B heads, N=8192, bf16, fused Triton tiles and the cuBLAS path beside TRL, Liger, CCE"
timeout 240 python3 bench/bench_linear_logprobs.py --device cuda --shapes llama3 gemma2 --tokens 8192 \
  --providers torch_eager trl liger cce fastalign fastalign_cublas matmul_floor \
  --csv "$RUN/linear_logprobs_cuda.csv" --plot "$RUN/linear_logprobs_cuda.png" 2>&1 | tee "$RUN/bench_linear.log" | tail -3

step "fused DPO and GRPO losses: 8 x 1024 tokens, Llama-3 head, bf16, beside TRL's path, Liger, unfused torch and the GEMM rate"
for op in dpo grpo; do
  timeout 120 python3 bench/bench_fused_losses.py --op $op --device cuda --pairs 4 --seq 1024 --hidden 4096 \
    --csv "$RUN/fused_${op}_cuda.csv" 2>&1 | tee "$RUN/bench_fused_${op}.log" | tail -3
done

step "fused-linear KL: Llama-3 head, N=8192, bf16, beside TRL and Liger"
timeout 90 python3 bench/bench_linear_logprobs.py --op kl --device cuda --shapes llama3 --tokens 8192 \
  --csv "$RUN/linear_kl_cuda.csv" --plot "$RUN/linear_kl_cuda.png" 2>&1 | tee "$RUN/bench_kl.log" | tail -3

step "distillation loss: N=8192, D=4096, teacher D_t=8192, V=128256, bf16, beta 0.5 and 1, beside TRL, Liger, eager"
timeout 240 python3 bench/bench_divergence.py --device cuda \
  --csv "$RUN/divergence_cuda.csv" 2>&1 | tee "$RUN/bench_divergence.log" | tail -4

step "trainers on CUDA: reward model, then GRPO and PPO (the built-in tiny runs, 30 steps each)"
mkdir -p "$RUN/trainers"
for kind in rm grpo ppo; do
  extra=(); [ $kind = ppo ] && extra=(--reward-model /tmp/fa-runs/rm)
  timeout 150 python3 -m fastalign train $kind --model tiny --device cuda --no-progress \
    --output /tmp/fa-runs/$kind --overwrite "${extra[@]}" 2>&1 | tee "$RUN/trainers/$kind.log" | tail -1
  cp /tmp/fa-runs/$kind/metrics.jsonl "$RUN/trainers/${kind}_metrics.jsonl" 2>/dev/null
done

step "one GRPO step beside TRL's GRPOTrainer: G=8 x 512 tokens, V=128256, tiny model"
timeout 240 python3 bench/bench_grpo_step.py --device cuda --repeats 2 \
  --csv "$RUN/grpo_step_cuda.csv" 2>&1 | tee "$RUN/bench_grpo_step.log" | tail -5

step "TRL's DPO and GRPO steps, unpatched (TRL's Triton head) beside fastalign.integrations.trl"
timeout 240 python3 bench/bench_trl_step.py --device cuda --steps dpo grpo --repeats 2 \
  --csv "$RUN/trl_step_cuda.csv" 2>&1 | tee "$RUN/bench_trl_step.log" | tail -6

GPUS=$(nvidia-smi -L | wc -l)
if [ "$GPUS" -ge 2 ]; then  # several GPUs: DDP beside FSDP2 on all of them (nccl)
  step "one DPO step on $GPUS GPUs, DDP beside FSDP2: per-rank training state and peak memory"
  timeout 240 python3 bench/bench_distributed.py --device cuda --nproc "$GPUS" \
    --csv "$RUN/distributed_dpo_cuda.csv" 2>&1 | tee "$RUN/bench_distributed.log" | tail -4
fi

if [ "${FULL:-0}" = 1 ]; then  # FULL=1: the fused-linear tile sweep (~1.5 min)
  step "fused-linear tile sweep"
  timeout 90 python3 bench/tune_linear_logprobs.py --csv "$RUN/tune_linear_logprobs_cuda.csv" 2>&1 | tee "$RUN/tune_linear.log"
fi
if [ "${FULL:-0}" = 1 ]; then  # FULL=1: also the token_logprobs regression check (~1.5 min)
  step "log-probs from logits (regression check of the measured kernels)"
  timeout 150 python3 bench/bench_token_logprobs.py --device cuda --batch 8 --vocab 32768 128256 \
    --compile-vocab 128256 --csv "$RUN/token_logprobs_cuda.csv" --plot "$RUN/token_logprobs_cuda.png" \
    2>&1 | tee "$RUN/bench.log" | tail -3
fi
# The token_logprobs tile sweep (bench/tune_token_logprobs.py) chose today's defaults on an H200
# (bench/results/tune_token_logprobs_cuda.csv); rerun it by hand when those kernels change.

step "summary"
grep -E "passed|failed|error" "$RUN/tests.log" | tail -3
[ -f "$RUN/tune_linear.log" ] && grep -E "cuBLAS|best:" "$RUN/tune_linear.log"
tail -n 1 "$RUN"/trainers/*.log
tail -n 4 "$RUN/bench_grpo_step.log"
tail -n 3 "$RUN/bench_trl_step.log"
[ -f "$RUN/bench_distributed.log" ] && tail -n 3 "$RUN/bench_distributed.log"
[ -f "$RUN/bench_divergence.log" ] && tail -n 3 "$RUN/bench_divergence.log"
# The entry of fastalign.ops._backends.MEASURED_CUDA_MATMUL this run supports (tiles vs cuBLAS).
[ -f "$RUN/linear_logprobs_cuda.csv" ] && python3 bench/pick_cuda_matmul.py "$RUN/linear_logprobs_cuda.csv" \
  --capability "$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
for csv in linear_logprobs fused_dpo fused_grpo linear_kl token_logprobs; do
  [ -f "$RUN/${csv}_cuda.csv" ] && python3 bench/summarize.py "$RUN/${csv}_cuda.csv"
done
pack
