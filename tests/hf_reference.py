"""Independent references: Hugging Face models with random weights, mapped into jkd params.

One builder per NeMo architecture (nemo_checkpoint_format.md §5): it makes a small HF model,
randomises every weight (norm scales and biases too, so a mis-mapped norm cannot hide), and
returns the jkd ModelConfig, the jkd params built from the HF state dict, and the HF model.
"""

from __future__ import annotations

import numpy as np
import torch

from jkd import model

L, D, N, G, F, V, T = 2, 64, 4, 2, 96, 256, 16


def _randomise(hf, seed: int):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if p.ndim == 1 and ('norm' in name or 'ln_' in name) and name.endswith('weight'):
        p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(0.05 * torch.randn(p.shape, generator=g))
  return hf.eval()


def _np(t) -> np.ndarray:
  return t.detach().float().numpy().copy()


def _stack(sd, pattern: str, fn=lambda w: w):
  return np.stack([fn(_np(sd[pattern.format(i)])) for i in range(L)])


def _attn_qkvo(sd, prefix: str, n: int, g: int, h: int, bias: bool):
  """q/k/v/o kernels from torch [out, in] Linear weights."""
  attn = {
      'q': {'kernel': _stack(sd, prefix + 'q_proj.weight', lambda w: w.T.reshape(D, n, h))},
      'k': {'kernel': _stack(sd, prefix + 'k_proj.weight', lambda w: w.T.reshape(D, g, h))},
      'v': {'kernel': _stack(sd, prefix + 'v_proj.weight', lambda w: w.T.reshape(D, g, h))},
      'o': {'kernel': _stack(sd, prefix + 'o_proj.weight', lambda w: w.T.reshape(n, h, D))},
  }
  if bias:
    for k, shape in (('q', (n, h)), ('k', (g, h)), ('v', (g, h)), ('o', (D,))):
      attn[k]['bias'] = _stack(sd, prefix + f'{k}_proj.bias', lambda w: w.reshape(shape))
  return attn


def _norm(sd, name: str, kind: str):
  """HF norm -> jkd norm params. kind: 'rms' (scale), 'ln' (scale, bias), 'ln_plus1' (StableLm's
  plain LayerNorm holding 1 + w, mapped to jkd's zero-centred layernorm1p weight w)."""
  get = (lambda k: _np(sd[name + k])) if '{}' not in name else (lambda k: _stack(sd, name + k))
  if kind == 'rms':
    return {'scale': get('.weight')}
  return {'scale': get('.weight') - (1.0 if kind == 'ln_plus1' else 0.0), 'bias': get('.bias')}


def _hf_decoder_params(sd, *, groups: int, gated: bool, norm: str, tied: bool):
  """jkd params from an HF Llama / Nemotron / StableLm state dict (same module names)."""
  pre = 'model.layers.{}.'
  if gated:  # jkd fc1 kernel [L, D, 2, F]: gate at 0, up at 1
    fc1 = np.stack([_stack(sd, pre + 'mlp.gate_proj.weight', np.transpose),
                    _stack(sd, pre + 'mlp.up_proj.weight', np.transpose)], axis=2)
  else:
    fc1 = _stack(sd, pre + 'mlp.up_proj.weight', np.transpose)
  params = {
      'embed': _np(sd['model.embed_tokens.weight']),
      'layers': {
          'attn_norm': _norm(sd, pre + 'input_layernorm', norm),
          'attn': _attn_qkvo(sd, pre + 'self_attn.', N, groups, D // N, bias=False),
          'mlp_norm': _norm(sd, pre + 'post_attention_layernorm', norm),
          'mlp': {'fc1': {'kernel': fc1},
                  'fc2': {'kernel': _stack(sd, pre + 'mlp.down_proj.weight', np.transpose)}},
      },
      'final_norm': _norm(sd, 'model.norm', norm),
  }
  if not tied:
    params['lm_head'] = _np(sd['lm_head.weight']).T
  return params


def llama(padded_vocab: int = V + 8, tied: bool = False, seed: int = 0):
  """rmsnorm + swiglu + GQA + full RoPE; the jkd embedding carries extra padded rows."""
  from transformers import LlamaConfig, LlamaForCausalLM
  hf_cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                       num_attention_heads=N, num_key_value_heads=G, rms_norm_eps=1e-5,
                       max_position_embeddings=64, tie_word_embeddings=tied,
                       rope_parameters={'rope_type': 'default', 'rope_theta': 5000.0})
  hf = _randomise(LlamaForCausalLM(hf_cfg), seed)
  sd = hf.state_dict()
  cfg = model.ModelConfig(
      num_layers=L, hidden_size=D, ffn_hidden_size=F, num_attention_heads=N,
      num_query_groups=G, vocab_size=V, padded_vocab_size=padded_vocab,
      normalization='rmsnorm', layernorm_epsilon=1e-5, activation='swiglu', bias=False,
      position_embedding_type='rope', rotary_base=5000.0, max_position_embeddings=64,
      share_embeddings_and_output_weights=tied)
  params = _hf_decoder_params(sd, groups=G, gated=True, norm='rms', tied=tied)
  # Padded rows are garbage on purpose: they must never reach the returned logits.
  rng = np.random.default_rng(seed)
  pad = lambda: rng.normal(0, 5.0, (padded_vocab - V, D)).astype(np.float32)
  params['embed'] = np.concatenate([params['embed'], pad()])
  if not tied:
    params['lm_head'] = np.concatenate([params['lm_head'].T, pad()]).T
  return cfg, params, hf


def nemotron(seed: int = 0):
  """layernorm1p + squared-relu + 50% RoPE, untied, no bias (Nemotron-3/4)."""
  from transformers import NemotronConfig, NemotronForCausalLM
  hf_cfg = NemotronConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                          num_attention_heads=N, num_key_value_heads=N, head_dim=D // N,
                          hidden_act='relu2', norm_eps=1e-5, max_position_embeddings=64,
                          tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                          rope_parameters={'rope_type': 'default', 'rope_theta': 10000.0,
                                           'partial_rotary_factor': 0.5})
  hf = _randomise(NemotronForCausalLM(hf_cfg), seed)
  sd = hf.state_dict()
  cfg = model.ModelConfig(
      num_layers=L, hidden_size=D, ffn_hidden_size=F, num_attention_heads=N, vocab_size=V,
      normalization='layernorm1p', activation='squared-relu', bias=False,
      position_embedding_type='rope', rotary_percentage=0.5, max_position_embeddings=64,
      share_embeddings_and_output_weights=False)
  # NemotronLayerNorm1P computes weight + 1 itself: the zero-centred weight is copied as-is.
  params = _hf_decoder_params(sd, groups=N, gated=False, norm='ln', tied=False)
  return cfg, params, hf


def gpt2b(seed: int = 0):
  """GPT-2B-001: layernorm1p + SwiGLU + 50% RoPE, untied, no bias, as HF StableLm (+1 folded)."""
  from transformers import StableLmConfig, StableLmForCausalLM
  hf_cfg = StableLmConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                          num_attention_heads=N, num_key_value_heads=N, hidden_act='silu',
                          layer_norm_eps=1e-5, max_position_embeddings=64,
                          tie_word_embeddings=False, use_qkv_bias=False, qk_layernorm=False,
                          use_parallel_residual=False,
                          rope_parameters={'rope_type': 'default', 'rope_theta': 10000.0,
                                           'partial_rotary_factor': 0.5})
  hf = _randomise(StableLmForCausalLM(hf_cfg), seed)
  sd = hf.state_dict()
  cfg = model.ModelConfig(
      num_layers=L, hidden_size=D, ffn_hidden_size=F, num_attention_heads=N, vocab_size=V,
      normalization='layernorm1p', activation='fast-swiglu', bias=False,
      position_embedding_type='rope', rotary_percentage=0.5, max_position_embeddings=64,
      share_embeddings_and_output_weights=False)
  params = _hf_decoder_params(sd, groups=N, gated=True, norm='ln_plus1', tied=False)
  return cfg, params, hf


def gpt3(seed: int = 0, gelu_tanh: bool = False):
  """Classic NeMo GPT-3: layernorm + GELU (exact; or tanh, NeMo's fused bias-GELU) + learned
  positions + biases + tied (HF GPT-2)."""
  from transformers import GPT2Config, GPT2LMHeadModel
  hf_cfg = GPT2Config(vocab_size=V, n_embd=D, n_layer=L, n_head=N, n_inner=F, n_positions=64,
                      activation_function='gelu_new' if gelu_tanh else 'gelu',
                      layer_norm_epsilon=1e-5,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
  hf = _randomise(GPT2LMHeadModel(hf_cfg), seed)
  sd = hf.state_dict()
  cfg = model.ModelConfig(
      num_layers=L, hidden_size=D, ffn_hidden_size=F, num_attention_heads=N, vocab_size=V,
      normalization='layernorm', activation='gelu', gelu_tanh=gelu_tanh, bias=True,
      position_embedding_type='learned_absolute', max_position_embeddings=64,
      share_embeddings_and_output_weights=True)
  h, pre = D // N, 'transformer.h.{}.'
  # GPT-2's Conv1D weights are already [in, out]; c_attn packs [Q | K | V] on the out axis.
  qkv_w = _stack(sd, pre + 'attn.c_attn.weight')  # [L, D, 3D]
  qkv_b = _stack(sd, pre + 'attn.c_attn.bias')  # [L, 3D]
  attn = {name: {'kernel': qkv_w[:, :, i * D:(i + 1) * D].reshape(L, D, N, h),
                 'bias': qkv_b[:, i * D:(i + 1) * D].reshape(L, N, h)}
          for i, name in enumerate(('q', 'k', 'v'))}
  attn['o'] = {'kernel': _stack(sd, pre + 'attn.c_proj.weight').reshape(L, N, h, D),
               'bias': _stack(sd, pre + 'attn.c_proj.bias')}
  params = {
      'embed': _np(sd['transformer.wte.weight']),
      'pos_embed': _np(sd['transformer.wpe.weight']),
      'layers': {
          'attn_norm': _norm(sd, pre + 'ln_1', 'ln'),
          'attn': attn,
          'mlp_norm': _norm(sd, pre + 'ln_2', 'ln'),
          'mlp': {'fc1': {'kernel': _stack(sd, pre + 'mlp.c_fc.weight'),
                          'bias': _stack(sd, pre + 'mlp.c_fc.bias')},
                  'fc2': {'kernel': _stack(sd, pre + 'mlp.c_proj.weight'),
                          'bias': _stack(sd, pre + 'mlp.c_proj.bias')}},
      },
      'final_norm': _norm(sd, 'transformer.ln_f', 'ln'),
  }
  return cfg, params, hf


ARCHITECTURES = {'llama': llama, 'nemotron': nemotron, 'gpt2b': gpt2b, 'gpt3': gpt3}


def hf_logits(hf, tokens_BxT: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return hf(torch.as_tensor(np.asarray(tokens_BxT), dtype=torch.long)).logits.float().numpy()
