"""ChatGLM2/3: logits against transformers' Glm (the same math, split q/k/v), THUDM's folder
layout, the tokenizer's special tokens and prompt formats, LoRA/PEFT names, training, generation."""
import io
import json

import pytest
import torch

import data
import lora
from chatglm import ChatGLM
import model as M
import peft_format
import train
from conftest import V, assert_same_adapter, job, make_glm, randomize_B, run_cfg, write_chatglm, write_rows
from tokenizer_util import TEXT

CHAT_TEXT = TEXT + ["问：你好 答：你好！很高兴见到你。", "[Round 1] 问 答 people shop"]


def write_chatglm_tokenizer(path, version: int, detect_by: str = "code"):
    """A sentencepiece tokenizer.model like ChatGLM's (<unk> 0, <s> 1, </s> 2, byte fallback,
    dummy prefix) and THUDM's tokenizer files. ChatGLM3 shows itself through its role tokens,
    in tokenization_chatglm.py (detect_by="code") or tokenizer_config.json ("config")."""
    import sentencepiece as spm
    path.mkdir(parents=True, exist_ok=True)
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CHAT_TEXT), model_writer=proto, vocab_size=420, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, minloglevel=2)
    (path / "tokenizer.model").write_bytes(proto.getvalue())
    config = {"tokenizer_class": "ChatGLMTokenizer", "remove_space": False, "do_lower_case": False,
              "padding_side": "left", "add_bos_token": False,
              "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}
    special = list(data.CHATGLM_SPECIAL) + (list(data.CHATGLM3_ROLES) if version == 3 else [])
    if version == 3 and detect_by == "config":
        n = spm.SentencePieceProcessor(model_proto=proto.getvalue()).get_piece_size()
        config["added_tokens_decoder"] = {str(n + 5 + i): {"content": t, "special": True}
                                          for i, t in enumerate(data.CHATGLM3_ROLES)}
    else:  # the one line of THUDM's code that names the tokens
        (path / "tokenization_chatglm.py").write_text(f"special_tokens = {special!r}\n")
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return spm.SentencePieceProcessor(model_proto=proto.getvalue())


@pytest.fixture(scope="module")
def mqa(tmp_path_factory):
    """(folder, Glm oracle) with 2 multi-query groups, rope_ratio 50, .bin shards, ChatGLM3 tokenizer."""
    glm = make_glm(groups=2, rope_ratio=50)
    path = write_chatglm(glm, tmp_path_factory.mktemp("mqa"), rope_ratio=50, shards="bin")
    write_chatglm_tokenizer(path, version=3)
    return path, glm


# ----------------------------------------------------------------------------- model

@pytest.mark.parametrize("groups, rope_ratio, shards", [(2, 50, "bin"), (4, 1, "safetensors")],
                         ids=["mqa2-rope50-bin", "mha-rope1-safetensors"])
def test_logits_match_glm(tmp_path, groups, rope_ratio, shards):
    glm = make_glm(groups, rope_ratio)
    path = write_chatglm(glm, tmp_path, rope_ratio, shards)
    ours = M.load_model(path, dtype=torch.float32)
    assert type(ours).__name__ == "ChatGLM" and ours.config.num_key_value_heads == groups
    idx = torch.randint(0, V, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), glm(idx).logits, atol=1e-5, rtol=1e-4)
    # rope_ratio matters: the other base gives other logits.
    ours.config.rope_theta = 10000.0 * (1 if rope_ratio != 1 else 50)
    ours.reset_buffers("cpu")
    assert not torch.allclose(ours(idx), glm(idx).logits, atol=1e-3)


def test_padding_cache_and_output_mask(mqa):
    path, glm = mqa
    ours = M.load_model(path)
    idx = torch.randint(3, V, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, :9] = 0
    got = ours(idx, attention_mask=mask)
    real = mask.bool()
    for row in range(3):  # each left-padded row equals the row alone: positions start at 0
        alone = ours(idx[row:row + 1, real[row]])
        torch.testing.assert_close(got[row, real[row]], alone[0], atol=1e-5, rtol=1e-4)
    # Right padding needs no mask (causal fast path): the real tokens are unaffected.
    torch.testing.assert_close(ours(idx[:1, :7]), ours(idx[:1])[:, :7], atol=1e-5, rtol=1e-4)
    # KV cache (multi-query groups) gives the full forward's logits, step by step.
    cache = ours.new_cache(3, 16)
    assert cache.k[0].shape == (3, 2, 16, 16)
    steps = [ours(idx[:, :6], attention_mask=mask[:, :6], cache=cache)]
    steps += [ours(idx[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache) for t in range(6, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], got[real], atol=1e-5, rtol=1e-4)
    keep = torch.zeros(3, 12, dtype=torch.bool)
    keep[0, 5:], keep[2, 11] = True, True
    torch.testing.assert_close(ours(idx, output_mask=keep), ours(idx)[keep])


def greedy(model, prompts: list[list[int]], steps: int, use_cache: bool) -> list[list[int]]:
    """Left-padded batch greedy decoding, with the KV cache or by recomputing everything."""
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    cache = model.new_cache(len(prompts), T + steps) if use_cache else None
    logits = model(ids, attention_mask=mask, cache=cache)[:, -1]
    out = []
    for _ in range(steps):
        token = logits.argmax(-1)                                                  # [B]
        out.append(token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if use_cache:
            logits = model(token[:, None], attention_mask=mask, cache=cache)[:, -1]
        else:
            logits = model(ids, attention_mask=mask)[:, -1]
    return torch.stack(out, dim=1).tolist()


def test_greedy_generation_equal_with_and_without_cache(mqa):
    path, _ = mqa
    ours = M.load_model(path)
    tok = data.load_tokenizer(path)
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True),
                          bos=True) for q in ("What is the capital of France?", "hello")]
    with torch.no_grad():
        cached = greedy(ours, prompts, 8, use_cache=True)
        assert cached == greedy(ours, prompts, 8, use_cache=False)
        assert [greedy(ours, [p], 8, use_cache=True)[0] for p in prompts] == cached  # padding changes nothing



def test_generation_never_picks_an_id_the_tokenizer_lacks(mqa, capsys):
    """The model's padded vocab (512) outgrows its tokenizer (~430 ids), as ChatGLM's does
    (65024 vs 64798): the CLI crashed decoding such an id; generation now masks them."""
    import generate as G
    path, _ = mqa
    tok = data.load_tokenizer(path)
    questions = ["What is the capital of France?", "hello", "people shop", "The quick brown fox"]
    assert G.main(["--base", str(path), "--chat", "--max-new-tokens", "16"]
                  + [arg for q in questions for arg in ("--prompt", q)]) == 0
    assert capsys.readouterr().out.count("[base] ") == len(questions)

    ours = M.load_model(path)
    prompts = [G.encode_prompt(tok, q, template="chat") for q in questions]
    free = G.generate(ours, prompts, [None] * 4, max_new_tokens=16)  # all of the model's 512 ids
    assert tok.vocab_size < V and any(t >= tok.vocab_size for row in free for t in row)  # the crash's cause
    with pytest.raises(data.DataError, match=f"ids \\[{V - 1}\\] are not in the tokenizer's vocabulary"):
        tok.decode([5, V - 1, 6])
    kept = G.generate(ours, prompts, [None] * 4, max_new_tokens=16, vocab_size=tok.vocab_size)
    assert all(t < tok.vocab_size for row in kept for t in row)
    for before, after in zip(free, kept):  # the same tokens up to the first one the tokenizer lacks
        n = next((i for i, t in enumerate(before) if t >= tok.vocab_size), len(before))
        assert after[:n] == before[:n]
    assert all(isinstance(tok.decode(row, skip_special=True), str) for row in kept)
    sampled = G.generate(ours, prompts, [None] * 4, max_new_tokens=16, temperature=1.5, seed=0,
                         vocab_size=tok.vocab_size)
    assert all(t < tok.vocab_size for row in sampled for t in row)


@pytest.mark.parametrize("change, message", [
    ({"position_encoding_2d": True}, "ChatGLM-6B v1"),
    ({"rmsnorm": False}, "rmsnorm=False .LayerNorm"),
    ({"apply_residual_connection_post_layernorm": True}, "apply_residual_connection_post_layernorm"),
    ({"post_layer_norm": False}, "post_layer_norm"),
    ({"pre_seq_len": 16}, "pre_seq_len"),
])
def test_unsupported_config_is_a_clear_error(mqa, tmp_path, change, message):
    path, _ = mqa
    cfg = {**json.loads((path / "config.json").read_text()), **change}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        M.load_model(tmp_path)


def test_mlora_names_are_read_as_chatglm_modules():
    """m-LoRA's ChatGLM names (2023: qkv, mlp_in, mlp_out; 2024: qkv_proj) become ChatGLM's modules:
    the file's names, on or off, fit ChatGLM's LORA_TARGETS."""
    import mlora_config
    from pathlib import Path
    raw = json.loads((Path(__file__).parent / "fixtures/mlora/2024/config/finetune.json").read_text())
    raw["lora"] = raw["lora"][:1]
    raw["lora"][0]["target_modules"] = {"qkv_proj": True, "dense": False, "mlp_in": True, "mlp_out": False}
    translated, _ = mlora_config.from_mlora(raw, "finetune.json")
    assert translated["jobs"][0]["targets"] == ["query_key_value", "dense_h_to_4h"]
    assert all(name in ChatGLM.LORA_TARGETS for name in translated["jobs"][0]["targets"])


# ----------------------------------------------------------------------------- tokenizer and prompts

@pytest.mark.parametrize("version, detect_by", [(2, "code"), (3, "code"), (3, "config")])
def test_tokenizer_special_tokens(tmp_path, version, detect_by):
    sp = write_chatglm_tokenizer(tmp_path, version, detect_by)
    tok = data.load_tokenizer(tmp_path)
    n = sp.get_piece_size()
    assert tok.chatglm == version
    names = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"] + (
        ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"] if version == 3 else [])
    assert [tok.token_to_id(t) for t in names] == list(range(n, n + len(names)))
    assert tok.vocab_size == n + len(names)
    assert tok.prefix_ids == [n + 1, n + 3] and tok.add_bos  # [gMASK] sop, despite add_bos_token false
    assert (tok.eos_id, tok.pad_id) == (2, 0)
    assert tok.eos_ids == ({2, n + 6, n + 8} if version == 3 else {2})
    # Masks and sop/eop written in text stay text, as with THUDM's tokenizer ("eop" is in "people").
    for text in ("people shop", "[gMASK]sop hello", "The quick brown fox."):
        assert tok.encode(text) == sp.encode(text)
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("hi", bos=True) == [n + 1, n + 3] + sp.encode("hi")
    assert tok.decode([n + 1, n + 3] + sp.encode("hi"), skip_special=True) == "hi"


def test_tiktoken_tokenizer_model_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.model").write_text("IQ== 0\nIg== 1\n")  # GLM-4's tiktoken format: base64 rank
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ChatGLM4Tokenizer"}))
    with pytest.raises(data.DataError, match="not a sentencepiece model .GLM-4's is tiktoken"):
        data.load_tokenizer(tmp_path)


def test_prompt_layouts_are_thudms(tmp_path):
    """Token for token what THUDM's code builds: ChatGLM2's build_prompt and ptuning's answer
    encoding, ChatGLM3's build_chat_input and finetune_demo's labels."""
    q, a = "What is the capital of France?", "The capital of France is Paris."
    sp = write_chatglm_tokenizer(tmp_path / "v2", 2)
    tok = data.load_tokenizer(tmp_path / "v2")
    n = sp.get_piece_size()
    prompt, response = data.format_example("chat", tok, q, "", a)
    assert (prompt, response) == (f"[Round 1]\n\n问：{q}\n\n答：", a)
    example = data.make_example(tok, prompt, response, cutoff_len=512, train_on_inputs=False)
    prompt_ids = [n + 1, n + 3] + sp.encode(prompt)
    answer_ids = sp.encode(a) + [2]  # encoded on its own: dummy-prefix space on its first piece
    assert example.input_ids == prompt_ids + answer_ids
    assert example.labels == [-100] * len(prompt_ids) + answer_ids
    history = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                       {"role": "user", "content": q}], add_generation_prompt=True)
    assert history == f"[Round 1]\n\n问：hi\n\n答：hello\n\n[Round 2]\n\n问：{q}\n\n答："

    sp = write_chatglm_tokenizer(tmp_path / "v3", 3)
    tok = data.load_tokenizer(tmp_path / "v3")
    n = sp.get_piece_size()
    user, assistant = n + 6, n + 7
    prompt, response = data.format_example("chat", tok, q, "", a)
    assert (prompt, response) == (f"<|user|>\n{q}<|assistant|>", "\n" + a)
    example = data.make_example(tok, prompt, response, cutoff_len=512, train_on_inputs=False)
    # build_single_message: role token, encode(metadata + "\n"), encode(content), each apart.
    prompt_ids = [n + 1, n + 3, user] + sp.encode("\n") + sp.encode(q) + [assistant]
    answer_ids = sp.encode("\n") + sp.encode(a) + [2]
    assert example.input_ids == prompt_ids + answer_ids
    assert example.labels == [-100] * len(prompt_ids) + answer_ids
    assert tok.encode(prompt, bos=True) == prompt_ids  # what generation feeds the model
    # Alpaca still works on a ChatGLM folder, with the [gMASK] sop prefix.
    example = data.make_example(tok, data.build_prompt("alpaca", tok, q), a, 512, False)
    assert example.input_ids[:2] == [n + 1, n + 3] and example.input_ids[2] != n + 1


# ----------------------------------------------------------------------------- LoRA, PEFT, training

def test_lora_targets_peft_names_and_mixed_batch(mqa, tmp_path):
    import peft
    from safetensors.torch import load_file
    path, _ = mqa
    ours = M.load_model(path)
    lora.add_adapters(ours, {"d": lora.LoRAConfig()})  # no targets named: the family's default
    assert peft_format.adapter_config(ours, "d").targets == ["query_key_value", "dense"]
    lora.remove_adapter(ours, "d")
    with pytest.raises(ValueError, match="valid targets: query_key_value, dense, dense_h_to_4h, dense_4h_to_h$"):
        lora.add_adapters(ours, {"x": lora.LoRAConfig(targets=["output_layer"])})
    lora.add_adapters(ours, {"a": lora.LoRAConfig(r=4, alpha=8, targets=["query_key_value", "dense", "dense_4h_to_h"]),
                             "b": lora.LoRAConfig(r=2, alpha=4, targets=["query_key_value"])})
    randomize_B(ours, "a", 0)
    randomize_B(ours, "b", 1)
    peft_format.save_peft(ours, "a", tmp_path / "a")
    keys = load_file(tmp_path / "a" / "adapter_model.safetensors").keys()
    assert "base_model.model.transformer.encoder.layers.0.self_attention.query_key_value.lora_A.weight" in keys
    assert "base_model.model.transformer.encoder.layers.1.mlp.dense_4h_to_h.lora_B.weight" in keys
    assert len(keys) == 2 * 3 * 2
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["dense", "dense_4h_to_h", "query_key_value"]
    # PEFT puts it onto a model with THUDM's module tree ("dense" must not catch the MLP's
    # dense_h_to_4h): the same logits as ours.
    idx = torch.randint(3, V, (4, 10), generator=torch.Generator().manual_seed(3))
    peft_config = peft.PeftConfig.from_pretrained(tmp_path / "a")
    peft_config.task_type = None  # CAUSAL_LM would want transformers' generation methods on the model
    pm = peft.PeftModel.from_pretrained(M.load_model(path), tmp_path / "a", config=peft_config)
    with torch.no_grad(), lora.route(ours, ["a"] * 4):
        torch.testing.assert_close(ours(idx), pm(idx), atol=1e-5, rtol=1e-4)
    peft_layers = {n for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert peft_layers == {peft_format.PEFT_PREFIX + p for p, m in lora.lora_layers(ours) if "a" in m.adapters}
    # A mixed batch equals each row run alone with its own adapter (or none).
    names = ["b", None, "a", "b"]
    with torch.no_grad(), lora.route(ours, names):
        mixed = ours(idx)
    for row, name in enumerate(names):
        with torch.no_grad(), lora.route(ours, [name]):
            torch.testing.assert_close(mixed[row], ours(idx[row:row + 1])[0], atol=1e-5, rtol=1e-4)
    assert (mixed[0] - mixed[1]).abs().max() > 1e-3 and (mixed[2] - mixed[1]).abs().max() > 1e-3


def test_fused_chatglm_jobs_equal_each_alone(mqa, tmp_path):
    from safetensors.torch import load_file
    path, _ = mqa
    d = tmp_path
    targets = list(ChatGLM.LORA_TARGETS)
    jobs = [job("chat", write_rows(d / "c.json", 8, 0, "reverse"), template="chat", targets=targets, epochs=1),
            job("alpaca", write_rows(d / "a.jsonl", 6, 1, "upper"), targets=["query_key_value", "dense"],
                r=8, micro_batch_size=4, optimizer="sgd", momentum=0.9, epochs=1),
            job("count", write_rows(d / "n.json", 4, 2, "count"), template="chat", targets=["dense_h_to_4h"],
                lr_schedule="cosine", warmup_steps=1, epochs=2)]   # 2 steps: the warmup's at lr 0, then one
    train.train(run_cfg(path, d / "fused", jobs, scheduler={"max_concurrent": 3, "max_candidates": 3}))
    for j in jobs:
        train.train(run_cfg(path, d / j.name, [j]))
        fused, alone = (load_file(d / out / j.name / "adapter_model.safetensors") for out in ("fused", j.name))
        assert_same_adapter(fused, alone)
        assert max(v.abs().max() for k, v in fused.items() if "lora_B" in k) > 1e-4  # it trained


def test_packed_row_equals_each_sequence_alone(mqa):
    """ChatGLM's interleaved RoPE restarts per segment too. (transformers' Glm on the packed
    row with restarting position_ids is the oracle as for LLaMA.)"""
    path, glm = mqa
    ours = M.load_model(path)
    lengths = [6, 11, 1, 9]
    g = torch.Generator().manual_seed(6)
    seqs = [torch.randint(3, V, (n,), generator=g) for n in lengths]
    row, positions = torch.cat(seqs)[None], torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        got = ours(row, segments=tuple(lengths))[0]
        for seq, part in zip(seqs, got.split(lengths)):
            torch.testing.assert_close(part, ours(seq[None])[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got, glm(row, position_ids=positions, use_cache=False).logits[0], atol=1e-5, rtol=1e-4)
