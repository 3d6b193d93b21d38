#!/usr/bin/env bash
# Runs scripts/gpu_check.sh on a lent GPU machine that has no network, from the bundle that
# scripts/gpu_bundle.sh built (it copies this file in as DIR/run.sh): installs DIR/whl into
# /tmp/site (first on PYTHONPATH, so its pinned versions win over the image's), points
# JKD_CACHE at DIR/cache, prints nvidia-smi and the versions in use, then runs the check with
# step limits that sum to 515 s (540 s if every step ignored its SIGTERM), so install, check
# and copies end inside one 600 s call. The step logs and this run's whole output land flat
# in $OUT (what the device call sends back, at most 8 files); the check's own folder (the smoke
# workdir) stays on the machine.
#
#   bash .device/run.sh               # one device call, from the repository root,
#                                     # carry [".device"], timeout_s 600
#   bash .device/run.sh --dry-run     # print the commands only
#   T_SMOKE=200 bash .device/run.sh --skip bench_train   # --skip goes to gpu_check.sh
#
# Exit status: gpu_check.sh's (non-zero if a step failed), or 2 if the bundle is unusable.
set -euo pipefail
BUNDLE=$(cd "$(dirname "$0")" && pwd)
[[ -f scripts/gpu_check.sh ]] || { echo "$0: run from the repository root" >&2; exit 2; }
# shellcheck source=scripts/gcp/common.sh
source scripts/gcp/common.sh  # run, cmdline, die, need_value

RESULTS=${OUT:-/tmp/jkd/gpu_bundle}     # $OUT: the device call's folder that comes back
CHECK_DIR=${CHECK_DIR:-/tmp/jkd/gpu_check}  # gpu_check.sh --out: logs and the smoke workdir
SITE=${SITE:-/tmp/site}
HOST_PYTHON=${HOST_PYTHON:-python3}     # the image's Python 3.12 (with torch and CUDA jax)
# gpu_check.sh's step limits in seconds (its defaults sum to 600): 515 here.
T_DEVICES=${T_DEVICES:-25}
T_BENCH_TRAIN=${T_BENCH_TRAIN:-150}  # 1.1B: torch's column, then jkd's compile and 13 steps
T_PYTEST=${T_PYTEST:-115}
T_BENCH_LOSS=${T_BENCH_LOSS:-105}  # part (a) compiles 9 programs at V=256000
T_SMOKE=${T_SMOKE:-120}  # 75-87 s on 2 CPU cores, a whole run from the bundle
STEPS=(devices bench_train pytest bench_loss smoke)  # gpu_check.sh's logs, STEP.log
CHECK_ARGS=()

usage() {
  cat << EOF
Usage: $(basename "$0") [--skip STEP]... [--dry-run]

From the repository root, in the bundle scripts/gpu_bundle.sh built ($BUNDLE):
installs whl/ into SITE, sets PYTHONPATH=SITE, JKD_CACHE=$BUNDLE/cache, JAX_PLATFORMS=cuda,
runs scripts/gpu_check.sh --out CHECK_DIR (limits T_DEVICES=$T_DEVICES T_BENCH_TRAIN=$T_BENCH_TRAIN
T_PYTEST=$T_PYTEST T_BENCH_LOSS=$T_BENCH_LOSS T_SMOKE=$T_SMOKE), and copies into \$OUT:
run.log (all of this output) and gpu_check-STEP.log for each step that ran.

Options:
  --skip STEP   passed to gpu_check.sh (repeatable)
  --dry-run     print the commands, run nothing [DRY_RUN=1]
  -h, --help    this text

Environment: OUT (default /tmp/jkd/gpu_bundle), CHECK_DIR (default /tmp/jkd/gpu_check),
SITE (default /tmp/site), HOST_PYTHON (default python3), the T_* limits above.
EOF
}

while (($#)); do
  case $1 in
    --skip) need_value "$@"; CHECK_ARGS+=(--skip "$2"); shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
shopt -s nullglob
wheels=("$BUNDLE"/whl/*.whl)
((${#wheels[@]})) || die "no wheels in $BUNDLE/whl: build the bundle with scripts/gpu_bundle.sh \
and run its copy of this script (bash .device/run.sh)"
[[ -d $BUNDLE/cache ]] || die "no $BUNDLE/cache: build the bundle with scripts/gpu_bundle.sh"
if [[ $DRY_RUN != 1 ]]; then
  PY=$(command -v "$HOST_PYTHON") || die "$HOST_PYTHON not found"
else
  PY=$HOST_PYTHON
fi

# name==version of each wheel, from its file name (NAME-VERSION-TAGS.whl).
pins=()
for w in "${wheels[@]}"; do
  f=${w##*/}
  rest=${f#*-}
  pins+=("${f%%-*}==${rest%%-*}")
done

main() {
  echo "== bundle: ${#wheels[@]} wheels, cache $BUNDLE/cache" >&2
  run nvidia-smi || true
  run rm -rf "$SITE"
  # main runs left of || below, where bash ignores set -e: each failure must return itself.
  run "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" ||
    { echo "gpu_bundle_run: installing the bundle's wheels failed: the bundle is unusable" >&2
      return 2; }
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  export JKD_CACHE=$BUNDLE/cache
  export JAX_PLATFORMS=cuda  # no silent fall-back to the CPU: a step fails instead
  export PYTHONUNBUFFERED=1
  echo "+ export $(cmdline "PYTHONPATH=$PYTHONPATH" "JKD_CACHE=$JKD_CACHE" \
    "JAX_PLATFORMS=$JAX_PLATFORMS" "PYTHONUNBUFFERED=$PYTHONUNBUFFERED")"
  # The versions imported: each bundled one must win over the image's.
  run "$PY" scripts/gpu_bundle.py versions "${pins[@]}" || true
  # XLA aborts on a flag it does not know, and scripts/gcp/xla_flags.sh is checked against the
  # pinned jaxlib, not the image's: probe once, and check without the flags (said) if one fails.
  if [[ $DRY_RUN != 1 ]]; then
    local probe
    if ! probe=$(bash -c 'source scripts/gcp/xla_flags.sh && "$0" -c "import jax; jax.devices()"' \
      "$PY" 2>&1) && grep -qi 'unknown flag' <<< "$probe"; then
      echo "gpu_bundle_run: this jaxlib does not know a flag of scripts/gcp/xla_flags.sh;" \
        "checking without them (JKD_XLA_FLAGS_OFF=1):" >&2
      grep -i 'unknown flag' <<< "$probe" >&2
      export JKD_XLA_FLAGS_OFF=1
    fi
  fi
  local rc=0 s
  if [[ $DRY_RUN != 1 ]]; then  # an earlier call's logs (a warm machine) are not this one's
    for s in "${STEPS[@]}"; do rm -f "$CHECK_DIR/$s.log"; done
  fi
  run env PYTHON="$PY" "T_DEVICES=$T_DEVICES" "T_PYTEST=$T_PYTEST" "T_BENCH_LOSS=$T_BENCH_LOSS" \
    "T_BENCH_TRAIN=$T_BENCH_TRAIN" "T_SMOKE=$T_SMOKE" bash scripts/gpu_check.sh \
    --out "$CHECK_DIR" ${CHECK_ARGS[@]+"${CHECK_ARGS[@]}"} || rc=$?
  if [[ $DRY_RUN != 1 ]]; then
    for s in "${STEPS[@]}"; do
      if [[ -f $CHECK_DIR/$s.log ]]; then
        cp "$CHECK_DIR/$s.log" "$RESULTS/gpu_check-$s.log"
      fi
    done
    echo "gpu_bundle_run: logs in $RESULTS: $(cd "$RESULTS" && echo ./*)"
  fi
  return "$rc"
}

if [[ $DRY_RUN == 1 ]]; then
  main
  exit 0
fi
mkdir -p "$RESULTS"
rc=0
main 2>&1 | tee "$RESULTS/run.log" || rc=$?
exit "$rc"
