#!/usr/bin/env bash
# Shared body of scripts/run_movielens_eval.sh and scripts/run_mind_eval.sh (sourced, not run):
# train NoteLLM without CSFT (alpha=0) and NoteLLM (alpha=1) with the same CPU choices, then one
# `notellm eval --baselines` run; copy the training logs and wall times next to the results.
# The caller sets DATA, RUNS, OUT, SPLIT_ARGS (array), BUDGET_MIN and GEN_NOTES.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
mkdir -p "$RUNS" "$OUT"

# The recipe of scripts/run_amazon_eval.sh (docs/results/amazon/README.md says which lever bought what):
# lower 28 layers frozen and cached, LoRA r 32 (lr 1e-3) on the top 2, projection whitened (lr 1e-2),
# temperature from scale 5 (lr 1e-2), logQ + known-positive masking, 32 pairs a step, a 10 % cold-start
# holdout, the held-out curve every 20 steps; NoteLLM with CSFT weight 1.
COMMON=(--data "$DATA" --base smollm2 --seed 0 "${SPLIT_ARGS[@]}" --cold-fraction 0.1
        --freeze-layers 28 --lora-r 32 --cache-path "$RUNS/frozen-cache.pt" --proj-init whiten
        --batch-size 32 --epochs 1 --lr 1e-3 --proj-lr 1e-2 --tau-lr 1e-2 --warmup-ratio 0.05
        --max-content-tokens 48 --checkpoint-every 25 --time-budget-min "$BUDGET_MIN"
        --eval-every 20 --eval-notes 300 --eval-pairs 512 --threads 2 --no-progress)

stage() { echo "=== $(date -u +%FT%TZ) $*"; }
t0=$(date +%s)
stage "train NoteLLM w/o CSFT (alpha=0)"
notellm train "${COMMON[@]}" --alpha 0 --out "$RUNS/notellm-a0"
t1=$(date +%s)
stage "train NoteLLM (alpha=1)"
notellm train "${COMMON[@]}" --alpha 1 --out "$RUNS/notellm"
t2=$(date +%s)
stage "eval"
notellm eval --data "$DATA" --model "NoteLLM w/o CSFT=$RUNS/notellm-a0" --model "NoteLLM=$RUNS/notellm" \
  --baselines --gen-notes "$GEN_NOTES" --no-progress --out "$OUT"
t3=$(date +%s)
cp "$RUNS/notellm-a0/train_log.jsonl" "$OUT/train_log_notellm_a0.jsonl"
cp "$RUNS/notellm/train_log.jsonl" "$OUT/train_log_notellm.jsonl"
for v in notellm notellm-a0; do
  cp "$RUNS/$v/curves.jsonl" "$OUT/curves_${v//-/_}.jsonl"
  cp "$RUNS/$v/curves.png" "$OUT/curves_${v//-/_}.png"
done
cat > "$OUT/wall_times.json" <<JSON
{"train_notellm_a0_s": $((t1 - t0)), "train_notellm_s": $((t2 - t1)), "eval_s": $((t3 - t2)), "total_s": $((t3 - t0))}
JSON
stage "done in $((t3 - t0)) s"
