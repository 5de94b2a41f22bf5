"""Gemma 2 and Gemma 3 (text): logits against transformers' Gemma2ForCausalLM / Gemma3ForCausalLM
(eager attention: the one that caps scores) on the same checkpoint, on every attention path (plain,
padded, cached, packed as segments and as a PackedRow), bf16 against transformers' bf16, LoRA against
PEFT, the training loss through the capped logits, config.json read as transformers reads it, and
the refusals. tests/test_families.py runs the rest (saved adapters in PEFT, merge, fused = alone,
nf4, generate, m-LoRA's names) and names these tests for the checks they make."""
import json

import pytest
import torch
import torch.nn.functional as F

import data
import fast
import lora
import model as M
import objectives
from conftest import TINY, assert_lora_matches_peft, randomize_B, save_hf
from gemma import Gemma2, Gemma3
from llama import PackedRow, positions

WINDOW = 6   # shorter than the batches and some packed sequences below
# Caps low enough that they bend these logits and scores (|logit| ~ 3 here); query_pre_attn_scalar
# unlike head_dim (16), so a wrong scale shows; sqrt(hidden_size) 8.485 (8.5 in bf16) not a power of 2.
GEMMA = dict(hidden_size=72, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=12, final_logit_softcapping=3.0,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)


def make_gemma(kind: str, **overrides):
    """A tiny random transformers Gemma2ForCausalLM or Gemma3ForCausalLM (fp32, eager attention)."""
    import transformers
    torch.manual_seed(0)
    config, model = {"gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
                     "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM)}[kind]
    hf = model(config(**{**TINY, **GEMMA, "attn_implementation": "eager", **overrides}))
    with torch.no_grad():  # larger than the default init, so any mismatch shows; norms store weight - 1
        for name, p in hf.named_parameters():
            p.uniform_(-0.5, 0.5) if "norm" in name else p.normal_(0, 0.1)
    return hf.eval()


def hub_style(path, **fields):
    """config.json as Google's Gemma 3 folders have it: rope_theta, rope_local_base_freq, rope_scaling and
    sliding_window_pattern beside the other fields; no rope_parameters nor layer_types."""
    config = json.loads((path / "config.json").read_text())
    for key in ("rope_parameters", "layer_types", "_sliding_window_pattern"):
        config.pop(key, None)
    (path / "config.json").write_text(json.dumps({**config, **fields}))
    return path


VARIANTS = {
    # name: (model_type, transformers config overrides, hub-style config.json fields or None)
    # Both caps, tied output layer, layers 0 sliding and 1 full (Gemma2Config's default pattern).
    "gemma2": ("gemma2", dict(attn_logit_softcapping=2.0), None),
    # No attention cap (SDPA attends), untied, the pattern reversed by layer_types.
    "gemma2-uncapped-untied": ("gemma2", dict(attn_logit_softcapping=None, tie_word_embeddings=False,
                                              layer_types=["full_attention", "sliding_attention"]), None),
    # q/k norms; linear rope scaling on the full layer, another rope base on the sliding one.
    "gemma3": ("gemma3_text", dict(sliding_window_pattern=2, rope_local_base_freq=100.0,
                                   rope_scaling={"rope_type": "linear", "factor": 4.0}), None),
    # The hub's keys, read back by transformers: 3 layers, sliding_window_pattern 3 (sliding, sliding, full).
    "gemma3-hub-keys": ("gemma3_text", dict(num_hidden_layers=3, sliding_window_pattern=3),
                        dict(rope_theta=5e5, rope_local_base_freq=50.0, sliding_window_pattern=3,
                             rope_scaling={"rope_type": "linear", "factor": 2.0})),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def gemma(request, tmp_path_factory):
    """(our model, transformers model, folder) of one variant; transformers' model is read back from
    the folder, so it sees config.json as we do."""
    import transformers
    kind, overrides, hub = VARIANTS[request.param]
    path = save_hf(make_gemma(kind, **overrides), tmp_path_factory.mktemp(request.param))
    if hub is not None:
        hub_style(path, **hub)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    ours = M.load_model(path, dtype=torch.float32)
    assert type(ours) is {"gemma2": Gemma2, "gemma3_text": Gemma3}[kind]
    # Some layers slide and some do not, as transformers decided from config.json.
    assert ours.layer_windows == [WINDOW if kind == "sliding_attention" else None for kind in hf.config.layer_types]
    assert set(ours.layer_windows) == {WINDOW, None}
    return ours, hf, path


def ids(B: int, T: int, seed: int) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def test_logits_match_transformers(gemma):
    ours, hf, _ = gemma
    idx = ids(2, 24, seed=1)
    with torch.no_grad():
        expected = hf(idx).logits
        torch.testing.assert_close(ours(idx), expected, atol=1e-5, rtol=1e-4)
    assert expected.abs().max() < 3.0 and expected.abs().max() > 2.0   # the final cap bends these logits


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_matches_transformers(gemma, side):
    ours, hf, _ = gemma
    idx = ids(3, 14, seed=2)
    mask = torch.ones(3, 14, dtype=torch.long)
    for row, n in enumerate([0, 5, 9]):
        if n:
            (mask[row, :n] if side == "left" else mask[row, 14 - n:]).zero_()
    real = mask.bool()
    with torch.no_grad():
        got = ours(idx, attention_mask=mask)
        torch.testing.assert_close(got[real], hf(idx, attention_mask=mask).logits[real], atol=1e-5, rtol=1e-4)


def test_kv_cache_decoding_matches_transformers(gemma):
    """A left-padded prompt, then one token at a time through the cache past the window (generate.py's
    path), against transformers' full forward."""
    ours, hf, _ = gemma
    idx = ids(2, 16, seed=3)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :3] = 0
    real = mask.bool()
    with torch.no_grad():
        cache = ours.new_cache(2, 16)
        steps = [ours(idx[:, :5], attention_mask=mask[:, :5], cache=cache)]
        steps += [ours(idx[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache) for t in range(5, 16)]
        torch.testing.assert_close(torch.cat(steps, dim=1)[real], hf(idx, attention_mask=mask).logits[real],
                                   atol=1e-5, rtol=1e-4)


def packed_row(lengths, seed=5):
    seqs = [ids(1, n, seed=seed + i)[0] for i, n in enumerate(lengths)]
    return seqs, torch.cat(seqs)[None], torch.cat([torch.arange(n) for n in lengths])[None]


def test_packed_row_matches_transformers_and_each_sequence_alone(gemma):
    """The training path: segments (each sequence attended on its own) and the same row as a
    PackedRow of device tensors (one [N, N] mask), against transformers given the row with
    restarting position_ids, and each sequence run alone."""
    ours, hf, _ = gemma
    lengths = [7, 1, 13, 13, 9]
    seqs, row, pos = packed_row(lengths)
    sizes = torch.tensor(lengths)
    device_row = PackedRow(positions(row, None, 0, tuple(lengths)), torch.arange(5).repeat_interleave(sizes),
                           F.pad(sizes.cumsum(0), (1, 0)).to(torch.int32), max(lengths))
    with torch.no_grad():
        expected = hf(row, position_ids=pos, use_cache=False).logits[0]
        got = ours(row, segments=tuple(lengths))[0]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours(row, segments=device_row)[0], expected, atol=1e-5, rtol=1e-4)
        for seq, part in zip(seqs, got.split(lengths)):
            torch.testing.assert_close(part, ours(seq[None])[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind, overrides, attn_implementation", [
    pytest.param("gemma2", dict(attn_logit_softcapping=2.0), "eager", id="gemma2"),
    pytest.param("gemma3_text", dict(sliding_window_pattern=2, query_pre_attn_scalar=16, rope_local_base_freq=100.0),
                 "sdpa", id="gemma3")])
def test_bf16_equals_transformers_bf16(tmp_path, kind, overrides, attn_implementation):
    """Both in bf16 where both attend the same way (capped: explicitly; Gemma 3 with the scale SDPA's
    own): within one bf16 step at the logits' scale (measured: equal), so every rounding is
    transformers' (the embedding scale rounded to bf16 first, the norms' 1 + w in fp32)."""
    import transformers
    path = save_hf(make_gemma(kind, **overrides), tmp_path / kind)
    idx = ids(2, 24, seed=0)
    with torch.no_grad():
        expected = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16, attn_implementation=attn_implementation).eval()(idx).logits
        got = M.load_model(path, dtype="bfloat16")(idx)
    assert got.dtype == torch.bfloat16 and expected.abs().max() < 4
    torch.testing.assert_close(got, expected, atol=2**-6, rtol=0)


def test_bf16_within_transformers_bf16(gemma):
    """Both loaded in bf16, against transformers in fp32: ours is as close as transformers' own bf16
    (more rounding steps than LLaMA's: embedding scale, four norms a block, caps)."""
    import transformers
    ours, hf, path = gemma
    idx = ids(2, 24, seed=0)
    with torch.no_grad():
        expected = hf(idx).logits
        theirs = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16, attn_implementation="eager").eval()(idx).logits
        got = M.load_model(path, dtype="bfloat16")(idx)
    assert got.dtype == torch.bfloat16
    their_error, our_error = (theirs.float() - expected).abs().max(), (got.float() - expected).abs().max()
    assert 0 < their_error < 0.1 and our_error <= 1.5 * their_error, (our_error, their_error)


# ----------------------------------------------------------------------------- LoRA and the loss

@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_lora_on_every_target_matches_peft(tmp_path, kind):
    """LoRA on q/k/v/o and gate/up/down: logits and A/B gradients equal PEFT's on transformers' model."""
    model_type, overrides, _ = VARIANTS[kind]
    hf = make_gemma(model_type, **overrides)
    ours = M.load_model(save_hf(hf, tmp_path / "base"), dtype=torch.float32)
    targets = list(Gemma2.LORA_TARGETS)
    assert_lora_matches_peft(ours, hf, lora.LoRAConfig(r=4, alpha=8, targets=targets), tmp_path / "job")


@pytest.mark.parametrize("packed", [False, True])
def test_training_loss_is_cross_entropy_of_transformers_capped_logits(tmp_path, packed):
    """objectives.token_losses (the training loss: hidden states through fast.chunked_token_losses,
    no lm_head call) equals F.cross_entropy of PEFT's logits on transformers' Gemma 2, soft-capped
    there; so do the adapter's gradients of the summed loss. Padded rows and a packed row."""
    import peft
    import peft_format
    hf = make_gemma("gemma2", attn_logit_softcapping=2.0)
    ours = M.load_model(save_hf(hf, tmp_path / "base"), dtype=torch.float32)
    lora.add_adapters(ours, {"job": lora.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])})
    randomize_B(ours, "job")
    peft_format.save_peft(ours, "job", tmp_path / "job")
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "job", is_trainable=True)
    g = torch.Generator().manual_seed(6)
    examples = [data.Example(tokens.tolist(), [-100] * 3 + tokens[3:].tolist())
                for tokens in (torch.randint(3, 384, (n,), generator=g) for n in (11, 8, 14))]
    batch = data.make_batch([("job", examples)], pad_id=0, packed=packed)
    with lora.route(ours, batch.adapter_names):   # chunks of 5 rows: several chunks
        got, _ = objectives.token_losses(ours, batch, chunk_elements=5 * 384, min_rows=1)
    if packed:
        _, _, pos = packed_row([len(e.input_ids) for e in examples])
        logits = pm(batch.input_ids, position_ids=pos, use_cache=False).logits
    else:   # right padding: the real tokens never see it
        logits = pm(batch.input_ids).logits
    keep = batch.labels[:, 1:] != -100
    expected = F.cross_entropy(logits[:, :-1][keep], batch.labels[:, 1:][keep], reduction="none")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    got.sum().backward()
    expected.sum().backward()
    peft_grads = {k.replace(".default", ""): p.grad for k, p in pm.named_parameters() if p.requires_grad}
    for key, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, peft_grads[f"base_model.model.{key.replace('.adapters.job', '')}"],
                                       atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_with_softcap_is_cross_entropy_of_capped_logits(dtype):
    """fast.chunked_token_losses with softcap, in chunks of 7 rows: the losses and the hidden states'
    gradient of F.cross_entropy over c * tanh(logits / c), the logits in fp32."""
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(30, 32, generator=g) * 2).to(dtype).requires_grad_()
    weight, targets = torch.randn(100, 32, generator=g).to(dtype), torch.randint(0, 100, (30,), generator=g)
    losses = fast.chunked_token_losses(hidden, weight, targets, 7 * 100, 1, softcap=4.0)
    weights = torch.linspace(0.5, 2, 30)
    (losses * weights).sum().backward()
    grad, hidden.grad = hidden.grad, None
    logits = (hidden @ weight.t()).float()
    expected = F.cross_entropy(torch.tanh(logits / 4.0) * 4.0, targets, reduction="none")
    (expected * weights).sum().backward()
    assert (logits.abs() > 8).any()   # the cap bends some of them
    torch.testing.assert_close(losses, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, hidden.grad, **({} if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)))


# ----------------------------------------------------------------------------- config.json

@pytest.mark.parametrize("kind, fields", [
    ("gemma2", dict(num_hidden_layers=5)),                                    # every other layer, from the first
    ("gemma3_text", dict(num_hidden_layers=8)),                               # sliding_window_pattern's default, 6
    ("gemma3_text", dict(num_hidden_layers=5, sliding_window_pattern=2, rope_theta=2e5, rope_local_base_freq=300.0)),
    ("gemma3_text", dict(num_hidden_layers=6, rope_scaling={"rope_type": "linear", "factor": 8.0},
                         rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e5},
                                          "sliding_attention": {"rope_type": "default", "rope_theta": 123.0}})),
])
def test_config_json_read_as_transformers_reads_it(kind, fields):
    """Which layers slide, from a config.json without layer_types, and each layer type's rope
    frequencies, as transformers' config class and rotary embedding make them of the same dict."""
    import transformers
    hf_config = {"model_type": kind, **TINY, "head_dim": 16, **fields}
    theirs = transformers.AutoConfig.for_model(**hf_config)
    model = M.build_model(hf_config)
    assert model.config.sliding_layers == tuple(i for i, t in enumerate(theirs.layer_types) if t == "sliding_attention")
    assert {"sliding_attention", "full_attention"} == set(theirs.layer_types)
    if kind == "gemma2":
        inv_freq = transformers.models.gemma2.modeling_gemma2.Gemma2RotaryEmbedding(theirs).inv_freq
        expected = {"full_attention": inv_freq, "sliding_attention": inv_freq}
    else:
        rotary = transformers.models.gemma3.modeling_gemma3.Gemma3RotaryEmbedding(theirs)
        expected = {kind: getattr(rotary, f"{kind}_inv_freq") for kind in ("full_attention", "sliding_attention")}
    torch.testing.assert_close(model.inv_freq, expected["full_attention"])
    torch.testing.assert_close(model.local_inv_freq, expected["sliding_attention"])


@pytest.mark.parametrize("kind, change, message", [
    ("gemma2", {"sliding_window": None}, "sliding_window must be a positive integer, got null"),
    ("gemma2", {"hidden_activation": "gelu"}, "hidden_activation 'gelu' is not supported"),
    ("gemma3_text", {"use_bidirectional_attention": True}, "use_bidirectional_attention is not supported"),
    ("gemma2", {"attn_logit_softcapping": -1.0}, "attn_logit_softcapping must be a positive number or null"),
    ("gemma2", {"layer_types": ["sliding_attention"]}, "layer_types must be 2 entries"),
    ("gemma3_text", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
     r"rope_parameters must have one entry per layer type"),
    ("gemma3_text", {"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}},
     "rope_parameters.full_attention: rope type 'yarn' is not supported"),
    ("gemma3_text", {"rope_local_base_freq": 0}, "rope_local_base_freq must be a finite number > 0"),
    ("gemma3_text", {"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 8.0}},
     "rope_scaling: write rope_type, not type"),
    ("gemma2", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}},
     "rope_parameters: rope type 'llama3' is not supported"),
    ("gemma2", {"partial_rotary_factor": 0.5}, "partial_rotary_factor is not supported"),
])
def test_unsupported_config_is_a_clear_error(tmp_path, kind, change, message):
    path = save_hf(make_gemma(kind), tmp_path / kind)
    config = path / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    with pytest.raises(M.CheckpointError, match=message):
        M.load_model(path)


def test_hidden_act_beside_hidden_activation_is_left_unread(tmp_path):
    """Hub folders carry both; Gemma2MLP reads hidden_activation only (LLaMA refuses a hidden_act not silu)."""
    path = save_hf(make_gemma("gemma2"), tmp_path / "gemma2")
    config = path / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "hidden_act": "gelu_pytorch_tanh"}))
    assert isinstance(M.load_model(path), Gemma2)
