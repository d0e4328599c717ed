#!/usr/bin/env bash
# docs/results.md and docs/results.json from scratch: the default run and MMSearch-R1's two ablations (no search
# penalty; no search-free questions in training), each with seeds 0 and 1, then the collector. The warm start is
# built by the first launch (~10 min, cached in .forage_cache/) and shared by all six; each launch then takes
# ~10-15 minutes on a 2-core machine. Usage: scripts/reproduce_results.sh [OUT_ROOT] [SEEDS...]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh cpu
out="${1:-runs/results}"
shift || true
seeds=("${@:-0 1}")
read -r -a seeds <<< "${seeds[*]}"
declare -A preset=([default]="" [no_penalty]="+experiment=no_penalty" [no_search_free]="+experiment=no_search_free")
args=()
for variant in default no_penalty no_search_free; do
  for seed in "${seeds[@]}"; do
    dir="$out/$variant-s$seed"
    if [ ! -f "$dir/report.json" ]; then
      rm -rf "$dir"
      .venv/bin/python launch.py ${preset[$variant]} run.seed="$seed" run.out_dir="$dir"
    fi
    args+=(--run "$variant=$dir")
  done
  args+=(--command "$variant=python launch.py ${preset[$variant]} run.seed=SEED run.out_dir=$out/$variant-sSEED")
done
notes=()
[ -f docs/results_notes.md ] && notes=(--notes docs/results_notes.md)  # the written observations, kept by hand
.venv/bin/python -m launcher.results "${args[@]}" "${notes[@]}" --out docs
