"""NeMo-Aligner's KD tutorial with its numbers: Nemotron-3-8B-Chat-4k-SFT teaches GPT-2B-001.

The tutorial's two commands (compute_topk_logits.py, train_gpt_knowledge_distillation.py) map
key by key in docs/nemo_to_jkd.md. On 8 GPUs, from the repository root:

    # the checkpoints, then the OASST chat data (NeMo-Aligner's preprocessing, spec §5.1)
    python -m jkd.main --config configs/convert.py \
        --config.convert.source=teacher_checkpoint/Nemotron-3-8B-Chat-4k-SFT.nemo \
        --config.convert.output=models/teacher
    python -m jkd.main --config configs/convert.py \
        --config.convert.source=GPT-2B-001_bf16_tp1.nemo --config.convert.output=models/student
    python -m jkd.data.oasst 2023-04-12_oasst_all.trees.jsonl.gz data/oasst
    # stage 1: the teacher's top-K logits for train (56,440 examples) and validation (2,938)
    python -m jkd.main --config configs/nemotron8b_gpt2b.py:extract
    # stage 2: 100 steps of 128 sequences; validates on 5 batches at the last step, then
    # writes the student as results/kd_log_dir/student.nemo
    python -m jkd.main --config configs/nemotron8b_gpt2b.py:train

The tutorial stores K=4 ("in practice, k is usually set to something larger, such as 100"):
pass --config.extract.top_k=100 for that; distill.top_k=None trains on every stored entry.
"""

from configs import base

TEACHER_DIR = 'models/teacher'  # converted Nemotron-3-8B-Chat-4k-SFT.nemo
STUDENT_DIR = 'models/student'  # converted GPT-2B-001_bf16_tp1.nemo (no MCore step needed)
STORE = 'data/oasst/logits'  # the logit store both stages share


def get_config(arg=None):
  base.check_variant(arg, 'configs/nemotron8b_gpt2b.py', ('extract', 'train'))
  c = base.get_config()
  c.mode = arg or 'train'  # extract | train
  c.workdir = 'results/kd_log_dir'  # NeMo: exp_manager.explicit_log_dir
  c.mesh.shape = (1, 8, 1)  # 8 devices, TP 1: data parallel over fsdp (distributed optimizer)

  # Both stages read the same chat data, tokenized with the teacher's tokenizer.
  c.data.train_file = 'data/oasst/train.jsonl'  # NeMo: data.data.file_path (teacher pass)
  c.data.validation_file = 'data/oasst/val.jsonl'
  c.data.format = 'chat'  # NeMo: data.chat=True
  c.data.max_seq_length = 4096  # NeMo: data.data.max_seq_length / model.data.seq_length

  # Stage 1 (compute_topk_logits.py).
  c.extract.teacher = TEACHER_DIR
  c.extract.output = STORE
  c.extract.top_k = 4  # the tutorial's command; 100 in practice
  c.extract.batch_size = 16  # NeMo: model.global_batch_size=16 (micro 2 has no jkd counterpart)
  c.extract.dtype = 'bfloat16'  # NeMo: trainer.precision=bf16, megatron_amp_O2=True
  c.extract.values_dtype = 'float32'  # NeMo's JSONL holds fp32 shifted logits; bfloat16 stores
  #   the values in 44 B/token, not 60 (K=100; ids take ~200), rounding each to 2^-8 relative
  c.extract.start_idx = 0  # NeMo: start_from_idx=0
  c.extract.end_idx = -1  # NeMo: end_at_idx=56439 (train) / 2937 (validation): the last index

  # Stage 2 (train_gpt_knowledge_distillation.py).
  c.train.student = STUDENT_DIR
  c.train.store = STORE
  c.train.precision = 'bf16'
  c.train.global_batch_size = 128
  c.train.micro_batch_size = 1
  c.train.lr = 1e-5
  c.train.weight_decay = 0.01
  c.train.constant_steps = 0  # warmup_steps 10, min_lr 9e-7, betas (0.9, 0.98): YAML defaults
  c.train.gradient_clip_val = 1.0  # YAML default
  c.train.max_steps = 100
  c.train.val_check_interval = 1000
  c.train.save_interval = 1000
  c.train.limit_val_batches = 5
  c.train.save_nemo_on_train_end = True  # <workdir>/student.nemo at the end (needs torch)
  # NeMo's W&B logger (project sft_knowledge_distillation): --config.train.wandb_project=...
  c.distill.kd_loss = 'fwd_kl'
  c.distill.kd_loss_weight = 1.0
  c.distill.sft_loss_weight = 0.4
  c.distill.logits_scale = 1.0
  c.distill.target_logits_scale = 1.0
  c.distill.reduction = 'nemo'
  c.distill.loss_impl = 'fused'
  return c
