#!/usr/bin/env bash
# Reproduces docs/results/movielens/: NoteLLM and NoteLLM without CSFT trained on MovieLens
# (ml-latest-small) with SmolLM2-135M on a 2-core CPU, then evaluated against SentenceBERT
# (zero-shot and fine-tuned on the same pairs) and the base LLM zero-shot, in one `notellm eval` run.
#
#   scripts/run_movielens_eval.sh                       # from the repo root, venv active
#   DATA=/path/to/movielens-latest-small scripts/run_movielens_eval.sh
#
# CPU budget choices (see docs/results/README.md): training pairs restricted to 600 notes (~2.7k pairs,
# one epoch), test pool of 500 notes, embeddings + the lower 24 of 30 layers frozen and their outputs
# cached once per note (shared by both runs), LoRA r=16 on the top 6 layers, content cut to 48 tokens,
# at most 12 minutes of training per variant (BUDGET_MIN=... to change; one epoch is 169 steps).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/movielens-latest-small}
RUNS=${RUNS:-runs/movielens}
OUT=${OUT:-docs/results/movielens}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
mkdir -p "$RUNS" "$OUT"

COMMON=(--data "$DATA" --base smollm2 --seed 0
        --max-train-notes 600 --max-test-notes 500
        --freeze-layers 24 --lora-r 16 --cache-path "$RUNS/frozen-cache.pt"
        --batch-size 16 --epochs 1 --lr 5e-4 --proj-lr 1e-3 --warmup-ratio 0.1
        --max-content-tokens 48 --checkpoint-every 25 --time-budget-min "${BUDGET_MIN:-12}")

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
  --baselines --gen-notes 80 --out "$OUT"
t3=$(date +%s)
cp "$RUNS/notellm-a0/train_log.jsonl" "$OUT/train_log_notellm_a0.jsonl"
cp "$RUNS/notellm/train_log.jsonl" "$OUT/train_log_notellm.jsonl"
cat > "$OUT/wall_times.json" <<JSON
{"train_notellm_a0_s": $((t1 - t0)), "train_notellm_s": $((t2 - t1)), "eval_s": $((t3 - t2)), "total_s": $((t3 - t0))}
JSON
stage "done in $((t3 - t0)) s"
