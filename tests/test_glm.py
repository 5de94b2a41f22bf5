"""GLM and GLM-4: logits against transformers' GlmForCausalLM and Glm4ForCausalLM on the same
checkpoint (plain, padded, cached, packed, bf16), LoRA on every target against PEFT, GLM-4-9B-chat in
THUDM's layout (chatglm.py) against its Hugging Face layout, refusals, config defaults, m-LoRA names."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import generate as G
import lora
import model as M
import peft_format
import quant
import train
from chatglm import ChatGLM
from conftest import (TINY, V, adapter, assert_lora_matches_peft, assert_same_adapter, job, make_glm, randomize_B,
                      run_cfg, save_hf, write_chatglm, write_rows)
from glm import Glm, Glm4
from tokenizer_util import write_tokenizer_json


def make_hf(kind: str = "glm", partial_rotary_factor: float = 0.5, **overrides):
    """A tiny random transformers GlmForCausalLM ("glm") or Glm4ForCausalLM ("glm4"), fp32, eval mode."""
    import transformers
    torch.manual_seed(0)
    config, causal_lm = {"glm": (transformers.GlmConfig, transformers.GlmForCausalLM),
                         "glm4": (transformers.Glm4Config, transformers.Glm4ForCausalLM)}[kind]
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": partial_rotary_factor}
    hf = causal_lm(config(**{**TINY, "head_dim": 16, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2,
                             "pad_token_id": 0, "rope_parameters": rope, **overrides}))
    with torch.no_grad():  # larger than the default init, so any mismatch shows
        for name, p in hf.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.1)
    return hf.eval()


def hub_style(path):
    """config.json as the hub's folders have it (THUDM/glm-4-9b-chat-hf, GLM-4-9B-0414): rope_theta and
    partial_rotary_factor beside the other fields, no rope_parameters."""
    config = json.loads((path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(rope_theta=rope["rope_theta"], partial_rotary_factor=rope["partial_rotary_factor"])
    (path / "config.json").write_text(json.dumps(config))
    return path


VARIANTS = {
    # name: (model type, partial_rotary_factor, config overrides, hub-style config.json)
    "glm-gqa": ("glm", 0.5, {}, False),
    "glm-tied-no-bias-hub-keys": ("glm", 0.75, dict(tie_word_embeddings=True, attention_bias=False), True),
    "glm4-gqa": ("glm4", 0.5, {}, False),
    "glm4-mha-full-rope-hub-keys": ("glm4", 1.0, dict(num_key_value_heads=4), True),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def glm(request, tmp_path_factory):
    """(our model, transformers model) of a tiny GLM or GLM-4 checkpoint."""
    kind, factor, overrides, hub = VARIANTS[request.param]
    hf = make_hf(kind, factor, **overrides)
    path = save_hf(hf, tmp_path_factory.mktemp(request.param))
    if hub:
        hub_style(path)
    ours = M.load_model(path, dtype=torch.float32)
    assert type(ours) is {"glm": Glm, "glm4": Glm4}[kind] and ours.config.rotary_dim == int(16 * factor)
    return ours, hf


def test_logits_match_transformers(glm):
    ours, hf = glm
    idx = torch.randint(0, 384, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_matches_transformers(glm, side):
    ours, hf = glm
    idx = torch.randint(0, 384, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 12, dtype=torch.long)
    for row, n in enumerate([0, 5, 9]):
        if n:
            (mask[row, :n] if side == "left" else mask[row, 12 - n:]).zero_()
    real = mask.bool()
    with torch.no_grad():
        got = ours(idx, attention_mask=mask)
        torch.testing.assert_close(got[real], hf(idx, attention_mask=mask).logits[real], atol=1e-5, rtol=1e-4)


def test_kv_cache_decoding_matches_transformers(glm):
    """A left-padded batch decoded step by step through our cache: transformers' logits on the whole."""
    ours, hf = glm
    idx = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :4] = 0
    real = mask.bool()
    with torch.no_grad():
        cache = ours.new_cache(2, 16)
        steps = [ours(idx[:, :6], attention_mask=mask[:, :6], cache=cache)]
        steps += [ours(idx[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache) for t in range(6, 16)]
        expected = hf(idx, attention_mask=mask).logits
        torch.testing.assert_close(torch.cat(steps, dim=1)[real], expected[real], atol=1e-5, rtol=1e-4)


def test_packed_row_matches_transformers_and_each_sequence_alone(glm):
    """Transformers given the packed row with restarting position_ids (it then keeps attention
    inside each sequence itself), and each sequence run alone."""
    ours, hf = glm
    lengths = [7, 1, 13, 13, 9]
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, 384, (n,), generator=g) for n in lengths]
    row, positions = torch.cat(seqs)[None], torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        got = ours(row, segments=tuple(lengths))[0]
        torch.testing.assert_close(got, hf(row, position_ids=positions, use_cache=False).logits[0], atol=1e-5, rtol=1e-4)
        for seq, part in zip(seqs, got.split(lengths)):
            torch.testing.assert_close(part, ours(seq[None])[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["glm", "glm4"])
def test_bf16_matches_transformers_bf16(tmp_path, kind):
    """Loaded in bf16, our logits are transformers' in bf16 on the same checkpoint, to one bf16 step at
    the logits' scale (as tests/test_model.py's LLaMA check; measured on CPU: equal bitwise). Our fp32
    logits, and ChatGLM's norm order (the weight applied in fp32, then rounded), are further off."""
    import transformers
    import llama
    path = save_hf(make_hf(kind), tmp_path / kind)
    idx = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ours = M.load_model(path, dtype="bfloat16")
    with torch.no_grad():
        expected = reference(idx).logits
        got = ours(idx)
        fp32 = M.load_model(path, dtype=torch.float32)(idx)
        for norm in ours.modules():
            if isinstance(norm, llama.RMSNorm):
                norm.weight_in_fp32 = True
        wrong_order = ours(idx)
    assert got.dtype == torch.bfloat16 and expected.abs().max() < 4
    tolerance = 2**-6
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=0)
    assert (wrong_order - expected).abs().max() > 2 * tolerance
    assert (fp32 - expected.float()).abs().max() > 2 * tolerance


@pytest.mark.parametrize("kind", ["glm", "glm4"])
def test_lora_on_every_target_matches_peft(tmp_path, kind):
    """LoRA on q/k/v/o_proj, gate_up_proj and down_proj: logits and the A/B gradients of one loss
    equal PEFT's on transformers' model with the same weights."""
    hf = make_hf(kind)
    ours = M.load_model(save_hf(hf, tmp_path / "base"), dtype=torch.float32)
    assert_lora_matches_peft(ours, hf, lora.LoRAConfig(r=4, alpha=8, targets=list(type(ours).LORA_TARGETS)),
                             tmp_path / "job")


# ----------------------------------------------------------------------------- training, QLoRA, merge, generation

@pytest.fixture(scope="module", params=["glm", "glm4"])
def base(request, tmp_path_factory):
    """(folder with a tokenizer.json, transformers model) of a tiny GLM or GLM-4."""
    folder = tmp_path_factory.mktemp(f"{request.param}-base")
    write_tokenizer_json(folder)   # 300 ids, within the model's 384
    hf = make_hf(request.param)
    return save_hf(hf, folder), hf


@pytest.mark.parametrize("quant_type", [None, "nf4"])
def test_fused_jobs_equal_each_alone(base, tmp_path, quant_type):
    """A job on every target (dropout on) fused with another ends as it does alone, on a float base and
    on an nf4 one (QLoRA)."""
    folder, _ = base
    targets = list(M.FAMILIES[json.loads((folder / "config.json").read_text())["model_type"]].LORA_TARGETS)
    target = job("target", write_rows(tmp_path / "t.json", 8, 0, "reverse"), targets=targets)
    other = job("other", write_rows(tmp_path / "o.jsonl", 6, 1, "upper"), r=8, optimizer="sgd", momentum=0.9,
                targets=["q_proj", "gate_up_proj"])
    train.train(run_cfg(folder, tmp_path / "fused", [other, target], quant=quant_type, scheduler={"max_concurrent": 2}))
    train.train(run_cfg(folder, tmp_path / "alone", [target], quant=quant_type))
    fused = adapter(tmp_path / "fused", "target")
    assert_same_adapter(fused, adapter(tmp_path / "alone", "target"))
    assert len(fused) == 2 * len(targets) * 2
    assert max(v.abs().max() for k, v in fused.items() if "lora_B" in k) > 1e-3  # it trained


def test_nf4_base_matches_transformers_bitsandbytes(base):
    """Every Linear but the head quantized, as transformers + bitsandbytes do it: the same logits."""
    import transformers
    folder, hf = base
    ours = M.load_model(folder, dtype=torch.float32, quant="nf4")
    quantized = {n.rsplit(".", 1)[-1] for n, m in ours.named_modules() if isinstance(m, quant.QuantLinear)}
    assert quantized == set(type(ours).LORA_TARGETS)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu",
        quantization_config=transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                            bnb_4bit_compute_dtype=torch.float32)).eval()
    for module in reference.modules():   # the fp32 kernel, which is what ours computes (tests/test_quant.py)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    idx = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), reference(idx).logits, atol=1e-5, rtol=1e-4)
        assert (ours(idx) - hf(idx).logits).abs().max() > 1e-3   # quantized: not the float model


def with_adapter(folder):
    """Our model with adapter "job" on every target, B randomized."""
    ours = M.load_model(folder, dtype=torch.float32)
    lora.add_adapters(ours, {"job": lora.LoRAConfig(r=4, alpha=8, targets=list(type(ours).LORA_TARGETS))})
    randomize_B(ours, "job")
    return ours


def test_merged_export_loads_in_transformers(base, tmp_path):
    import transformers
    folder, _ = base
    ours = with_adapter(folder)
    peft_format.save_peft(ours, "job", tmp_path / "job", base_model_path=str(folder))
    assert train.main(["--merge", str(tmp_path / "job"), "--to", str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    idx = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(10))
    with torch.no_grad(), lora.route(ours, ["job", "job"]):
        expected = ours(idx)
        torch.testing.assert_close(merged(idx).logits, expected, atol=1e-4, rtol=1e-4)
        assert (M.load_model(folder)(idx) - expected).abs().max() > 1e-2   # the adapter changed something


def test_generation_equals_peft_greedy_and_the_cli_runs(base, tmp_path, capsys):
    """Greedy decoding of left-padded prompts with an adapter (our KV cache) equals PEFT's on transformers'
    generate; generate.py runs on the folder with the saved adapter."""
    import peft
    folder, hf = base
    ours = with_adapter(folder)
    peft_format.save_peft(ours, "job", tmp_path / "job")
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 384, (n,), generator=g).tolist() for n in (5, 9, 3)]
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "job")
    expected = pm.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                           eos_token_id=[])[:, T:].tolist()
    pm.unload()   # the module-scoped transformers model back as it was
    assert G.generate(ours, prompts, ["job"] * 3, max_new_tokens=8) == expected
    assert G.generate(ours, prompts, [None] * 3, max_new_tokens=8) != expected   # the adapter matters
    assert G.main(["--base", str(folder), "--adapter", str(tmp_path / "job"), "--with-base",
                   "--prompt", "hello world", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("[job] ") == 1 and out.count("[base] ") == 1, out


# ----------------------------------------------------------------------------- THUDM's layout of the same weights

@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """One tiny GLM-4-9B-chat-like checkpoint (2 key/value groups, rope base 10000 * 50) as a Hugging Face
    folder and as THUDM's (conftest.write_chatglm), the same tokenizer.json in both:
    (GLM folder, ChatGLM folder, transformers' GlmForCausalLM)."""
    glm = make_glm(groups=2, rope_ratio=50)
    folder = tmp_path_factory.mktemp("layouts")
    hf_dir, thudm_dir = save_hf(glm, folder / "glm"), write_chatglm(glm, folder / "chatglm", rope_ratio=50)
    write_tokenizer_json(hf_dir)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_dir / file, thudm_dir / file)
    return hf_dir, thudm_dir, glm


def test_glm_and_chatglm_layouts_give_the_same_logits(layouts):
    hf_dir, thudm_dir, glm = layouts
    ours, thudm = M.load_model(hf_dir), M.load_model(thudm_dir)
    assert type(ours) is Glm and type(thudm) is ChatGLM
    idx = torch.randint(3, V, (3, 20), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, :6] = 0
    real = mask.bool()
    with torch.no_grad():
        expected = glm(idx, attention_mask=mask).logits
        for model in (ours, thudm):
            torch.testing.assert_close(model(idx, attention_mask=mask)[real], expected[real], atol=1e-5, rtol=1e-4)


# The layers both layouts have: THUDM's query_key_value is q, k and v as ONE layer, and a LoRA over it
# is not three LoRAs, so it has no counterpart among GLM's targets.
THUDM_NAMES = {"model.layers.": "transformer.encoder.layers.", "self_attn.o_proj": "self_attention.dense",
               "mlp.gate_up_proj": "mlp.dense_h_to_4h", "mlp.down_proj": "mlp.dense_4h_to_h"}


def test_glm_and_chatglm_layouts_train_the_same(layouts, tmp_path):
    """The same job (no dropout: masks are seeded by the layer's path) trained on either folder ends
    with the same adapter, under THUDM's names in one and GLM's in the other."""
    hf_dir, thudm_dir, _ = layouts
    data_path = write_rows(tmp_path / "rows.json", 8, 0, "reverse")
    for folder, targets in ((hf_dir, ["o_proj", "gate_up_proj", "down_proj"]),
                            (thudm_dir, ["dense", "dense_h_to_4h", "dense_4h_to_h"])):
        train.train(run_cfg(folder, tmp_path / folder.name, [job("j", data_path, targets=targets, dropout=0.0)]))
    glm_adapter = load_file(tmp_path / "glm" / "j" / "adapter_model.safetensors")
    thudm_adapter = load_file(tmp_path / "chatglm" / "j" / "adapter_model.safetensors")
    renamed = {}
    for key, value in glm_adapter.items():
        for name, thudm_name in THUDM_NAMES.items():
            key = key.replace(name, thudm_name)
        renamed[key] = value
    assert len(renamed) == 2 * 3 * 2
    assert_same_adapter(renamed, thudm_adapter)
    assert max(v.abs().max() for k, v in renamed.items() if "lora_B" in k) > 1e-4  # it trained


# ----------------------------------------------------------------------------- config.json

@pytest.mark.parametrize("kind", ["glm", "glm4"])
@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "rope_parameters: rope type 'linear' is not supported"),
    ({"rope_parameters": None, "rope_theta": 1e4, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     "rope_scaling: rope type 'yarn' is not supported"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.1}},
     "partial_rotary_factor 0.1"),
    ({"attention_dropout": 0.1}, "attention_dropout 0.1"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
], ids=["linear-rope", "yarn-rope", "partial-rotary-0.1", "attention-dropout", "gelu"])
def test_unsupported_config_is_a_clear_error(tmp_path, kind, change, message):
    path = save_hf(make_hf(kind), tmp_path / kind)
    config = path / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    with pytest.raises(M.CheckpointError, match=f"config.json: .*{message}"):
        M.load_model(path)


@pytest.mark.parametrize("kind", ["glm", "glm4"])
def test_absent_fields_take_transformers_defaults(tmp_path, kind):
    """config.json without head_dim, num_key_value_heads, attention_bias, rms_norm_eps,
    max_position_embeddings and partial_rotary_factor: transformers reads GlmConfig's (Glm4Config's)
    defaults, 128, 2, true, 1.5625e-7, 131072, 0.5, and so do we."""
    import transformers
    path = save_hf(make_hf(kind, head_dim=128, rms_norm_eps=1.5625e-7), tmp_path / kind)
    config = json.loads((path / "config.json").read_text())
    for key in ("head_dim", "num_key_value_heads", "attention_bias", "rms_norm_eps", "max_position_embeddings"):
        del config[key]
    del config["rope_parameters"]["partial_rotary_factor"]
    (path / "config.json").write_text(json.dumps(config))
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = M.load_model(path)
    rc, c = reference.config, ours.config
    assert (c.head_dim, c.num_key_value_heads, c.qkv_bias, c.rms_norm_eps, c.max_position_embeddings, c.rotary_dim) \
        == (rc.head_dim, rc.num_key_value_heads, rc.attention_bias, rc.rms_norm_eps, rc.max_position_embeddings,
            int(rc.head_dim * rc.rope_parameters["partial_rotary_factor"])) == (128, 2, True, 1.5625e-7, 131072, 64)
    idx = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), reference(idx).logits, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- m-LoRA names

def test_mlora_names_are_glm_modules_where_the_file_says_so():
    """m-LoRA's fused MLP names (ChatGLM's mlp_in/mlp_out, THUDM's dense_h_to_4h/dense_4h_to_h) are
    gate_up_proj/down_proj where the file's other names are GLM's; beside query_key_value they stay
    ChatGLM's; LLaMA's w2 is down_proj in either family, w1/w3 stay LLaMA's."""
    from mlora_config import MloraFile, _family_names
    m = MloraFile("finetune.json")
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert _family_names(m, ["q_proj", "mlp_in", "mlp_out"], attention + ["mlp_in", "mlp_out"], "t") \
        == ["q_proj", "gate_up_proj", "down_proj"]
    assert _family_names(m, ["o_proj", "dense_h_to_4h"], attention + ["dense_h_to_4h"], "t") \
        == ["o_proj", "gate_up_proj"]
    assert _family_names(m, ["dense", "dense_h_to_4h"], ["query_key_value", "dense", "dense_h_to_4h"], "t") \
        == ["dense", "dense_h_to_4h"]
    assert _family_names(m, ["q_proj", "w2_proj"], attention + ["w2_proj"], "t") == ["q_proj", "down_proj"]
    assert _family_names(m, ["w1_proj", "w3_proj"], attention + ["w1_proj", "w2_proj", "w3_proj"], "t") \
        == ["gate_proj", "up_proj"]
    with pytest.raises(ValueError, match=r"could be the modules of chatglm \(dense\) or glm \(o_proj\)"):
        _family_names(m, ["dense"], ["dense"], "t")


def test_targets_glm_lacks_are_refused_in_one_line(layouts, tmp_path):
    """LLaMA's gate_proj (m-LoRA's w1) and ChatGLM's query_key_value are halves or a fusion of GLM's
    layers: a job naming them on a GLM base stops before training, naming the base's targets."""
    hf_dir, _, _ = layouts
    data_path = write_rows(tmp_path / "rows.json", 4, 0, "reverse")
    for bad in ("gate_proj", "query_key_value"):
        cfg = run_cfg(hf_dir, tmp_path / bad, [job("j", data_path, targets=["q_proj", bad])])
        with pytest.raises(ValueError, match=f"'{bad}' not in .*config.json \\(glm\\); LoRA targets: "
                                             "q_proj, k_proj, v_proj, o_proj, gate_up_proj, down_proj$"):
            train.train(cfg)
