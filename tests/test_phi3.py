"""Phi-3: logits against transformers' Phi3ForCausalLM on the same checkpoint (padded, packed,
cached), LoRA on its fused projections against PEFT, its refusals and m-LoRA names."""
import json

import pytest
import torch

import lora
import model as M
from conftest import TINY, assert_lora_matches_peft, save_hf
from phi3 import Phi3


def make_phi3(partial_rotary_factor: float = 1.0, **overrides):
    """A tiny random transformers Phi3ForCausalLM (fp32, eval mode, fixed seed)."""
    import transformers
    torch.manual_seed(0)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": partial_rotary_factor}
    cfg = transformers.Phi3Config(**{**TINY, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                                     "rope_parameters": rope, **overrides})
    hf = transformers.Phi3ForCausalLM(cfg)
    with torch.no_grad():  # larger than the default init, so any mismatch shows
        for name, p in hf.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.1)
    return hf.eval()


def hub_style(path):
    """config.json as Microsoft's folders have it: rope_theta, partial_rotary_factor and a null
    rope_scaling beside the other fields, no rope_parameters."""
    config = json.loads((path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(rope_theta=rope["rope_theta"], partial_rotary_factor=rope["partial_rotary_factor"], rope_scaling=None)
    (path / "config.json").write_text(json.dumps(config))
    return path


VARIANTS = {
    # name: (partial_rotary_factor, config overrides, hub-style config.json)
    "gqa": (1.0, {}, False),
    "tied-partial-rope-hub-keys": (0.5, dict(tie_word_embeddings=True), True),
    "sliding-window": (0.75, dict(sliding_window=5), False),   # a window shorter than T, every layer
}


@pytest.fixture(params=list(VARIANTS))
def phi3(request, tmp_path):
    """(our model, transformers model) of a tiny Phi-3 checkpoint."""
    factor, overrides, hub = VARIANTS[request.param]
    hf = make_phi3(factor, **overrides)
    path = save_hf(hf, tmp_path / request.param)
    if hub:
        hub_style(path)
    ours = M.load_model(path, dtype=torch.float32)
    assert type(ours) is Phi3 and ours.config.rotary_dim == int(16 * factor)
    return ours, hf


def test_logits_match_transformers(phi3):
    ours, hf = phi3
    idx = torch.randint(0, 384, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_matches_transformers(phi3, side):
    ours, hf = phi3
    idx = torch.randint(0, 384, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 12, dtype=torch.long)
    for row, n in enumerate([0, 5, 9]):
        if n:
            (mask[row, :n] if side == "left" else mask[row, 12 - n:]).zero_()
    real = mask.bool()
    with torch.no_grad():
        got = ours(idx, attention_mask=mask)
        torch.testing.assert_close(got[real], hf(idx, attention_mask=mask).logits[real], atol=1e-5, rtol=1e-4)


def test_kv_cache_equals_full_forward(phi3):
    ours, hf = phi3
    idx = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = ours.new_cache(2, 16)
        steps = [ours(idx[:, :6], cache=cache)] + [ours(idx[:, t:t + 1], cache=cache) for t in range(6, 16)]
        torch.testing.assert_close(torch.cat(steps, dim=1), hf(idx).logits, atol=1e-5, rtol=1e-4)


def test_packed_row_matches_transformers_and_each_sequence_alone(phi3):
    """Transformers given the packed row with restarting position_ids (it then keeps attention
    inside each sequence itself), and each sequence run alone."""
    ours, hf = phi3
    lengths = [7, 1, 13, 13, 9]
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, 384, (n,), generator=g) for n in lengths]
    row, positions = torch.cat(seqs)[None], torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        got = ours(row, segments=tuple(lengths))[0]
        torch.testing.assert_close(got, hf(row, position_ids=positions, use_cache=False).logits[0], atol=1e-5, rtol=1e-4)
        for seq, part in zip(seqs, got.split(lengths)):
            torch.testing.assert_close(part, ours(seq[None])[0], atol=1e-5, rtol=1e-4)


def test_lora_on_every_target_matches_peft(tmp_path):
    """LoRA on qkv_proj, o_proj, gate_up_proj and down_proj: logits and the A/B gradients of one
    loss equal PEFT's on transformers' model with the same weights."""
    hf = make_phi3(0.5)
    ours = M.load_model(save_hf(hf, tmp_path / "base"), dtype=torch.float32)
    assert_lora_matches_peft(ours, hf, lora.LoRAConfig(r=4, alpha=8, targets=list(Phi3.LORA_TARGETS)), tmp_path / "job")


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
      "rope_parameters": None}, "rope_scaling: rope type 'longrope' is not supported"),
    ({"partial_rotary_factor": 0.1, "rope_parameters": None}, "partial_rotary_factor 0.1"),
])
def test_unsupported_config_is_a_clear_error(tmp_path, change, message):
    path = save_hf(make_phi3(), tmp_path / "phi3")
    config = path / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    with pytest.raises(M.CheckpointError, match=message):
        M.load_model(path)


def test_mlora_names_are_phi3_modules_when_the_file_says_so():
    """m-LoRA's qkv_proj is Phi-3's own module beside o_proj/gate_up_proj, ChatGLM's query_key_value
    beside dense; alone it could be either, and the file must say which."""
    from mlora_config import MloraFile, _family_names
    m = MloraFile("finetune.json")
    assert _family_names(m, ["qkv_proj", "gate_up_proj"], ["qkv_proj", "o_proj", "gate_up_proj"], "t") \
        == ["qkv_proj", "gate_up_proj"]
    assert _family_names(m, ["qkv_proj"], ["qkv_proj", "dense"], "t") == ["query_key_value"]
    with pytest.raises(ValueError, match=r"could be the modules of chatglm \(query_key_value\) or phi3 \(qkv_proj\)"):
        _family_names(m, ["qkv_proj"], ["qkv_proj"], "t")
