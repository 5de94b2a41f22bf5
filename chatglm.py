"""ChatGLM2/3 and GLM-4 (THUDM's `model_type: "chatglm"` folders) in plain PyTorch.

The same pre-norm RMSNorm decoder as the LLaMA family in llama.py (whose RMSNorm, attention
and KV cache it imports), written the way THUDM's checkpoints are laid out:
- one fused `query_key_value` Linear with bias, split into nh query heads and ng multi-query
  groups of keys and values (ng < nh: each group serves nh/ng query heads, as GQA);
- RoPE on the first half of each head only, rotating interleaved (even, odd) pairs, base
  10000 * rope_ratio (ChatGLM3-32k/128k and GLM-4 raise the base instead of the positions);
- SwiGLU through one `dense_h_to_4h` whose first half is the gate.
Parameter names equal the checkpoint's keys (transformer.encoder.layers.N.self_attention...),
so loading is model.py's strict load and PEFT keys come out as THUDM's own code has them.
transformers' layout of the same weights (GLM-4-9B-chat as `model_type: "glm"`) is glm.py's.

Shape letters: B batch rows, T time steps, C channels (hidden_size), nh query heads,
ng key/value groups, hd head size, rd rotary size (hd/2), V vocab (padded).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import (MAX_HEAD_DIM, MAX_HEADS, MAX_HIDDEN, MAX_INTERMEDIATE, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB,
                        ConfigFields)
from llama import (KVCache, RMSNorm as LlamaRMSNorm, attend, positions_and_mask, run_block)


# ----------------------------------------------------------------------------- config

CHATGLM_FIELDS = ConfigFields(   # THUDM's field names (ChatGLMConfig.from_hf)
    required={"padded_vocab_size": MAX_VOCAB, "hidden_size": MAX_HIDDEN, "ffn_hidden_size": MAX_INTERMEDIATE,
              "num_layers": MAX_LAYERS, "num_attention_heads": MAX_HEADS},
    optional={"multi_query_group_num": MAX_HEADS, "kv_channels": MAX_HEAD_DIM, "seq_length": MAX_POSITIONS},
    floats=("layernorm_epsilon", "rope_ratio"),
    flags=("multi_query_attention", "add_qkv_bias", "add_bias_linear"),
    kv_heads=lambda hf: hf.get("multi_query_group_num") if hf.get("multi_query_attention") else None,
)

@dataclass
class ChatGLMConfig:
    model_type: str                 # always "chatglm" (ChatGLM2/3, GLM-4)
    vocab_size: int                 # V: padded_vocab_size (65024 for ChatGLM2/3), larger than the tokenizer's
    hidden_size: int                # C
    ffn_hidden_size: int            # MLP width; dense_h_to_4h is twice this (gate and up)
    num_layers: int
    num_attention_heads: int        # nh
    num_key_value_heads: int        # ng: multi_query_group_num, or nh without multi-query attention
    head_dim: int                   # hd: kv_channels
    layernorm_epsilon: float
    rope_theta: float               # 10000 * rope_ratio
    qkv_bias: bool = True           # add_qkv_bias (or add_bias_linear)
    linear_bias: bool = False       # add_bias_linear: bias on dense and both MLP Linears
    seq_length: int = 8192
    tie_word_embeddings: bool = False   # always False for ChatGLM; load_model reads it
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    @classmethod
    def from_hf(cls, hf: dict) -> "ChatGLMConfig":
        """Map THUDM's config.json (configuration_chatglm.py's fields) onto ours, one by one."""
        if hf.get("model_type") != "chatglm":
            raise ValueError(f"config.json: model_type {hf.get('model_type')!r} is not 'chatglm'")
        # ChatGLM-6B v1 shares the model_type but is another architecture (2D positions,
        # GLM blocks with post-norm residuals scaled by alpha, LayerNorm, tied head).
        if "position_encoding_2d" in hf or "padded_vocab_size" not in hf:
            raise ValueError("config.json: position_encoding_2d / no padded_vocab_size: ChatGLM-6B v1 "
                             "is not supported (ChatGLM2/3 and GLM-4 are)")
        unsupported = {  # field: (value this code implements, what the other value would mean)
            "rmsnorm": (True, "LayerNorm instead of RMSNorm"),
            "apply_residual_connection_post_layernorm": (False, "post-layernorm residuals"),
            "post_layer_norm": (True, "no final layernorm"),
            "fp32_residual_connection": (False, "residual stream kept in fp32"),
            "tie_word_embeddings": (False, "output_layer tied to the embedding"),
        }
        for name, (ours, meaning) in unsupported.items():
            if name in hf and hf[name] != ours:
                raise ValueError(f"config.json: {name}={hf[name]!r} ({meaning}) is not supported")
        if hf.get("pre_seq_len"):
            raise ValueError(f"config.json: pre_seq_len={hf['pre_seq_len']} (P-tuning v2 prefix) is not supported")
        if hf.get("quantization_bit"):
            raise ValueError(f"config.json: quantization_bit={hf['quantization_bit']}: THUDM's pre-quantized "
                             "weights are not supported; load the fp16/bf16 checkpoint (and use quant=)")
        n_heads = hf["num_attention_heads"]
        multi_query = hf.get("multi_query_attention", False)
        return cls(
            model_type="chatglm",
            vocab_size=hf["padded_vocab_size"],
            hidden_size=hf["hidden_size"],
            ffn_hidden_size=hf["ffn_hidden_size"],
            num_layers=hf["num_layers"],
            num_attention_heads=n_heads,
            num_key_value_heads=hf["multi_query_group_num"] if multi_query else n_heads,
            head_dim=hf.get("kv_channels") or hf["hidden_size"] // n_heads,
            layernorm_epsilon=hf.get("layernorm_epsilon", 1e-5),
            rope_theta=10000.0 * hf.get("rope_ratio", 1),
            qkv_bias=hf.get("add_qkv_bias", False) or hf.get("add_bias_linear", False),
            linear_bias=hf.get("add_bias_linear", False),
            seq_length=hf.get("seq_length", 8192),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )


# ----------------------------------------------------------------------------- rope

def rope_inv_freq(cfg: ChatGLMConfig) -> torch.Tensor:
    """Inverse frequencies [rd/2] over the rotary half of the head (RoFormer, eq. 15)."""
    rd = cfg.head_dim // 2
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[2i], x[2i+1]) of the first rd channels; the rest pass through."""
    rd = 2 * cos.size(-1)
    x_rot, x_pass = x[..., :rd], x[..., rd:]                      # [B, n, T, rd], [B, n, T, hd-rd]
    x_even, x_odd = x_rot.unflatten(-1, (-1, 2)).unbind(-1)        # [B, n, T, rd/2] each
    rotated = torch.stack((x_even * cos - x_odd * sin, x_odd * cos + x_even * sin), dim=-1)
    return torch.cat((rotated.flatten(-2), x_pass), dim=-1)        # [B, n, T, hd]


# ----------------------------------------------------------------------------- blocks

def RMSNorm(dim: int, eps: float) -> LlamaRMSNorm:
    """ChatGLM's order: normalize and scale by the weight in fp32, then cast back (LLaMA
    casts before the weight, as transformers' Llama does)."""
    return LlamaRMSNorm(dim, eps, weight_in_fp32=True)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ChatGLMConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.nh, self.ng, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        C = cfg.hidden_size
        # Output rows: [q: nh*hd | k: ng*hd | v: ng*hd], as THUDM's checkpoint stores them.
        self.query_key_value = nn.Linear(C, (self.nh + 2 * self.ng) * self.hd, bias=cfg.qkv_bias)
        self.dense = nn.Linear(self.nh * self.hd, C, bias=cfg.linear_bias)

    def forward(self, x, cos, sin, mask, cache):
        B, T, C = x.shape
        q, k, v = self.query_key_value(x).split([self.nh * self.hd, self.ng * self.hd, self.ng * self.hd], dim=-1)
        q = q.view(B, T, self.nh, self.hd).transpose(1, 2)                 # [B, nh, T, hd]
        k = k.view(B, T, self.ng, self.hd).transpose(1, 2)                 # [B, ng, T, hd]
        v = v.view(B, T, self.ng, self.hd).transpose(1, 2)                 # [B, ng, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)                           # [B, ng, T_past+T, hd]
        # Query head h reads group h // (nh/ng): THUDM expands each group over consecutive heads.
        y = attend(q, k, v, mask, gqa=self.ng != self.nh)                   # [B, nh, T, hd]
        y = y.transpose(1, 2).reshape(B, T, self.nh * self.hd)              # [B, T, nh*hd]
        return self.dense(y)


class MLP(nn.Module):
    def __init__(self, cfg: ChatGLMConfig):
        super().__init__()
        C, H = cfg.hidden_size, cfg.ffn_hidden_size
        self.dense_h_to_4h = nn.Linear(C, 2 * H, bias=cfg.linear_bias)
        self.dense_4h_to_h = nn.Linear(H, C, bias=cfg.linear_bias)

    def forward(self, x):
        gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)                  # [B, T, H] each
        return self.dense_4h_to_h(F.silu(gate) * up)                        # SwiGLU


class GLMBlock(nn.Module):
    def __init__(self, cfg: ChatGLMConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.self_attention = SelfAttention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attention(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Embedding(nn.Module):
    """Named as in the checkpoint: transformer.embedding.word_embeddings."""

    def __init__(self, cfg: ChatGLMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)


class Encoder(nn.Module):
    def __init__(self, cfg: ChatGLMConfig):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(cfg, i) for i in range(cfg.num_layers))
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon)


class Transformer(nn.Module):
    """The body; named `transformer` inside ChatGLM so keys read as on the hub."""

    def __init__(self, cfg: ChatGLMConfig):
        super().__init__()
        self.embedding = Embedding(cfg)
        self.encoder = Encoder(cfg)
        self.output_layer = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


class ChatGLM(nn.Module):
    # What the rest of the code needs to know about this family, stated once (model.FAMILIES collects it):
    Config = ChatGLMConfig          # Config.from_hf maps config.json
    MODEL_TYPES = ("chatglm",)      # config.json's model_type values this class loads
    CONFIG_FIELDS = CHATGLM_FIELDS  # what model.check_checkpoint checks in config.json before building
    LORA_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
    DEFAULT_TARGETS = ("query_key_value", "dense")   # the attention projections, as for LLaMA
    SHARED_INPUTS = ()   # q, k, v are one layer already (query_key_value), so are gate and up
    OUTPUT_LAYER = "transformer.output_layer"        # never a LoRA target nor quantized
    # THUDM's checkpoints store inv_freq, ignoring rope_ratio; we recompute it from the config.
    RECOMPUTED_KEYS = ("rotary_pos_emb.inv_freq",)
    # m-LoRA's names: qkv, mlp_in, mlp_out in 2023; qkv_proj in 2024 (Phi-3's own name too).
    MLORA_NAMES = {"qkv": "query_key_value", "qkv_proj": "query_key_value",
                   "mlp_in": "dense_h_to_4h", "mlp_out": "dense_4h_to_h"}
    FIXED_SHAPE_STEP = False        # forward reads no PackedRow: graphs.py leaves it to the eager step
    NOT_SUPPORTED = ("ChatGLM-6B v1", "pre_seq_len (P-tuning v2)", "quantization_bit (THUDM's quantized weights)",
                     "LayerNorm, post-layernorm or fp32 residuals, a tied output_layer")   # from_hf refuses each
    logit_softcap = None            # its logits are not capped (llama.Llama.logit_softcap)

    def __init__(self, cfg: ChatGLMConfig):
        super().__init__()
        self.config = cfg
        self.transformer = Transformer(cfg)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.checkpoint_blocks = False  # activation checkpointing while training (llama.run_block)

    def tie_weights(self):
        pass  # ChatGLM's output_layer is its own weight (from_hf rejects tie_word_embeddings)

    def reset_buffers(self, device):
        """Recompute what is not in the checkpoint (rope frequencies, fp32) on device."""
        self.inv_freq = rope_inv_freq(self.config).to(device)

    def new_cache(self, B: int, max_T: int) -> KVCache:
        cfg, w = self.config, self.transformer.embedding.word_embeddings.weight
        return KVCache(cfg.num_layers, B, cfg.num_key_value_heads, max_T, cfg.head_dim, w.dtype, w.device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, output_mask: torch.Tensor | None = None,
                head: bool = True, segments: tuple[int, ...] | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V]; attention_mask, cache, output_mask, head, segments
        as llama.Llama."""
        T = input_ids.size(1)
        past = cache.length if cache is not None else 0
        pos, mask = positions_and_mask(input_ids, attention_mask, past, segments)
        freqs = pos[..., None].float() * self.inv_freq                       # [B, T, rd/2]
        x = self.transformer.embedding.word_embeddings(input_ids)            # [B, T, C]
        # Rounded to the model's dtype before use, as THUDM's rope cache is.
        cos = freqs.cos().to(x.dtype)[:, None]                               # [B, 1, T, rd/2]
        sin = freqs.sin().to(x.dtype)[:, None]
        for block in self.transformer.encoder.layers:
            x = run_block(self, block, x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
        x = self.transformer.encoder.final_layernorm(x)
        if output_mask is not None:
            x = x[output_mask]                                               # [N, C]
        return self.transformer.output_layer(x) if head else x
