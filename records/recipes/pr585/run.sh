#!/usr/bin/env bash
# PR #585 recipe: three seeds on 8xH100 from the repository root, then the submission folder.
# Extra env vars on the command line override the preset, e.g. NUM_LAYERS=12 bash records/recipes/pr585/run.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."
for seed in 1337 42 2025; do
  PRESET=pr585 SEED=$seed RUN_ID=pr585_s$seed torchrun --standalone --nproc_per_node=8 train_gpt.py
done
python3 records/tools/submission.py logs/pr585_s1337.txt logs/pr585_s42.txt logs/pr585_s2025.txt \
  --name "pr585 recipe" --author "${AUTHOR:?set AUTHOR}" --github-id "${GITHUB_ID:?set GITHUB_ID}" \
  --script train_gpt.py --out "records/track_10min_16mb/$(date +%Y-%m-%d)_pr585"
