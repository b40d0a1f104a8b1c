#!/usr/bin/env bash
# benchmarks/gpu.sh: every GPU measurement of issue 16 in one command, for a lent H100/H200 (<= 8 min).
#
# Steps (each under its own timeout, each writing its own JSON, so one failure does not lose the rest):
#   env         env.json         GPU, driver, package versions
#   matmul      matmul.json      the card's MEASURED dense bf16 rate: a jitted 8192^3 bf16 matmul (MFU denominator)
#   parity      parity.json      whole-model parity at full size (Sam3Config(), 1008 px) vs transformers'
#                                Sam3Model on the GPU, fp32 and bf16 (bounds of tests/test_parity.py), compile
#                                time and peak memory of each jalias forward
#   throughput  throughput.json  benchmarks/throughput.py --config full: torch-seed, torch-opt (bf16 autocast +
#                                SDPA), jalias fp32 / bf16; setup/compile (warmup) seconds, peak memory, stages
#   summary     summary.json     MFU of jalias fp32/bf16 vs the measured bf16 rate; the targets (>= 50x torch-seed,
#                                >= 3x torch-opt, >= 40% bf16 MFU); which steps passed / timed out
# plus gpu_log.txt (every step's output). 7 files: the device tool returns at most 8.
#
# PREPARATION (here, on the dev box, once; the GPU machine cannot download and its image has neither ftfy nor
# pycocotools), in the repository root:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl ftfy==6.3.1 wcwidth==0.7.0 pycocotools==2.0.11
#
# (.whl/ is git-ignored; 1.3 MB.) Then, with the device tool:
#   run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=600)
# Results land in $OUT (the device tool's output folder) or in the folder given as --out DIR (default
# benchmarks/out/gpu). WHEELS=DIR picks another wheel folder (benchmarks/wheels is also looked at).
#
# Dry run anywhere (CPU, < 3 min): SMALL=1 bash benchmarks/gpu.sh   (or: bash benchmarks/gpu.sh --dry-run)
# runs the same steps at tiny sizes (tiny configs, 1024^3 matmul); the wheels are only needed where ftfy or
# pycocotools cannot be imported.
#
# Environment knobs: T_TOTAL (default 475 s; the whole script's deadline), T_MATMUL, T_PARITY, T_THROUGHPUT
# (per-step caps, each also cut to what is left of T_TOTAL), TP_ARGS (throughput.py's size arguments).
set -u

SMALL=${SMALL:-0}
OUTDIR=${OUT:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run|--small) SMALL=1 ;;
    --out) OUTDIR=$2; shift ;;
    -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown argument $1 (use --dry-run, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
OUTDIR=${OUTDIR:-benchmarks/out/gpu}
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_log.txt"
: > "$LOG"
START=$(date +%s)
T_TOTAL=${T_TOTAL:-475}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# jax and torch share the GPU in one process: no jax preallocation of 75% of the card
export XLA_PYTHON_CLIENT_PREALLOCATE=false
SMALLFLAG=""
if [ "$SMALL" = 1 ]; then SMALLFLAG="--small"; fi

say() { echo "[gpu.sh $(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG" >&2; }

# ---- wheels: ftfy (+ wcwidth) and pycocotools, only where they are missing -----------------------------------
if ! "$PY" -c "import ftfy, pycocotools" 2>/dev/null; then
  WHEELS=${WHEELS:-}
  if [ -z "$WHEELS" ]; then
    for d in .whl benchmarks/wheels; do
      if ls "$d"/ftfy-*.whl >/dev/null 2>&1; then WHEELS=$d; break; fi
    done
  fi
  missing=""
  for n in ftfy wcwidth pycocotools; do
    ls "${WHEELS:-.whl}"/$n-*.whl >/dev/null 2>&1 || missing="$missing $n"
  done
  if [ -n "$missing" ]; then
    say "ERROR: ftfy/pycocotools are not importable here and no wheels were found for:$missing"
    say "  looked in: ${WHEELS:-.whl and benchmarks/wheels}. Prepare them on the dev box (see the top of this script):"
    say "  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl ftfy==6.3.1 wcwidth==0.7.0 pycocotools==2.0.11"
    say "  and pass carry=[\".whl\"] to the device tool."
    exit 3
  fi
  say "installing carried wheels from $WHEELS into /tmp/site"
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$WHEELS"/*.whl >>"$LOG" 2>&1; then
    say "ERROR: pip could not install the wheels in $WHEELS (wrong Python version or platform?): see $LOG"
    exit 3
  fi
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import jalias, jalias.tokenizer, jalias.data.coco" >>"$LOG" 2>&1; then
  say "ERROR: jalias does not import with this Python ($("$PY" -V 2>&1)): see $LOG"
  exit 4
fi

# ---- steps --------------------------------------------------------------------------------------------------
STATUS="$OUTDIR/status.json"
echo "{}" > "$STATUS"
record() {  # step rc seconds
  "$PY" - "$STATUS" "$1" "$2" "$3" <<'EOF'
import json, sys
p, step, rc, sec = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
d = json.load(open(p))
d[step] = {"rc": rc, "seconds": sec, "result": "ok" if rc == 0 else ("timeout" if rc in (124, 137) else "failed")}
json.dump(d, open(p, "w"), indent=1)
EOF
}
step() {  # name cap command...
  local name=$1 cap=$2; shift 2
  local left=$(( T_TOTAL - ($(date +%s) - START) ))
  local t=$(( cap < left ? cap : left ))
  if [ "$t" -lt 10 ]; then
    say "skip $name: ${left}s left of T_TOTAL=${T_TOTAL}s"
    record "$name" 125 0
    return
  fi
  say "step $name (timeout ${t}s): $*"
  local s0=$(date +%s)
  timeout --kill-after=10 "$t" "$@" >>"$LOG" 2>&1
  local rc=$?
  record "$name" "$rc" $(( $(date +%s) - s0 ))
  say "step $name: rc=$rc after $(( $(date +%s) - s0 ))s"
}

if [ "$SMALL" = 1 ]; then
  TP_DEFAULT="--config tiny --candidates 64 --images 2 --seed-candidates 8 --repeats 2"
else
  TP_DEFAULT="--config full --candidates 256 --images 4 --seed-candidates 8 --repeats 2"
fi
TP_ARGS=${TP_ARGS:-$TP_DEFAULT}

step env 30 "$PY" benchmarks/gpu_steps.py env "$OUTDIR/env.json" $SMALLFLAG
step matmul "${T_MATMUL:-45}" "$PY" benchmarks/gpu_steps.py matmul "$OUTDIR/matmul.json" $SMALLFLAG
step parity "${T_PARITY:-140}" "$PY" benchmarks/gpu_steps.py parity "$OUTDIR/parity.json" $SMALLFLAG
step throughput "${T_THROUGHPUT:-290}" "$PY" benchmarks/throughput.py $TP_ARGS --json "$OUTDIR/throughput.json"
T_TOTAL=$(( T_TOTAL + 30 )) step summary 30 "$PY" benchmarks/gpu_steps.py summary "$OUTDIR" $SMALLFLAG
say "done in $(( $(date +%s) - START ))s; results in $OUTDIR: $(ls "$OUTDIR" | tr '\n' ' ')"
