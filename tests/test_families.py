"""Every model type of model.FAMILIES through one harness, against transformers' own class on the
same tiny random checkpoint (and PEFT for LoRA): logits on a plain batch longer than any sliding
window, a left-padded batch, KV-cache decoding and a packed row; bf16 against transformers' bf16;
LoRA on every target against PEFT; train.py's saved adapter in PeftModel.from_pretrained; export.py's
merge in transformers; two jobs fused equal to each alone; an nf4 QLoRA job that trains; generate.py
with an adapter; m-LoRA's names for the family's modules.

Adding a family is one TINY_MODELS entry here (how transformers builds a tiny one of its model type),
plus its own test file for what is special to it. A check another file already makes for a model
type is named in its entry's `elsewhere` (the test, which must exist) and not generated here; one
that cannot apply says "n/a: why". A model type of model.FAMILIES without an entry fails.
"""
import json
import math
import re
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
import torch

import export
import generate as G
import lora
import model as M
import peft_format
import train
from conftest import (TINY, TINY_GLM, adapter, assert_lora_matches_peft, assert_same_adapter, job, make_tiny, randomize_B,
                      run_cfg, save_hf, write_chatglm, write_rows)
from tokenizer_util import write_tokenizer_json

TESTS = Path(__file__).parent
CHECKS = ("logits", "left_padded", "kv_cache", "packed", "bf16", "lora_peft", "peft_load", "merge", "fused", "nf4",
          "generate", "mlora_names")
WINDOW = 5   # a sliding window shorter than every batch below, where a family has one
EXACT = dict(atol=1e-5, rtol=1e-4)


class Tiny(NamedTuple):
    """How transformers builds a tiny random model of one model type (conftest.TINY sizes, weights
    larger than the default init) and how its folder is written; what other files check for it."""
    config: str                                   # transformers' config class
    model: str                                    # its causal-LM class, the oracle
    overrides: dict = {}                          # over conftest.TINY: what makes the family's own paths run
    attn_implementation: str | None = None        # e.g. "eager" where transformers' SDPA path differs
    write: Callable | None = None                 # (transformers model, folder) -> folder; default save_hf
    elsewhere: dict[str, str] = {}                # check -> "tests/test_x.py::test_name[id]" or "n/a: why"


def model_file(name: str) -> str:
    return f"tests/test_model.py::{name}"


LLAMA_ELSEWHERE = {
    "logits": model_file("test_logits_match_transformers"),
    "left_padded": model_file("test_padding_matches_transformers[left]"),
    "kv_cache": model_file("test_kv_cache_equals_full_forward"),
    "packed": model_file("test_packed_row_matches_transformers_and_each_sequence_alone[llama3-gqa-rope-scaled]"),
    "bf16": model_file("test_bf16_matches_transformers_bf16"),
    "lora_peft": "tests/test_lora.py::test_forward_and_grads_match_peft",
    "peft_load": "tests/test_train.py::test_train_writes_outputs_and_adapters_load_in_peft",
    "merge": "tests/test_export.py::test_merged_export_loads_in_transformers",
    "fused": "tests/test_train.py::test_fused_job_equals_job_alone",
    "nf4": "tests/test_quant.py::test_fused_qlora_jobs_equal_each_alone",
    "generate": "tests/test_generate.py::test_cli_with_two_adapters_and_base",
}


def sliding_elsewhere(name: str) -> dict[str, str]:
    """test_model.py's sliding-window tests of SLIDING[name]: logits, left padding, KV cache."""
    return {"logits": model_file(f"test_sliding_window_matches_transformers[{name}]"),
            "left_padded": model_file(f"test_sliding_window_with_left_padding_matches_transformers[{name}]"),
            "kv_cache": model_file(f"test_sliding_window_kv_cache_equals_full_forward[{name}]")}


GLM = dict(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})


def glm_elsewhere(kind: str) -> dict[str, str]:
    """tests/test_glm.py's bf16 check (ChatGLM's norm order off too) and greedy generation against PEFT's."""
    return {"bf16": f"tests/test_glm.py::test_bf16_matches_transformers_bf16[{kind}]",
            "generate": f"tests/test_glm.py::test_generation_equals_peft_greedy_and_the_cli_runs[{kind}]"}


def gemma_elsewhere(variant: str) -> dict[str, str]:
    """tests/test_gemma.py's tests of its VARIANTS[variant] (and of the uncapped and hub-keys variants):
    logits, left (and right) padding, KV cache, packed rows as segments and as a PackedRow; bf16; LoRA."""
    return {check: f"tests/test_gemma.py::{name}[{variant}]" for check, name in (
        ("logits", "test_logits_match_transformers"), ("kv_cache", "test_kv_cache_decoding_matches_transformers"),
        ("bf16", "test_bf16_equals_transformers_bf16"), ("lora_peft", "test_lora_on_every_target_matches_peft"),
        ("packed", "test_packed_row_matches_transformers_and_each_sequence_alone"),
    )} | {"left_padded": "tests/test_gemma.py::test_padding_matches_transformers"}   # ids [variant-left]


NO_TRANSFORMERS_CLASS = "n/a: transformers has no class for THUDM's layout (it is their remote code)"
TINY_MODELS = {
    "llama": Tiny("LlamaConfig", "LlamaForCausalLM", elsewhere=LLAMA_ELSEWHERE),
    "mistral": Tiny("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW),
                    elsewhere=sliding_elsewhere("mistral")),
    "qwen2": Tiny("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=WINDOW,
                                                          max_window_layers=1),
                  elsewhere=sliding_elsewhere("qwen2-max-window-layers")),
    "chatglm": Tiny("GlmConfig", "GlmForCausalLM", dict(TINY_GLM, num_key_value_heads=2, rope_parameters={
                        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
                    write=lambda hf, folder: write_chatglm(hf, folder, rope_ratio=1),
                    elsewhere={"logits": "tests/test_chatglm.py::test_logits_match_glm",
                               "left_padded": "tests/test_chatglm.py::test_padding_cache_and_output_mask",
                               "kv_cache": "tests/test_chatglm.py::test_padding_cache_and_output_mask",
                               "packed": "tests/test_chatglm.py::test_packed_row_equals_each_sequence_alone",
                               "bf16": "n/a: the oracle, transformers' Glm, rounds its norms in Llama's order, "
                                       "THUDM's code (and ours) after the weight",
                               "lora_peft": "tests/test_chatglm.py::test_lora_targets_peft_names_and_mixed_batch",
                               "peft_load": NO_TRANSFORMERS_CLASS, "merge": NO_TRANSFORMERS_CLASS,
                               "fused": "tests/test_chatglm.py::test_fused_chatglm_jobs_equal_each_alone"}),
    "phi3": Tiny("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=WINDOW, rope_parameters={
                     "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
                 elsewhere={"logits": "tests/test_phi3.py::test_logits_match_transformers",
                            "left_padded": "tests/test_phi3.py::test_padding_matches_transformers[left]",
                            "kv_cache": "tests/test_phi3.py::test_kv_cache_equals_full_forward",
                            "packed": "tests/test_phi3.py::test_packed_row_matches_transformers_and_each_sequence_alone",
                            "lora_peft": "tests/test_phi3.py::test_lora_on_every_target_matches_peft"}),
    # A head_dim other than hidden_size / heads, biases, and layer 1 sliding (Qwen2's rule).
    "qwen3": Tiny("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, attention_bias=True, use_sliding_window=True,
                                                          sliding_window=WINDOW, max_window_layers=1)),
    "olmo2": Tiny("Olmo2Config", "Olmo2ForCausalLM", dict(attention_bias=True)),
    # q/k/v bias (GlmConfig's default), interleaved rope on half of each head; GLM-4's extra norms.
    "glm": Tiny("GlmConfig", "GlmForCausalLM", GLM, elsewhere=glm_elsewhere("glm")),
    "glm4": Tiny("Glm4Config", "Glm4ForCausalLM", GLM, elsewhere=glm_elsewhere("glm4")),
    # Both caps low enough to bend these scores and logits, a query scale other than head_dim's, layer 0
    # sliding; sqrt(hidden_size) not a power of 2 (the embedding scale's rounding shows in bf16).
    "gemma2": Tiny("Gemma2Config", "Gemma2ForCausalLM", dict(hidden_size=72, head_dim=16, sliding_window=WINDOW,
                   query_pre_attn_scalar=12, attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
                   attn_implementation="eager", elsewhere=gemma_elsewhere("gemma2")),
    # q/k norms, a rope of its own on the sliding layer 0, linear scaling on layer 1, a final cap.
    "gemma3_text": Tiny("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
                            hidden_size=72, head_dim=16, sliding_window=WINDOW, sliding_window_pattern=2,
                            rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 4.0},
                            final_logit_softcapping=3.0), attn_implementation="eager",
                        elsewhere=gemma_elsewhere("gemma3")),
}


def cases(check: str) -> list:
    """The model types of model.FAMILIES this harness checks for `check`: all but those whose entry
    names where it is checked instead (a type without an entry is a case, which fails)."""
    return [kind for kind in M.FAMILIES if check not in getattr(TINY_MODELS.get(kind), "elsewhere", {})]


# ----------------------------------------------------------------------------- the table itself

def test_every_model_type_has_an_entry():
    assert set(TINY_MODELS) == set(M.FAMILIES)


def test_checks_left_to_other_files_are_made_there():
    """Each `elsewhere` names a check of this harness and a test that exists (its parameter id
    written in the file), or says why the check does not apply."""
    for kind, tiny in TINY_MODELS.items():
        assert set(tiny.elsewhere) <= set(CHECKS), kind
        for check, where in tiny.elsewhere.items():
            if where.startswith("n/a: "):
                continue
            file, name, param = re.fullmatch(r"(tests/test_\w+\.py)::(test_\w+)(?:\[(.+)\])?", where).groups()
            text = (TESTS.parent / file).read_text()
            assert re.search(rf"^def {name}\(", text, re.M), f"{kind} {check}: no {name} in {file}"
            assert param is None or f'"{param}"' in text, f"{kind} {check}: no parameter {param!r} in {file}"


# ----------------------------------------------------------------------------- building

def entry(kind: str) -> Tiny:
    if kind not in TINY_MODELS:
        pytest.fail(f"model_type {kind!r} of model.FAMILIES has no TINY_MODELS entry in tests/test_families.py")
    return TINY_MODELS[kind]


def make_hf(kind: str, vocab_size: int):
    """A tiny random transformers model of this type (conftest.make_tiny), its special ids those of
    the test tokenizer (tokenizer_util's: 0 begins and pads, 2 ends)."""
    tiny = entry(kind)
    extra = {"attn_implementation": tiny.attn_implementation} if tiny.attn_implementation else {}
    return make_tiny(tiny.config, tiny.model, **{"vocab_size": vocab_size, "bos_token_id": 0, "eos_token_id": 2,
                                                 "pad_token_id": 0, **tiny.overrides, **extra})


def oracle(kind: str, folder, dtype=torch.float32):
    """transformers' class of this type loaded from a folder (a fresh one: PEFT changes what it wraps)."""
    import transformers
    tiny = entry(kind)
    extra = {"attn_implementation": tiny.attn_implementation} if tiny.attn_implementation else {}
    return getattr(transformers, tiny.model).from_pretrained(folder, dtype=dtype, **extra).eval()


class Built(NamedTuple):
    folder: Path        # config.json, weights and a tokenizer.json
    hf: object          # transformers' model of the same weights, fp32
    ours: object        # model.load_model's, fp32


@pytest.fixture(autouse=True, scope="module")
def no_loss_plot():
    """train.py's loss.png (matplotlib: half of a tiny run's time) is tests/test_export.py's to check."""
    import report
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report, "plot_losses", lambda metrics_file, png: None)
        yield


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """kind -> Built, each made once for the module."""
    cache = {}

    def get(kind: str) -> Built:
        if kind not in cache:
            folder = tmp_path_factory.mktemp(kind)
            vocab = write_tokenizer_json(folder)
            hf = make_hf(kind, max(vocab, TINY["vocab_size"]))
            (entry(kind).write or save_hf)(hf, folder)
            ours = M.load_model(folder, dtype=torch.float32)
            assert type(ours) is M.FAMILIES[kind] and ours.config.model_type == kind
            cache[kind] = Built(folder, hf, ours)
        return cache[kind]
    return get


def ids(B: int, T: int, seed: int) -> torch.Tensor:
    return torch.randint(3, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def left_padded(B=3, T=16, pad=(0, 4, 9), seed=4):
    mask = torch.ones(B, T, dtype=torch.long)
    for row, n in enumerate(pad):
        mask[row, :n] = 0
    return ids(B, T, seed), mask


# ----------------------------------------------------------------------------- logits

@pytest.mark.parametrize("kind", cases("logits"))
def test_logits_match_transformers(built, kind):
    b = built(kind)
    idx = ids(2, 40, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(b.ours(idx), b.hf(idx).logits, **EXACT)


@pytest.mark.parametrize("kind", cases("left_padded"))
def test_left_padded_batch_matches_transformers(built, kind):
    b = built(kind)
    idx, mask = left_padded()
    real = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(b.ours(idx, attention_mask=mask)[real], b.hf(idx, attention_mask=mask).logits[real],
                                   **EXACT)


@pytest.mark.parametrize("kind", cases("kv_cache"))
def test_kv_cache_decoding_matches_transformers(built, kind):
    """A left-padded prompt of 7 then one token at a time through the cache, against transformers'
    full forward: past the window, the cache drops old keys as transformers' mask does."""
    b = built(kind)
    idx, mask = left_padded()
    real = mask.bool()
    with torch.no_grad():
        cache = b.ours.new_cache(3, 16)
        steps = [b.ours(idx[:, :7], attention_mask=mask[:, :7], cache=cache)]
        steps += [b.ours(idx[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache) for t in range(7, 16)]
        torch.testing.assert_close(torch.cat(steps, dim=1)[real], b.hf(idx, attention_mask=mask).logits[real], **EXACT)


@pytest.mark.parametrize("kind", cases("packed"))
def test_packed_row_matches_transformers_and_each_sequence_alone(built, kind):
    """The training path (segments): transformers given the row with restarting position_ids keeps
    attention inside each sequence itself; each sequence alone gives the same; so does the row as a
    llama.PackedRow (graphs.py's fixed-shape step) where the family declares FIXED_SHAPE_STEP."""
    import llama
    b = built(kind)
    lengths = [7, 1, 13, 13, 9]
    seqs = [ids(1, n, seed=5 + i)[0] for i, n in enumerate(lengths)]
    row, positions = torch.cat(seqs)[None], torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        got = b.ours(row, segments=tuple(lengths))[0]
        torch.testing.assert_close(got, b.hf(row, position_ids=positions, use_cache=False).logits[0], **EXACT)
        for seq, part in zip(seqs, got.split(lengths)):
            torch.testing.assert_close(part, b.ours(seq[None])[0], **EXACT)
        if M.FAMILIES[kind].FIXED_SHAPE_STEP:
            segment = torch.arange(len(lengths)).repeat_interleave(torch.tensor(lengths))
            starts = torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)
            packed = llama.PackedRow(positions, segment, starts, max(lengths))
            torch.testing.assert_close(b.ours(row, segments=packed)[0], got, **EXACT)


@pytest.mark.parametrize("kind", cases("bf16"))
def test_bf16_matches_transformers_bf16(built, kind):
    """Both loaded in bf16: within one bf16 step at the logits' scale (tests/test_model.py's rule)."""
    b = built(kind)
    idx = ids(2, 24, seed=0)
    with torch.no_grad():
        expected = oracle(kind, b.folder, torch.bfloat16)(idx).logits
        got = M.load_model(b.folder, dtype="bfloat16")(idx)
    assert got.dtype == torch.bfloat16
    step = 2.0 ** (math.floor(math.log2(expected.abs().max().item())) - 7)
    torch.testing.assert_close(got, expected, atol=step, rtol=0)


# ----------------------------------------------------------------------------- LoRA and adapters

@pytest.mark.parametrize("kind", cases("lora_peft"))
def test_lora_on_every_target_matches_peft(built, kind, tmp_path):
    b = built(kind)
    ours = M.load_model(b.folder, dtype=torch.float32)
    targets = list(M.FAMILIES[kind].LORA_TARGETS)
    assert_lora_matches_peft(ours, oracle(kind, b.folder), lora.LoRAConfig(r=4, alpha=8, targets=targets), tmp_path / "job",
                             layers=TINY["num_hidden_layers"])


@pytest.fixture(scope="module")
def trained(built, tmp_path_factory):
    """kind -> the run folder of two jobs trained fused (a: every target; b: the defaults, SGD), and
    of the same two trained one after the other (max_candidates 1: never in one step)."""
    cache = {}

    def get(kind: str) -> tuple[Path, Path]:
        if kind not in cache:
            folder, d = built(kind).folder, tmp_path_factory.mktemp(f"{kind}-runs")
            jobs = [job("a", write_rows(d / "a.json", 4, 0, "reverse"), targets=list(M.FAMILIES[kind].LORA_TARGETS),
                        batch_size=2, epochs=1),
                    job("b", write_rows(d / "b.jsonl", 4, 1, "upper"), targets=None, r=8, optimizer="sgd",
                        momentum=0.9, batch_size=2, epochs=1)]
            train.train(run_cfg(folder, d / "fused", jobs, scheduler={"max_concurrent": 2, "max_candidates": 2}))
            train.train(run_cfg(folder, d / "alone", jobs, scheduler={"max_concurrent": 1, "max_candidates": 1}))
            cache[kind] = d / "fused", d / "alone"
        return cache[kind]
    return get


@pytest.mark.parametrize("kind", cases("fused"))
def test_two_jobs_fused_equal_each_alone(trained, kind):
    fused, alone = trained(kind)
    for name in ("a", "b"):
        assert_same_adapter(adapter(fused, name), adapter(alone, name))
        assert max(v.abs().max() for k, v in adapter(fused, name).items() if "lora_B" in k) > 1e-4  # it trained


@pytest.mark.parametrize("kind", cases("peft_load"))
def test_trained_adapter_loads_in_peft(built, trained, kind):
    """train.py's saved adapter, by PeftModel.from_pretrained on transformers' class: our logits."""
    import peft
    b, (fused, _) = built(kind), trained(kind)
    pm = peft.PeftModel.from_pretrained(oracle(kind, b.folder), fused / "a")
    ours = M.load_model(b.folder, dtype=torch.float32)
    name = peft_format.load_peft(ours, fused / "a")
    idx = ids(2, 12, seed=6)
    with torch.no_grad(), lora.route(ours, [name] * 2):
        torch.testing.assert_close(ours(idx), pm(idx).logits, **EXACT)


@pytest.mark.parametrize("kind", cases("merge"))
def test_merge_loads_in_transformers(built, trained, kind, tmp_path):
    """export.py's merge of the trained adapter, loaded by transformers: base + adapter's logits."""
    b, (fused, _) = built(kind), trained(kind)
    export.export_merged(str(fused / "a"), str(tmp_path / "merged"), base=str(b.folder))
    ours = M.load_model(b.folder, dtype=torch.float32)
    name = peft_format.load_peft(ours, fused / "a")
    idx = ids(2, 12, seed=7)
    with torch.no_grad(), lora.route(ours, [name] * 2):
        expected = ours(idx)
        torch.testing.assert_close(oracle(kind, tmp_path / "merged")(idx).logits, expected, **EXACT)
    assert (expected - b.ours(idx)).abs().max() > 1e-4  # the adapter is in it


@pytest.mark.parametrize("kind", cases("nf4"))
def test_nf4_qlora_job_trains(built, kind, tmp_path):
    target = job("q", write_rows(tmp_path / "q.json", 4, 2, "count"), targets=list(M.FAMILIES[kind].LORA_TARGETS),
                 batch_size=2, epochs=1)
    train.train(run_cfg(built(kind).folder, tmp_path / "out", [target], quant="nf4"))
    assert max(v.abs().max() for k, v in adapter(tmp_path / "out", "q").items() if "lora_B" in k) > 1e-4


@pytest.mark.parametrize("kind", cases("generate"))
def test_generate_runs_with_an_adapter(built, kind, tmp_path, capsys):
    """generate.py's command line with an adapter and the base; generate() with the adapter (KV
    cache) equals greedy decoding by full forwards through our model routed to it."""
    b = built(kind)
    ours = M.load_model(b.folder, dtype=torch.float32)
    lora.add_adapters(ours, {"a": lora.LoRAConfig(r=4, alpha=8, targets=list(M.FAMILIES[kind].LORA_TARGETS))})
    randomize_B(ours, "a")
    ours.eval()
    peft_format.save_peft(ours, "a", tmp_path / "a")
    assert G.main(["--base", str(b.folder), "--adapter", str(tmp_path / "a"), "--with-base",
                   "--prompt", "hello world", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "[base] " in out and "[a] " in out
    prompt = ids(1, 5, seed=8)[0].tolist()
    got = G.generate(ours, [prompt], ["a"], max_new_tokens=6)[0]
    sequence = list(prompt)
    with torch.no_grad(), lora.route(ours, ["a"]):
        for _ in range(6):
            sequence.append(int(ours(torch.tensor([sequence]))[0, -1].argmax()))
    assert got == sequence[len(prompt):]


@pytest.mark.parametrize("kind", cases("mlora_names"))
def test_mlora_names_are_the_family_modules(built, kind):
    """An m-LoRA file (2024) naming every module of the family in m-LoRA's words (MLORA_NAMES: Meta's
    w1/w2/w3 for gate/down/up on LLaMA-like ones; else the family's own names) trains all its LoRA
    targets, which add_adapters takes on the loaded model."""
    import mlora_config
    family = M.FAMILIES[kind]
    names = list(family.MLORA_NAMES) + [t for t in family.LORA_TARGETS if t not in family.MLORA_NAMES.values()]
    raw = json.loads((TESTS / "fixtures/mlora/2024/config/finetune.json").read_text())
    raw["lora"] = [dict(raw["lora"][0], target_modules=dict.fromkeys(names, True))]
    targets = mlora_config.from_mlora(raw, "finetune.json")[0]["jobs"][0]["targets"]
    assert sorted(targets) == sorted(family.LORA_TARGETS)
    ours = M.load_model(built(kind).folder, dtype=torch.float32)
    lora.add_adapters(ours, {"m": lora.LoRAConfig(targets=targets)})
    assert len(lora.lora_layers(ours)) == TINY["num_hidden_layers"] * len(targets)
