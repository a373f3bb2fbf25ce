#!/usr/bin/env bash
# The GPU dress rehearsal (at most about 8 minutes on one H100/H200: every step has a timeout),
# from the repository root:
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# 1. the CUDA tests; 2. Table 5's step times on CUDA (benchmarks/step_time.py); 3. one round of
# every method at ViT-B/16 (random init) on a generated VOC-size dataset (2,000 JPEGs of
# 500 x 375 in the VOC layout) through the feature store, the second method onwards reading the
# store. One table out: OUT_DIR/gpu_check.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
mkdir -p "$OUT"
export FEDMPT_CACHE="$OUT/cache"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

echo "== 1. CUDA tests"
timeout 90 python -m pytest -q -k "cuda" tests 2>&1 | tail -5 | tee "$OUT/cuda_tests.txt"

echo "== 2. step times on CUDA"
timeout 100 python benchmarks/step_time.py --device cuda --steps 5 --out "$OUT/step_time.md" | tail -20

echo "== 3. one round of every method, VOC-size data, ViT-B/16"
[ -f "$OUT/voc/VOCdevkit/VOC2007/ImageSets/Main/test.txt" ] || timeout 60 python benchmarks/voc_like.py "$OUT/voc" --trainval 1000 --test 1000
{
  echo "| method | mAP | round seconds | encoded images | wall seconds |"
  echo "|---|---:|---:|---:|---:|"
} > "$OUT/rounds.md"
for method in fedmpt fed-poscoop fed-dualcoop fedtpg fed-maple fedmvp fed-ram; do
  start=$(date +%s)
  rm -rf "$OUT/runs/$method"
  timeout 40 python federate.py --dataset voc2007 --root "$OUT/voc" --clip ViT-B/16 --random-init \
    --device cuda --method "$method" --rounds 1 --clients 2 --out "$OUT/runs/$method" > "$OUT/$method.log" 2>&1
  code=$?
  wall=$(( $(date +%s) - start ))
  python - "$OUT" "$method" "$code" "$wall" >> "$OUT/rounds.md" <<'PY'
import json, sys
out, method, code, wall = sys.argv[1:]
try:
    assert code == "0"
    history = json.load(open(f"{out}/runs/{method}/metrics.json"))
    config = json.load(open(f"{out}/runs/{method}/config.json"))
    print(f"| {method} | {history[-1]['mAP']:.2f} | {history[-1]['seconds']:.1f} | {config['encoded_images']} | {wall} |")
except (AssertionError, OSError, ValueError, KeyError, IndexError):
    print(f"| {method} | failed (exit {code}, see {out}/{method}.log) | | | {wall} |")
PY
done
{ cat "$OUT/gpu.txt"; echo; cat "$OUT/cuda_tests.txt"; echo; cat "$OUT/step_time.md"; echo; cat "$OUT/rounds.md"; } > "$OUT/gpu_check.md"
cat "$OUT/gpu_check.md"
