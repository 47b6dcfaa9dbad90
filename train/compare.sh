#!/usr/bin/env bash
# The loss comparison of docs/results.md: same backbone, seed, split and budget for every recipe,
# evaluated on the 48 held-out identities (never trained on). Usage: bash train/compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
FG=.venv/bin/facegate
CROPS=${CROPS:-data/celeba-crops}
RUNS=${RUNS:-runs/cmp}
EPOCHS=${EPOCHS:-4}
COMMON=(--set data.root="$CROPS" --set data.teacher="$CROPS/teacher_dlib.npz" --set train.epochs="$EPOCHS")
DISTILL=(--set loss.distill.enabled=true --set loss.distill.weight=10 --set loss.distill.direct=10 --set loss.head_weight=0.1 --set loss.uss.weight=0.1)

# The crops docs/results.md was measured on: ArcFace template from the 68-point landmarks, with
# the CNN fallback (prepare's defaults then; the 68-point model is non-commercial, see docs/pipeline.md).
[ -f "$CROPS/crops.csv" ] || $FG prepare ../shared/data/celeba-subset/identities.csv "$CROPS" --teacher dlib \
  --geometry arcface_template --size 112 --landmarks 68 --cnn-fallback

train_and_evaluate() {  # NAME CONFIG [extra overrides...]
  local name=$1 config=$2; shift 2
  # --resume: an interrupted run continues from its last checkpoint instead of starting over
  [ -f "$RUNS/$name/summary.json" ] || $FG train "$config" --out "$RUNS/$name" --quiet --resume \
    --set name="$name" "${COMMON[@]}" "$@"
  $FG evaluate "$RUNS/$name/checkpoint_last.pt" "$CROPS" --identities "$RUNS/$name/split.json" \
    --out "$RUNS/$name/eval"
}

train_and_evaluate cosface configs/cosface.yaml
train_and_evaluate arcface configs/arcface.yaml
train_and_evaluate cosface_uss configs/cosface_uss.yaml
train_and_evaluate cosface_discface configs/cosface_discface.yaml
train_and_evaluate cosface_uss_tcm configs/cosface_uss_tcm.yaml
train_and_evaluate cosface_uss_distill configs/cosface_uss.yaml "${DISTILL[@]}"

# Reference: dlib's pretrained ResNet (the teacher) on exactly the same held-out pairs.
mkdir -p "$RUNS/dlib_resnet_pretrained"
$FG evaluate "$CROPS/teacher_dlib.npz" "$CROPS" --identities "$RUNS/cosface/split.json" \
  --out "$RUNS/dlib_resnet_pretrained/eval"

.venv/bin/python -m facegate.train.comparison \
  "$RUNS"/{cosface,arcface,cosface_uss,cosface_discface,cosface_uss_tcm,cosface_uss_distill,dlib_resnet_pretrained} \
  --roc docs/figures/roc_comparison.png | tee "$RUNS/table.md"
