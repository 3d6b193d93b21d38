#!/usr/bin/env bash
# Copy a run's outputs (its workdir and the launch logs) from a VM to this machine with
# gcloud compute scp --recurse.
#
#   scripts/gcp/fetch_results.sh --zone us-central1-a                     # results/kd_log_dir + logs
#   scripts/gcp/fetch_results.sh --zone us-central1-a --path results/kd_log_dir/student.nemo
set -euo pipefail
# shellcheck source=scripts/gcp/common.sh
source "$(dirname "$0")/common.sh"

VM_INDEX=0
DEST=''
PATHS=()

usage() {
  cat << EOF
Usage: $(basename "$0") --zone ZONE [options]

Copies each PATH (relative to ~/REMOTE_DIR on the VM) into DEST/. Without --path: the tutorial's
workdir results/kd_log_dir (metrics.jsonl, tensorboard/, checkpoints/, exports) and logs/.
Orbax checkpoints of the 2B student are ~30 GB each: name smaller paths to skip them.

Options (or the environment variable in brackets):
  --path PATH   remote path to copy, repeatable; default results/kd_log_dir and logs
  --dest DIR    local directory; default runs/gcp/PREFIX-I (runs/ is git-ignored)
  --vm I        which VM to copy from; default 0 (process 0 writes the outputs)
$COMMON_HELP
EOF
}

while (($#)); do
  case $1 in
    --path) need_value "$@"; PATHS+=("$2"); shift 2 ;;
    --dest) need_value "$@"; DEST=$2; shift 2 ;;
    --vm) need_value "$@"; VM_INDEX=$2; shift 2 ;;
    *)
      common_opt "$@"
      shift "$SHIFT_BY" ;;
  esac
done
check_common
if ! [[ $VM_INDEX =~ ^[0-9]+$ ]] || ((VM_INDEX >= NUM_VMS)); then
  die "--vm $VM_INDEX: not one of the $NUM_VMS VM(s) (0-based; pass --vms N for more)"
fi
vm=${VMS[$VM_INDEX]}
if ((${#PATHS[@]} == 0)); then
  PATHS=(results/kd_log_dir logs)
fi
DEST=${DEST:-$REPO_ROOT/runs/gcp/$vm}

run mkdir -p "$DEST"
# Each path is tried: a run that stopped before its workdir existed still has its logs.
missed=()
for path in "${PATHS[@]}"; do
  run gcloud compute scp --recurse "${GCLOUD_FLAGS[@]}" "$vm:$REMOTE_DIR/${path%/}" "$DEST/" ||
    missed+=("$path")
done
if ((${#missed[@]})); then
  die "could not copy ${missed[*]} from $vm (see above); the other paths are in $DEST"
fi
