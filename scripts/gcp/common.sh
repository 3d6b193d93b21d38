# shellcheck shell=bash
# Shared by scripts/gcp/*.sh (sourced, never run): settings, option parsing, and `run`, which
# prints each command as `+ cmd` (quoted so that it can be pasted back into a shell) and runs
# it unless this is a dry run.
#
# Settings come from the environment or from the common options below (options win):
#   GCP_PROJECT  --project  GCP project; '' = gcloud's configured project
#   GCP_ZONE     --zone     zone of the VMs (required: A3 capacity is per zone, e.g. us-central1-a)
#   VM_PREFIX    --prefix   VMs are named PREFIX-0 .. PREFIX-(N-1) (default jkd)
#   NUM_VMS      --vms      N, the number of VMs (default 1)
#   REMOTE_DIR   --remote-dir  the project's directory on each VM, relative to the login's home
#                           (default jkd)
#   DRY_RUN=1    --dry-run  print the commands, run nothing

GCP_PROJECT=${GCP_PROJECT:-}
GCP_ZONE=${GCP_ZONE:-}
VM_PREFIX=${VM_PREFIX:-jkd}
NUM_VMS=${NUM_VMS:-1}
REMOTE_DIR=${REMOTE_DIR:-jkd}
DRY_RUN=${DRY_RUN:-0}
# shellcheck disable=SC2034  # REPO_ROOT, COMMON_HELP, SHIFT_BY: for the sourcing scripts
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

# shellcheck disable=SC2034
COMMON_HELP='Common options (or the environment variable in brackets):
  --zone ZONE        zone of the VMs, required [GCP_ZONE]
  --project ID       GCP project; default: gcloud config [GCP_PROJECT]
  --vms N            number of VMs, named PREFIX-0 .. PREFIX-(N-1); default 1 [NUM_VMS]
  --prefix NAME      VM name prefix; default jkd [VM_PREFIX]
  --remote-dir DIR   project directory on the VMs, relative to home; default jkd [REMOTE_DIR]
  --dry-run          print the commands (one per line, prefixed "+ "), run nothing [DRY_RUN=1]
  -h, --help         this text'

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}

# shellcheck source=scripts/shell_words.sh
source "$(dirname "${BASH_SOURCE[0]}")/../shell_words.sh"

# run CMD ARG...: print `+ CMD ARG...`, then run it unless DRY_RUN=1.
run() {
  echo "+ $(cmdline "$@")"
  if [[ $DRY_RUN != 1 ]]; then
    "$@"
  fi
}

# need_value "$@": fail unless the option in $1 has a value in $2.
need_value() {
  [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value"
}

# common_opt "$@": consume one common option, setting SHIFT_BY (the words it takes); any other
# argument is an error (ARG_HINT, if set, says where it belongs).
# shellcheck disable=SC2034
common_opt() {
  SHIFT_BY=2
  case $1 in
    --zone) need_value "$@"; GCP_ZONE=$2 ;;
    --project) need_value "$@"; GCP_PROJECT=$2 ;;
    --vms) need_value "$@"; NUM_VMS=$2 ;;
    --prefix) need_value "$@"; VM_PREFIX=$2 ;;
    --remote-dir) need_value "$@"; REMOTE_DIR=$2 ;;
    --dry-run) DRY_RUN=1; SHIFT_BY=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (${ARG_HINT:-see --help})" ;;
  esac
}

# check_common: validate the settings every script needs; sets GCLOUD_FLAGS and VMS.
check_common() {
  [[ -n $GCP_ZONE ]] || die "no zone: pass --zone ZONE or set GCP_ZONE (e.g. us-central1-a)"
  [[ $NUM_VMS =~ ^[1-9][0-9]*$ ]] || die "--vms must be a positive integer, got '$NUM_VMS'"
  [[ $VM_PREFIX =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "--prefix '$VM_PREFIX' is not a valid instance name prefix (lowercase, digits, -)"
  GCLOUD_FLAGS=("--zone=$GCP_ZONE")
  if [[ -n $GCP_PROJECT ]]; then
    GCLOUD_FLAGS+=("--project=$GCP_PROJECT")
  fi
  VMS=()
  local i
  for ((i = 0; i < NUM_VMS; i++)); do
    VMS+=("$VM_PREFIX-$i")
  done
  if [[ $DRY_RUN != 1 ]] && ! command -v gcloud > /dev/null; then
    die "gcloud not found: install the Google Cloud CLI (or use --dry-run to see the commands)"
  fi
}

# ssh_run VM REMOTE_COMMAND: run a shell command line on VM over gcloud compute ssh.
ssh_run() {
  run gcloud compute ssh "$1" "${GCLOUD_FLAGS[@]}" --command "$2"
}
