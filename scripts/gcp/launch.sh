#!/usr/bin/env bash
# Start `python -m jkd.main --config CONFIG [ARGS...]` in the background on each VM (one process
# per VM, all its GPUs), under nohup, output appended to ~/jkd/logs/NAME.vmI.log on the VM.
#
#   scripts/gcp/launch.sh --zone us-central1-a --config configs/nemotron8b_gpt2b.py:extract
#   scripts/gcp/launch.sh --zone us-central1-a --config configs/nemotron8b_gpt2b.py:train \
#       -- --config.workdir=results/kd_log_dir --config.train.max_steps=100
#
# With --vms N > 1 every process gets JAX_COORDINATOR_ADDRESS (VM 0's internal IP:PORT),
# JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=I, from which jkd joins the N processes into one job
# (jax.distributed.initialize; docs/multihost.md). Every process must see the same workdir (the
# logit store and orbax checkpoints), so N > 1 asks for --allow-multi-host: the confirmation that
# the workdir is on storage all VMs share (a Filestore mount or similar).
set -euo pipefail
# shellcheck source=scripts/gcp/common.sh
source "$(dirname "$0")/common.sh"

CONFIG=''
NAME=''
PORT=${JAX_PORT:-8476}
COORDINATOR_IP=${COORDINATOR_IP:-}
ALLOW_MULTI_HOST=0
EXTRA=()

usage() {
  cat << EOF
Usage: $(basename "$0") --zone ZONE --config CONFIG[:ARG] [options] [-- JKD_ARGS...]

Runs python -m jkd.main --config CONFIG JKD_ARGS... on every VM, in ~/REMOTE_DIR, detached
(nohup), with the XLA flags of scripts/gcp/xla_flags.sh. Returns once started; follow with
  gcloud compute ssh PREFIX-0 --zone ZONE --command 'tail -f REMOTE_DIR/logs/NAME.vm0.log'

Options (or the environment variable in brackets):
  --config CONFIG      jkd config file, with its :arg (required), e.g.
                       configs/nemotron8b_gpt2b.py:extract
  --name NAME          log name; default: the config's file name and arg, e.g.
                       nemotron8b_gpt2b-extract
  --port PORT          coordinator port on VM 0 (N > 1); default 8476 [JAX_PORT]
  --coordinator-ip IP  VM 0's internal IP; default: looked up with gcloud [COORDINATOR_IP]
  --allow-multi-host   start N > 1 processes (one job): confirms the workdir is on storage that
                       every VM sees
  -- JKD_ARGS...       passed to jkd.main (config overrides such as --config.workdir=...)
$COMMON_HELP
EOF
}

ARG_HINT="jkd arguments go after --; see --help"
while (($#)); do
  case $1 in
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --port) need_value "$@"; PORT=$2; shift 2 ;;
    --coordinator-ip) need_value "$@"; COORDINATOR_IP=$2; shift 2 ;;
    --allow-multi-host) ALLOW_MULTI_HOST=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *)
      common_opt "$@"
      shift "$SHIFT_BY" ;;
  esac
done
[[ -n $CONFIG ]] || die "--config is required, e.g. --config configs/nemotron8b_gpt2b.py:extract"
check_common
[[ $PORT =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"
if [[ -z $NAME ]]; then
  NAME=$(basename "${CONFIG%%:*}" .py)
  if [[ $CONFIG == *:* ]]; then
    NAME+="-${CONFIG#*:}"
  fi
fi
[[ $NAME =~ ^[A-Za-z0-9_.-]+$ ]] || die "--name '$NAME': use letters, digits, _ . - only"
if ((NUM_VMS > 1 && !ALLOW_MULTI_HOST)); then
  die "--vms $NUM_VMS: the N processes form one job (jax.distributed.initialize) and must share" \
    "the workdir. Put it on storage every VM sees and pass --allow-multi-host (docs/gcp.md)."
fi

if ((NUM_VMS > 1)) && [[ -z $COORDINATOR_IP ]]; then
  lookup=(gcloud compute instances describe "${VMS[0]}" "${GCLOUD_FLAGS[@]}"
    '--format=value(networkInterfaces[0].networkIP)')
  if [[ $DRY_RUN == 1 ]]; then
    run "${lookup[@]}"
    COORDINATOR_IP="INTERNAL_IP_OF_${VMS[0]}"
  else
    echo "+ $(cmdline "${lookup[@]}")"
    COORDINATOR_IP=$("${lookup[@]}")
    [[ -n $COORDINATOR_IP ]] || die "no internal IP for ${VMS[0]}"
  fi
fi

dir=$(quote "$REMOTE_DIR")
jkd_args=$(cmdline --config "$CONFIG" ${EXTRA[@]+"${EXTRA[@]}"})  # bash < 4.4: empty is unset
started=()  # the VMs whose process runs: a later VM that fails to start stops them again
stop_started() {
  local j
  for j in "${started[@]}"; do
    # The process waits in jax.distributed.initialize for the missing one: it has done no work.
    local stop="cd $dir && kill -KILL -- -\$(cat logs/$NAME.vm$j.pid)"
    ssh_run "${VMS[$j]}" "$stop && echo \"stopped the process started on \$(hostname)\"" || true
  done
}
for i in "${!VMS[@]}"; do
  log="logs/$NAME.vm$i.log"
  env=''
  if ((NUM_VMS > 1)); then
    env="JAX_COORDINATOR_ADDRESS=$COORDINATOR_IP:$PORT JAX_NUM_PROCESSES=$NUM_VMS JAX_PROCESS_ID=$i "
  fi
  # Refuse early (here, not in the detached log) when a run already holds the VM. setsid makes
  # the process a group leader: its pid, in logs/NAME.vmI.pid, names the group (stop_started).
  rc=0
  ssh_run "${VMS[$i]}" "set -e; cd $dir; mkdir -p logs; lock=logs/jkd.\$(hostname).lock; if ! flock -n \$lock true; then echo \"a jkd run is active on \$(hostname) (\$lock)\" >&2; exit 3; fi; ${env}nohup setsid bash scripts/gcp/remote_run.sh $jkd_args >> $log 2>&1 < /dev/null & echo \$! > logs/$NAME.vm$i.pid; echo \"started on \$(hostname): $REMOTE_DIR/$log\"" || rc=$?
  if ((rc != 0)); then
    if ((${#started[@]})); then
      echo "$(basename "$0"): ${VMS[$i]} did not start (exit status $rc): stopping the" \
        "processes started on ${started[*]/#/$VM_PREFIX-}" >&2
      stop_started
    fi
    exit "$rc"
  fi
  started+=("$i")
done
