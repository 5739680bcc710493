#!/usr/bin/env bash
# Reproduces docs/results/movielens/: NoteLLM and NoteLLM without CSFT trained on MovieLens
# (ml-latest-small) with SmolLM2-135M on a 2-core CPU, then evaluated against SentenceBERT
# (zero-shot and fine-tuned on the same pairs) and the base LLM zero-shot, in one `notellm eval` run.
#
#   scripts/run_movielens_eval.sh                       # from the repo root, venv active
#   DATA=/path/to/movielens-latest-small scripts/run_movielens_eval.sh
#
# CPU budget choices (see docs/results/README.md): training pairs restricted to 600 notes (~2.7k pairs,
# one epoch), test pool of 500 notes, 10 % of the notes held out of training (cold start), embeddings +
# the lower 28 of 30 layers frozen and their outputs cached once per note (shared by both runs), LoRA r=32
# on the top 2 layers (the recipe of scripts/run_amazon_eval.sh, in scripts/eval-run.sh), content cut to
# 48 tokens, at most one epoch or 12 minutes of training per variant (BUDGET_MIN=... to change).
set -euo pipefail
DATA=${DATA:-../shared/data/movielens-latest-small}
RUNS=${RUNS:-runs/movielens}
OUT=${OUT:-docs/results/movielens}
SPLIT_ARGS=(--max-train-notes 600 --max-test-notes 500)
BUDGET_MIN=${BUDGET_MIN:-12}
GEN_NOTES=80
. "$(dirname "$0")/eval-run.sh"
