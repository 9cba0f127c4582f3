#!/usr/bin/env bash
# GPU check: the family matrix and the speed benchmark on a CUDA GPU in bf16, and — when the machine
# has two GPUs or more — the same runs spread over two GPUs (--device-map auto) and sharded across
# two processes (torchrun), whose summaries must equal the one-process run's.
#
#   scripts/gpu_check.sh [OUT_DIR]          (default: runs/gpu-check/<date>-<time>)
#
# Environment: PYTHON (default .venv/bin/python, else python3) must have mmke installed with a
# CUDA build of torch; CASES (default 3) cases per run; METHODS (default "ft-lm ft-vision ike
# t-patcher grace"); FAMILIES (default: every tiny family); DTYPE (default bf16).
# Writes into OUT_DIR: hardware.txt (date, GPUs, driver, versions), one log per step, the runs'
# summary.json files, bench_families.json and SUMMARY.md (PASS/FAIL per step). Exits 2 without a
# CUDA GPU, 1 if any step failed, 0 otherwise. Copy SUMMARY.md's table into docs/RESULTS.md.
set -u -o pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=${1:-runs/gpu-check/$(date +%Y%m%d-%H%M%S)}
CASES=${CASES:-3}
METHODS=${METHODS:-"ft-lm ft-vision ike t-patcher grace"}
DTYPE=${DTYPE:-bf16}

# ---- a GPU, or a clear stop -------------------------------------------------------------------
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null)
if [ -z "$NGPU" ]; then
  echo "gpu_check: cannot run $PY with torch (set PYTHON to an interpreter with mmke and a CUDA torch)" >&2
  exit 2
fi
if [ "$NGPU" -lt 1 ]; then
  echo "gpu_check: no CUDA GPU visible to torch ($("$PY" -c 'import torch; print(torch.__version__)'));" \
       "this check needs one (the CPU suite covers the code paths: scripts/test.sh)" >&2
  exit 2
fi
FAMILIES=${FAMILIES:-$("$PY" -c "from mmke.models.tiny import TINY_FAMILIES; print(' '.join(TINY_FAMILIES))")}

mkdir -p "$OUT/ckpt" "$OUT/runs" "$OUT/logs"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(uname -srm)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
  "$PY" -c "import torch, transformers, mmke, platform; print(f'python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, mmke {mmke.__version__}')"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
  echo "gpus visible: $NGPU; dtype $DTYPE; cases per run $CASES"
} > "$OUT/hardware.txt"
cat "$OUT/hardware.txt"

RESULTS=()
FAILED=0
step() {  # step NAME COMMAND...: run, log, record PASS/FAIL with its wall time
  local name=$1; shift
  local log="$OUT/logs/$name.log" t0=$SECONDS rc
  echo "== $name"
  "$@" > "$log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then RESULTS+=("| $name | PASS | $((SECONDS - t0)) s |")
  else RESULTS+=("| $name | FAIL (rc $rc, logs/$name.log) | $((SECONDS - t0)) s |"); FAILED=1; tail -5 "$log"; fi
}

# ---- 1. the CPU test matrix of the families (same code, this machine's libraries) --------------
step pytest-families env MMKE_QUIET=1 "$PY" -m pytest -q -x tests/test_families.py tests/test_prefix_sharing.py \
  tests/test_precision.py

# ---- 2. every family x method on one GPU in bf16, through the command line ----------------------
for fam in $FAMILIES; do
  step "save-$fam" "$PY" -c "from mmke.models.tiny import save_tiny; save_tiny('$fam', '$OUT/ckpt/$fam')"
  for m in $METHODS; do
    step "1gpu-$fam-$m" "$PY" -m mmke run --model "hf:$OUT/ckpt/$fam" --method "$m" --limit "$CASES" \
      --device cuda --dtype "$DTYPE" --out "$OUT/runs/1gpu/$fam-$m"
  done
done
step "1gpu-default-ike" "$PY" -m mmke run --model default --method ike --set image_first=false --limit "$CASES" \
  --device cuda --dtype "$DTYPE" --out "$OUT/runs/1gpu/default-ike"

# ---- 3. the benchmark on the GPU -----------------------------------------------------------------
step bench-families "$PY" benchmarks/bench_families.py --device cuda --dtype "$DTYPE" --cases "$CASES" \
  --threads 4 --families $FAMILIES default --methods $METHODS --out "$OUT/bench_families.json"

# ---- 4. two GPUs: one model spread over both, and two model replicas (torchrun) -----------------
same_metrics() {  # same_metrics A/summary.json B/summary.json: the five metrics agree
  "$PY" - "$1" "$2" <<'EOF'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
ma, mb = a["metrics"], b["metrics"]
bad = {k: (ma[k], mb.get(k)) for k in ma if abs(ma[k] - (mb.get(k) if mb.get(k) is not None else 1e9)) > 1e-9}
print("metrics", ma)
if bad:
    sys.exit(f"summaries differ: {bad}")
EOF
}
if [ "$NGPU" -ge 2 ]; then
  for fam in $FAMILIES; do
    for m in ft-lm ike; do
      step "map-$fam-$m" "$PY" -m mmke run --model "hf:$OUT/ckpt/$fam" --method "$m" --limit "$CASES" \
        --device-map auto --dtype "$DTYPE" --out "$OUT/runs/map/$fam-$m"
      step "torchrun-$fam-$m" "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 -m mmke run \
        --model "hf:$OUT/ckpt/$fam" --method "$m" --limit "$((2 * CASES))" --dtype "$DTYPE" \
        --out "$OUT/runs/torchrun/$fam-$m"
      step "one-process-$fam-$m" "$PY" -m mmke run --model "hf:$OUT/ckpt/$fam" --method "$m" \
        --limit "$((2 * CASES))" --device cuda --dtype "$DTYPE" --out "$OUT/runs/one-process/$fam-$m"
      step "same-summary-$fam-$m" same_metrics "$OUT/runs/one-process/$fam-$m/summary.json" \
        "$OUT/runs/torchrun/$fam-$m/summary.json"
    done
  done
else
  RESULTS+=("| two-GPU runs (--device-map auto, torchrun) | not run: $NGPU GPU visible | |")
fi

{
  echo "# GPU check, $(head -1 "$OUT/hardware.txt" | cut -d' ' -f2)"
  echo
  sed 's/^/    /' "$OUT/hardware.txt"
  echo
  echo "| step | result | wall |"
  echo "|---|---|---|"
  printf '%s\n' "${RESULTS[@]}"
} > "$OUT/SUMMARY.md"
echo "wrote $OUT/SUMMARY.md"
exit $FAILED
