#!/usr/bin/env bash
# Reproduces docs/results/mind/: the same protocol as scripts/run_movielens_eval.sh on the MIND sample
# (2,000 news; all of its ~2.2k training pairs over ~520 notes and all ~270 test notes), SmolLM2-135M
# on a 2-core CPU, NoteLLM and NoteLLM without CSFT against SentenceBERT (zero-shot and fine-tuned on the
# same pairs) and the base LLM zero-shot, in one `notellm eval` run.
#
#   scripts/run_mind_eval.sh                            # from the repo root, venv active
#   DATA=/path/to/mind-small-sample scripts/run_mind_eval.sh
#
# The recipe of scripts/run_amazon_eval.sh (scripts/eval-run.sh): lower 28 of 30 layers frozen and cached,
# LoRA r=32 on the top 2, content (the abstract) cut to 48 tokens, at most one epoch and 6 minutes of
# training per variant.
set -euo pipefail
DATA=${DATA:-../shared/data/mind-small-sample}
RUNS=${RUNS:-runs/mind}
OUT=${OUT:-docs/results/mind}
SPLIT_ARGS=(--test-fraction 0.2)
BUDGET_MIN=${BUDGET_MIN:-6}
GEN_NOTES=60
. "$(dirname "$0")/eval-run.sh"
