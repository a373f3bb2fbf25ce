#!/usr/bin/env bash
# The GPU dress rehearsal, from the repository root, in at most 5 minutes (the step limits below add
# up to 295 s), so that a 15-minute lease can run it twice:
#   bash benchmarks/gpu_wheels.sh                 # here, once: the wheels the GPU machine lacks, into .whl/
#   bash benchmarks/gpu_check.sh [--cpu] [DIR]    # there: results in $OUT when set, else DIR (runs/gpu_check)
# It uses python3 and the machine's own torch (2.11 or newer), unpacks from .whl/ only the wheels
# whose package is missing (openai-clip, ftfy, wcwidth, POT, setuptools for pkg_resources), and
# stops at the first failing step with that step's exit code. Without CUDA (or with --cpu) it
# skips the CUDA steps and runs the rest small (CLIP tiny), so that it can be tried anywhere.
# Steps: the CUDA tests; the new tests (shared prefixes, bf16, parallel clients) on this torch;
# every method's step (ms, peak memory) at VOC's and COCO's class counts in fp32 and bf16
# (step_time.py); CPU-vs-CUDA logits of one fixed state (device_parity.py); one short VOC-sized
# cell end to end with --parallel-clients 2 in bf16; that GPU-trained run resumed for one more
# round and evaluated on the CPU. At most 8 small files in the results folder: gpu_check.md (the
# summary), steps.log (every step's output), step_time.md/.json, parity.json, cell_metrics.json.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=cuda
if [ "${1:-}" = "--cpu" ]; then MODE=cpu; shift; fi
RESULTS=${OUT:-${1:-runs/gpu_check}}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fedmpt-gpu-check.XXXXXX")  # images, runs, the feature store: not sent back
trap 'rm -rf "$WORK"' EXIT
export FEDMPT_CACHE="$WORK/cache" MPLBACKEND=Agg
LOG="$RESULTS/steps.log" SUMMARY="$RESULTS/gpu_check.md"
: > "$LOG"
echo "# GPU dress rehearsal, $(date -u +%Y-%m-%dT%H:%MZ), $(git describe --always --dirty 2>/dev/null || echo 'no git')" > "$SUMMARY"
START=$SECONDS

step() {  # step NAME SECONDS COMMAND...: under a time limit, output to steps.log; a failure ends the rehearsal
  local name=$1 limit=$2 code=0 began=$SECONDS
  shift 2
  echo "== $name (at most ${limit} s)" | tee -a "$LOG"
  timeout "$limit" "$@" >> "$LOG" 2>&1 || code=$?
  if [ "$code" -ne 0 ]; then
    echo "- **$name: FAILED, exit $code** after $((SECONDS - began)) s (timeout gives 124); the end of steps.log:" >> "$SUMMARY"
    { echo '```'; tail -n 25 "$LOG"; echo '```'; } >> "$SUMMARY"
    tail -n 25 "$LOG"
    exit "$code"
  fi
  echo "- $name: ok, $((SECONDS - began)) s" >> "$SUMMARY"
}

missing_wheels() {  # unpack the wheels of the packages this python3 lacks into $WORK/deps
  mkdir -p "$WORK/deps"
  for pair in openai-clip:openai_clip ftfy:ftfy wcwidth:wcwidth POT:POT; do
    if ! (cd / && python3 -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "${pair%%:*}") 2>/dev/null; then
      wheel=$(ls .whl/"${pair#*:}"-*.whl 2>/dev/null | head -n 1) || true
      [ -n "$wheel" ] || { echo "${pair%%:*} is missing and .whl/ has no wheel of it: run bash benchmarks/gpu_wheels.sh first"; return 2; }
      python3 -m zipfile -e "$wheel" "$WORK/deps" && echo "unpacked $wheel"
    fi
  done
  if ! (cd / && python3 -c "import pkg_resources") 2>/dev/null; then
    python3 -m zipfile -e .whl/setuptools-*.whl "$WORK/deps" && echo "unpacked setuptools (pkg_resources)"
  fi
}

export PYTHONPATH="$WORK/deps${PYTHONPATH:+:$PYTHONPATH}" WORK
export -f missing_wheels
step "missing wheels" 5 bash -c missing_wheels
step "environment" 10 python3 -c "import sys, torch, clip, ftfy
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())
assert tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2]) >= (2, 11), 'torch 2.11 or newer'"
if [ "$MODE" = cuda ] && ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  MODE=cpu; echo "no CUDA device visible: the CUDA steps are skipped" | tee -a "$LOG"
fi
echo "- mode: $MODE; $(python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__)')" >> "$SUMMARY"
if [ "$MODE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$LOG" | sed 's/^/- GPU: /' >> "$SUMMARY"
  CLIP=(--clip ViT-B/16 --random-init --device cuda) STEP=(--steps 3) IMAGES=(--trainval 320 --test 160)
  step "CUDA tests" 55 python3 -m pytest -q -x -p no:cacheprovider -k cuda tests/test_ot.py tests/test_faults.py
else
  echo "- CUDA tests, CUDA step times, CPU-vs-CUDA logits: skipped (no CUDA)" >> "$SUMMARY"
  CLIP=(--clip tiny --device cpu) STEP=(--clip tiny --steps 1 --methods fedmpt fed-dualcoop --datasets voc2007) IMAGES=(--trainval 64 --test 32)
fi
step "new tests on this torch" 30 python3 -m pytest -q -x -p no:cacheprovider -m "not slow" \
  tests/test_speed.py tests/test_client.py tests/test_precision.py
step "step times" 75 python3 benchmarks/step_time.py "${STEP[@]}" --out "$RESULTS/step_time.md"
if [ "$MODE" = cuda ]; then
  step "CPU-vs-CUDA logits" 30 python3 benchmarks/device_parity.py --out "$RESULTS/parity.json"
fi
step "VOC-sized images" 10 python3 benchmarks/voc_like.py "$WORK/voc" "${IMAGES[@]}"
step "one cell end to end, --parallel-clients 2, bf16" 40 python3 federate.py --dataset voc2007 --root "$WORK/voc" \
  "${CLIP[@]}" --rounds 2 --clients 2 --parallel-clients 2 --precision bf16 --out "$WORK/cell"
step "resumed and evaluated on the CPU" 40 env CUDA_VISIBLE_DEVICES= bash -c \
  "python3 federate.py --resume '$WORK/cell' --rounds 3 --device cpu && python3 predict.py --run '$WORK/cell' --evaluate"
cp "$WORK/cell/metrics.json" "$RESULTS/cell_metrics.json"
python3 - "$RESULTS" >> "$SUMMARY" <<'PY'
import json, sys
rows = json.load(open(f"{sys.argv[1]}/cell_metrics.json"))
print("\n| round | mAP | seconds |\n|---:|---:|---:|")
for row in rows:
    print(f"| {row['round']} | {row['mAP']:.2f} | {row['seconds']:.1f} |")
print("\nRounds 1-2 trained with the mode's device, round 3 resumed on the CPU.\n")
PY
{ echo; cat "$RESULTS/step_time.md"; } >> "$SUMMARY"
echo "- total: $((SECONDS - START)) s" >> "$SUMMARY"
cat "$SUMMARY"
