"""GLM (`model_type: "glm"`, transformers' GlmForCausalLM: the Hugging Face layout of GLM-4-9B-chat)
and GLM-4 (`"glm4"`, Glm4ForCausalLM: the GLM-4-0414 releases) as LLaMA-like families: llama.py's
model with their own attention, block, config and rope. What differs from LLaMA:
- a bias on q_proj, k_proj and v_proj (attention_bias), none on o_proj nor the MLP;
- RoPE on the first partial_rotary_factor (0.5) of each head, rotating interleaved (even, odd)
  pairs: chatglm.py's rope, the one THUDM's own layout of the same weights uses;
- one gate_up_proj whose first half is the gate (phi3.py's MLP);
- GLM-4 adds post_self_attn_layernorm on the attention's output and post_mlp_layernorm on the
  MLP's, each before its residual add.
GLM-4-9B-chat in THUDM's layout (model_type "chatglm") loads through chatglm.py and gives the
same logits (tests/test_glm.py). Rope types other than "default" are refused.

Shape letters as in llama.py; rd the rotary channels of a head.
"""
from typing import Callable, ClassVar

import torch.nn as nn

from chatglm import apply_rope
from llama import Attention, Block, Llama, RMSNorm
from phi3 import Phi3, Phi3Config, Phi3MLP, partial_rotary_dim


def glm_fields(hf: dict) -> dict:
    """GlmConfig's and Glm4Config's own fields, with their defaults where config.json has no key:
    attention_bias true (on q, k, v only), head_dim 128, 2 key/value heads, rms_norm_eps 1.5625e-7,
    131072 positions, partial_rotary_factor 0.5. GlmModel has no sliding window."""
    if hf.get("attention_dropout"):  # transformers drops attention weights while training; we do not
        raise ValueError(f"config.json: attention_dropout {hf['attention_dropout']!r} is not supported (only 0)")
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim", 128) or hf["hidden_size"] // n_heads
    return dict(qkv_bias=hf.get("attention_bias", True), o_bias=False, mlp_bias=False, head_dim=head_dim,
                num_key_value_heads=hf.get("num_key_value_heads", 2) or n_heads,
                rms_norm_eps=hf.get("rms_norm_eps", 1.5625e-7),
                max_position_embeddings=hf.get("max_position_embeddings", 131072),
                rotary_dim=partial_rotary_dim(hf, head_dim, default=0.5))


class GlmConfig(Phi3Config):   # Phi3Config's rotary_dim: the first rd channels of each head rotate
    MODEL_TYPES: ClassVar[dict[str, Callable[[dict], dict]]] = {"glm": glm_fields}
    ROPE_TYPES: ClassVar[tuple[str, ...]] = ("default",)


class Glm4Config(GlmConfig):
    MODEL_TYPES: ClassVar[dict[str, Callable[[dict], dict]]] = {"glm4": glm_fields}


class GlmAttention(Attention):
    """LLaMA's q/k/v/o projections (the biases from GlmConfig) with GLM's rope: interleaved pairs
    of the first rd channels of each head (chatglm.apply_rope)."""

    def rotate(self, t, cos, sin):
        # Llama.forward's cos, sin [B, 1, T, rd] are cat(freqs, freqs); a pair takes each frequency once.
        return apply_rope(t, cos[..., :cos.size(-1) // 2], sin[..., :sin.size(-1) // 2])


class Glm4Block(Block):
    """LLaMA's block with a norm on the attention's output and one on the MLP's, before each
    residual add (Glm4DecoderLayer)."""

    def __init__(self, cfg: GlmConfig, layer: int, attention: type[nn.Module], mlp: type[nn.Module]):
        super().__init__(cfg, layer, attention, mlp)
        self.post_self_attn_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.post_self_attn_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache))
        return x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))


class Glm(Llama):
    # What differs from Llama (model.FAMILIES collects it); the rest is Llama's, its Block included.
    Config = GlmConfig
    MODEL_TYPES = tuple(GlmConfig.MODEL_TYPES)
    CONFIG_FIELDS = Phi3.CONFIG_FIELDS._replace(kv_heads=lambda hf: hf.get("num_key_value_heads", 2))
    LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")
    DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
    SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"),)   # gate and up are one layer already (gate_up_proj)
    # m-LoRA's names that are one of GLM's layers: THUDM's (ChatGLM's) for the same weights, m-LoRA's
    # ChatGLM MLP names and LLaMA's w2 (down). Its fused q/k/v (query_key_value, qkv, qkv_proj) and
    # LLaMA's w1/w3 (gate, up: halves of gate_up_proj) are no layer here: the job's targets refuse them.
    MLORA_NAMES = {"dense": "o_proj", "dense_h_to_4h": "gate_up_proj", "dense_4h_to_h": "down_proj",
                   "mlp_in": "gate_up_proj", "mlp_out": "down_proj", "w2_proj": "down_proj"}
    NOT_SUPPORTED = ("rope_scaling of any type but default", "attention_dropout other than 0",
                     "a partial_rotary_factor giving an odd number of rotary channels", "hidden_act other than silu")
    Attention = GlmAttention
    MLP = Phi3MLP
    rope_inv_freq = Phi3.rope_inv_freq   # transformers' default rope over the rd rotary channels


class Glm4(Glm):
    Config = Glm4Config
    MODEL_TYPES = tuple(Glm4Config.MODEL_TYPES)
    Block = Glm4Block
