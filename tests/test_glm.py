"""What is special to GLM and GLM-4 (tests/test_families.py runs the checks every family shares):
config.json variants (hub keys, tied head, no bias, full or partial rope, no GQA) against transformers'
GlmForCausalLM and Glm4ForCausalLM; bf16 in LLaMA's norm order, not ChatGLM's; the nf4 base against
transformers + bitsandbytes; greedy generation against PEFT; GLM-4-9B-chat in THUDM's layout
(chatglm.py) against its Hugging Face layout; refusals, config defaults, m-LoRA names."""
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
from conftest import (V, assert_same_adapter, job, make_glm, make_tiny, randomize_B, run_cfg, save_hf, write_chatglm,
                      write_rows)
from glm import Glm, Glm4
from tokenizer_util import write_tokenizer_json


def make_hf(kind: str = "glm", partial_rotary_factor: float = 0.5, **overrides):
    """A tiny random transformers GlmForCausalLM ("glm") or Glm4ForCausalLM ("glm4") (conftest.make_tiny)."""
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": partial_rotary_factor}
    prefix = {"glm": "Glm", "glm4": "Glm4"}[kind]
    return make_tiny(f"{prefix}Config", f"{prefix}ForCausalLM", **{
        "head_dim": 16, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "rope_parameters": rope, **overrides})


def hub_style(path):
    """config.json as the hub's folders have it (THUDM/glm-4-9b-chat-hf, GLM-4-9B-0414): rope_theta and
    partial_rotary_factor beside the other fields, no rope_parameters."""
    config = json.loads((path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(rope_theta=rope["rope_theta"], partial_rotary_factor=rope["partial_rotary_factor"])
    (path / "config.json").write_text(json.dumps(config))
    return path


# ----------------------------------------------------------------------------- config.json variants

VARIANTS = {
    # name: (model type, partial_rotary_factor, config overrides); each written with the hub's keys
    "glm-tied-no-bias-rope-0.75": ("glm", 0.75, dict(tie_word_embeddings=True, attention_bias=False)),
    "glm4-mha-full-rope": ("glm4", 1.0, dict(num_key_value_heads=4)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_variant_matches_transformers(tmp_path, variant):
    """A left-padded batch, whole and decoded step by step through our cache: transformers' logits."""
    kind, factor, overrides = VARIANTS[variant]
    hf = make_hf(kind, factor, **overrides)
    ours = M.load_model(hub_style(save_hf(hf, tmp_path / variant)), dtype=torch.float32)
    assert type(ours) is {"glm": Glm, "glm4": Glm4}[kind] and ours.config.rotary_dim == int(16 * factor)
    idx = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :5] = 0
    real = mask.bool()
    with torch.no_grad():
        expected = hf(idx, attention_mask=mask).logits[real]
        torch.testing.assert_close(ours(idx, attention_mask=mask)[real], expected, atol=1e-5, rtol=1e-4)
        cache = ours.new_cache(2, 24)
        steps = [ours(idx[:, :8], attention_mask=mask[:, :8], cache=cache)]
        steps += [ours(idx[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache) for t in range(8, 24)]
        torch.testing.assert_close(torch.cat(steps, dim=1)[real], expected, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- bf16, QLoRA, generation

@pytest.fixture(scope="module", params=["glm", "glm4"])
def base(request, tmp_path_factory):
    """(folder with a tokenizer.json, transformers model) of a tiny GLM or GLM-4."""
    folder = tmp_path_factory.mktemp(f"{request.param}-base")
    write_tokenizer_json(folder)   # 300 ids, within the model's 384
    hf = make_hf(request.param)
    return save_hf(hf, folder), hf


def test_bf16_matches_transformers_bf16(base):
    """Loaded in bf16, our logits are transformers' in bf16 on the same checkpoint, to one bf16 step at
    the logits' scale (as tests/test_model.py's LLaMA check; measured on CPU: equal bitwise). Our fp32
    logits, and ChatGLM's norm order (the weight applied in fp32, then rounded), are further off."""
    import transformers
    import llama
    folder, _ = base
    idx = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ours = M.load_model(folder, dtype="bfloat16")
    with torch.no_grad():
        expected = reference(idx).logits
        got = ours(idx)
        fp32 = M.load_model(folder, dtype=torch.float32)(idx)
        for norm in ours.modules():
            if isinstance(norm, llama.RMSNorm):
                norm.weight_in_fp32 = True
        wrong_order = ours(idx)
    assert got.dtype == torch.bfloat16 and expected.abs().max() < 4
    tolerance = 2**-6
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=0)
    assert (wrong_order - expected).abs().max() > 2 * tolerance
    assert (fp32 - expected.float()).abs().max() > 2 * tolerance


def test_nf4_base_matches_transformers_bitsandbytes(base):
    """Every Linear but the head quantized (gate_up_proj too), as transformers + bitsandbytes do it."""
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


def test_generation_equals_peft_greedy_and_the_cli_runs(base, tmp_path, capsys):
    """Greedy decoding of left-padded prompts with an adapter on every target (our KV cache) equals
    PEFT's on transformers' generate; generate.py runs on the folder with the saved adapter."""
    import peft
    folder, hf = base
    ours = M.load_model(folder, dtype=torch.float32)
    lora.add_adapters(ours, {"job": lora.LoRAConfig(r=4, alpha=8, targets=list(type(ours).LORA_TARGETS))})
    randomize_B(ours, "job")
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
