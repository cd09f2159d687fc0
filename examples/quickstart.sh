#!/usr/bin/env bash
# MedAlign in a few minutes on a CPU, with numbers that move for a reason you can see.
#
# Synthetic scans with lesions, and an expert teacher that was really trained: a tiny CLIP
# (the `tiny` teacher's vision tower) taught on the scans' reports of its own, so its
# attention does point at lesions (about 4x chance). A tiny random LLaVA student learns the
# questions twice from the same cache: plain LoRA (baseline) and LoRA + MedAlign's two
# losses. Then: evaluate both (answers, and how much of the student's attention falls on
# the lesion, from the lesion masks), compare, and draw where each one looks.
# What it shows and what it does not: README.md, "Quick start"; the 3-seed, 4-configuration
# version with its statistics: examples/grounding/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-quickstart}
STEPS=${STEPS:-800}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # two trainings side by side, one core each
rm -rf "$OUT"

# 1. data (400 train / 100 test scans, VQA + reports + lesion masks), the teacher, its cache (~1 min)
"$BIN/python" examples/grounding/run.py --prepare-only --out "$OUT"
DATA=(--data "$OUT/data/train.json" --image-root "$OUT/data/images")
TEST=(--data "$OUT/data/test.json" --image-root "$OUT/data/images")

# 2. the same student, the same cache, twice: baseline (alpha = beta = 0) and MedAlign (1, 1)
#    (the settings of examples/grounding: LoRA r 16, layer 2 of 4, 800 steps of 16, lr 5e-3)
TRAIN=(--cache "$OUT/cache" --teacher tiny --student tiny "${DATA[@]}" --layer 2 --lora-r 16 --lora-alpha 32
       --lora-dropout 0 --lr 5e-3 --warmup-ratio 0.05 --batch-size 16 --grad-accum 1 --max-steps "$STEPS"
       --save-every 1000000 --workers 0 --quiet)
"$BIN/medalign-distill" run "${TRAIN[@]}" --alpha 0 --beta 0 --out "$OUT/runs/baseline" &
"$BIN/medalign-distill" run "${TRAIN[@]}" --alpha 1 --beta 1 --out "$OUT/runs/medalign" &
wait

# 3. answers and grounding on the held-out scans; one table; pictures
for run in baseline medalign; do
    "$BIN/medalign-distill" eval --run "$OUT/runs/$run" "${TEST[@]}" --masks "$OUT/data/masks.npz" \
        --max-new-tokens 24 --batch-size 32 --workers 0 --no-meteor --quiet
done
"$BIN/medalign-distill" compare "$OUT"/runs/* --out "$OUT/table.md"
"$BIN/medalign-distill" pictures --run "$OUT/runs/medalign" "${TEST[@]}" --n 4 --out "$OUT/pictures"
echo "table: $OUT/table.md (grounding = share of the student's attention on the lesion; chance = lesion area)"
echo "pictures: $OUT/pictures/attention.png (teacher vs student before/after), loss curves, t-SNE"
