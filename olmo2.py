"""OLMo 2 (`model_type: "olmo2"`; transformers' Olmo2ForCausalLM) as a LLaMA-like family: llama.py's
model with its own block, attention and config.

- no norm before attention or MLP: post_attention_layernorm and post_feedforward_layernorm
  normalise each sublayer's output before it is added to the residual stream;
- q_norm and k_norm over the whole q and k projections (nh*hd and nkv*hd channels), before the
  split into heads and RoPE;
- every RMSNorm applies its weight in fp32 and then casts (Olmo2RMSNorm: ChatGLM's order, not
  Llama's), and RoPE runs in fp32 (Olmo2RotaryEmbedding keeps cos and sin in fp32);
- attention_bias puts a bias on q, k, v and o (Olmo2Config's default: none); no sliding window.
Rope types transformers computes that llama.rope_inv_freq does not (yarn, dynamic, longrope) are
refused by LlamaConfig.from_hf, naming rope_scaling or rope_parameters.

Shape letters as in llama.py.
"""
from typing import Callable, ClassVar

import torch
import torch.nn as nn

from llama import Attention, Llama, LlamaConfig, RMSNorm, project


def olmo2_fields(hf: dict) -> dict:
    """Olmo2ForCausalLM's own fields: the bias of attention_bias on all four projections, no MLP
    bias, rms_norm_eps 1e-5 when absent (Olmo2Config's default); Olmo2Model has no sliding window,
    so a sliding_window key is ignored, as transformers ignores it."""
    bias = hf.get("attention_bias", False)
    return dict(qkv_bias=bias, o_bias=bias, mlp_bias=False, rms_norm_eps=hf.get("rms_norm_eps", 1e-5))


class Olmo2Config(LlamaConfig):
    MODEL_TYPES: ClassVar[dict[str, Callable[[dict], dict]]] = {"olmo2": olmo2_fields}


def norm(dim: int, eps: float) -> RMSNorm:
    """Olmo2RMSNorm: the weight applied in fp32, then cast back."""
    return RMSNorm(dim, eps, weight_in_fp32=True)


class Olmo2Attention(Attention):
    """Llama's attention with q_norm and k_norm over the whole projections before the head split."""

    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__(cfg, layer)
        self.q_norm = norm(self.nh * self.hd, cfg.rms_norm_eps)
        self.k_norm = norm(self.nkv * self.hd, cfg.rms_norm_eps)

    def heads(self, x):
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj))
        return self.split(self.q_norm(q), self.k_norm(k), v)                # normed over [B, T, n*hd]

    def rotate(self, t, cos, sin):   # cos, sin in fp32 (Olmo2.ROPE_DTYPE), the result back in the model's dtype
        return super().rotate(t, cos, sin).to(t.dtype)


class Olmo2Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int, attention: type[nn.Module], mlp: type[nn.Module]):
        super().__init__()
        self.self_attn = attention(cfg, layer)
        self.post_attention_layernorm = norm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp(cfg)
        self.post_feedforward_layernorm = norm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.post_attention_layernorm(self.self_attn(x, cos, sin, mask, cache))
        return x + self.post_feedforward_layernorm(self.mlp(x))


class Olmo2(Llama):
    # What differs from Llama (model.FAMILIES collects it); the rest is Llama's, m-LoRA's names too.
    Config = Olmo2Config
    MODEL_TYPES = tuple(Olmo2Config.MODEL_TYPES)
    ROPE_DTYPE = torch.float32      # Olmo2RotaryEmbedding returns cos and sin in fp32, whatever the model's dtype
    Block = Olmo2Block
    Attention = Olmo2Attention

    def __init__(self, cfg: LlamaConfig):
        super().__init__(cfg)
        self.model.norm = norm(cfg.hidden_size, cfg.rms_norm_eps)
