# shellcheck shell=bash
# The srun half of scripts/slurm/{extract,train}.sbatch (sourced by them after their settings):
# one task per node runs `python -m jkd.main --config $CONFIG "$@"` from $REPO, inside $CONTAINER
# (pyxis) when set, else with $REPO/.venv. DRY_RUN=1 prints the srun command and runs nothing.
#
# Reads: REPO RESULTS_DIR CONTAINER MOUNTS CONFIG JOB_NAME JAX_PORT DRY_RUN, and the job's
# SLURM_* variables.

DRY_RUN=${DRY_RUN:-0}

# shellcheck source=scripts/shell_words.sh
source "$REPO/scripts/shell_words.sh"  # quote, cmdline

[[ -n ${CONFIG:-} ]] || { echo "run_jkd.sh: error: CONFIG is not set" >&2; exit 2; }

# Multi-node: JAX's coordinator is the first node of the job. jkd reads these variables and
# joins the nodes with jax.distributed.initialize (docs/multihost.md); the workdir must be on a
# file system every node sees. JAX_LOCAL_DEVICE_IDS: without it JAX's Slurm auto-detection
# would give each task only GPU $SLURM_LOCALID (it assumes one task per GPU).
if [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
  coordinator=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1) || true
  coordinator=${coordinator:-$(hostname)}
else
  coordinator=FIRST_NODE_OF_THE_JOB  # dry run outside an allocation
fi
# The coordinator's port: JAX_PORT, else one of the job's own (as JAX's Slurm detection picks
# it, from the job id), so that jobs sharing a node do not collide; 8476 outside a job.
port=${JAX_PORT:-$(( ${SLURM_JOB_ID:-0} > 0 ? SLURM_JOB_ID % 4096 + 61440 : 8476 ))}
gpus=${SLURM_GPUS_ON_NODE:-8}
local_ids=$(seq -s, 0 $((gpus - 1)))
if [[ -n $CONTAINER ]]; then
  python=python
else
  python=$REPO/.venv/bin/python
fi

# The task's command: \$SLURM_PROCID is expanded by each task, the rest here.
cmd="cd $(quote "$REPO") && source scripts/gcp/xla_flags.sh && \
export JAX_COORDINATOR_ADDRESS=$coordinator:$port \
JAX_NUM_PROCESSES=\${SLURM_NTASKS:-1} JAX_PROCESS_ID=\${SLURM_PROCID:-0} \
JAX_LOCAL_DEVICE_IDS=$local_ids && \
exec $(cmdline "$python" -m jkd.main --config "$CONFIG" "$@")"

srun_args=(srun --ntasks-per-node=1 "--gpus-per-node=$gpus"
  -o "$RESULTS_DIR/$JOB_NAME-%j_%t.out" -e "$RESULTS_DIR/$JOB_NAME-%j_%t.err")
# One task per node gets all of the node's CPUs (data loading, tokenizing, XLA compiles).
if [[ -n ${SLURM_CPUS_ON_NODE:-} ]]; then
  srun_args+=("--cpus-per-task=$SLURM_CPUS_ON_NODE")
fi
if [[ -n $CONTAINER ]]; then
  srun_args+=("--container-image=$CONTAINER")
  if [[ -n $MOUNTS ]]; then
    srun_args+=("--container-mounts=$MOUNTS")
  fi
fi
srun_args+=(bash -c "$cmd")

echo "+ mkdir -p $(quote "$RESULTS_DIR")"
echo "+ $(cmdline "${srun_args[@]}")"
if [[ $DRY_RUN != 1 ]]; then
  mkdir -p "$RESULTS_DIR"
  "${srun_args[@]}"
fi
