#!/usr/bin/env bash
# The whole pipeline on the embedded demo images, on CPU, in about a minute.
# Random-init teacher and tiny random student: this shows the plumbing, not medicine.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-demo}
DATA=(--data examples/demo/train.json --image-root examples/demo/images)

# Stage one: the real UniMed-CLIP B/16 architecture, random weights (flagged in the cache).
"$BIN/medalign-cache" build --teacher unimed --random-init "${DATA[@]}" --cache "$OUT/cache" --batch-size 8
"$BIN/medalign-cache" info --cache "$OUT/cache"
"$BIN/medalign-cache" verify --cache "$OUT/cache" --teacher unimed --random-init --image-root examples/demo/images --samples 2

# Stage two: a tiny random LLaVA student (4 decoder layers: distil at layer 2), targets from the cache.
# Three ablations from the same cache, no teacher run: both losses; no attention loss;
# the softmax-KL attention loss. Flags override the config files.
TRAIN=(--cache "$OUT/cache" --teacher unimed --student tiny "${DATA[@]}" --layer 2 --max-steps 30
       --batch-size 4 --grad-accum 1 --lr 1e-3 --save-every 10)
rm -rf "$OUT/runs"
"$BIN/medalign-distill" run "${TRAIN[@]}" --out "$OUT/runs/demo"
"$BIN/medalign-distill" run "${TRAIN[@]}" --out "$OUT/runs/no-attn" --config examples/ablations/no-attention.json --quiet
"$BIN/medalign-distill" run "${TRAIN[@]}" --out "$OUT/runs/softmax-kl" --config examples/ablations/softmax-kl.json --quiet

# Evaluate the trained runs and the untouched base model on held-out images, compare, look.
TEST=(--data examples/demo/test.json --image-root examples/demo/images)
for run in demo no-attn softmax-kl; do
    "$BIN/medalign-distill" eval --run "$OUT/runs/$run" "${TEST[@]}" --quiet
done
"$BIN/medalign-distill" eval --run "$OUT/runs/demo" --base-only "${TEST[@]}" --quiet
"$BIN/medalign-distill" compare "$OUT"/runs/* --out "$OUT/ablations.md" --csv "$OUT/ablations.csv"
"$BIN/medalign-distill" pictures --run "$OUT/runs/demo" "${DATA[@]}" --n 3 --out "$OUT/runs/demo/pictures"
"$BIN/medalign-cache" show --cache "$OUT/cache" --teacher unimed --image-root examples/demo/images \
    --key ct_thorax_axial.png --key mni_axial_z10.png --out "$OUT/show.png"
echo "run directories: $OUT/runs/{demo,no-attn,softmax-kl} (config.json, metrics.jsonl, loss_curves.png, adapter/, alignment/, eval/); table: $OUT/ablations.md; pictures: $OUT/runs/demo/pictures"
