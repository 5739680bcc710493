#!/usr/bin/env bash
# Shared body of scripts/run_movielens_eval.sh and scripts/run_mind_eval.sh (sourced, not run):
# train NoteLLM without CSFT (alpha=0) and NoteLLM (alpha=0.01) with the same CPU choices, then one
# `notellm eval --baselines` run; copy the training logs and wall times next to the results.
# The caller sets DATA, RUNS, OUT, SPLIT_ARGS (array), BUDGET_MIN and GEN_NOTES.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
mkdir -p "$RUNS" "$OUT"

COMMON=(--data "$DATA" --base smollm2 --seed 0 "${SPLIT_ARGS[@]}"
        --freeze-layers 24 --lora-r 16 --cache-path "$RUNS/frozen-cache.pt"
        --batch-size 16 --epochs 1 --lr 5e-4 --proj-lr 1e-3 --warmup-ratio 0.1
        --max-content-tokens 48 --checkpoint-every 25 --time-budget-min "$BUDGET_MIN")

stage() { echo "=== $(date -u +%FT%TZ) $*"; }
t0=$(date +%s)
stage "train NoteLLM w/o CSFT (alpha=0)"
notellm train "${COMMON[@]}" --alpha 0 --out "$RUNS/notellm-a0"
t1=$(date +%s)
stage "train NoteLLM (alpha=0.01)"
notellm train "${COMMON[@]}" --alpha 0.01 --out "$RUNS/notellm"
t2=$(date +%s)
stage "eval"
notellm eval --data "$DATA" --model "NoteLLM w/o CSFT=$RUNS/notellm-a0" --model "NoteLLM=$RUNS/notellm" \
  --baselines --gen-notes "$GEN_NOTES" --out "$OUT"
t3=$(date +%s)
cp "$RUNS/notellm-a0/train_log.jsonl" "$OUT/train_log_notellm_a0.jsonl"
cp "$RUNS/notellm/train_log.jsonl" "$OUT/train_log_notellm.jsonl"
cat > "$OUT/wall_times.json" <<JSON
{"train_notellm_a0_s": $((t1 - t0)), "train_notellm_s": $((t2 - t1)), "eval_s": $((t3 - t2)), "total_s": $((t3 - t0))}
JSON
stage "done in $((t3 - t0)) s"
