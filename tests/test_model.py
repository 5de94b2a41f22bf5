"""Our model's logits against transformers' own classes on the same checkpoint."""
import json
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import model as M
from conftest import make_hf_model, save_hf

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

VARIANTS = {
    # name: (kind, config overrides, save kwargs, old config keys)
    "llama2-mha": ("llama", dict(num_key_value_heads=4), {}, True),
    "llama3-gqa-rope-scaled": ("llama", dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0), {}, False),
    "llama3-old-keys": ("llama", dict(rope_scaling=LLAMA3_ROPE), {}, True),
    "smollm-tied": ("llama", dict(tie_word_embeddings=True), {}, True),
    "linear-rope-sharded": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
                            dict(max_shard_size="100KB"), False),
    "attention-bias-head-dim": ("llama", dict(attention_bias=True, head_dim=32), {}, False),
    "qwen2-bias": ("qwen2", dict(), {}, True),
    "qwen2-tied-sharded": ("qwen2", dict(tie_word_embeddings=True), dict(max_shard_size="100KB"), False),
    # A window shorter than T that transformers' Llama does not apply.
    "llama-sliding-window-ignored": ("llama", dict(sliding_window=5), {}, False),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(tmp_path, name):
    kind, overrides, save_kwargs, old_keys = VARIANTS[name]
    hf = make_hf_model(kind, **overrides)
    path = save_hf(hf, tmp_path / name, old_config_keys=old_keys, **save_kwargs)
    if save_kwargs:
        assert (path / "model.safetensors.index.json").exists()
    ours = M.load_model(path, dtype=torch.float32)
    idx = torch.randint(0, hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(idx).logits
        got = ours(idx)
    assert got.shape == (2, 40, hf.config.vocab_size)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_matches_transformers(tiny_llama, side):
    path, hf = tiny_llama
    ours = M.load_model(path)
    idx = torch.randint(0, 384, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 12, dtype=torch.long)
    pad = [0, 5, 9]
    for row, n in enumerate(pad):
        if n:
            mask[row, :n] = 0 if side == "left" else 1
            if side == "right":
                mask[row, 12 - n:] = 0
    with torch.no_grad():
        expected = hf(idx, attention_mask=mask).logits
        got = ours(idx, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-4)
    # Each padded row's real tokens equal the same row run alone with no padding.
    for row in range(3):
        alone = ours(idx[row:row + 1, real[row]])
        torch.testing.assert_close(got[row, real[row]], alone[0], atol=1e-5, rtol=1e-4)


def test_kv_cache_equals_full_forward(tiny_llama):
    path, _ = tiny_llama
    ours = M.load_model(path)
    idx = torch.randint(0, 384, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # left padding on row 1
    full = ours(idx, attention_mask=mask)
    cache = ours.new_cache(2, 16)
    first = ours(idx[:, :6], attention_mask=mask[:, :6], cache=cache)
    steps = [ours(idx[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache) for t in range(6, 10)]
    got = torch.cat([first] + steps, dim=1)
    real = mask.bool()
    torch.testing.assert_close(got[real], full[real], atol=1e-5, rtol=1e-4)


def test_output_mask_selects_positions(tiny_llama):
    path, _ = tiny_llama
    ours = M.load_model(path)
    idx = torch.randint(0, 384, (2, 8))
    keep = torch.zeros(2, 8, dtype=torch.bool)
    keep[0, 3:] = True
    keep[1, 6] = True
    torch.testing.assert_close(ours(idx, output_mask=keep), ours(idx)[keep])


def test_bf16_matches_transformers_bf16(tiny_llama):
    """Loaded in bf16, our logits are transformers' LlamaForCausalLM's in bf16 on the same checkpoint,
    to one bf16 step at the logits' scale (|logit| < 4 here: 2^-6). Measured on CPU: equal bitwise;
    the same model with ChatGLM's norm order (weight applied in fp32, then rounded) is 0.056 off,
    our fp32 logits 0.06: both fail this tolerance, as the last lines check."""
    import transformers
    import llama
    path, _ = tiny_llama
    idx = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    reference = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ours = M.load_model(path, dtype="bfloat16")
    with torch.no_grad():
        expected = reference(idx).logits
        got = ours(idx)
        fp32 = M.load_model(path, dtype=torch.float32)(idx)
        for norm in ours.modules():   # the wrong rounding order for LLaMA
            if isinstance(norm, llama.RMSNorm):
                norm.weight_in_fp32 = True
        wrong_order = ours(idx)
    assert got.dtype == torch.bfloat16 and expected.abs().max() < 4
    tolerance = 2**-6
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=0)
    assert (wrong_order - expected).abs().max() > 2 * tolerance
    assert (fp32 - expected.float()).abs().max() > 2 * tolerance


def plain_rms_norm(x, weight, eps, weight_in_fp32):
    """The norm as plain ops, differentiated by autograd: the oracle for RMSNormFunction."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h).to(x.dtype) if weight_in_fp32 else weight * h.type_as(x)


@pytest.mark.parametrize("weight_in_fp32", [False, True])
def test_rms_norm_backward_matches_autograd(weight_in_fp32):
    import fast
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(2, 5, 8, generator=g) * 3, torch.rand(8, generator=g) + 0.5
    for dtype in (torch.float32, torch.bfloat16):   # forward bitwise as the plain ops, gradients close
        xs, ws = x.to(dtype).requires_grad_(True), weight.to(dtype).requires_grad_(True)
        grad = torch.randn(2, 5, 8, generator=g).to(dtype)
        ours = fast.RMSNormFunction.apply(xs, ws, 1e-5, weight_in_fp32)
        plain = plain_rms_norm(xs, ws, 1e-5, weight_in_fp32)
        assert torch.equal(ours, plain)
        for a, b in zip(torch.autograd.grad(ours, (xs, ws), grad), torch.autograd.grad(plain, (xs, ws), grad)):
            torch.testing.assert_close(a, b, **({} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.02}))


def test_pytorch_bin_fallback(tmp_path, tiny_llama):
    path, hf = tiny_llama
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((path / "config.json").read_text())
    torch.save(hf.state_dict(), bin_dir / "pytorch_model.bin")
    idx = torch.randint(0, 384, (1, 8))
    torch.testing.assert_close(M.load_model(bin_dir)(idx), M.load_model(path)(idx))


def test_strict_loading_names_bad_keys(tmp_path, tiny_llama):
    from safetensors.torch import load_file, save_file
    path, _ = tiny_llama
    state = load_file(path / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.extra"] = torch.zeros(1)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, path / "model.safetensors")
    with pytest.raises(M.CheckpointError, match=r"model.safetensors: .*missing \['model.layers.1.mlp.up_proj.weight'\]"
                                               r".*q_proj.extra"):
        M.load_model(path)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "model_type 'gpt2'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_parameters": None}, "rope type 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "qwen2", "use_sliding_window": True, "layer_types": ["sliding_attention"]}, "layer_types must be 2"),
    ({"model_type": "qwen2", "layer_types": ["sliding_attention"] * 2}, "no window"),
])
def test_unsupported_config_is_a_clear_error(tiny_llama, change, message):
    path, _ = tiny_llama
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(change)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        M.load_model(path)


# ----------------------------------------------------------------------------- sliding window

# transformers' rule (masking_utils.sliding_window_overlay): a query at cache index i sees the
# keys j with i - window < j <= i, so a window of 5 cuts everything more than 4 tokens back.
SLIDING = {
    # name: (kind, config overrides, which layers transformers makes sliding)
    "mistral": ("mistral", dict(sliding_window=5), [True, True]),
    # Qwen2Config: sliding where i >= max_window_layers, so layer 0 full, layer 1 windowed.
    "qwen2-max-window-layers": ("qwen2", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),
                                [False, True]),
    # An explicit layer_types decides per layer, whatever max_window_layers says.
    "qwen2-layer-types": ("qwen2", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1,
                                        layer_types=["sliding_attention", "full_attention"]), [True, False]),
}


@pytest.fixture(params=list(SLIDING))
def sliding(request, tmp_path):
    """(our model, transformers model) of a tiny checkpoint with a window of 5 < T."""
    kind, overrides, sliding_layers = SLIDING[request.param]
    hf = make_hf_model(kind, **overrides)
    assert [t == "sliding_attention" for t in getattr(hf.config, "layer_types", ["sliding_attention"] * 2)] == sliding_layers
    path = save_hf(hf, tmp_path / request.param)
    if "layer_types" not in overrides:  # as hub configs: the loader derives it (Qwen2: from max_window_layers)
        cfg = json.loads((path / "config.json").read_text())
        cfg.pop("layer_types", None)
        (path / "config.json").write_text(json.dumps(cfg))
    ours = M.load_model(path, dtype=torch.float32)
    assert [ours.config.layer_window(i) for i in range(2)] == [5 if s else None for s in sliding_layers]
    return ours, hf


def left_padded(B=3, T=16, pad=(0, 4, 9), seed=4):
    idx = torch.randint(0, 384, (B, T), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(B, T, dtype=torch.long)
    for row, n in enumerate(pad):
        mask[row, :n] = 0
    return idx, mask


def test_sliding_window_matches_transformers(sliding):
    ours, hf = sliding
    idx = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-5, rtol=1e-4)
        # The window cuts nothing within its own length: the plain causal model there.
        torch.testing.assert_close(ours(idx[:, :5]), hf(idx[:, :5]).logits, atol=1e-5, rtol=1e-4)


def test_sliding_window_with_left_padding_matches_transformers(sliding):
    ours, hf = sliding
    idx, mask = left_padded()
    with torch.no_grad():
        expected = hf(idx, attention_mask=mask).logits
        got = ours(idx, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-4)


def test_sliding_window_kv_cache_equals_full_forward(sliding):
    ours, hf = sliding
    idx, mask = left_padded()
    with torch.no_grad():
        expected = hf(idx, attention_mask=mask).logits
        cache = ours.new_cache(3, 16)
        first = ours(idx[:, :7], attention_mask=mask[:, :7], cache=cache)
        steps = [ours(idx[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache) for t in range(7, 16)]
        got = torch.cat([first] + steps, dim=1)
        # Without padding the window still cuts the cache: steps past index 5 drop old keys.
        cache = ours.new_cache(1, 16)
        unpadded = [ours(idx[:1, :2], cache=cache)] + [ours(idx[:1, t:t + 1], cache=cache) for t in range(2, 16)]
        unpadded_expected = hf(idx[:1]).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat(unpadded, dim=1), unpadded_expected, atol=1e-5, rtol=1e-4)


def test_qwen2_window_without_use_sliding_window_is_ignored(tmp_path):
    """A hub Qwen2.5 config.json names a window but use_sliding_window is false: transformers,
    reading that same file, attends fully."""
    import transformers
    path = save_hf(make_hf_model("qwen2"), tmp_path / "qwen2")
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("layer_types")
    cfg.update(use_sliding_window=False, sliding_window=5, max_window_layers=0)
    (path / "config.json").write_text(json.dumps(cfg))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = M.load_model(path, dtype=torch.float32)
    assert ours.config.sliding_window is None
    idx = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-5, rtol=1e-4)


def test_sliding_window_config_defaults():
    from llama import LlamaConfig
    base = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)
    # MistralConfig's default when the key is absent is a window of 4096 on every layer; null turns it off.
    mistral = LlamaConfig.from_hf({"model_type": "mistral", **base})
    assert [mistral.layer_window(i) for i in range(3)] == [4096] * 3
    assert LlamaConfig.from_hf({"model_type": "mistral", "sliding_window": None, **base}).sliding_window is None
    # Qwen2's defaults: use_sliding_window false; when true, window 4096 from layer max_window_layers (28) on.
    assert LlamaConfig.from_hf({"model_type": "qwen2", "sliding_window": 5, **base}).sliding_layers == ()
    qwen2 = LlamaConfig.from_hf({"model_type": "qwen2", "use_sliding_window": True, "max_window_layers": 2, **base})
    assert [qwen2.layer_window(i) for i in range(3)] == [None, None, 4096]


def test_load_message_names_the_family(tmp_path, capsys):
    path = save_hf(make_hf_model("qwen2"), tmp_path / "qwen2")
    M.load_model(path)
    assert "(qwen2, " in capsys.readouterr().out


# ----------------------------------------------------------------------------- packed rows

def packed_row(lengths, seed=5, vocab=384):
    """Random sequences of these lengths, and the same end to end in one row with the
    position ids transformers reads packed sequences from (restarting at 0 for each)."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return seqs, torch.cat(seqs)[None], positions


def assert_packed_equals_alone(ours, seqs, row, lengths):
    got = ours(row, segments=tuple(lengths))[0]
    for seq, part in zip(seqs, got.split(lengths)):
        torch.testing.assert_close(part, ours(seq[None])[0], atol=1e-5, rtol=1e-4)
    return got


@pytest.mark.parametrize("name", ["llama3-gqa-rope-scaled", "qwen2-bias"])
def test_packed_row_matches_transformers_and_each_sequence_alone(tmp_path, name):
    """Segments: positions restart and attention stays inside each sequence. Oracle:
    transformers given the same packed row with restarting position_ids and no mask (it then
    builds the block-diagonal mask itself; only without a cache, hence use_cache=False), and
    each sequence run alone."""
    kind, overrides, save_kwargs, old_keys = VARIANTS[name]
    hf = make_hf_model(kind, **overrides)
    ours = M.load_model(save_hf(hf, tmp_path / name, old_config_keys=old_keys), dtype=torch.float32)
    lengths = [7, 1, 19, 13, 13, 13]   # the run of 13s goes through SDPA as one batch
    seqs, row, positions = packed_row(lengths)
    with torch.no_grad():
        got = assert_packed_equals_alone(ours, seqs, row, lengths)
        torch.testing.assert_close(got, hf(row, position_ids=positions, use_cache=False).logits[0], atol=1e-5, rtol=1e-4)
        # Without segments it is one long sequence: the later ones see the earlier ones.
        assert not torch.allclose(ours(row)[0, 7:], got[7:], atol=1e-3)


def test_packed_row_with_sliding_window(sliding):
    """Each segment keeps its own window (5 here; segments longer and shorter than it, two of
    one length batched)."""
    ours, hf = sliding
    lengths = [9, 9, 3, 12]
    seqs, row, positions = packed_row(lengths)
    with torch.no_grad():
        got = assert_packed_equals_alone(ours, seqs, row, lengths)
        torch.testing.assert_close(got, hf(row, position_ids=positions, use_cache=False).logits[0], atol=1e-5, rtol=1e-4)


def test_segments_must_cover_one_row(tiny_llama):
    path, _ = tiny_llama
    ours = M.load_model(path)
    with pytest.raises(ValueError, match="one packed row of 10 tokens"):
        ours(torch.zeros(1, 10, dtype=torch.long), segments=(4, 5))
    with pytest.raises(ValueError, match="got 2 rows"):
        ours(torch.zeros(2, 10, dtype=torch.long), segments=(4, 6))


# ----------------------------------------------------------------------------- checking a folder

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One tiny llama saved whole and in ~100KB shards; tests corrupt copies of them."""
    root, hf = tmp_path_factory.mktemp("saved"), make_hf_model()
    return save_hf(hf, root / "single"), save_hf(hf, root / "sharded", max_shard_size="100KB")


@pytest.fixture
def single(saved, tmp_path):
    return Path(shutil.copytree(saved[0], tmp_path / "single"))


@pytest.fixture
def sharded(saved, tmp_path):
    return Path(shutil.copytree(saved[1], tmp_path / "sharded"))


def assert_bad(path, file, match):
    """check_checkpoint raises a one-line CheckpointError that starts with the file at fault."""
    with pytest.raises(M.CheckpointError, match=match) as error:
        M.check_checkpoint(path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{file}: "), message


def read_header(file):
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_header(file, header, data):
    encoded = json.dumps(header).encode()
    file.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data)


def test_check_accepts_valid_folders(saved, tmp_path):
    from conftest import make_glm, write_chatglm
    for path in saved:
        assert M.check_checkpoint(path) == json.loads((path / "config.json").read_text())
    glm = make_glm(groups=2, rope_ratio=1.0)
    for shards in ("safetensors", "bin"):
        assert M.check_checkpoint(write_chatglm(glm, tmp_path / shards, 1.0, shards))["model_type"] == "chatglm"


@pytest.mark.parametrize("content, match", [
    (None, "not found"),
    (b"{not json", "not UTF-8 JSON"),
    (b"\xff\xfe{}", "not UTF-8 JSON"),
    (b"[1, 2]", "expected a JSON object, got list"),
])
def test_check_unreadable_config(single, content, match):
    config = single / "config.json"
    config.unlink() if content is None else config.write_bytes(content)
    assert_bad(single, config, match)


@pytest.mark.parametrize("change, match", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"hidden_size": 62}, "hidden_size 62 is not divisible by num_attention_heads 4"),
    ({"num_key_value_heads": 3}, "not divisible by the 3 key/value heads"),
    ({"num_attention_heads": True}, r"num_attention_heads must be an integer in \[1, 1024\], got True"),
    ({"vocab_size": "384"}, "vocab_size must be an integer"),
    ({"intermediate_size": 0}, "intermediate_size must be an integer"),
    ({"vocab_size": 2**40}, "vocab_size must be an integer"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a finite number > 0, got nan"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}}, "rope_theta must be a finite number > 0"),
    ({"rope_scaling": [1, 2]}, "rope_scaling must be an object or null"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true, false or null"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),  # from_hf's own check, one line too
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "missing field 'low_freq_factor'"),
])
def test_check_bad_config_field(single, change, match):
    config = single / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    assert_bad(single, config, match)


def test_check_unknown_model_type_names_the_table(single):
    config = single / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_type": "gpt2"}))
    assert_bad(single, config, re.escape(f"(supported: {', '.join(M.FAMILIES)})"))


def test_check_absurd_layer_count_fails_fast(single):
    config = single / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_hidden_layers": 1_000_000}))
    t0 = time.time()
    assert_bad(single, config, r"num_hidden_layers must be an integer in \[1, 1024\], got 1000000")
    assert time.time() - t0 < 1


def test_check_bad_chatglm_config(tmp_path):
    from conftest import make_glm, write_chatglm
    path = write_chatglm(make_glm(groups=2, rope_ratio=1.0), tmp_path / "glm", 1.0)
    config = path / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_layers": 4096}))
    assert_bad(path, config, "num_layers must be an integer")


@pytest.mark.parametrize("corrupt, match", [
    (lambda raw: raw[:len(raw) // 2], "data_offsets .* not within"),  # cut in the middle of the data
    (lambda raw: raw[:5], "too short for a safetensors file"),
    (lambda raw: (len(raw)).to_bytes(8, "little") + raw[8:], "header length .* exceeds the file"),
    (lambda raw: raw[:8] + b"x" * int.from_bytes(raw[:8], "little") + raw[8 + int.from_bytes(raw[:8], "little"):],
     "header is not UTF-8 JSON"),
])
def test_check_corrupt_safetensors(single, corrupt, match):
    file = single / "model.safetensors"
    file.write_bytes(corrupt(file.read_bytes()))
    assert_bad(single, file, match)
    with pytest.raises(M.CheckpointError, match=match):  # load_model checks first
        M.load_model(single)


Q_PROJ = "model.layers.0.self_attn.q_proj.weight"  # [64, 64] float32


@pytest.mark.parametrize("edit, match", [
    (lambda h: h[Q_PROJ].update(data_offsets=[0, 10**12]), "data_offsets .* not within"),
    (lambda h: h[Q_PROJ].update(data_offsets=[100, 50]), "data_offsets .* not within"),
    (lambda h: h[Q_PROJ].update(dtype="F16"), "span 16384 bytes, its F16 shape .64, 64. needs 8192"),
    (lambda h: h[Q_PROJ].update(dtype="F7"), "no known dtype"),
    (lambda h: h[Q_PROJ].update(shape=[64, -64]), "not a list of non-negative integers"),
    (lambda h: h[Q_PROJ].update(shape=[32, 128]), r"'model.layers.0.self_attn.q_proj.weight' has shape \[32, 128\], "
                                                  r"config.json's model expects \[64, 64\]"),
    (lambda h: h.pop("model.layers.1.mlp.up_proj.weight"),
     r"missing \['model.layers.1.mlp.up_proj.weight'\], unexpected \[\]"),
    (lambda h: h.update(extra={"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}),
     r"missing \[\], unexpected \['extra'\]"),
])
def test_check_bad_safetensors_header(single, edit, match):
    file = single / "model.safetensors"
    header, data = read_header(file)
    edit(header)
    write_header(file, header, data)
    assert_bad(single, file, match)


@pytest.mark.parametrize("shard, match", [
    ("../x.safetensors", r"shard '../x.safetensors' is not a plain .safetensors file name"),
    ("ABSOLUTE", "is not a plain .safetensors file name"),
    ("model-00009-of-00009.safetensors", "shard 'model-00009-of-00009.safetensors' does not exist"),
    ("model.bin", "is not a plain .safetensors file name"),
    (["a.safetensors"], "is not a plain .safetensors file name"),
])
def test_check_bad_index_shard(sharded, shard, match):
    index = sharded / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    first = sorted(content["weight_map"].values())[0]
    (sharded.parent / "x.safetensors").write_bytes((sharded / first).read_bytes())  # a real file, not followed
    if shard == "ABSOLUTE":
        shard = str(sharded.parent / "x.safetensors")
    content["weight_map"]["model.embed_tokens.weight"] = shard
    index.write_text(json.dumps(content))
    assert_bad(sharded, index, match)


@pytest.mark.parametrize("content, match", [
    ("{not json", "not UTF-8 JSON"),
    ('{"metadata": {}}', 'non-empty "weight_map" object'),
    ('{"weight_map": ["model-00001-of-00002.safetensors"]}', 'non-empty "weight_map" object'),
])
def test_check_bad_index_file(sharded, content, match):
    index = sharded / "model.safetensors.index.json"
    index.write_text(content)
    assert_bad(sharded, index, match)


def test_check_key_split_across_shards(sharded):
    """Keys and shapes are checked over the union of the shards' headers."""
    shards = sorted(sharded.glob("*.safetensors"))
    header, data = read_header(shards[-1])
    key = next(iter(k for k in header if k != "__metadata__"))
    del header[key]
    write_header(shards[-1], header, data)
    assert_bad(sharded, sharded / "model.safetensors.index.json", rf"missing \['{key}'\]")


def test_check_folder_and_bin_shards(tmp_path, single):
    assert_bad(tmp_path / "nowhere", tmp_path / "nowhere", "not a directory")
    (single / "model.safetensors").unlink()
    assert_bad(single, single, "no model.safetensors")
    (single / "pytorch_model.bin").write_bytes(b"")
    assert_bad(single, single / "pytorch_model.bin", "empty file")


KEEP_FREED = """
import resource, sys
sys.path.insert(0, sys.argv[1])
import torch, scheduler
assert scheduler.keep_freed_memory()
def allocate_and_free():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    held = [torch.empty(2**20).fill_(1.0) for _ in range(50)]   # 50 tensors of 4 MiB, written
    del held
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(*[allocate_and_free() for _ in range(4)])
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_keep_freed_memory_reuses_freed_pages():
    # In a fresh process (it changes the process's allocator). glibc's defaults give the
    # freed 200 MiB back, so each round faults all 51200 pages in again; kept, only the first does
    # (later rounds measured 0-6144 faults: torch's own allocations around them vary).
    out = subprocess.run([sys.executable, "-c", KEEP_FREED, str(Path(M.__file__).parent)],
                         capture_output=True, text=True, check=True).stdout
    first, *later = map(int, out.split())
    assert first > 40000 and all(faults < first // 4 for faults in later), out


# ----------------------------------------------------------------------------- the families table

FAMILY_CLASSES = list(dict.fromkeys(M.FAMILIES.values()))


@pytest.mark.parametrize("family", FAMILY_CLASSES, ids=lambda family: family.__name__)
def test_family_declarations_agree(family):
    """What a family declares is consistent: its model types map back to it and its Config takes
    exactly those; the defaults, shared inputs and m-LoRA names are among its LoRA targets."""
    assert family.MODEL_TYPES and all(M.FAMILIES[kind] is family for kind in family.MODEL_TYPES)
    assert set(family.DEFAULT_TARGETS) <= set(family.LORA_TARGETS)
    assert all(set(group) <= set(family.LORA_TARGETS) for group in family.SHARED_INPUTS)
    assert set(family.MLORA_NAMES.values()) <= set(family.LORA_TARGETS)
    assert family.OUTPUT_LAYER.rsplit(".", 1)[-1] not in family.LORA_TARGETS
    assert isinstance(family.FIXED_SHAPE_STEP, bool)
    assert family.NOT_SUPPORTED and all(isinstance(item, str) and ";" not in item for item in family.NOT_SUPPORTED)
    others = [kind for kind in M.FAMILIES if kind not in family.MODEL_TYPES]
    for kind in others:
        with pytest.raises(ValueError, match=f"model_type {kind!r}"):
            family.Config.from_hf({"model_type": kind})


def test_readme_families_table_is_the_table():
    """README's families table lists what model.FAMILIES holds: each family's model types, module,
    LoRA targets, defaults and what it refuses (NOT_SUPPORTED)."""
    readme = (Path(M.__file__).parent / "README.md").read_text()
    rows = re.findall(r"^\| (`[\w]+`(?:, `[\w]+`)*) \| `(\w+)\.py` \| `([\w ]+)` \| `([\w ]+)` \| ([^|`]+) \|$",
                      readme, re.M)
    listed = {tuple(kind.strip("`") for kind in kinds.split(", ")): (module, targets.split(), defaults.split(), refused)
              for kinds, module, targets, defaults, refused in rows}
    assert listed == {family.MODEL_TYPES: (family.__module__, list(family.LORA_TARGETS), list(family.DEFAULT_TARGETS),
                                           "; ".join(family.NOT_SUPPORTED)) for family in FAMILY_CLASSES}
