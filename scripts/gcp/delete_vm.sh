#!/usr/bin/env bash
# Delete the VMs PREFIX-0 .. PREFIX-(N-1) and their boot disks (everything on them is lost:
# run fetch_results.sh first).
#
#   scripts/gcp/delete_vm.sh --zone us-central1-a            # gcloud asks before deleting
#   scripts/gcp/delete_vm.sh --zone us-central1-a --vms 2 --yes
set -euo pipefail
# shellcheck source=scripts/gcp/common.sh
source "$(dirname "$0")/common.sh"

YES=0

usage() {
  cat << EOF
Usage: $(basename "$0") --zone ZONE [options]

Deletes NUM_VMS VMs with one gcloud compute instances delete (boot disks go with them).

Options:
  --yes         do not ask for confirmation (gcloud --quiet)
$COMMON_HELP
EOF
}

while (($#)); do
  case $1 in
    --yes) YES=1; shift ;;
    *)
      common_opt "$@"
      shift "$SHIFT_BY" ;;
  esac
done
check_common

args=(gcloud compute instances delete "${VMS[@]}" "${GCLOUD_FLAGS[@]}")
if ((YES)); then
  args+=(--quiet)
fi
run "${args[@]}"
