"""Phi-3 (microsoft's `model_type: "phi3"` folders; transformers' Phi3ForCausalLM) as a LLaMA-like
family: llama.py's model with its own attention, MLP, config and rope.

- one fused `qkv_proj` (rows [q: nh*hd | k: nkv*hd | v: nkv*hd], as the checkpoint stores them)
  and one `gate_up_proj` whose first half is the gate, no biases;
- rotate-half RoPE on the first partial_rotary_factor of each head (1.0 in Phi-3 itself);
- with a sliding_window in config.json every layer slides (Phi3Model builds one mask), as Mistral.
rope_scaling "longrope" (the 128k releases) is refused: transformers switches its frequencies by
the longest position in the batch, which this code does not do.

Shape letters as in llama.py; rd the rotary channels of a head.
"""
import dataclasses
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from llama import LLAMA_FIELDS, Attention, Llama, LlamaConfig, checked_window, rope_inv_freq, rotate_half


def partial_rotary_dim(hf: dict, head_dim: int, default: float = 1.0) -> int:
    """rd = int(head_dim * partial_rotary_factor), as transformers' rope computes it, the factor read
    from rope_parameters (or rope_scaling), else beside it, else `default`; rd must be even."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    factor = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", default))
    rotary_dim = int(head_dim * factor) if isinstance(factor, (int, float)) and 0 < factor <= 1 else 0
    if rotary_dim < 2 or rotary_dim % 2:
        raise ValueError(f"config.json: partial_rotary_factor {factor!r} of a {head_dim}-channel head must "
                         f"give an even number of rotary channels")
    return rotary_dim


def phi3_fields(hf: dict) -> dict:
    """Phi3ForCausalLM's own fields: no bias; the sliding window on every layer (Phi3Config's
    default: none); the rotary channels from partial_rotary_factor (Phi3Config's default: 1.0)."""
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    window = checked_window(hf.get("sliding_window"), tuple(range(hf["num_hidden_layers"])))
    return dict(qkv_bias=False, o_bias=False, mlp_bias=False, rotary_dim=partial_rotary_dim(hf, head_dim), **window)


@dataclass
class Phi3Config(LlamaConfig):
    rotary_dim: int = 0             # rd: the first rd channels of each head rotate, the rest pass through

    MODEL_TYPES: ClassVar[dict[str, Callable[[dict], dict]]] = {"phi3": phi3_fields}
    ROPE_TYPES: ClassVar[tuple[str, ...]] = ("default",)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first rd = cos.size(-1) channels of x [B, n, T, hd]."""
    rd = cos.size(-1)
    x_rot, x_pass = x[..., :rd], x[..., rd:]                       # [B, n, T, rd], [B, n, T, hd-rd]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


class Phi3Attention(Attention):
    """llama.Attention over one fused qkv_proj, with RoPE on the first rd channels of each head."""

    def __init__(self, cfg: Phi3Config, layer: int):
        nn.Module.__init__(self)   # its own projections, not LLaMA's four
        self.layer = layer
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        C = cfg.hidden_size
        self.qkv_proj = nn.Linear(C, (self.nh + 2 * self.nkv) * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, C, bias=False)

    def heads(self, x):
        return self.split(*self.qkv_proj(x).split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1))

    def rotate(self, t, cos, sin):
        return apply_rope(t, cos, sin)


class Phi3MLP(nn.Module):
    def __init__(self, cfg: Phi3Config):
        super().__init__()
        C, H = cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = nn.Linear(C, 2 * H, bias=False)
        self.down_proj = nn.Linear(H, C, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)                   # [B, T, H] each
        return self.down_proj(F.silu(gate) * up)                            # SwiGLU


class Phi3(Llama):
    # What differs from Llama (model.FAMILIES collects it); the rest is Llama's.
    Config = Phi3Config
    MODEL_TYPES = tuple(Phi3Config.MODEL_TYPES)
    CONFIG_FIELDS = LLAMA_FIELDS._replace(floats=LLAMA_FIELDS.floats + ("partial_rotary_factor",))
    LORA_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    DEFAULT_TARGETS = ("qkv_proj", "o_proj")
    SHARED_INPUTS = ()   # q, k, v are one layer already (qkv_proj), so are gate and up
    MLORA_NAMES = {}     # m-LoRA's qkv_proj, o_proj, gate_up_proj, down_proj are Phi-3's own names
    NOT_SUPPORTED = ("rope_scaling longrope (the 128k releases) or any but default", "hidden_act other than silu")
    Attention = Phi3Attention
    MLP = Phi3MLP

    def rope_inv_freq(self) -> torch.Tensor:
        """Inverse frequencies [rd/2] over the rotary channels only (transformers' default rope, dim = rd)."""
        return rope_inv_freq(dataclasses.replace(self.config, head_dim=self.config.rotary_dim))
