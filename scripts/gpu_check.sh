#!/usr/bin/env bash
# One-shot GPU check for a bare CUDA host: no SGLang, no FlashInfer, nothing installed or
# fetched, the repo not pip-installed (PYTHONPATH=<repo>). About 2 minutes on one H200 (step
# limits add up to about 7 minutes):
#   1. nvidia-smi -L
#   2. python3 -m pytest -q tests/gpu                       (FlashInfer tests skip without it)
#   3. python3 -m lsa_sglang.bench kernels     --json OUTDIR/kernels-<device>.json
#   4. python3 -m lsa_sglang.bench decode-loop --json OUTDIR/decode-loop-<device>.json
#   5. python3 -m lsa_sglang.bench planning --device cuda --json OUTDIR/planning-<device>.json (seconds)
# Every step has a time limit; a failing step does not stop the next ones, but the script
# exits non-zero if any failed. Everything is logged to OUTDIR/gpu_check.log and a summary
# table is printed at the end.
#
#   scripts/gpu_check.sh [OUTDIR]            OUTDIR: first argument, else $OUT, else bench/results
#   scripts/gpu_check.sh --smoke [OUTDIR]    CPU form for CI: no nvidia-smi/pytest, tiny benches
set -o pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD

SMOKE=0
OUTDIR=""
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    -*) echo "gpu_check: unknown option $arg" >&2; exit 2 ;;
    *) [ -z "$OUTDIR" ] && OUTDIR=$arg ;;
  esac
done
OUTDIR=${OUTDIR:-${OUT:-bench/results}}
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
LOG=$OUTDIR/gpu_check.log
: > "$LOG"

PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ "$SMOKE" = 0 ]; then
  unset TRITON_INTERPRET  # compiled Triton on the GPU
fi

log() { echo "$*" | tee -a "$LOG"; }

HAVE_TIMEOUT=0
command -v timeout >/dev/null 2>&1 && HAVE_TIMEOUT=1

NAMES=() STATUS=() SECS=() FILES=()
FAILED=0

# run_step NAME LIMIT_S OUTPUT_FILE CMD...
run_step() {
  local name=$1 limit=$2 file=$3
  shift 3
  local t0=$SECONDS rc status
  log ""
  log "=== [$name] $* (limit ${limit}s) $(date -u +%H:%M:%S)"
  if [ "$HAVE_TIMEOUT" = 1 ]; then
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
  else
    "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
  fi
  if [ "$rc" = 0 ]; then
    status=ok
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    status="TIMEOUT"
    FAILED=$((FAILED + 1))
  else
    status="FAIL($rc)"
    FAILED=$((FAILED + 1))
  fi
  if [ -n "$file" ] && [ ! -s "$file" ]; then
    file="$file (missing)"
  fi
  log "=== [$name] $status in $((SECONDS - t0)) s"
  NAMES+=("$name") STATUS+=("$status") SECS+=("$((SECONDS - t0))") FILES+=("${file:--}")
}

skip_step() {
  NAMES+=("$1") STATUS+=("skipped") SECS+=("0") FILES+=("-")
  log "=== [$1] skipped: $2"
}

T_START=$SECONDS
log "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) smoke=$SMOKE outdir=$OUTDIR"
log "repo $ROOT commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import platform
print("python", platform.python_version())
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("device", torch.cuda.get_device_name(0), f"{p.total_memory / 2**30:.1f} GiB", p.multi_processor_count, "SMs")
except Exception as e:
    print("torch: not importable:", e)
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
for name in ("flashinfer", "sglang"):
    try:
        __import__(name)
        print(name, "importable")
    except Exception:
        print(name, "absent")
EOF

DEVICE=$("$PY" - 2>/dev/null <<EOF
import platform, re
raw = "cpu-" + platform.machine()
if not $SMOKE:
    try:
        import torch
        if torch.cuda.is_available():
            raw = torch.cuda.get_device_name(0)
    except Exception:
        pass
print(re.sub(r"[^a-z0-9_]+", "-", raw.lower()).strip("-"))
EOF
)
DEVICE=${DEVICE:-unknown}
log "device id: $DEVICE"

if [ "$SMOKE" = 1 ]; then
  skip_step nvidia-smi "smoke"
  skip_step pytest-gpu "smoke"
  run_step kernels 120 "$OUTDIR/kernels-$DEVICE.json" \
    "$PY" -m lsa_sglang.bench kernels --batch 1 2 --context 1024 --budget 256 --iters 2 --layers 2 --copy-chunks 2 \
    --threads 1 --json "$OUTDIR/kernels-$DEVICE.json"
  run_step decode-loop 180 "$OUTDIR/decode-loop-$DEVICE.json" \
    "$PY" -m lsa_sglang.bench decode-loop --smoke --json "$OUTDIR/decode-loop-$DEVICE.json"
  run_step planning 120 "$OUTDIR/planning-$DEVICE.json" \
    "$PY" -m lsa_sglang.bench planning --batch 8 --context 1024 --reps 5 --json "$OUTDIR/planning-$DEVICE.json"
else
  run_step nvidia-smi 30 "" nvidia-smi -L
  run_step pytest-gpu 150 "" "$PY" -m pytest -q -ra -p no:cacheprovider tests/gpu
  run_step kernels 60 "$OUTDIR/kernels-$DEVICE.json" \
    "$PY" -m lsa_sglang.bench kernels --json "$OUTDIR/kernels-$DEVICE.json"
  run_step decode-loop 160 "$OUTDIR/decode-loop-$DEVICE.json" \
    "$PY" -m lsa_sglang.bench decode-loop --time-budget-s 110 --json "$OUTDIR/decode-loop-$DEVICE.json"
  run_step planning 30 "$OUTDIR/planning-$DEVICE.json" \
    "$PY" -m lsa_sglang.bench planning --device cuda --json "$OUTDIR/planning-$DEVICE.json"
fi

log ""
log "=== summary ($((SECONDS - T_START)) s, log $LOG)"
log "$(printf '%-14s %-10s %6s  %s' step status seconds output)"
for i in "${!NAMES[@]}"; do
  log "$(printf '%-14s %-10s %6s  %s' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}" "${FILES[$i]}")"
done
if [ -s "$OUTDIR/decode-loop-$DEVICE.json" ]; then
  "$PY" - "$OUTDIR/decode-loop-$DEVICE.json" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
d = json.load(open(sys.argv[1]))
c = d.get("correctness") or {}
print(f"decode-loop: correctness ok={c.get('ok')}; skipped configs: {len(d.get('skipped', []))}")
for s in d.get("summary", []):
    r = s.get("tokens_per_s_ratio_lsa_over_dense")
    w = s.get("tokens_per_s_ratio_with_weights_est")
    print(f"  context {s['context']}: dense batch {s['dense_batch']} {s.get('dense_tokens_per_s', float('nan')):.0f} tok/s,"
          f" lsa batch {s['lsa_batch']} {s.get('lsa_tokens_per_s', float('nan')):.0f} tok/s,"
          f" ratio {'-' if r is None else f'{r:.2f}x'} (with weights est {'-' if w is None else f'{w:.2f}x'}),"
          f" lsa stall {s.get('lsa_stall_frac', float('nan')):.1%}")
EOF
fi
if [ "$FAILED" -gt 0 ]; then
  log "gpu_check: $FAILED step(s) failed"
  exit 1
fi
log "gpu_check: all steps passed"
exit 0
