# shellcheck shell=bash
# XLA and JAX settings for jkd on H100 (and H200) GPUs: the one place they are written. Sourced
# (`source scripts/gcp/xla_flags.sh`) by scripts/gcp/remote_run.sh (launch.sh's runs),
# scripts/slurm/run_jkd.sh and scripts/gpu_check.sh, before Python starts: XLA reads XLA_FLAGS
# once, when the backend initialises. docs/gcp.md explains each flag.
#
# XLA aborts the process on a flag it does not know, so every flag here is checked against the
# pinned jaxlib by tests/test_scripts.py (XLA parses GPU flags on CPU too). Flags you already
# exported in XLA_FLAGS come after these and win. JKD_XLA_FLAGS_OFF=1 leaves XLA_FLAGS alone.

JKD_XLA_FLAGS=(
  # Schedule collectives (FSDP all-gathers / reduce-scatters) to overlap with compute.
  --xla_gpu_enable_latency_hiding_scheduler=true
  # Collectives on a high-priority stream, so they are not queued behind matmuls.
  --xla_gpu_enable_highest_priority_async_stream=true
  # Combine the per-tensor collectives of one scanned layer into few large ones (128 MiB cap).
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728
  # Inside the layer scan: gather layer i+1's weights while layer i computes, and reduce-scatter
  # layer i's gradients while layer i-1's backward runs.
  --xla_gpu_enable_pipelined_all_gather=true
  --xla_gpu_enable_pipelined_reduce_scatter=true
  --xla_gpu_enable_pipelined_all_reduce=true
  # Unroll while loops (the layer scan) by two so the pipelining above has a next iteration.
  --xla_gpu_enable_while_loop_double_buffering=true
)

if [[ ${JKD_XLA_FLAGS_OFF:-0} != 1 ]]; then
  XLA_FLAGS="${JKD_XLA_FLAGS[*]}${XLA_FLAGS:+ $XLA_FLAGS}"
  export XLA_FLAGS
  # XLA's share of GPU memory, preallocated (JAX's default is 0.75); the rest is for cuDNN,
  # NCCL and CUDA's own context.
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
fi
