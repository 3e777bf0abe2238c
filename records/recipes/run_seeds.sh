#!/usr/bin/env bash
# Three seeds of a preset on 8xH100, then the record folder with submission.json and the significance test.
# The record folder gets logs/<RUN_ID>.packed.py: the packed script whose bytes the runs counted (CODE_PACK=1).
#   AUTHOR=... GITHUB_ID=... bash records/recipes/run_seeds.sh pr585 [REFERENCE_BPB=1.1179,1.1183,1.1175]
# Extra env vars override the preset: NUM_LAYERS=12 AUTHOR=... GITHUB_ID=... bash records/recipes/run_seeds.sh pr585
set -euo pipefail
preset=${1:?usage: run_seeds.sh PRESET}
cd "$(dirname "$0")/../.."
for seed in 1337 42 2025; do
  PRESET=$preset SEED=$seed RUN_ID=${preset}_s$seed torchrun --standalone --nproc_per_node=8 train_gpt.py
done
python3 records/tools/submission.py logs/${preset}_s1337.txt logs/${preset}_s42.txt logs/${preset}_s2025.txt \
  --name "$preset recipe" --author "${AUTHOR:?set AUTHOR}" --github-id "${GITHUB_ID:?set GITHUB_ID}" \
  ${REFERENCE_BPB:+--reference-bpb "$REFERENCE_BPB"} \
  --script logs/${preset}_s1337.packed.py --out "records/track_10min_16mb/$(date +%Y-%m-%d)_$preset"
