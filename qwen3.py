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

from llama import Attention, Llama, LlamaConfig, RMSNorm, qwen2_fields


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

    def heads(self, x):
        q, k, v = super().heads(x)
        return self.q_norm(q), self.k_norm(k), v


class Qwen3(Llama):
    # What differs from Llama (model.FAMILIES collects it); the rest is Llama's, m-LoRA's names too.
    Config = Qwen3Config
    MODEL_TYPES = tuple(Qwen3Config.MODEL_TYPES)
    Attention = Qwen3Attention

