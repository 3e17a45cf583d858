#!/usr/bin/env bash
# Table III analogue on the small preset: LTC and DSSL switched on/off, each its own training run with the same
# step budget, then zero-shot evaluation on MVTec AD bottle. Usage:
#   bash benchmarks/ablation_small.sh RIAD_DIR OUT_DIR [STEPS]
# RIAD_DIR: the VMAD-small training build (see src/vmad/weights/small/README.md). "w/o LTC" swaps the LTC
# projector for average pooling to the same 144 tokens, so every variant feeds the LLM the same token count.
set -euo pipefail
riad=$1; out=$2; steps=${3:-60}
vmad=${VMAD:-.venv/bin/vmad}
declare -A variants=(
  [both]=""
  [no_dssl]="--set train.dssl=false"
  [no_ltc]="--set model.projector.kind=avgpool"
  [neither]="--set train.dssl=false --set model.projector.kind=avgpool"
)
for name in both no_dssl no_ltc neither; do
  # shellcheck disable=SC2086
  $vmad train configs/vmad_small.yaml --set data.root="$riad" --set train.max_steps="$steps" \
    --set train.save_every="$steps" --set output_dir="$out/$name" --no-progress ${variants[$name]}
  $vmad eval --model "$out/$name/final" --data ../shared/data/mvtec_ad/bottle --out "$out/$name/eval_bottle" \
    --no-progress
done
