"""OLMo 2: what is special to it (tests/test_families.py checks it against transformers with the
other families): config.json read as Olmo2Config reads it, a hub-style folder, and its refusals."""
import json

import pytest
import torch

import model as M
from conftest import make_tiny, save_hf
from olmo2 import Olmo2, Olmo2Config

BASE = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


@pytest.mark.parametrize("fields", [
    {},                                                     # Olmo2Config's defaults: eps 1e-5, no bias
    {"attention_bias": True, "rms_norm_eps": 1e-6, "num_key_value_heads": 2, "mlp_bias": True},
    {"sliding_window": 5, "use_sliding_window": True},      # Olmo2Model has no window: ignored
], ids=["defaults", "bias-eps-gqa", "window-ignored"])
def test_config_is_read_as_olmo2config_reads_it(fields):
    import transformers
    theirs = transformers.Olmo2Config(**BASE, **fields)
    ours = Olmo2Config.from_hf({"model_type": "olmo2", **BASE, **fields})
    assert (ours.rms_norm_eps, ours.num_key_value_heads) == (theirs.rms_norm_eps, theirs.num_key_value_heads)
    assert ours.qkv_bias == ours.o_bias == theirs.attention_bias and not ours.mlp_bias   # Olmo2MLP has no bias
    assert ours.sliding_layers == () and not hasattr(theirs, "layer_types")


def test_hub_style_folder_matches_transformers(tmp_path):
    """config.json as OLMo-2-1124-7B's: rope_theta and a null rope_scaling, rms_norm_eps 1e-6; plus
    a sliding_window shorter than the batch, which transformers ignores for OLMo 2 and so do we."""
    import transformers
    path = save_hf(make_tiny("Olmo2Config", "Olmo2ForCausalLM", rms_norm_eps=1e-6), tmp_path)
    config = json.loads((path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(rope_theta=rope["rope_theta"], rope_scaling=None, sliding_window=5)
    (path / "config.json").write_text(json.dumps(config))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = M.load_model(path, dtype=torch.float32)
    assert type(ours) is Olmo2 and ours.config.rms_norm_eps == 1e-6
    idx = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": None, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                "original_max_position_embeddings": 4096}},
     "config.json: rope_scaling: rope type 'yarn' is not supported"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                          "long_factor": [2.0] * 8}},
     "config.json: rope_parameters: rope type 'longrope' is not supported"),
    ({"hidden_act": "gelu"}, "config.json: hidden_act 'gelu' is not supported"),
])
def test_unsupported_config_is_one_line_naming_the_field(tmp_path, change, message):
    path = save_hf(make_tiny("Olmo2Config", "Olmo2ForCausalLM"), tmp_path)
    config = path / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    with pytest.raises(M.CheckpointError, match=message) as error:
        M.load_model(path)
    assert "\n" not in str(error.value)
