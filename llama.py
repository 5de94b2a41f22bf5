"""The LLaMA family in plain PyTorch: Llama 1/2/3.x, Mistral, SmolLM, TinyLlama, Qwen2.

They share one architecture: pre-norm RMSNorm blocks, rotate-half RoPE over the whole
head, grouped-query attention and a SwiGLU MLP. Parameter names follow the checkpoint's
keys, so model.load_model loads them with a strict check. This file knows nothing about
LoRA (lora.py swaps Linears in later) nor about files (model.py reads the folder).
KVCache, positions_and_mask and attend are shared with chatglm.py. Each model type's own
config.json fields (Qwen2's biases, Mistral's and Qwen2's sliding windows, per layer as
transformers decides them) are its LlamaConfig.MODEL_TYPES entry. A LLaMA-like family is a
subclass of Llama naming its own Block, Attention (heads, rotate, attend), MLP, config, rope.

Shape letters: B batch rows, T time steps, C channels (hidden_size), nh query heads,
nkv key/value heads, hd head size, V vocab.
"""
import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from checkpoint import (MAX_HEAD_DIM, MAX_HEADS, MAX_HIDDEN, MAX_INTERMEDIATE, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB,
                        ConfigFields)
from fast import RMSNormFunction, attend_packed, attend_varlen


# ----------------------------------------------------------------------------- config


LLAMA_FIELDS = ConfigFields(
    required={"vocab_size": MAX_VOCAB, "hidden_size": MAX_HIDDEN, "intermediate_size": MAX_INTERMEDIATE,
              "num_hidden_layers": MAX_LAYERS, "num_attention_heads": MAX_HEADS},
    optional={"num_key_value_heads": MAX_HEADS, "head_dim": MAX_HEAD_DIM,
              "max_position_embeddings": MAX_POSITIONS, "sliding_window": MAX_POSITIONS},
    floats=("rms_norm_eps", "rope_theta"),
    flags=("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window"),
    kv_heads=lambda hf: hf.get("num_key_value_heads"),
)


def checked_window(window, layers: tuple[int, ...]) -> dict:
    """LlamaConfig's sliding_window and sliding_layers: none when no layer slides."""
    if window is None or not layers:
        return dict(sliding_window=None, sliding_layers=())
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"config.json: sliding_window must be a positive integer or null, got {window!r}")
    return dict(sliding_window=window, sliding_layers=layers)


def llama_fields(hf: dict) -> dict:
    """LlamaForCausalLM: attention_bias puts a bias on q, k, v and o. LlamaModel has no sliding
    window: a sliding_window key in a llama config.json is ignored."""
    bias = hf.get("attention_bias", False)
    return dict(qkv_bias=bias, o_bias=bias)


def mistral_fields(hf: dict) -> dict:
    """MistralForCausalLM: MistralConfig defaults to a window of 4096 when the key is absent;
    MistralModel builds one mask for every layer and ignores a layer_types key (it only warns)."""
    bias = hf.get("attention_bias", False)
    window = hf.get("sliding_window", 4096)
    return dict(qkv_bias=bias, o_bias=bias, **checked_window(window, tuple(range(hf["num_hidden_layers"]))))


def qwen2_fields(hf: dict) -> dict:
    """Qwen2ForCausalLM: a bias on q, k and v always, none on o; a window per layer, as Qwen2Config
    decides it."""
    n_layers = hf["num_hidden_layers"]
    # Qwen2Config: `self.sliding_window = self.sliding_window if self.use_sliding_window else None`
    window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window", False) else None
    layer_types = hf.get("layer_types")
    if layer_types is None:
        # Qwen2Config: "sliding_attention" if self.sliding_window is not None and i >= self.max_window_layers
        max_window_layers = hf.get("max_window_layers", 28)
        layers = tuple(i for i in range(n_layers) if window is not None and i >= max_window_layers)
    else:  # an explicit list decides per layer
        if len(layer_types) != n_layers or not set(layer_types) <= {"sliding_attention", "full_attention"}:
            raise ValueError(f"config.json: layer_types must be {n_layers} entries of 'sliding_attention' "
                             f"or 'full_attention', got {layer_types!r}")
        layers = tuple(i for i, kind in enumerate(layer_types) if kind == "sliding_attention")
        if layers and window is None:  # transformers' create_sliding_window_causal_mask raises too
            raise ValueError("config.json: layer_types has sliding_attention layers but there is no window "
                             "(use_sliding_window is false or sliding_window is null)")
    return dict(qkv_bias=True, o_bias=False, **checked_window(window, layers))


@dataclass
class LlamaConfig:
    model_type: str                 # config.json's, a key of MODEL_TYPES
    vocab_size: int
    hidden_size: int                # C
    intermediate_size: int          # MLP width
    num_hidden_layers: int
    num_attention_heads: int        # nh
    num_key_value_heads: int        # nkv (< nh: grouped-query attention)
    head_dim: int                   # hd (usually C // nh; Qwen/Llama 3 may say otherwise)
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict = field(default_factory=dict)   # {"rope_type": "linear"|"llama3", ...}
    tie_word_embeddings: bool = False                  # lm_head shares embed_tokens' weight
    qkv_bias: bool = False                             # Qwen2: bias on q/k/v projections
    o_bias: bool = False                               # Llama's attention_bias puts one on o_proj too
    mlp_bias: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # Mistral/Qwen2 sliding-window attention: a query sees at most this many keys, itself and the
    # ones just before it by cache index (transformers' rule, see causal_mask); None = full attention.
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()               # the layers that use sliding_window; the rest see all

    # model_type -> its own fields from config.json (bias, sliding window), the rest shared (from_hf)
    MODEL_TYPES: ClassVar[dict[str, Callable[[dict], dict]]] = {
        "llama": llama_fields, "mistral": mistral_fields, "qwen2": qwen2_fields}
    ROPE_TYPES: ClassVar[tuple[str, ...]] = ("default", "linear", "llama3")   # what rope_inv_freq computes

    def layer_window(self, layer: int) -> int | None:
        """The attention window of this layer; None = full causal attention."""
        return self.sliding_window if layer in self.sliding_layers else None

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        """Map a hub config.json onto our fields, one by one: the fields every type shares here,
        each model type's own by its MODEL_TYPES entry."""
        model_type = hf.get("model_type")
        if model_type not in cls.MODEL_TYPES:
            family = cls.__name__.removesuffix("Config")
            raise ValueError(f"config.json: model_type {model_type!r} is not a {family} model "
                             f"(supported: {', '.join(cls.MODEL_TYPES)})")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported (only silu)")
        # Two styles for rope: hub folders have rope_theta + rope_scaling; transformers >= 5
        # writes everything into rope_parameters.
        rope_field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
        rope = dict(hf.get(rope_field) or {})
        rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope_type not in cls.ROPE_TYPES:
            raise ValueError(f"config.json: {rope_field}: rope type {rope_type!r} is not supported "
                             f"(supported: {', '.join(cls.ROPE_TYPES)})")
        rope_scaling = {"rope_type": rope_type, **rope} if rope_type != "default" else {}
        n_heads = hf["num_attention_heads"]
        shared = dict(
            model_type=model_type, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=n_heads, num_key_value_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(rope_theta), rope_scaling=rope_scaling,
            # LlamaConfig, Qwen2Config, MistralConfig and Phi3Config default to untied when the key is absent.
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            mlp_bias=hf.get("mlp_bias", False),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )
        return cls(**{**shared, **cls.MODEL_TYPES[model_type](hf)})


# ----------------------------------------------------------------------------- rope

def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies [hd/2] (RoFormer, eq. 15), with linear or Llama 3 scaling."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    scaling = cfg.rope_scaling
    if scaling.get("rope_type") == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif scaling.get("rope_type") == "llama3":
        # Llama 3.1's long-context rule: low frequencies (long wavelengths) are divided by
        # `factor`, high ones kept, and the band between is interpolated smoothly.
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen - low) / (high - low)).clamp(0, 1)
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def project(x: torch.Tensor, linears) -> list[torch.Tensor]:
    """The linears that read one input x (q/k/v; gate/up), applied together: a LoRA layer
    (lora.MultiLoRALinear.forward_siblings) computes them in one autograd node; plain Linears
    one by one."""
    joint = next((m.forward_siblings for m in linears if hasattr(m, "forward_siblings")), None)
    return joint(x, linears) if joint is not None else [linear(x) for linear in linears]


# ----------------------------------------------------------------------------- positions and mask

class Segments(NamedTuple):
    """Sequences laid end to end in one row (data.pack): each attends causally to its own
    earlier tokens only (and, with a sliding window, to at most `window` of them)."""
    lengths: tuple[int, ...]
    window: int | None = None


class PackedRow(NamedTuple):
    """A packed row described by device tensors only, so that its shapes and kernels are the
    same from step to step (graphs.py replays the step as a CUDA graph): each token's position
    [1, N] and segment number [N], the segments' starts [E+1] (int32), and `longest`, a bound
    on a segment's length (the flash kernel's grid)."""
    positions: torch.Tensor
    segment: torch.Tensor
    starts: torch.Tensor
    longest: int
    window: int | None = None


def positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, past: int,
              segments: tuple[int, ...] | None = None) -> torch.Tensor:
    """Position ids [B, T]. Without attention_mask every row is taken as unpadded (right padding
    needs no mask under causal attention); with it, positions count real tokens only, so a
    left-padded row starts at 0. With segments (one packed row) they restart at each segment."""
    B, T = input_ids.shape
    if isinstance(segments, PackedRow):
        return segments.positions
    if segments is not None:
        if B != 1 or sum(segments) != T or past or attention_mask is not None:
            raise ValueError(f"segments {list(segments)} must cover one packed row of {T} tokens "
                             f"(got {B} rows), with no attention_mask and no cache")
        lengths = torch.tensor(segments, device=input_ids.device)
        starts = lengths.cumsum(0) - lengths
        return (torch.arange(T, device=input_ids.device) - starts.repeat_interleave(lengths))[None]   # [1, T]
    if attention_mask is None:
        return torch.arange(past, past + T, device=input_ids.device).expand(B, T)    # [B, T]
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]             # [B, T]


def causal_mask(T: int, past: int, attention_mask: torch.Tensor | None, window: int | None = None,
                device=None, segments: tuple[int, ...] | None = None) -> torch.Tensor | Segments | None:
    """How attend() attends: None where is_causal=True gives the same (the fast path); with
    segments, a Segments (each segment on its own); else the boolean mask for SDPA, [T, T_past+T]
    (no padding) or [B, 1, T, T_past+T].

    The query at cache index i = past + t sees key j when j <= i, j is a real token, and, with a
    window, j > i - window (transformers' masking_utils.sliding_window_overlay:
    `return kv_idx > q_idx - sliding_window`): at most `window` keys, itself included, counted in
    cache indices, padding included, as transformers counts them.
    """
    if isinstance(segments, PackedRow):
        return segments._replace(window=window)
    if segments is not None:
        return Segments(tuple(segments), window)
    cuts = window is not None and past + T > window         # else the window hides no key
    if attention_mask is None and past == 0 and not cuts:
        return None
    query = torch.arange(past, past + T, device=device)[:, None]   # [T, 1] cache index of each query
    key = torch.arange(past + T, device=device)                    # [T_past+T]
    mask = key <= query                                            # [T, T_past+T]
    if cuts:
        mask = mask & (key > query - window)
    if attention_mask is None:
        return mask                                                # broadcast over B and heads
    mask = mask & attention_mask.bool()[:, None, :]                # [B, T, T_past+T]
    # A padding query would see no key at all (NaN softmax); let it see itself.
    mask = mask | (key == query)
    return mask[:, None]                                           # [B, 1, T, T_past+T]


def positions_and_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, past: int,
                       segments: tuple[int, ...] | None = None):
    """Position ids [B, T] and how to attend with full attention (see positions and causal_mask)."""
    T = input_ids.size(1)
    return (positions(input_ids, attention_mask, past, segments),
            causal_mask(T, past, attention_mask, device=input_ids.device, segments=segments))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | Segments | None,
           gqa: bool) -> torch.Tensor:
    """Scaled dot-product attention of q [B, nh, T, hd] over k, v [B, nkv, S, hd] -> [B, nh, T, hd].
    mask is causal_mask's answer: None (is_causal, the fused kernel), a bool mask, or Segments."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if isinstance(mask, Segments):
        return attend_segments(q, k, v, mask, gqa)
    if isinstance(mask, PackedRow):
        return attend_packed(q, k, v, mask, gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def attend_segments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments, gqa: bool) -> torch.Tensor:
    """Block-diagonal causal attention over one packed row, no mask materialised.

    On CUDA in 16-bit, torch's variable-length flash kernel does every segment in one call.
    Elsewhere each segment runs through SDPA's causal kernel on its own, which on a CPU beats
    one SDPA call with the [N, N] block-diagonal mask (N^2 work, most of it masked) and the same
    rows padded.
    """
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        # tests/test_cuda.py compares it with the segment-by-segment path below (last run on an
        # H200 with torch 2.11, at ab4e102 on 2026-11-29; not re-run since: benchmarks.md).
        lengths = torch.tensor(segments.lengths, device=q.device, dtype=torch.int32)
        starts = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))               # [E+1] segment starts
        return attend_varlen(q, k, v, starts, max(segments.lengths), segments.window, gqa)
    # split, not slicing: autograd joins split gradients with one cat, where each slice's
    # gradient would be a zero-filled [1, nh, N, hd] added up.
    # A run of segments of one length goes through SDPA as one batch: one call instead of one
    # per segment (scripts/op_count.py counts the ops saved).
    runs = [(length, len(list(run))) for length, run in itertools.groupby(segments.lengths)]
    sizes = [length * count for length, count in runs]
    out = []
    for qs, ks, vs, (length, count) in zip(q.split(sizes, 2), k.split(sizes, 2), v.split(sizes, 2), runs):
        mask = causal_mask(length, 0, None, segments.window, q.device)
        if count == 1:
            out.append(attend(qs, ks, vs, mask, gqa))
            continue
        batch = [t.reshape(t.size(1), count, length, t.size(3)).transpose(0, 1) for t in (qs, ks, vs)]
        y = attend(*batch, mask, gqa)                                              # [count, nh, length, hd]
        out.append(y.transpose(0, 1).reshape(1, y.size(1), count * length, y.size(3)))
    return out[0] if len(out) == 1 else torch.cat(out, dim=2)


# ----------------------------------------------------------------------------- blocks, checkpointed or not

def run_block(model: nn.Module, block: nn.Module, x: torch.Tensor, *args) -> torch.Tensor:
    """block(x, *args); with model.checkpoint_blocks while training with gradients, under
    activation checkpointing: only the block's input is kept and its insides are recomputed
    in backward (torch's non-reentrant checkpoint), trading ~1/3 more compute for memory."""
    if model.checkpoint_blocks and model.training and torch.is_grad_enabled():
        return checkpoint(block, x, *args, use_reentrant=False)
    return block(x, *args)


# ----------------------------------------------------------------------------- kv cache

class KVCache:
    """Preallocated keys/values for generation: [B, nkv, max_T, hd] per layer."""

    def __init__(self, n_layers: int, B: int, nkv: int, max_T: int, hd: int, dtype, device):
        self.k = [torch.zeros(B, nkv, max_T, hd, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(B, nkv, max_T, hd, dtype=dtype, device=device) for _ in range(n_layers)]
        self.length = 0  # time steps already written (advanced by the model after the last layer)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        T = k.size(2)
        self.k[layer][:, :, self.length:self.length + T] = k
        self.v[layer][:, :, self.length:self.length + T] = v
        end = self.length + T
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


# ----------------------------------------------------------------------------- blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, weight_in_fp32: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.weight_in_fp32 = eps, weight_in_fp32

    def forward(self, x):
        # In fp32 for stability, then back (as the reference implementations do).
        return RMSNormFunction.apply(x, self.weight, self.eps, self.weight_in_fp32)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        C = cfg.hidden_size
        self.q_proj = nn.Linear(C, self.nh * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(C, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(C, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, C, bias=cfg.o_bias)

    def forward(self, x, cos, sin, mask, cache):
        B, T, C = x.shape
        q, k, v = self.heads(x)                                             # [B, nh, T, hd], [B, nkv, T, hd] x2
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)                           # [B, nkv, T_past+T, hd]
        y = self.attend(q, k, v, mask)                                      # [B, nh, T, hd]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))

    # What a LLaMA-like family changes of it: its projections and norms, its RoPE, its scores.
    def heads(self, x):
        return self.split(*project(x, (self.q_proj, self.k_proj, self.v_proj)))

    def split(self, q, k, v):   # [B, T, n*hd] -> [B, n, T, hd]
        return tuple(t.unflatten(-1, (n, self.hd)).transpose(1, 2) for t, n in ((q, self.nh), (k, self.nkv), (v, self.nkv)))

    def rotate(self, t, cos, sin):
        return t * cos + rotate_half(t) * sin

    def attend(self, q, k, v, mask):
        return attend(q, k, v, mask, gqa=self.nkv != self.nh)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        C, H = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(C, H, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(C, H, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(H, C, bias=cfg.mlp_bias)

    def forward(self, x):
        gate, up = project(x, (self.gate_proj, self.up_proj))
        return self.down_proj(F.silu(gate) * up)                            # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int, attention: type[nn.Module], mlp: type[nn.Module]):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp(cfg)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The body; named `model` inside Llama so keys read `model.layers.0...` as on the hub."""

    def __init__(self, cfg: LlamaConfig, block: type[nn.Module], attention: type[nn.Module], mlp: type[nn.Module]):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(block(cfg, i, attention, mlp) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Llama(nn.Module):
    # What the rest of the code needs to know about this family, stated once (model.FAMILIES collects it):
    Config = LlamaConfig            # Config.from_hf maps config.json
    MODEL_TYPES = tuple(LlamaConfig.MODEL_TYPES)    # config.json's model_type values this class loads
    CONFIG_FIELDS = LLAMA_FIELDS    # what model.check_checkpoint checks in config.json before building
    LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # Alpaca-LoRA's and m-LoRA's examples
    SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # layers that read one input
    OUTPUT_LAYER = "lm_head"        # never a LoRA target nor quantized (as in QLoRA)
    RECOMPUTED_KEYS = ("rotary_emb.inv_freq",)  # in some checkpoints; recomputed, not loaded
    MLORA_NAMES = {"w1_proj": "gate_proj", "w2_proj": "down_proj", "w3_proj": "up_proj"}  # m-LoRA's (Meta's w1/w2/w3)
    FIXED_SHAPE_STEP = True         # forward takes a PackedRow: graphs.py may run its step at fixed shapes
    NOT_SUPPORTED = ("rope_scaling yarn, dynamic, longrope", "hidden_act other than silu")  # refused, one line each
    ROPE_DTYPE: torch.dtype | None = None   # cos and sin in this dtype (OLMo 2: fp32); None: the model's
    logit_softcap: float | None = None  # logits capped as c * tanh(z / c) in forward and the loss (Gemma); None: not
    # The pieces of each block, so a LLaMA-like family is a subclass naming its own.
    Block = Block
    Attention = Attention
    MLP = MLP

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, self.Block, self.Attention, self.MLP)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.layer_windows = [cfg.layer_window(i) for i in range(cfg.num_hidden_layers)]
        self.checkpoint_blocks = False  # activation checkpointing while training (run_block)
        # Not a checkpoint key: recomputed, and created again after meta-device loading.
        self.register_buffer("inv_freq", self.rope_inv_freq(), persistent=False)

    def rope_inv_freq(self) -> torch.Tensor:
        """The rotary embedding's inverse frequencies [hd/2]; a family with another rope overrides it."""
        return rope_inv_freq(self.config)

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_buffers(self, device):
        """Recompute what is not in the checkpoint (rope frequencies, fp32) on device."""
        self.inv_freq = self.rope_inv_freq().to(device)

    def new_cache(self, B: int, max_T: int) -> KVCache:
        cfg, w = self.config, self.model.embed_tokens.weight
        return KVCache(cfg.num_hidden_layers, B, cfg.num_key_value_heads, max_T, cfg.head_dim, w.dtype, w.device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, output_mask: torch.Tensor | None = None,
                head: bool = True, segments: tuple[int, ...] | PackedRow | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V].

        attention_mask [B, T_past+T] (1 = real token) handles left or right padding; without
        it every row is taken as unpadded. output_mask [B, T] (bool) keeps only those
        positions and returns [N, V], which saves the big vocab matmul on prompt tokens.
        head=False returns the final hidden states ([B, T, C] or [N, C]) instead, for a loss
        that applies the output layer itself (objectives.token_losses). segments (lengths
        summing to T, B = 1) marks a packed row (data.pack): positions restart and attention
        stays inside each segment; a PackedRow gives the same as device tensors.
        """
        T = input_ids.size(1)
        past = cache.length if cache is not None else 0
        pos = positions(input_ids, attention_mask, past, segments)
        # One mask per distinct window (None: full attention), built once here and shared by the layers.
        masks = {w: causal_mask(T, past, attention_mask, w, input_ids.device, segments) for w in set(self.layer_windows)}
        freqs = pos[..., None].float() * self.inv_freq                       # [B, T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)                              # [B, T, hd]
        x = self.model.embed_tokens(input_ids)                               # [B, T, C]
        cos = emb.cos().to(self.ROPE_DTYPE or x.dtype)[:, None]              # [B, 1, T, hd]
        sin = emb.sin().to(self.ROPE_DTYPE or x.dtype)[:, None]
        for block, window in zip(self.model.layers, self.layer_windows):
            x = run_block(self, block, x, cos, sin, masks[window], cache)
        if cache is not None:
            cache.length += T
        x = self.model.norm(x)
        if output_mask is not None:
            x = x[output_mask]                                               # [N, C]
        return self.lm_head(x) if head else x
