"""Gemma 2 (`model_type: "gemma2"`, transformers' Gemma2ForCausalLM) and Gemma 3's text model
(`"gemma3_text"`, Gemma3ForCausalLM) as LLaMA-like families: llama.py's model with their own block,
attention, MLP, config and rope. What differs from LLaMA:
- the embeddings are multiplied by sqrt(hidden_size), that scale first rounded to the model's dtype;
- Gemma's RMSNorm: x / rms(x) * (1 + w), all in fp32, then cast; four per block, the attention's and
  the MLP's outputs normed too before each residual add;
- a GeGLU MLP (gelu with the tanh approximation, hidden_activation);
- attention scores scaled by query_pre_attn_scalar**-0.5 and, in Gemma 2, capped as c * tanh(s / c)
  (attn_logit_softcapping) before the mask: no fused kernel caps, so those layers attend explicitly;
- logits capped the same way (final_logit_softcapping), in the training loss too
  (`logit_softcap`, which objectives.token_losses hands to fast.chunked_token_losses);
- sliding-window attention on the layers layer_types names (by default every other layer from the
  first in Gemma 2, five of each six in Gemma 3); the output layer tied to the embedding by default.
Gemma 3 adds q_norm/k_norm (Gemma's RMSNorm over each head, before RoPE), a rope of its own for the
sliding layers (rope_local_base_freq) and drops the attention cap (transformers' Gemma3Attention
reads attn_logit_softcapping but never applies it; neither do we).

Shape letters as in llama.py.
"""
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import MAX_LAYERS
from fast import RMSNormFunction
from llama import (LLAMA_FIELDS, MLP, Attention, Llama, LlamaConfig, PackedRow, Segments, attend, causal_mask,
                   checked_window, positions, project, rope_inv_freq, run_block)


# ----------------------------------------------------------------------------- config

def positive_or_null(hf: dict, name: str, default: float | None) -> float | None:
    value = hf.get(name, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not 0 < value < math.inf):
        raise ValueError(f"config.json: {name} must be a positive number or null, got {value!r}")
    return value


def sliding_layers(hf: dict, default: Callable[[int], bool]) -> tuple[int, ...]:
    """The layers layer_types marks sliding_attention; without layer_types, those `default` picks."""
    n_layers = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types")
    if layer_types is None:
        return tuple(i for i in range(n_layers) if default(i))
    if (not isinstance(layer_types, list) or len(layer_types) != n_layers
            or not set(layer_types) <= {"sliding_attention", "full_attention"}):
        raise ValueError(f"config.json: layer_types must be {n_layers} entries of 'sliding_attention' "
                         f"or 'full_attention', got {layer_types!r}")
    return tuple(i for i, kind in enumerate(layer_types) if kind == "sliding_attention")


def gemma_fields(hf: dict, sliding: tuple[int, ...], final_cap: float | None) -> dict:
    """What Gemma2Config and Gemma3TextConfig share, with their defaults where config.json is silent."""
    if hf.get("use_bidirectional_attention"):
        raise ValueError("config.json: use_bidirectional_attention is not supported (causal attention only)")
    act = hf.get("hidden_activation", "gelu_pytorch_tanh")   # Gemma2MLP reads this; hidden_act is unused
    if act != "gelu_pytorch_tanh":
        raise ValueError(f"config.json: hidden_activation {act!r} is not supported (only gelu_pytorch_tanh)")
    window = hf.get("sliding_window", 4096)
    if window is None:   # Gemma2Model builds the sliding mask whatever the layers, and raises without one
        raise ValueError("config.json: sliding_window must be a positive integer, got null")
    ropes = [hf, hf.get("rope_scaling") or {}, hf.get("rope_parameters") or {}]
    ropes += [rope for rope in ropes[2].values() if isinstance(rope, dict)]   # Gemma 3's, per layer type
    if any(rope.get("partial_rotary_factor", 1.0) != 1.0 for rope in ropes):
        raise ValueError("config.json: partial_rotary_factor is not supported (Gemma rotates whole heads)")
    bias = hf.get("attention_bias", False)
    return dict(qkv_bias=bias, o_bias=bias, mlp_bias=False, **checked_window(window, sliding),
                num_key_value_heads=hf.get("num_key_value_heads") or 4, head_dim=hf.get("head_dim") or 256,
                tie_word_embeddings=hf.get("tie_word_embeddings", True),
                query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
                final_logit_softcapping=positive_or_null(hf, "final_logit_softcapping", final_cap))


def gemma2_fields(hf: dict) -> dict:
    """Gemma2Config: every other layer slides, from the first; both caps on by default (50, 30)."""
    return {**gemma_fields(hf, sliding_layers(hf, lambda i: i % 2 == 0), final_cap=30.0),
            "attn_logit_softcapping": positive_or_null(hf, "attn_logit_softcapping", 50.0)}


def rope_of(spec: dict, field_name: str) -> tuple[float, dict]:
    """(rope_theta, rope_scaling) of one layer type's rope; only what llama.rope_inv_freq computes."""
    spec = dict(spec)
    theta = spec.pop("rope_theta")
    rope_type = spec.pop("rope_type", spec.pop("type", "default"))
    if rope_type not in Gemma2Config.ROPE_TYPES:
        raise ValueError(f"config.json: {field_name}: rope type {rope_type!r} is not supported "
                         f"(supported: {', '.join(Gemma2Config.ROPE_TYPES)})")
    for name, value in (("rope_theta", theta), ("factor", spec.get("factor", 1.0))):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"config.json: {field_name}: {name} must be a positive number, got {value!r}")
    return float(theta), ({"rope_type": rope_type, **spec} if rope_type != "default" else {})


def gemma3_fields(hf: dict) -> dict:
    """Gemma3TextConfig: five of each sliding_window_pattern (6) layers slide; no caps by default; the
    full layers' rope (rope_theta 1e6, rope_scaling) and the sliding layers' (rope_local_base_freq 1e4),
    or transformers 5's rope_parameters with one entry per layer type."""
    pattern = hf.get("sliding_window_pattern", 6)
    if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
        raise ValueError(f"config.json: sliding_window_pattern must be a positive integer, got {pattern!r}")
    ropes = hf.get("rope_parameters") or {}
    if not set(ropes) <= {"full_attention", "sliding_attention"}:
        raise ValueError(f"config.json: rope_parameters must have one entry per layer type (full_attention, "
                         f"sliding_attention), got keys {sorted(ropes)}")
    # Gemma3TextConfig.convert_rope_params_to_dict: rope_scaling updates the full layers' entry, which
    # already has a rope_type: the older key `type` is then not read.
    scaling = hf.get("rope_scaling") or {}
    if "type" in scaling and "rope_type" not in scaling:
        raise ValueError("config.json: rope_scaling: write rope_type, not type (transformers' Gemma3TextConfig "
                         "reads a rope_scaling `type` as no scaling)")
    full = {**(ropes.get("full_attention") or {}), **scaling}
    full.setdefault("rope_theta", hf.get("rope_theta", 1e6))
    local = {"rope_theta": hf.get("rope_local_base_freq", 1e4), **(ropes.get("sliding_attention") or {})}
    rope_theta, rope_scaling = rope_of(full, "rope_parameters.full_attention")
    local_theta, local_scaling = rope_of(local, "rope_parameters.sliding_attention")
    return {**gemma_fields(hf, sliding_layers(hf, lambda i: (i + 1) % pattern != 0), final_cap=None),
            "rope_theta": rope_theta, "rope_scaling": rope_scaling,
            "local_rope_theta": local_theta, "local_rope_scaling": local_scaling}


@dataclass
class Gemma2Config(LlamaConfig):
    query_pre_attn_scalar: float = 256.0               # attention scores are scaled by its -1/2 power
    attn_logit_softcapping: float | None = None        # scores capped as c * tanh(s / c); None: not capped
    final_logit_softcapping: float | None = None       # the logits capped the same way
    # The sliding layers' rope (Gemma 3); None: theirs is rope_theta/rope_scaling like the other layers'.
    local_rope_theta: float | None = None
    local_rope_scaling: dict = field(default_factory=dict)

    MODEL_TYPES: ClassVar[dict[str, Callable[[dict], dict]]] = {"gemma2": gemma2_fields}
    ROPE_TYPES: ClassVar[tuple[str, ...]] = ("default", "linear")

    @classmethod
    def from_hf(cls, hf: dict) -> "Gemma2Config":
        # hidden_act, in hub folders beside hidden_activation, is read by no Gemma class: dropped
        # before LlamaConfig's check of it (gemma_fields checks hidden_activation).
        return super().from_hf({key: value for key, value in hf.items() if key != "hidden_act"})


@dataclass
class Gemma3Config(Gemma2Config):
    MODEL_TYPES: ClassVar[dict[str, Callable[[dict], dict]]] = {"gemma3_text": gemma3_fields}


GEMMA_FIELDS = LLAMA_FIELDS._replace(
    optional={**LLAMA_FIELDS.optional, "sliding_window_pattern": MAX_LAYERS},
    floats=LLAMA_FIELDS.floats + ("query_pre_attn_scalar", "rope_local_base_freq"),
    kv_heads=lambda hf: hf.get("num_key_value_heads") or 4)   # Gemma2Config's default


# ----------------------------------------------------------------------------- blocks

def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """c * tanh(x / c): x squashed smoothly into (-c, c) (Gemma 2 report, section 2); None: x."""
    return x if cap is None else torch.tanh(x / cap) * cap


class GemmaRMSNorm(nn.Module):
    """x / rms(x) * (1 + weight), in fp32 then cast to x's dtype (transformers' Gemma2RMSNorm): the
    checkpoint stores weight - 1."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):
        return RMSNormFunction.apply(x, 1.0 + self.weight.float(), self.eps, True)


def dense_mask(mask: torch.Tensor | PackedRow | None, T: int, S: int, device) -> torch.Tensor:
    """causal_mask's answer as a bool mask [.., T, S] (True: attend): None is causal; a PackedRow is
    causal inside each segment, within its window (fast.attend_packed's mask)."""
    if isinstance(mask, torch.Tensor):
        return mask
    if mask is None:
        return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)
    i = torch.arange(T, device=device)
    allowed = (mask.segment[:, None] == mask.segment[None, :]) & (i[None, :] <= i[:, None])    # [N, N]
    if mask.window is not None:
        allowed &= i[None, :] > i[:, None] - mask.window
    return allowed


def attend_capped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float, cap: float) -> torch.Tensor:
    """Attention with capped scores, as transformers' eager attention: q k^T * scale, c * tanh(s / c),
    the mask, a softmax in fp32 -> [B, nh, T, hd]. q [B, nh, T, hd], k, v [B, nkv, S, hd]; mask is
    llama.causal_mask's answer. A packed row's Segments go one by one: no [N, N] scores."""
    if isinstance(mask, Segments):
        parts = zip(*(t.split(mask.lengths, dim=2) for t in (q, k, v)))
        return torch.cat([attend_capped(qs, ks, vs, causal_mask(qs.size(2), 0, None, mask.window, q.device), scale, cap)
                          for qs, ks, vs in parts], dim=2)
    groups = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)   # [B, nh, S, hd]
    scores = softcap((q @ k.transpose(2, 3)) * scale, cap)                            # [B, nh, T, S]
    scores = scores.masked_fill(~dense_mask(mask, q.size(2), k.size(2), q.device), float("-inf"))
    return scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v                   # [B, nh, T, hd]


class Gemma2Attention(Attention):
    """llama.Attention's projections; scores scaled by query_pre_attn_scalar**-0.5, capped when
    attn_logit_softcapping is set."""

    def __init__(self, cfg: Gemma2Config, layer: int):
        super().__init__(cfg, layer)
        self.scale, self.cap = cfg.query_pre_attn_scalar ** -0.5, cfg.attn_logit_softcapping
        # Uncapped, SDPA's kernels attend (they scale by hd**-0.5): q is scaled by the ratio beforehand,
        # 1.0 (nothing to do) in the releases where query_pre_attn_scalar is head_dim.
        self.q_factor = (self.hd / cfg.query_pre_attn_scalar) ** 0.5

    def attend(self, q, k, v, mask):
        if self.cap is not None:
            return attend_capped(q, k, v, mask, self.scale, self.cap)
        return attend(q * self.q_factor if self.q_factor != 1 else q, k, v, mask, gqa=self.nkv != self.nh)


class Gemma3Attention(Gemma2Attention):
    """Gemma 2's attention with q and k normed per head (Gemma's RMSNorm over hd) before RoPE."""

    def __init__(self, cfg: Gemma3Config, layer: int):
        super().__init__(cfg, layer)
        self.q_norm = GemmaRMSNorm(self.hd, cfg.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.hd, cfg.rms_norm_eps)

    def heads(self, x):
        q, k, v = super().heads(x)
        return self.q_norm(q), self.k_norm(k), v


class GemmaMLP(MLP):
    def forward(self, x):
        gate, up = project(x, (self.gate_proj, self.up_proj))
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)         # GeGLU


class GemmaBlock(nn.Module):
    """Pre- and post-norms around both the attention and the MLP (Gemma 2 report, section 2)."""

    def __init__(self, cfg: Gemma2Config, layer: int, attention: type[nn.Module], mlp: type[nn.Module]):
        super().__init__()
        C, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(C, eps)
        self.self_attn = attention(cfg, layer)
        self.post_attention_layernorm = GemmaRMSNorm(C, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(C, eps)
        self.mlp = mlp(cfg)
        self.post_feedforward_layernorm = GemmaRMSNorm(C, eps)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


# ----------------------------------------------------------------------------- the model

def rope_tables(pos: torch.Tensor, inv_freq: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, T, hd] of positions [B, T] (rotate-half RoPE over the whole head)."""
    freqs = pos[..., None].float() * inv_freq                                # [B, T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)                                  # [B, T, hd]
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


class Gemma2(Llama):
    # What differs from Llama (model.FAMILIES collects it); the rest is Llama's.
    Config = Gemma2Config
    MODEL_TYPES = tuple(Gemma2Config.MODEL_TYPES)
    CONFIG_FIELDS = GEMMA_FIELDS
    # graphs.py's fixed-shape step computes its loss without the logits' cap, and capped attention
    # has no flash kernel: Gemma runs the eager step.
    FIXED_SHAPE_STEP = False
    NOT_SUPPORTED = ("use_bidirectional_attention", "a null sliding_window", "rope types other than default and linear",
                     "partial_rotary_factor", "hidden_activation other than gelu_pytorch_tanh")   # from_hf refuses each
    Block = GemmaBlock
    Attention = Gemma2Attention
    MLP = GemmaMLP

    def __init__(self, cfg: Gemma2Config):
        super().__init__(cfg)
        self.model.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.logit_softcap = cfg.final_logit_softcapping
        self.register_buffer("local_inv_freq", self.local_rope_inv_freq(), persistent=False)

    def local_rope_inv_freq(self) -> torch.Tensor:
        """The sliding layers' inverse frequencies [hd/2]: those of the other layers unless
        local_rope_theta says otherwise (Gemma 3)."""
        cfg = self.config
        if cfg.local_rope_theta is None:
            return self.rope_inv_freq()
        return rope_inv_freq(dataclasses.replace(cfg, rope_theta=cfg.local_rope_theta,
                                                 rope_scaling=cfg.local_rope_scaling))

    def reset_buffers(self, device):
        super().reset_buffers(device)
        self.local_inv_freq = self.local_rope_inv_freq().to(device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache=None, output_mask: torch.Tensor | None = None, head: bool = True,
                segments: tuple[int, ...] | PackedRow | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V], capped; the arguments as llama.Llama.forward's."""
        T = input_ids.size(1)
        past = cache.length if cache is not None else 0
        pos = positions(input_ids, attention_mask, past, segments)
        # One mask per distinct window (None: full attention), built once here and shared by the layers.
        masks = {w: causal_mask(T, past, attention_mask, w, input_ids.device, segments) for w in set(self.layer_windows)}
        x = self.model.embed_tokens(input_ids)                               # [B, T, C]
        # sqrt(C) in fp32 then in x's dtype, as transformers' embed_scale buffer (55.4256 is 55.5 in bf16).
        x = x * torch.tensor(self.config.hidden_size ** 0.5).to(device=x.device, dtype=x.dtype)
        # The sliding layers (a window) have their own rope in Gemma 3.
        ropes = {w: rope_tables(pos, self.inv_freq if w is None else self.local_inv_freq, x.dtype) for w in masks}
        for block, window in zip(self.model.layers, self.layer_windows):
            x = run_block(self, block, x, *ropes[window], masks[window], cache)
        if cache is not None:
            cache.length += T
        x = self.model.norm(x)
        if output_mask is not None:
            x = x[output_mask]                                               # [N, C]
        return softcap(self.lm_head(x), self.logit_softcap) if head else x


class Gemma3(Gemma2):
    Config = Gemma3Config
    MODEL_TYPES = tuple(Gemma3Config.MODEL_TYPES)
    NOT_SUPPORTED = Gemma2.NOT_SUPPORTED + ("rope_scaling with the older key type (transformers reads no scaling)",)
    Attention = Gemma3Attention
