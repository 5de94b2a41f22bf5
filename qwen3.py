"""Qwen3 (`model_type: "qwen3"`; transformers' Qwen3ForCausalLM) as a LLaMA-like family: llama.py's
model with its own attention and config.

- an RMSNorm on each query and key head (q_norm, k_norm: hd channels, one weight shared by the
  heads) after the projection, before RoPE;
- head_dim stated in config.json (Qwen3Config's default is 128, not hidden_size / heads);
- attention_bias puts a bias on q, k, v and o (Qwen3Config's default: none); the MLP has none;
- sliding windows per layer by Qwen2's rule (use_sliding_window, max_window_layers or layer_types).
Rope types transformers computes that llama.rope_inv_freq does not (yarn, dynamic, longrope) are
refused by LlamaConfig.from_hf, naming rope_scaling or rope_parameters.

Shape letters as in llama.py.
"""
from typing import Callable, ClassVar

from llama import Attention, Llama, LlamaConfig, RMSNorm, attend, project, qwen2_fields, rotate_half


def qwen3_fields(hf: dict) -> dict:
    """Qwen3ForCausalLM's own fields: the window as Qwen2Config decides it (Qwen3Config's
    __post_init__ is Qwen2Config's), the bias of attention_bias on all four projections, no MLP
    bias (Qwen3MLP has none whatever mlp_bias says), head_dim 128 when config.json has none."""
    bias = hf.get("attention_bias", False)
    return {**qwen2_fields(hf), "qkv_bias": bias, "o_bias": bias, "mlp_bias": False,
            "head_dim": hf.get("head_dim") or 128}


class Qwen3Config(LlamaConfig):
    MODEL_TYPES: ClassVar[dict[str, Callable[[dict], dict]]] = {"qwen3": qwen3_fields}


class Qwen3Attention(Attention):
    """Llama's attention with q_norm and k_norm on each head before RoPE (Qwen3Attention)."""

    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__(cfg, layer)
        self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        B, T, C = x.shape
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj))
        q = self.q_norm(q.view(B, T, self.nh, self.hd)).transpose(1, 2)     # [B, nh, T, hd]
        k = self.k_norm(k.view(B, T, self.nkv, self.hd)).transpose(1, 2)    # [B, nkv, T, hd]
        v = v.view(B, T, self.nkv, self.hd).transpose(1, 2)                 # [B, nkv, T, hd]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer, k, v)                           # [B, nkv, T_past+T, hd]
        y = attend(q, k, v, mask, gqa=self.nkv != self.nh)                   # [B, nh, T, hd]
        y = y.transpose(1, 2).reshape(B, T, self.nh * self.hd)              # [B, T, nh*hd]
        return self.o_proj(y)


class Qwen3(Llama):
    # What differs from Llama (model.FAMILIES collects it); the rest is Llama's, m-LoRA's names too.
    Config = Qwen3Config
    MODEL_TYPES = tuple(Qwen3Config.MODEL_TYPES)
    Attention = Qwen3Attention

