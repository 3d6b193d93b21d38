#!/usr/bin/env bash
# Create N GCP A3 High VMs (a3-highgpu-8g: 8x H100 80GB) for jkd, named PREFIX-0 .. PREFIX-(N-1).
#
#   scripts/gcp/create_vm.sh --zone us-central1-a                 # one on-demand VM, jkd-0
#   scripts/gcp/create_vm.sh --zone us-central1-a --vms 2 --spot  # jkd-0, jkd-1 as Spot VMs
#   scripts/gcp/create_vm.sh --zone us-central1-a --dry-run       # print the gcloud command only
set -euo pipefail
# shellcheck source=scripts/gcp/common.sh
source "$(dirname "$0")/common.sh"

MACHINE_TYPE=${MACHINE_TYPE:-a3-highgpu-8g}
# A3 machine types come with their GPUs attached; the flag states them explicitly (it must match
# the machine type). ACCELERATOR='' leaves it out.
ACCELERATOR=${ACCELERATOR-type=nvidia-h100-80gb,count=8}
# Deep Learning VM (Ubuntu 22.04, CUDA 12.9, NVIDIA driver 580). List the current families with
#   gcloud compute images list --project deeplearning-platform-release \
#     --filter='family~^common-cu12' --format='value(family)' | sort -u
IMAGE_FAMILY=${IMAGE_FAMILY:-common-cu129-ubuntu-2204-nvidia-580}
IMAGE_PROJECT=${IMAGE_PROJECT:-deeplearning-platform-release}
# The teacher (~17 GB bf16), student, logit store, venv (~10 GB) and student checkpoints (~30 GB
# each with Adam moments, 3 kept) fit in 500 GB; the 16 local NVMe SSDs of a3-highgpu-8g are
# not mounted by this script.
BOOT_DISK_SIZE=${BOOT_DISK_SIZE:-500GB}
BOOT_DISK_TYPE=${BOOT_DISK_TYPE:-pd-balanced}
SPOT=${SPOT:-0}
RESERVATION=${RESERVATION:-}

usage() {
  cat << EOF
Usage: $(basename "$0") --zone ZONE [options]

Creates NUM_VMS VMs of MACHINE_TYPE with one gcloud compute instances create.

Options (or the environment variable in brackets):
  --machine-type T     default a3-highgpu-8g [MACHINE_TYPE]
  --accelerator SPEC   default type=nvidia-h100-80gb,count=8; '' = omit [ACCELERATOR]
  --image-family F     default $IMAGE_FAMILY [IMAGE_FAMILY]
  --image-project P    default deeplearning-platform-release [IMAGE_PROJECT]
  --disk-size SIZE     boot disk, default 500GB [BOOT_DISK_SIZE]
  --disk-type TYPE     boot disk, default pd-balanced [BOOT_DISK_TYPE]
  --spot               Spot provisioning (preemptible, much cheaper; stopped when reclaimed) [SPOT=1]
  --reservation NAME   consume reservation NAME (specific affinity); 'any' = any matching
                       reservation [RESERVATION]
$COMMON_HELP
EOF
}

while (($#)); do
  case $1 in
    --machine-type) need_value "$@"; MACHINE_TYPE=$2; shift 2 ;;
    --accelerator) [[ $# -ge 2 ]] || die "--accelerator needs a value ('' to omit)"
      ACCELERATOR=$2; shift 2 ;;
    --image-family) need_value "$@"; IMAGE_FAMILY=$2; shift 2 ;;
    --image-project) need_value "$@"; IMAGE_PROJECT=$2; shift 2 ;;
    --disk-size) need_value "$@"; BOOT_DISK_SIZE=$2; shift 2 ;;
    --disk-type) need_value "$@"; BOOT_DISK_TYPE=$2; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --reservation) need_value "$@"; RESERVATION=$2; shift 2 ;;
    *)
      common_opt "$@"
      shift "$SHIFT_BY" ;;
  esac
done
check_common
if [[ $SPOT == 1 && -n $RESERVATION ]]; then
  die "--spot and --reservation exclude each other: a reservation holds on-demand capacity"
fi

args=(gcloud compute instances create "${VMS[@]}" "${GCLOUD_FLAGS[@]}"
  "--machine-type=$MACHINE_TYPE")
if [[ -n $ACCELERATOR ]]; then
  args+=("--accelerator=$ACCELERATOR")
fi
args+=("--image-family=$IMAGE_FAMILY" "--image-project=$IMAGE_PROJECT"
  "--boot-disk-size=$BOOT_DISK_SIZE" "--boot-disk-type=$BOOT_DISK_TYPE"
  # GPU VMs cannot live-migrate: host maintenance stops them.
  --maintenance-policy=TERMINATE
  # Deep Learning VM images install the driver on first boot if the image lacks it.
  --metadata=install-nvidia-driver=True)
if [[ $SPOT == 1 ]]; then
  # STOP keeps the boot disk (venv, models, logit store, checkpoints) when Google reclaims the
  # VM; start it again with gcloud compute instances start and relaunch: jkd resumes.
  args+=(--provisioning-model=SPOT --instance-termination-action=STOP)
fi
if [[ $RESERVATION == any ]]; then
  args+=(--reservation-affinity=any)
elif [[ -n $RESERVATION ]]; then
  args+=(--reservation-affinity=specific "--reservation=$RESERVATION")
fi
run "${args[@]}"
