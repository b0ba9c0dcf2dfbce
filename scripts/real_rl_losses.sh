#!/usr/bin/env bash
# GRPO on SmolLM2-135M-Instruct (make real) with today's RL losses side by side, two seeds each:
# the default clipped surrogate (loss_type grpo), CISPO, SAPO, and the default loss on rollouts
# sampled from a bf16 copy of the policy, with token-level truncated importance sampling (TIS,
# arm bf16-tis) and without any correction (arm bf16, the mismatch left as it is).
# Each run logs its held-out verifier scores before and after training; logs and metrics.jsonl
# land in bench/results/real_model/rl-<arm>-<seed>.*; docs/real_model.md has the table.
#
#   scripts/real_rl_losses.sh [RUNS_DIR] [ARM ...]     (default: runs, every arm; PYTHON: the
#   interpreter, default .venv/bin/python; SEEDS: default "0 1"; ITERATIONS: optimizer updates
#   per batch of rollouts, default 1: the ratio is then exactly 1 at every update, where SAPO's
#   gradient equals the clipped surrogate's; with 2 the second update is off-policy, runs named
#   rl-<arm>-it2-<seed>)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs}
shift || true
arms=("$@")
[ ${#arms[@]} -gt 0 ] || arms=(grpo cispo sapo bf16-tis bf16)
results=bench/results/real_model
mkdir -p "$results" "$runs"

common=(--model smollm2 --prompts arithmetic --rewards correct_answer,answer_format
        --reward-weights 1,0.5 --lora-r 16 --learning-rate 3e-4 --lr-schedule constant
        --batch-size 4 --num-generations 8 --max-new-tokens 48 --temperature 0.7
        --max-steps 10 --overwrite --no-progress --num-iterations "${ITERATIONS:-1}")
suffix=$([ "${ITERATIONS:-1}" = 1 ] || echo "-it${ITERATIONS}")

for seed in ${SEEDS:-0 1}; do
  for arm in "${arms[@]}"; do
    case $arm in
      grpo) extra=(--loss-type grpo) ;;
      cispo) extra=(--loss-type cispo) ;;
      sapo) extra=(--loss-type sapo) ;;
      bf16-tis) extra=(--loss-type grpo --rollout-dtype bf16 --rollout-correction token_truncate) ;;
      bf16) extra=(--loss-type grpo --rollout-dtype bf16) ;;
      *) echo "unknown arm $arm (grpo, cispo, sapo, bf16-tis, bf16)" >&2; exit 2 ;;
    esac
    name=rl-$arm$suffix-$seed
    echo "== $name"
    ( set -x; time "${PYTHON:-.venv/bin/python}" -m fastalign train grpo "${common[@]}" \
        "${extra[@]}" --seed "$seed" --output "$runs/$name" ) > "$results/$name.log" 2>&1
    cp "$runs/$name/metrics.jsonl" "$results/$name.metrics.jsonl"
    grep "held-out" "$results/$name.log" | tail -1
  done
done
