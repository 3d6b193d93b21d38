#!/usr/bin/env bash
# Runs ON a VM, in the project directory (setup_vm.sh starts it over gcloud compute ssh): Python
# 3.11, .venv with the pinned dependencies plus jax[cuda12], then a check that jax sees the GPUs.
#
#   bash scripts/gcp/remote_setup.sh [--extras gpu,convert] [--gpus 8] [--dry-run]
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/gcp/common.sh
source scripts/gcp/common.sh  # run, die

EXTRAS=gpu,convert  # pyproject extras: gpu = jax[cuda12], convert = torch (writing .nemo);
#   gpu,test adds pytest, torch and transformers (gpu_check.sh)
GPUS=8      # devices jax must see
PYTHON=${PYTHON:-python3.11}  # the lock is resolved for 3.11; Ubuntu 22.04 ships 3.10

while (($#)); do
  case $1 in
    --extras) EXTRAS=${2:?--extras needs a value}; shift 2 ;;
    --gpus) GPUS=${2:?--gpus needs a value}; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) sed -n '2,5p' "$0"; exit 0 ;;
    *) die "unknown argument '$1'" ;;
  esac
done

final() {  # is $PYTHON a final release? (jammy's own 3.11 may be a release candidate, which
  # pip's Requires-Python >= 3.11 checks reject)
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info.releaselevel != "final")' 2> /dev/null
}
apt=(sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$PYTHON" "$PYTHON-venv")
if ! command -v "$PYTHON" > /dev/null; then
  run sudo apt-get update -q
  run "${apt[@]}"
fi
if [[ $DRY_RUN != 1 ]] && ! final; then
  echo "$PYTHON is not a final release: installing it from the deadsnakes PPA" >&2
  run sudo add-apt-repository -y ppa:deadsnakes/ppa
  run "${apt[@]}"
  final || die "$PYTHON is still not a final release: install Python 3.11 yourself"
fi
if [[ ! -x .venv/bin/python ]]; then
  run "$PYTHON" -m venv .venv
fi
run .venv/bin/pip install -q --disable-pip-version-check --upgrade pip
# requirements.lock pins everything the CPU install resolves; jax[cuda12] adds the CUDA plugin
# and NVIDIA's pip-packaged CUDA libraries (same jax version, libraries not pinned by the lock).
run .venv/bin/pip install -q --disable-pip-version-check -c requirements.lock -e ".[$EXTRAS]"
# JAX_PLATFORMS=cuda: fail here rather than fall back to the CPU silently.
run env JAX_PLATFORMS=cuda .venv/bin/python -c "import jax; d = jax.devices(); \
print(jax.__version__, d); assert len(d) == $GPUS and d[0].platform == \"gpu\", \"want $GPUS GPUs\""
