"""Qwen3: what is special to it (tests/test_families.py checks it against transformers with the
other families): config.json read as Qwen3Config reads it, a hub-style folder, and its refusals."""
import json

import pytest
import torch

import model as M
from conftest import make_tiny, save_hf
from qwen3 import Qwen3, Qwen3Config

BASE = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)


@pytest.mark.parametrize("fields", [
    {},                                                     # Qwen3Config's defaults: head_dim 128, no bias, no window
    {"head_dim": 16, "attention_bias": True, "rms_norm_eps": 1e-5, "mlp_bias": True},
    {"sliding_window": 5},                                  # no use_sliding_window: no window
    {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 2},
    {"use_sliding_window": True, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
], ids=["defaults", "bias-head-dim", "window-off", "max-window-layers", "layer-types"])
def test_config_is_read_as_qwen3config_reads_it(fields):
    import transformers
    theirs = transformers.Qwen3Config(**BASE, **fields)
    ours = Qwen3Config.from_hf({"model_type": "qwen3", **BASE, **fields})
    assert (ours.head_dim, ours.rms_norm_eps) == (theirs.head_dim, theirs.rms_norm_eps)
    assert ours.qkv_bias == ours.o_bias == theirs.attention_bias and not ours.mlp_bias   # Qwen3MLP has no bias
    windows = [theirs.sliding_window if kind == "sliding_attention" else None for kind in theirs.layer_types]
    assert [ours.layer_window(i) for i in range(3)] == windows


def test_hub_style_folder_matches_transformers(tmp_path):
    """config.json as Qwen3-0.6B's: rope_theta and a null rope_scaling, a null window that is off,
    max_window_layers, no layer_types, tied embeddings; transformers reads the same file."""
    import transformers
    path = save_hf(make_tiny("Qwen3Config", "Qwen3ForCausalLM", head_dim=32, tie_word_embeddings=True), tmp_path)
    config = json.loads((path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.pop("layer_types")
    config.update(rope_theta=rope["rope_theta"], rope_scaling=None, sliding_window=None, use_sliding_window=False,
                  max_window_layers=28)
    (path / "config.json").write_text(json.dumps(config))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = M.load_model(path, dtype=torch.float32)
    assert type(ours) is Qwen3 and ours.lm_head.weight is ours.model.embed_tokens.weight
    idx = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": None, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                "original_max_position_embeddings": 32768}},
     "config.json: rope_scaling: rope type 'yarn' is not supported"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}},
     "config.json: rope_parameters: rope type 'dynamic' is not supported"),
    ({"hidden_act": "gelu"}, "config.json: hidden_act 'gelu' is not supported"),
])
def test_unsupported_config_is_one_line_naming_the_field(tmp_path, change, message):
    path = save_hf(make_tiny("Qwen3Config", "Qwen3ForCausalLM", head_dim=16), tmp_path)
    config = path / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    with pytest.raises(M.CheckpointError, match=message) as error:
        M.load_model(path)
    assert "\n" not in str(error.value)
