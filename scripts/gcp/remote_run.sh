#!/usr/bin/env bash
# Runs ON a VM, in the project directory (launch.sh starts it under nohup, output appended to
# logs/NAME.vmI.log): the XLA flags, then `.venv/bin/python -m jkd.main ARGS...`, one run per VM.
#
#   bash scripts/gcp/remote_run.sh --config configs/nemotron8b_gpt2b.py:extract [--config.x=y ...]
#
# JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID pass through from launch.sh
# (multi-VM runs); see docs/gcp.md for what jkd does with them today.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/gcp/xla_flags.sh
source scripts/gcp/xla_flags.sh

mkdir -p logs
# One jkd process drives all of a VM's GPUs: a second one would fail to allocate memory, or
# worse, write the same logit store or checkpoints. The lock is held until python exits; it is
# the VM's own (named by host), so a logs/ that several VMs share holds one lock for each.
lock="logs/jkd.$(hostname).lock"
exec 9> "$lock"
if ! flock -n 9; then
  echo "remote_run.sh: error: another jkd run holds $PWD/$lock on $(hostname)" >&2
  exit 3
fi

echo "[remote_run] $(date -u +%FT%TZ) $(hostname) process ${JAX_PROCESS_ID:-0} of" \
  "${JAX_NUM_PROCESSES:-1}: python -m jkd.main $*"
# A VM's shutdown (Spot preemption) sends SIGTERM to every process: python commits its work and
# exits 143, and this shell, which a trap keeps alive until python ends, logs that status.
trap : TERM
rc=0
.venv/bin/python -m jkd.main "$@" || rc=$?
echo "[remote_run] $(date -u +%FT%TZ) exit status $rc"
exit "$rc"
