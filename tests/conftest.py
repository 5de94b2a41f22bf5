"""Tiny random Hugging Face checkpoints, written by transformers itself (the oracle)."""
import json
from pathlib import Path

import pytest
import torch

TINY = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def make_hf_model(kind: str = "llama", **overrides):
    """A tiny random transformers model (fp32, eval mode, fixed seed)."""
    import transformers
    torch.manual_seed(0)
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(**{**TINY, **overrides})
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**{**TINY, **overrides})
        model = transformers.LlamaForCausalLM(cfg)
    # Default init (std 0.02) gives near-uniform logits; larger weights make any
    # mismatch visible.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.1)
    return model.eval()


def save_hf(model, path: Path, old_config_keys: bool = False, **save_kwargs) -> Path:
    """save_pretrained, optionally rewriting config.json into the hub's older rope keys."""
    model.save_pretrained(path, **save_kwargs)
    if old_config_keys:
        cfg = json.loads((path / "config.json").read_text())
        rope = dict(cfg.pop("rope_parameters"))
        cfg["rope_theta"] = rope.pop("rope_theta")
        rope_type = rope.pop("rope_type")
        cfg["rope_scaling"] = None if rope_type == "default" else {"rope_type": rope_type, **rope}
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


@pytest.fixture
def tiny_llama(tmp_path):
    """(path, transformers model) of a tiny random LLaMA with GQA."""
    hf = make_hf_model()
    return save_hf(hf, tmp_path / "llama"), hf
