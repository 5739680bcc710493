#!/usr/bin/env bash
# Reproduces docs/results/mind/: the same protocol as scripts/run_movielens_eval.sh on the MIND sample
# (2,000 news; all of its ~2.2k training pairs over ~520 notes and all ~270 test notes), SmolLM2-135M
# on a 2-core CPU, NoteLLM and NoteLLM without CSFT against SentenceBERT (zero-shot and fine-tuned on the
# same pairs) and the base LLM zero-shot, in one `notellm eval` run.
#
#   scripts/run_mind_eval.sh                            # from the repo root, venv active
#   DATA=/path/to/mind-small-sample scripts/run_mind_eval.sh
#
# Same CPU choices as the MovieLens run: lower 24 of 30 layers frozen and cached, LoRA r=16 on the top 6,
# content (the abstract) cut to 48 tokens, at most one epoch and 6 minutes of training per variant.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/mind-small-sample}
RUNS=${RUNS:-runs/mind}
OUT=${OUT:-docs/results/mind}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
mkdir -p "$RUNS" "$OUT"

COMMON=(--data "$DATA" --base smollm2 --seed 0
        --test-fraction 0.2
        --freeze-layers 24 --lora-r 16 --cache-path "$RUNS/frozen-cache.pt"
        --batch-size 16 --epochs 1 --lr 5e-4 --proj-lr 1e-3 --warmup-ratio 0.1
        --max-content-tokens 48 --checkpoint-every 25 --time-budget-min 6)

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
  --baselines --gen-notes 60 --out "$OUT"
t3=$(date +%s)
cp "$RUNS/notellm-a0/train_log.jsonl" "$OUT/train_log_notellm_a0.jsonl"
cp "$RUNS/notellm/train_log.jsonl" "$OUT/train_log_notellm.jsonl"
cat > "$OUT/wall_times.json" <<JSON
{"train_notellm_a0_s": $((t1 - t0)), "train_notellm_s": $((t2 - t1)), "eval_s": $((t3 - t2)), "total_s": $((t3 - t0))}
JSON
stage "done in $((t3 - t0)) s"
