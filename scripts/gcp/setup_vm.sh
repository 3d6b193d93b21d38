#!/usr/bin/env bash
# Prepare each VM for jkd over gcloud compute ssh: wait for the NVIDIA driver (nvidia-smi), copy
# this checkout (or clone a repository), make .venv with the pinned dependencies + jax[cuda12]
# (scripts/gcp/remote_setup.sh on the VM), and check that jax sees 8 GPUs.
#
#   scripts/gcp/setup_vm.sh --zone us-central1-a                  # jkd-0, copy of this checkout
#   scripts/gcp/setup_vm.sh --zone us-central1-a --vms 2 --dry-run
#   scripts/gcp/setup_vm.sh --zone us-central1-a --clone https://github.com/ORG/jkd --ref main
set -euo pipefail
# shellcheck source=scripts/gcp/common.sh
source "$(dirname "$0")/common.sh"

CLONE_URL=${CLONE_URL:-}
CLONE_REF=${CLONE_REF:-}
EXTRAS=${EXTRAS:-gpu,convert}
GPUS_PER_VM=${GPUS_PER_VM:-8}
TARBALL=${TARBALL:-${TMPDIR:-/tmp}/jkd-src.tgz}

usage() {
  cat << EOF
Usage: $(basename "$0") --zone ZONE [options]

For each VM: wait for nvidia-smi, copy the project to ~/REMOTE_DIR, build .venv, check the GPUs.
By default the copy is this checkout's files as git sees them (tracked + untracked, minus
.gitignore: no .venv, caches or run outputs), packed into one tarball and sent with
gcloud compute scp; reruns overwrite the sources and keep .venv, models/, data/ and results/.

Options (or the environment variable in brackets):
  --clone URL        git clone URL on the VM instead of copying this checkout [CLONE_URL]
  --ref REF          branch, tag or commit to check out after --clone [CLONE_REF]
  --extras E         pyproject extras to install; default gpu,convert (jax[cuda12], and torch
                     for the .nemo a tutorial run writes at its end); gpu,test adds pytest and
                     transformers for scripts/gpu_check.sh [EXTRAS]
  --gpus N           GPUs jax must see on each VM; default 8 [GPUS_PER_VM]
$COMMON_HELP
EOF
}

while (($#)); do
  case $1 in
    --clone) need_value "$@"; CLONE_URL=$2; shift 2 ;;
    --ref) need_value "$@"; CLONE_REF=$2; shift 2 ;;
    --extras) need_value "$@"; EXTRAS=$2; shift 2 ;;
    --gpus) need_value "$@"; GPUS_PER_VM=$2; shift 2 ;;
    *)
      common_opt "$@"
      shift "$SHIFT_BY" ;;
  esac
done
check_common
if [[ -n $CLONE_REF && -z $CLONE_URL ]]; then
  die "--ref needs --clone URL"
fi
dir=$(quote "$REMOTE_DIR")

if [[ -z $CLONE_URL ]]; then
  # One tarball for all VMs. --ignore-failed-read: files deleted but still tracked are skipped.
  root=$(quote "$REPO_ROOT")
  run bash -c "set -o pipefail; git -C $root ls-files -z -c -o --exclude-standard | tar -C $root --null -T - --ignore-failed-read -czf $(quote "$TARBALL")"
fi

for vm in "${VMS[@]}"; do
  echo "== $vm" >&2
  # A fresh Deep Learning VM may still be installing its driver: wait up to 10 minutes.
  # shellcheck disable=SC2016  # $i and $(seq) expand on the VM
  ssh_run "$vm" 'for i in $(seq 1 30); do nvidia-smi && exit 0; echo "waiting for the NVIDIA driver ($i/30)"; sleep 20; done; echo "nvidia-smi failed: no working NVIDIA driver" >&2; exit 1'
  if [[ -z $CLONE_URL ]]; then
    run gcloud compute scp "${GCLOUD_FLAGS[@]}" "$TARBALL" "$vm:jkd-src.tgz"
    ssh_run "$vm" "mkdir -p $dir && tar -xzf jkd-src.tgz -C $dir && rm jkd-src.tgz"
  else
    clone="if [ ! -d $dir/.git ]; then git clone $(quote "$CLONE_URL") $dir; fi"
    # A branch, tag or commit (--ref), else origin's default branch: whatever origin has now,
    # checked out detached (a pull would fail on the detached HEAD an earlier --ref left)
    clone+=" && git -C $dir fetch origin $(quote "${CLONE_REF:-HEAD}") && git -C $dir checkout --detach FETCH_HEAD"
    ssh_run "$vm" "$clone"
  fi
  ssh_run "$vm" "cd $dir && bash scripts/gcp/remote_setup.sh --extras $(quote "$EXTRAS") --gpus $(quote "$GPUS_PER_VM")"
done
