"""jkd: knowledge distillation of Megatron/NeMo LLMs in JAX."""

__version__ = "0.1.0"
