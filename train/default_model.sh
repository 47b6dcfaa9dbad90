#!/usr/bin/env bash
# Rebuild models/default from the shared CelebA photos: prepare -> train -> export -> evaluate.
# Usage: make default-model   (CPU: see docs/model-card.md for the measured run time)
set -euo pipefail
cd "$(dirname "$0")/.."
FG=.venv/bin/facegate
SRC=${SRC:-../shared/data/celeba-subset/identities.csv}
CROPS=${CROPS:-data/celeba-crops}
RUN=${RUN:-runs/default}
OUT=${OUT:-models/default}
start=$(date +%s)

# 1. Detect + align every photo once (resumable), with dlib's descriptors as the distillation teacher.
$FG prepare "$SRC" "$CROPS" --teacher dlib

# 2. Train the default recipe on all 248 identities, from scratch.
rm -rf "$RUN"
$FG train configs/default.yaml --out "$RUN" --quiet \
  --set data.root="$CROPS" --set data.teacher="$CROPS/teacher_dlib.npz"

# 3. Export to an ONNX bundle with parity checks; the threshold is the learned USS t.
rm -rf "$OUT.new"
$FG export onnx "$RUN/checkpoint_last.pt" "$OUT.new" --name facegate-default \
  --version "$(date +%Y.%m.%d)" --simplify
rm -rf "$OUT" && mv "$OUT.new" "$OUT"
echo "default model rebuilt in $(( $(date +%s) - start )) s -> $OUT"
