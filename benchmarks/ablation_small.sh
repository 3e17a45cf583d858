#!/usr/bin/env bash
# Table III analogue on the small preset: LTC and DSSL switched on/off, each its own training run with the same
# step budget, then zero-shot evaluation on MVTec AD bottle and evaluation on the held-out test splits of the
# three training datasets (in-domain; same caps as benchmarks/compare_small_musc.py). Usage:
#   bash benchmarks/ablation_small.sh RIAD_DIR OUT_DIR [STEPS]
# RIAD_DIR: the VMAD-small training build (see src/vmad/weights/small/README.md). "w/o LTC" swaps the LTC
# projector for average pooling to the same 144 tokens, so every variant feeds the LLM the same token count.
# Re-running skips the runs whose final weights exist and the evaluations whose results.json exists; an
# interrupted training run resumes from its last checkpoint.
set -euo pipefail
riad=$1; out=$2; steps=${3:-60}
vmad=${VMAD:-.venv/bin/vmad}
data=../shared/data
declare -A variants=(
  [both]=""
  [no_dssl]="--set train.dssl=false"
  [no_ltc]="--set model.projector.kind=avgpool"
  [neither]="--set train.dssl=false --set model.projector.kind=avgpool"
)
# eval folder name -> "dataset path under ../shared/data" and --max-per-class (0 = all images)
evals=("eval_bottle mvtec_ad/bottle 0" "eval_mpdd_metal_plate mpdd_metal_plate 0"
       "eval_magnetic_tile magnetic_tile 140" "eval_neu_seg neu_seg 150")
for name in both no_dssl no_ltc neither; do
  run="$out/$name"
  if [[ ! -f "$run/final/config.json" ]]; then
    # shellcheck disable=SC2086
    $vmad train configs/vmad_small.yaml --set data.root="$riad" --set train.max_steps="$steps" \
      --set train.save_every=50 --set output_dir="$run" --no-progress --resume ${variants[$name]}
  fi
  for spec in "${evals[@]}"; do
    read -r folder set cap <<<"$spec"
    [[ -f "$run/$folder/results.json" ]] && continue
    limit=(); [[ $cap != 0 ]] && limit=(--max-per-class "$cap")
    $vmad eval --model "$run/final" --data "$data/$set" --out "$run/$folder" --no-progress "${limit[@]}"
  done
done
