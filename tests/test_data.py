"""data.py against the tokenizers/sentencepiece libraries and transformers (oracle), plus
exact prompts, loss masks, fused batches and error messages."""

import json
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

import data
import tokenizer
from data import (DataError, Example, build_prompt, format_example, fuse, load_job_data, load_tokenizer,
                  make_example)
from tokenizer_util import CHATML_TEMPLATE, write_sentencepiece, write_tokenizer_json

TEXTS = [
    "Hello world",
    "The capital of France is Paris.",
    "a\n\nb  c\t d",
    "héllo wörld ✓ 日本",
    "",
]
SPECIAL_TEXTS = [
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<|im_end|>",
]
ROWS = [
    {"instruction": "What is the capital of France?", "input": "", "output": "The capital of France is Paris."},
    {"instruction": "Translate the sentence into French.", "input": "the cat sits on the mat", "output": "le chat"},
    {"instruction": "Give three tips for staying healthy.", "output": "Eat well, exercise and sleep."},
]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe")
    write_tokenizer_json(path)
    return path


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sp")
    write_sentencepiece(path)
    return path


def write_rows(path, rows):
    path.write_text(json.dumps(rows) if path.suffix == ".json" else "\n".join(json.dumps(r) for r in rows))
    return path


def unmasked(example: Example) -> list[int]:
    return [label for label in example.labels if label != -100]


def assert_one_line(error, start, expected: str) -> None:
    """The DataError's message is one line, starts with start (the file) and contains expected."""
    message = str(error.value)
    assert message.startswith(f"{start}: ") and expected in message and "\n" not in message, message


# -----------------------------------------------------------------------------
# tokenizers

def test_tokenizer_json_matches_tokenizers_and_transformers(tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    vocab_size = write_tokenizer_json(tmp_path)
    tok = load_tokenizer(tmp_path)
    reference = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS + SPECIAL_TEXTS:
        ids = tok.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False).ids
        assert ids == hf.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        assert tok.decode(ids, skip_special=True) == hf.decode(ids, skip_special_tokens=True)
    # Special tokens written in text are single ids, not their characters' bytes.
    assert tok.encode("<|im_start|>") == [1]
    assert tok.encode("x<|im_end|>")[-1] == 2
    assert tok.vocab_size == vocab_size == len(hf)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 2, 0)
    assert (tok.bos_token, tok.eos_token) == ("<|endoftext|>", "<|im_end|>")
    assert tok.eos_ids == {2}
    assert tok.add_bos is False
    assert tok.encode("Hello world", bos=True) == [0] + tok.encode("Hello world")
    # An id past the vocabulary (a model's padded output ids) is an error, not silently dropped.
    with pytest.raises(DataError, match=f"ids \\[{vocab_size}, -1\\] are not in the tokenizer's vocabulary"):
        tok.decode([5, vocab_size, -1])


def test_bos_detected_from_post_processor(tmp_path):
    # Llama 3 style: no add_bos_token in the config, the tokenizer.json post-processor adds BOS.
    from transformers import AutoTokenizer

    write_tokenizer_json(tmp_path, add_bos=True)
    tok = load_tokenizer(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.add_bos is True
    for text in TEXTS:
        assert tok.encode(text, bos=True) == hf.encode(text)
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False)
    example = make_example(tok, "Say hi.\n", "hi", cutoff_len=64, train_on_inputs=False)
    assert example.input_ids[0] == tok.bos_id and example.input_ids[1] != tok.bos_id


def test_sentencepiece_matches_sentencepiece(sp_dir):
    import sentencepiece

    tok = load_tokenizer(sp_dir)
    reference = sentencepiece.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    for text in TEXTS:
        assert tok.encode(text) == reference.encode(text)
        assert tok.decode(tok.encode(text)) == text
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)  # no pad token: pad with EOS
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    assert tok.add_bos is True and tok.vocab_size == reference.get_piece_size() == 400
    assert tok.chat_template is None
    # "<s>" and "</s>" in text (Llama 2's chat template writes them) are the special ids.
    assert tok.encode("<s>hi there</s>") == [1] + reference.encode("hi there") + [2]
    assert tok.decode(tok.encode("<s>hi there</s>")) == "<s>hi there</s>"
    assert tok.decode(tok.encode("<s>hi there</s>"), skip_special=True) == "hi there"
    assert tok.encode("hi", bos=True) == [1] + reference.encode("hi")
    with pytest.raises(DataError, match="ids \\[400\\] are not in the tokenizer's vocabulary .vocab_size 400"):
        tok.decode([5, 400])  # sentencepiece itself raises a bare IndexError


def test_sentencepiece_matches_transformers(sp_dir):
    pytest.importorskip("google.protobuf", reason="transformers needs protobuf to read tokenizer.model")
    from transformers import AutoTokenizer

    tok = load_tokenizer(sp_dir)
    hf = AutoTokenizer.from_pretrained(sp_dir)
    # transformers 5 drops sentencepiece's dummy prefix before a leading space and after
    # special tokens; on ordinary text the two agree.
    for text in TEXTS:
        assert tok.encode(text, bos=True) == hf.encode(text)
    assert (tok.bos_id, tok.eos_id) == (hf.bos_token_id, hf.eos_token_id)


def test_prefers_tokenizer_json(tmp_path):
    write_sentencepiece(tmp_path)
    vocab_size = write_tokenizer_json(tmp_path)  # overwrites tokenizer_config.json too
    tok = load_tokenizer(tmp_path)
    assert tok.vocab_size == vocab_size and tok.encode("<|im_end|>") == [2]


def test_special_ids_from_other_files(tmp_path):
    write_tokenizer_json(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 0}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1]}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 2, 2)  # pad falls back to the primary EOS
    assert tok.eos_ids == {0, 1, 2}
    assert tok.add_bos is False  # no config flag, and the post-processor adds no BOS
    assert tok.chat_template is None


def test_missing_tokenizer(tmp_path):
    with pytest.raises(DataError) as error:
        load_tokenizer(tmp_path)
    assert_one_line(error, tmp_path, "no tokenizer.json or tokenizer.model")


def edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def bad_merges(folder):
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["model"]["merges"] = spec["model"]["merges"][:3] + [["Zq", "Xj"]]  # pieces not in the vocabulary
    (folder / "tokenizer.json").write_text(json.dumps(spec))


@pytest.mark.parametrize("file, write, expected", [
    ("tokenizer.json", lambda d: (d / "tokenizer.json").write_text("{nope"), "line 1: invalid JSON (Expecting"),
    ("tokenizer.json", lambda d: (d / "tokenizer.json").write_text("[]"), "expected a JSON object, got list"),
    ("tokenizer.json", lambda d: (d / "tokenizer.json").write_text('{"version": "1.0"}'), "no 'model' object"),
    ("tokenizer.json", lambda d: edit_json(d / "tokenizer.json", model={"type": "Tiktoken"}),
     "model type 'Tiktoken' is not supported by the tokenizers library"),
    ("tokenizer.json", bad_merges, "the tokenizers library cannot read it (Token `Zq` out of vocabulary"),
    ("tokenizer_config.json", lambda d: (d / "tokenizer_config.json").write_text('{"bos_token": "<s>",'),
     "line 1: invalid JSON"),
    ("tokenizer_config.json", lambda d: (d / "tokenizer_config.json").write_text("3"), "expected a JSON object, got int"),
    ("tokenizer_config.json", lambda d: edit_json(d / "tokenizer_config.json", chat_template=3),
     "'chat_template' must be a string or a list"),
    ("tokenizer_config.json", lambda d: edit_json(d / "tokenizer_config.json", chat_template=[{"name": "default"}]),
     "'chat_template' must be a string or a list"),
    ("tokenizer_config.json", lambda d: edit_json(d / "tokenizer_config.json", bos_token=1),
     "'bos_token' must be a string or an object with a string 'content', got int"),
    ("tokenizer_config.json", lambda d: edit_json(d / "tokenizer_config.json", add_bos_token="yes"),
     "'add_bos_token' must be true or false, got str"),
    ("tokenizer_config.json", lambda d: edit_json(d / "tokenizer_config.json", added_tokens_decoder={"x": "<pad>"}),
     "'added_tokens_decoder' must map ids to tokens"),
    ("tokenizer_config.json", lambda d: (d / "tokenizer_config.json").write_text('{"eos_token": "\\ud800"}'),
     "lone surrogate \\ud800"),
    ("special_tokens_map.json", lambda d: (d / "special_tokens_map.json").write_bytes(b"\xff\xfe{}"), "not UTF-8 text"),
    ("special_tokens_map.json", lambda d: (d / "special_tokens_map.json").write_text('{"eos_token": ["</s>"]}'),
     "'eos_token' must be a string"),
    ("config.json", lambda d: (d / "config.json").write_text('{"eos_token_id": "2"}'),
     "'eos_token_id' must be a token id, a list of them or null, got str"),
    ("generation_config.json", lambda d: (d / "generation_config.json").write_text('{"eos_token_id": [2, 99999]}'),
     "'eos_token_id' [2, 99999] is past the tokenizer's vocabulary"),
    ("tokenizer_config.json", lambda d: edit_json(d / "tokenizer_config.json", chat_template="{% for m in messages %}"),
     "chat template line 1 does not compile (Unexpected end of template"),
    ("tokenizer_config.json", lambda d: edit_json(d / "tokenizer_config.json", chat_template="{{ messages | shout }}"),
     "chat template line 1 does not compile (No filter named 'shout'"),
    ("chat_template.jinja", lambda d: (d / "chat_template.jinja").write_text("ok\n{{ messages[0] }"),
     "chat template line 2 does not compile"),
])
def test_tokenizer_file_errors(tmp_path, file, write, expected):
    write_tokenizer_json(tmp_path)
    write(tmp_path)
    with pytest.raises(DataError) as error:
        load_tokenizer(tmp_path)
    assert_one_line(error, tmp_path / file, expected)


@pytest.mark.parametrize("content", [b"", b"garbage", b"\x0a\x05\x0a\x01"])
def test_corrupt_sentencepiece(tmp_path, content):
    write_sentencepiece(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(content)
    with pytest.raises(DataError) as error:
        load_tokenizer(tmp_path)
    assert_one_line(error, tmp_path / "tokenizer.model", "not a sentencepiece model")


def test_byte_order_mark_accepted(bpe_dir, tmp_path):
    # Windows editors start UTF-8 files with a byte-order mark; it is dropped, as utf-8-sig does.
    write_tokenizer_json(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_text("\ufeff" + (tmp_path / name).read_text(), encoding="utf-8")
    plain, marked = load_tokenizer(bpe_dir), load_tokenizer(tmp_path)
    assert (marked.bos_id, marked.eos_id, marked.chat_template) == (plain.bos_id, plain.eos_id, plain.chat_template)
    assert all(marked.encode(text) == plain.encode(text) for text in TEXTS + SPECIAL_TEXTS)
    template = tmp_path / "tpl.json"
    template.write_text("\ufeff" + json.dumps({"prompt_input": "{instruction} {input}", "prompt_no_input": "{instruction}"}),
                        encoding="utf-8")
    assert build_prompt(str(template), marked, "a", "b") == "a b"
    for name, text in [("d.json", json.dumps(ROWS)), ("d.jsonl", "\n".join(json.dumps(r) for r in ROWS))]:
        (tmp_path / name).write_text("\ufeff" + text, encoding="utf-8")
        assert len(load_job_data(tmp_path / name, marked)) == len(ROWS)


# -----------------------------------------------------------------------------
# chat templates

# Exercises what real templates use: bos_token, namespace, loop controls, whitespace control
# under trim_blocks/lstrip_blocks, tojson on non-ASCII, raise_exception (not raised here).
LLAMA3_LIKE_TEMPLATE = """{{- bos_token }}
{%- set ns = namespace(system='') %}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {%- set ns.system = message['content'] %}
        {%- continue %}
    {%- endif %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('unknown role ' + message['role']) }}
    {%- endif %}
    {{- '<|im_start|>' + message['role'] + '\\n' }}
    {%- if loop.index0 == 1 and ns.system %}{{ ns.system | tojson }}
{% endif %}
    {{- message['content'] | trim + '<|im_end|>' }}
{% endfor %}
{% if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {% endif %}"""

MESSAGES = [
    {"role": "system", "content": "Réponds en français."},
    {"role": "user", "content": "  Hello there  "},
    {"role": "assistant", "content": "Bonjour !"},
    {"role": "user", "content": "Count to 3."},
]


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, LLAMA3_LIKE_TEMPLATE])
def test_chat_template_matches_transformers(tmp_path, template):
    from transformers import AutoTokenizer

    write_tokenizer_json(tmp_path, chat_template=template)
    tok = load_tokenizer(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for add_generation_prompt in (False, True):
        ours = tok.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt)
        assert ours == hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.rstrip("\n").endswith("<|im_start|>assistant")
    if template == LLAMA3_LIKE_TEMPLATE:
        with pytest.raises(DataError, match="unknown role tool"):
            tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_chat_template_sources(tmp_path):
    write_tokenizer_json(tmp_path, chat_template=None)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(tmp_path).chat_template == "D"
    (tmp_path / "chat_template.jinja").write_text("J{{ messages[0]['content'] }}")
    tok = load_tokenizer(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "Jx"


# -----------------------------------------------------------------------------
# prompts and examples

def test_alpaca_prompt_exact(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    assert build_prompt("alpaca", tok, "Add the numbers.", "2 and 3") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n")
    assert build_prompt("alpaca", tok, "Say {hi}.", "") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSay {hi}.\n\n### Response:\n")
    assert build_prompt("plain", tok, "Q", "ctx") == "Q\nctx"
    assert build_prompt("plain", tok, "Q", "") == "Q"


def test_template_file(bpe_dir, tmp_path):
    tok = load_tokenizer(bpe_dir)
    template = tmp_path / "tpl.json"
    template.write_text(json.dumps({
        "description": "m-LoRA style", "response_split": "### Output:",
        "prompt_input": "### Task:\n{instruction}\n### Context:\n{input}\n### Output:\n",
        "prompt_no_input": "### Task:\n{instruction}\n### Output:\n"}))
    assert build_prompt(str(template), tok, "Do it", "now") == "### Task:\nDo it\n### Context:\nnow\n### Output:\n"
    assert build_prompt(str(template), tok, "Do it", "") == "### Task:\nDo it\n### Output:\n"
    examples = load_job_data(write_rows(tmp_path / "d.json", ROWS), tok, template=str(template))
    prompt = "### Task:\nWhat is the capital of France?\n### Output:\n"
    assert examples[0].input_ids[:len(tok.encode(prompt))] == tok.encode(prompt)


@pytest.mark.parametrize("kind", ["bpe", "sp"])
def test_labels_mask_exactly_the_prompt(bpe_dir, sp_dir, tmp_path, kind):
    tok = load_tokenizer(bpe_dir if kind == "bpe" else sp_dir)
    examples = load_job_data(write_rows(tmp_path / "d.jsonl", ROWS), tok, cutoff_len=512)
    assert len(examples) == len(ROWS)
    for row, example in zip(ROWS, examples):
        prompt = build_prompt("alpaca", tok, row["instruction"], row.get("input", ""))
        prompt_ids = tok.encode(prompt, bos=tok.add_bos)
        assert example.input_ids[:len(prompt_ids)] == prompt_ids
        assert len(example.labels) == len(example.input_ids)
        assert example.labels[:len(prompt_ids)] == [-100] * len(prompt_ids)
        assert example.labels[len(prompt_ids):] == example.input_ids[len(prompt_ids):]  # aligned, not shifted
        assert tok.decode(unmasked(example)) == row["output"] + tok.eos_token
        assert example.input_ids[-1] == tok.eos_id and example.input_ids.count(tok.eos_id) == 1
    if kind == "sp":  # Llama: one BOS first; after "Response:\n" no dummy-prefix space on the response
        assert examples[0].input_ids[0] == 1 and examples[0].input_ids[1] != 1
        assert not tok.id_to_token(unmasked(examples[0])[0]).startswith("\u2581")


def test_train_on_inputs_and_cutoff(bpe_dir, tmp_path, capsys):
    tok = load_tokenizer(bpe_dir)
    path = write_rows(tmp_path / "d.json", ROWS)
    full = load_job_data(path, tok, train_on_inputs=True, cutoff_len=512)
    assert all(example.labels == example.input_ids for example in full)

    # The alpaca header alone is > 20 tokens: every prompt is cut, no loss token is left.
    with pytest.raises(DataError, match=f"{path}: no example"):
        load_job_data(path, tok, cutoff_len=20)
    # A cutoff that fits the short rows drops the long one, with one warning.
    long_row = {"instruction": "word " * 200, "output": "ok"}
    capsys.readouterr()
    cutoff_len = max(len(example.input_ids) for example in full)
    examples = load_job_data(write_rows(path, ROWS + [long_row]), tok, cutoff_len=cutoff_len)
    assert len(examples) == len(ROWS)
    warning = capsys.readouterr().out
    assert warning.count("\n") == 1 and "dropped 1 of 4" in warning and str(path) in warning
    # Truncation keeps the first cutoff_len tokens of ids and labels alike.
    cut = load_job_data(path, tok, cutoff_len=60, train_on_inputs=True)
    assert all(len(c.input_ids) == min(60, len(f.input_ids)) for c, f in zip(cut, full))
    assert cut[0].input_ids == full[0].input_ids[:60] and cut[0].labels == full[0].labels[:60]


def test_chat_example_ends_at_eos(bpe_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = load_tokenizer(bpe_dir)
    examples = load_job_data(write_rows(tmp_path / "d.json", ROWS), tok, template="chat")
    hf = AutoTokenizer.from_pretrained(bpe_dir)
    row, example = ROWS[1], examples[1]
    messages = [{"role": "user", "content": row["instruction"] + "\n\n" + row["input"]},
                {"role": "assistant", "content": row["output"]}]
    rendered = hf.apply_chat_template(messages, tokenize=False)
    assert rendered.endswith("<|im_end|>\n")
    # The sequence is the rendered conversation up to and including the final <|im_end|> (EOS).
    assert tok.decode(example.input_ids) == rendered[:-1]
    assert example.input_ids[-1] == tok.eos_id and example.input_ids.count(tok.eos_id) == 2
    assert tok.decode(unmasked(example)) == row["output"] + "<|im_end|>"


def test_llama2_chat_on_sentencepiece(tmp_path):
    # Llama 2's template writes "<s>" and "</s>" as text: no double BOS, no extra EOS.
    write_sentencepiece(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                               "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}"
                               "{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    examples = load_job_data(write_rows(tmp_path / "d.json", ROWS[:1]), tok, template="chat")
    ids = examples[0].input_ids
    assert ids[0] == 1 and ids.count(1) == 1 and ids[-1] == 2 and ids.count(2) == 1
    assert tok.decode(ids) == "<s>[INST] What is the capital of France? [/INST] The capital of France is Paris. </s>"
    assert tok.decode(unmasked(examples[0])) == "The capital of France is Paris. </s>"


def test_chat_without_template(sp_dir, tmp_path):
    with pytest.raises(DataError, match="template 'chat': .* has no chat template"):
        load_job_data(write_rows(tmp_path / "d.json", ROWS), load_tokenizer(sp_dir), template="chat")


def test_chat_template_prefix_mismatch(tmp_path):
    # A template that renders the last user turn differently once a reply follows.
    write_tokenizer_json(tmp_path, chat_template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                         "{% if loop.last %}!{% endif %}\n{% endfor %}")
    path = write_rows(tmp_path / "d.json", ROWS)
    with pytest.raises(DataError, match=f"{path}: row 1: template 'chat'"):
        load_job_data(path, load_tokenizer(tmp_path), template="chat")


# -----------------------------------------------------------------------------
# fuse

def test_fuse():
    def example(n, start):
        return Example(input_ids=list(range(start, start + n)), labels=[-100] * 2 + list(range(start + 2, start + n)))

    a = [example(3, 10), example(11, 20)]
    b = [example(5, 40)]
    batch = fuse([("a", a), (None, b)], pad_id=7)
    assert batch.input_ids.shape == batch.labels.shape == (3, 16)
    assert batch.input_ids.dtype == batch.labels.dtype == torch.long
    assert batch.adapter_names == ["a", "a", None]
    assert batch.lengths.tolist() == [3, 11, 5] and batch.num_tokens == 19
    for row, ex in enumerate(a + b):
        n = len(ex.input_ids)
        assert batch.input_ids[row, :n].tolist() == ex.input_ids
        assert batch.labels[row, :n].tolist() == ex.labels
        assert (batch.input_ids[row, n:] == 7).all() and (batch.labels[row, n:] == -100).all()
    assert fuse([("a", a)], pad_id=0, multiple_of=1).input_ids.shape == (2, 11)
    assert fuse([("x", [example(16, 0)])], pad_id=0).input_ids.shape == (1, 16)
    moved = batch.to("cpu")
    assert torch.equal(moved.input_ids, batch.input_ids) and moved.adapter_names == batch.adapter_names


# -----------------------------------------------------------------------------
# errors: one line naming the file and the row or line

def bad_json(path):
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]')


def bad_jsonl(path):
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": }\n')


@pytest.mark.parametrize("name, write, expected", [
    ("missing.json", None, "file not found"),
    ("d.json", bad_json, "line 3: invalid JSON (Expecting ','"),
    ("d.jsonl", bad_jsonl, "line 3: invalid JSON (Expecting value"),
    ("d.json", lambda p: write_rows(p, [ROWS[0], {"instruction": "x"}]), "row 2: missing field 'output'"),
    ("d.jsonl", lambda p: p.write_text('\n{"instruction": "x", "output": 1}\n'),
     "line 2: field 'output' must be a string, got int"),
    ("d.json", lambda p: write_rows(p, [ROWS[0], ROWS[1], ["x"]]), "row 3: expected an object, got list"),
    ("d.json", lambda p: write_rows(p, [{"instruction": "x", "input": 3, "output": "y"}]),
     "row 1: field 'input' must be a string"),
    ("d.json", lambda p: p.write_text(""), "file is empty"),
    ("d.json", lambda p: p.write_text("[]"), "no rows"),
    ("d.json", lambda p: p.write_text('{"instruction": "x"}'), "expected a JSON list of objects, got dict"),
    ("d.txt", lambda p: p.write_text("x"), "expected a .json or .jsonl file"),
    ("d.json", lambda p: p.write_text('"rows"'), "expected a JSON list of objects, got str"),
    # JSON's "\ud800" parses in Python but is no text: no tokenizer can encode it.
    ("d.jsonl", lambda p: p.write_text('{"instruction": "a\\ud800", "output": "b"}'),
     "line 1: field 'instruction' has a lone surrogate \\ud800 at character 1"),
    ("d.json", lambda p: p.write_text(json.dumps([ROWS[0], {"instruction": "a", "input": "", "output": "b\udfff"}])),
     "row 2: field 'output' has a lone surrogate \\udfff"),
    ("d.jsonl", lambda p: p.write_bytes(b'{"instruction": "a\x00", "output": "b"}'),
     "line 1: invalid JSON (Invalid control character at column 19)"),
    ("d.jsonl", lambda p: p.write_bytes(b'{"instruction": "a", "output": "\xff"}'), "not UTF-8 text"),
    ("d.json", lambda p: p.write_text("[" * 100_000), "invalid JSON (nested too deeply)"),
    ("d.jsonl", lambda p: p.write_text('{"instruction": "a", "output": "b", "id": ' + "9" * 5000 + "}"),
     "line 1: invalid JSON (Exceeds the limit (4300 digits)"),
])
def test_data_errors(bpe_dir, tmp_path, name, write, expected):
    path = tmp_path / name
    if write is not None:
        write(path)
    with pytest.raises(DataError) as error:
        load_job_data(path, load_tokenizer(bpe_dir))
    message = str(error.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message


def odd_rows(path):
    # Valid JSON that naive readers trip on: an escaped NUL, and U+2028 / U+0085 written as they
    # are inside strings (str.splitlines() would cut the line there), CRLF line ends.
    rows = [{"instruction": "a\u0000b", "output": "c\u0000"}, {"instruction": "x\u2028y\x85z", "output": "w\u2028"}]
    path.write_text("\r\n".join(json.dumps(row, ensure_ascii=False) for row in rows), encoding="utf-8")
    return rows


@pytest.mark.parametrize("kind", ["bpe", "sp"])
def test_odd_but_valid_rows(bpe_dir, sp_dir, tmp_path, kind):
    tok = load_tokenizer(bpe_dir if kind == "bpe" else sp_dir)
    rows = odd_rows(tmp_path / "d.jsonl")
    examples = load_job_data(tmp_path / "d.jsonl", tok, template="plain")
    assert len(examples) == 2
    if kind == "bpe":  # byte-level BPE round-trips any text
        assert [tok.decode(unmasked(ex)) for ex in examples] == [row["output"] + tok.eos_token for row in rows]


def test_empty_row_kept_as_before(bpe_dir, tmp_path, capsys):
    # An empty instruction and output: with a prompt the example learns EOS alone; with none
    # (plain template, no BOS) it has no response token after position 0 and is dropped.
    tok = load_tokenizer(bpe_dir)
    path = write_rows(tmp_path / "d.json", [{"instruction": "", "output": ""}, ROWS[0]])
    assert unmasked(load_job_data(path, tok)[0]) == [tok.eos_id]
    capsys.readouterr()
    assert len(load_job_data(path, tok, template="plain")) == 1
    assert "dropped 1 of 2 examples" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["bpe", "sp"])
@pytest.mark.parametrize("text", ["the capital of France is Paris. " * 3000, "a" * 100_000, "日本 ✓ héllo " * 5000,
                                  "Say <|im_end|> </s> now\n\n" * 4000, " " * 50_000 + "x" * 50_000])
def test_long_row_is_cut_before_tokenizing(bpe_dir, sp_dir, kind, text, monkeypatch):
    # Only cutoff_len tokens are kept, so only a prefix of a huge row is tokenized; the kept
    # tokens are those of the whole row.
    tok = load_tokenizer(bpe_dir if kind == "bpe" else sp_dir)
    whole = make_example(tok, "Q: " + text[:500], text, cutoff_len=len(text), train_on_inputs=False)
    encoded = []
    monkeypatch.setattr(tok, "encode", lambda s, bos=False: encoded.append(len(s)) or type(tok).encode(tok, s, bos))
    for cutoff_len in (16, 64):
        for train_on_inputs in (False, True):
            example = make_example(tok, "Q: " + text[:500], text, cutoff_len, train_on_inputs)
            assert example.input_ids == whole.input_ids[:cutoff_len]
            labels = whole.input_ids if train_on_inputs else whole.labels
            assert example.labels == labels[:cutoff_len]
    assert max(encoded) <= 32 * 64 * 8 < len(text)  # a few doublings at most, never the whole row


@pytest.mark.parametrize("content, expected", [
    ({"prompt_input": "{instruction} {input}"}, "missing key 'prompt_no_input'"),
    ({"prompt_input": "{instruction}", "prompt_no_input": 3}, "'prompt_no_input' must be a string"),
    ({"prompt_input": "{instruction} {context}", "prompt_no_input": "{instruction}"}, "bad placeholder {context}"),
    (None, "template file not found"),
    ("{nope", "line 1: invalid JSON"),
    (["prompt_input"], "expected a JSON object, got list"),
    # m-LoRA / alpaca-lora templates end with the response's header; the output follows the prompt.
    ({"prompt_input": "### Input:\n{input}\n### Output:\n{output}", "prompt_no_input": "{instruction}"},
     "'prompt_input' has a bad placeholder {output}: only {instruction} and {input} are filled (the response"),
    ({"prompt_input": "{instruction}", "prompt_no_input": "JSON: {\"a\": 1}"}, "'prompt_no_input' has a bad placeholder"),
    ({"prompt_input": "{instruction} }", "prompt_no_input": "{instruction}"},
     "'prompt_input': Single '}' encountered in format string (write a literal brace as {{ or }})"),
    ({"prompt_input": "{instruction} {", "prompt_no_input": "{instruction}"}, "Single '{' encountered"),
    ({"prompt_input": "{instruction.upper}", "prompt_no_input": "{instruction}"}, "bad placeholder {instruction.upper}"),
    ({"prompt_input": "{instruction:>9999999999}", "prompt_no_input": "{instruction}"}, "bad placeholder"),
    ({"prompt_input": "{}", "prompt_no_input": "{instruction}"}, "bad placeholder {}"),
    ({"prompt_input": "{instruction}", "prompt_no_input": "{instruction}", "response_split": 1},
     "'response_split' must be a string, got int"),
])
def test_template_file_errors(bpe_dir, tmp_path, content, expected):
    template = tmp_path / "tpl.json"
    if content is not None:
        template.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DataError) as error:
        load_job_data(write_rows(tmp_path / "d.json", ROWS), load_tokenizer(bpe_dir), template=str(template))
    assert_one_line(error, template, expected)


def test_template_file_literal_braces(bpe_dir, tmp_path):
    template = tmp_path / "tpl.json"
    template.write_text(json.dumps({"prompt_input": "{{json}} {instruction} {input}", "prompt_no_input": "{instruction}"}))
    assert build_prompt(str(template), load_tokenizer(bpe_dir), "a", "b") == "{json} a b"


# -----------------------------------------------------------------------------
# chat templates are the checkpoint's code: bounded, and their errors are one line

NESTED = "{% for i in range(100000) %}{% for j in range(100000) %}BODY{% endfor %}{% endfor %}"


def render(folder, template: str, content: str = "hi") -> str:
    write_tokenizer_json(folder, chat_template=template)
    return load_tokenizer(folder).apply_chat_template([{"role": "user", "content": content}])


@pytest.mark.parametrize("template, content, expected", [
    (NESTED.replace("BODY", "x"), "hi", "chat template writes more than 1000"),  # 10^10 x's
    (NESTED.replace("BODY", ""), "hi", "chat template takes longer than 1 s"),  # range() calls check the clock
    # No call or lookup inside the loops: only SIGALRM stops this one.
    ("{% set s = messages[0]['content'] %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}", "y" * 100_000,
     "chat template takes longer than 1 s"),
    ("{{ 'x' * 10**10 }}", "hi", "chat template builds a value longer than"),
    ("{{ 9 ** (9 ** 9) }}", "hi", "chat template computes an integer over"),
    ("{{ range(10**9) | list }}", "hi", "chat template fails (OverflowError: Range too big"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "hi", "chat template fails (RecursionError"),
    ("{% if messages %}{{ messages | shout }}{% endif %}", "hi", "fails (TemplateRuntimeError: No filter named 'shout'"),
    ("{{ foo.bar }}", "hi", "chat template fails (UndefinedError: 'foo' is undefined)"),
    ("{{ messages[0]['content'] + 1 }}", "hi", "chat template fails (TypeError"),
    ("{{ raise_exception('no system\nmessages') }}", "hi", "chat template: no system messages"),
])
def test_chat_template_bounded(tmp_path, monkeypatch, template, content, expected):
    monkeypatch.setattr(tokenizer, "CHAT_TEMPLATE_SECONDS", 1.0)
    previous = signal.getsignal(signal.SIGALRM)
    tokenizer.alarm_stops_templates()   # as train.py's and generate.py's main() do
    try:
        start = time.monotonic()
        with pytest.raises(DataError) as error:
            render(tmp_path, template, content)
        assert time.monotonic() - start < 4
        assert_one_line(error, tmp_path / "tokenizer_config.json", expected)
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    finally:
        signal.signal(signal.SIGALRM, previous)


def test_without_main_s_handler_no_alarm_is_set(tmp_path, monkeypatch):
    """Library code sets no signal handler: without main()'s, a render arms no timer and the
    clock checks at each call stop it."""
    monkeypatch.setattr(tokenizer, "CHAT_TEMPLATE_SECONDS", 1.0)
    handler = signal.getsignal(signal.SIGALRM)
    assert handler is not tokenizer.on_alarm
    with pytest.raises(DataError) as error:
        render(tmp_path, NESTED.replace("BODY", ""))
    assert_one_line(error, tmp_path / "tokenizer_config.json", "chat template takes longer than 1 s")
    assert signal.getsignal(signal.SIGALRM) is handler and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_chat_template_bounded_off_the_main_thread(tmp_path, monkeypatch):
    # No SIGALRM there: the clock is checked at each call (here range()), '*', '**' and output piece.
    monkeypatch.setattr(tokenizer, "CHAT_TEMPLATE_SECONDS", 1.0)
    errors = []

    def run():
        try:
            render(tmp_path, NESTED.replace("BODY", "{% set k = j %}"))
        except DataError as e:
            errors.append(str(e))

    start = time.monotonic()
    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive() and time.monotonic() - start < 4
    assert errors == [f"{tmp_path / 'tokenizer_config.json'}: chat template takes longer than 1 s"]


def test_chat_template_error_names_row_and_file(tmp_path):
    write_tokenizer_json(tmp_path, chat_template=NESTED.replace("BODY", "x"))
    path = write_rows(tmp_path / "d.json", ROWS)
    with pytest.raises(DataError) as error:
        load_job_data(path, load_tokenizer(tmp_path), template="chat")
    assert_one_line(error, f"{path}: row 1: {tmp_path / 'tokenizer_config.json'}", "chat template writes more than")


def test_long_row_through_chat_template(bpe_dir, tmp_path):
    # A long row is no runaway template: the output limit grows with the messages.
    tok = load_tokenizer(bpe_dir)
    row = {"instruction": "word " * 400_000, "output": "ok " * 400_000}
    examples = load_job_data(write_rows(tmp_path / "d.json", [row, ROWS[0]]), tok, template="chat", cutoff_len=64,
                             train_on_inputs=True)
    assert len(examples[0].input_ids) == 64


# -----------------------------------------------------------------------------
# m-LoRA's templates: its default 'mlora', its JSON files ({output} inside), its YAML Jinja files

MLORA = Path(__file__).parent / "fixtures" / "mlora"
MLORA_2023 = MLORA / "2023" / "template" / "template_demo.json"  # "parameter"; str.replace'd by aspen/dataset.py
MLORA_2024 = MLORA / "2025" / "demo" / "dummy_template.json"  # "response"; str.format'ted by mlora/prompter
PROMPT_YAML = MLORA / "2025" / "demo" / "prompt.yaml"  # instruction data
PREFERENCE_YAML = MLORA / "2025" / "demo" / "preference_prompt.yaml"  # preference data: is_chosen
PREFERENCE_ROWS = json.loads((MLORA / "2025" / "demo" / "data.json").read_text())[:1] + [
    {"instruction": "Add.", "input": "2 and 3", "chosen": "5", "reject": "6"}]


def mlora_prompter(path):
    """m-LoRA's Prompter (mlora/prompter/prompter.py): the oracle for its YAML templates."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    source = yaml.safe_load(Path(path).read_text())["template"]
    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(source)


def test_mlora_named_template(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    with_input = "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Output:\n"
    assert build_prompt("mlora", tok, "Add.", "2 and 3") == with_input
    assert build_prompt("mlora", tok, "Add.", "") == build_prompt("mlora", tok, "Add.", None) == (
        "### Instruction:\nAdd.\n\n### Output:\n")
    assert format_example("mlora", tok, "Add.", "2 and 3", "5") == (with_input, "5")


@pytest.mark.parametrize("template", [MLORA_2023, MLORA_2024], ids=["2023", "2024"])
def test_mlora_json_template(bpe_dir, tmp_path, template):
    # The prompt is the text before {output}; the response the output and what follows it (a "\n"),
    # then EOS. No input field (or null): prompt_no_input; an empty input: "prompt", as in m-LoRA.
    tok = load_tokenizer(bpe_dir)
    rows = [{"instruction": "Reverse.", "input": "a b", "output": "b a"},
            {"instruction": "Hi?", "output": "Hi."},
            {"instruction": "Hi?", "input": "", "output": "Hi."},
            {"instruction": "Hi?", "input": None, "output": "Hi."}]
    no_input = "### Instruction:\nHi?\n\n### Output:\n"
    prompts = ["### Instruction:\nReverse.\n\n### Input:\na b\n\n### Output:\n", no_input,
               "### Instruction:\nHi?\n\n### Input:\n\n\n### Output:\n", no_input]
    examples = load_job_data(write_rows(tmp_path / "d.json", rows), tok, template=str(template), cutoff_len=512)
    for row, prompt, example in zip(rows, prompts, examples):
        response = row["output"] + "\n"
        texts = format_example(str(template), tok, row["instruction"], row.get("input"), row["output"])
        assert texts == (prompt, response)
        assert build_prompt(str(template), tok, row["instruction"], row.get("input")) == prompt
        prompt_ids = tok.encode(prompt, bos=tok.add_bos)
        assert example.input_ids[:len(prompt_ids)] == prompt_ids
        assert example.labels[:len(prompt_ids)] == [-100] * len(prompt_ids)
        assert tok.decode(unmasked(example)) == response + tok.eos_token


def test_mlora_json_template_no_input_rule(bpe_dir, tmp_path):
    # 2023 took prompt_no_input when the row lacked a field that "parameter" lists; 2024 when
    # "prompt".format(**row) failed, on a field it uses. Neither looks at input here: "prompt" always.
    tok = load_tokenizer(bpe_dir)
    old = dict(json.loads(MLORA_2023.read_text()), parameter=["instruction", "output"])
    (tmp_path / "2023.json").write_text(json.dumps(old))
    assert build_prompt(str(tmp_path / "2023.json"), tok, "Hi?", None) == (
        "### Instruction:\nHi?\n\n### Input:\n\n\n### Output:\n")
    (tmp_path / "2024.json").write_text(json.dumps({"prompt": "Q: {instruction}\nA: {output}{{end}}",
                                                    "prompt_no_input": "unused {output}", "response": "A: "}))
    assert format_example(str(tmp_path / "2024.json"), tok, "Hi?", None, "Hi.") == ("Q: Hi?\nA: ", "Hi.{end}")


@pytest.mark.parametrize("kind", ["bpe", "sp"])
def test_jinja_template_renders_whole_rows(bpe_dir, sp_dir, tmp_path, kind):
    # As m-LoRA's prompter: data_point=row, rows of any fields; the whole text is the response
    # (BOS + text + EOS, every token labelled) whatever train_on_inputs says.
    tok = load_tokenizer(bpe_dir if kind == "bpe" else sp_dir)
    path = write_rows(tmp_path / "d.jsonl", PREFERENCE_ROWS)
    oracle = mlora_prompter(PROMPT_YAML)
    # The same template as a .json object and as a bare .jinja file reads the same.
    (tmp_path / "t.json").write_text(json.dumps({"template": yaml.safe_load(PROMPT_YAML.read_text())["template"]}))
    (tmp_path / "t.jinja").write_text(yaml.safe_load(PROMPT_YAML.read_text())["template"])
    for template in (PROMPT_YAML, tmp_path / "t.json", tmp_path / "t.jinja"):
        examples = load_job_data(path, tok, template=str(template), cutoff_len=512)
        for row, example in zip(PREFERENCE_ROWS, examples):
            text = oracle.render(data_point=row)
            assert text.startswith("### Instruction:\n") and ("### Input:\n" in text) == ("input" in row)
            assert example.input_ids == tok.encode(text, bos=tok.add_bos) + [tok.eos_id]
            assert unmasked(example) == tok.encode(text) + [tok.eos_id]


def test_jinja_preference_pairs(bpe_dir, tmp_path):
    # Rendered with is_chosen true and false, each whole text encoded; the prompt, unlabelled in
    # both, is their common token prefix ("chosen" / "reject": the template's own field names).
    tok = load_tokenizer(bpe_dir)
    oracle = mlora_prompter(PREFERENCE_YAML)
    pairs = data.load_pairs(write_rows(tmp_path / "d.json", PREFERENCE_ROWS), tok, str(PREFERENCE_YAML), cutoff_len=512)
    assert len(pairs) == len(PREFERENCE_ROWS)
    for row, pair in zip(PREFERENCE_ROWS, pairs):
        chosen, rejected = (tok.encode(oracle.render(data_point=row, is_chosen=flag), bos=tok.add_bos) + [tok.eos_id]
                            for flag in (True, False))
        assert (pair.chosen.input_ids, pair.rejected.input_ids) == (chosen, rejected)
        shared = next(i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b)
        assert "### Output:\n" in tok.decode(chosen[:shared])
        for example in (pair.chosen, pair.rejected):
            assert example.labels == [-100] * shared + example.input_ids[shared:]
    with pytest.raises(DataError) as error:  # an instruction template has no is_chosen
        data.load_pairs(write_rows(tmp_path / "d.json", PREFERENCE_ROWS), tok, str(PROMPT_YAML))
    assert_one_line(error, f"{tmp_path / 'd.json'}: row 1: {PROMPT_YAML}",
                    "renders the same text with is_chosen true and false")


OUTPUT_TWICE = {"prompt": "{output}{output}", "prompt_no_input": "{output}"}
MLORA_OK = {"prompt": "{instruction} {input} {output}", "prompt_no_input": "{instruction} {output}"}


@pytest.mark.parametrize("name, content, expected", [
    ("t.json", {"prompt": "{instruction}", "prompt_no_input": "{output}"}, "'prompt' must hold {output} once (where "
     "the row's output goes), it has 0"),
    ("t.json", OUTPUT_TWICE, "'prompt' must hold {output} once (where the row's output goes), it has 2"),
    ("t.json", {"prompt": "{instruction} {output}"}, "missing key 'prompt_no_input'"),
    ("t.json", {"prompt": "{context} {output}", "prompt_no_input": "{output}"},
     "'prompt' has a bad placeholder {context}: only {instruction}, {input} and {output} are filled"),
    ("t.json", {"prompt": "{output!r}", "prompt_no_input": "{output}"}, "bad placeholder {output!r}"),
    ("t.json", {"prompt": "{output} }", "prompt_no_input": "{output}"}, "'prompt': Single '}' encountered"),
    ("t.json", dict(MLORA_OK, parameter="input"), "'parameter' must be a list of field names, got input"),
    ("t.json", dict(MLORA_OK, parameter=["instruction", "context"]),
     "'parameter' lists 'context': rows fill only instruction, input and output"),
    ("t.json", dict(MLORA_OK, response=3), "'response' must be a string, got int"),
    ("t.json", dict(MLORA_OK, description=None), "'description' must be a string, got NoneType"),
    ("t.json", dict(MLORA_OK, prompt_input="{instruction}"),
     "keys 'prompt_input' (alpaca-lora) and 'prompt' (mlora) are of two template formats"),
    ("t.json", {"description": "x", "prompt_no_input": "{instruction}"},
     "missing key 'prompt_input' (alpaca-lora's format), 'prompt' (m-LoRA's JSON) or 'template' (m-LoRA's YAML)"),
    ("t.json", {"template": 3}, "'template' must be a string, got int"),
    ("t.json", {"template": "{% if %}"}, "template line 1 does not compile (Expected an expression"),
    ("t.yaml", "template: [unclosed\n", "cannot parse YAML (expected ',' or ']', but got '<stream end>' at line 2"),
    ("t.yaml", "- template\n", "expected a YAML mapping (template: ...), got list"),
    ("t.yml", "", "expected a YAML mapping (template: ...), got NoneType"),
    ("t.yaml", "template: |\n  ok\n  {{ data_point[ }}\n", "template line 2 does not compile"),
    ("t.yaml", "template: 2024-13-01\n", "cannot parse YAML (ValueError: month must be in 1..12)"),
    ("t.jinja", "{% for x in %}", "template line 1 does not compile"),
    ("t.jinja", b"\xff\xfe", "not UTF-8 text"),
])
def test_mlora_template_file_errors(bpe_dir, tmp_path, name, content, expected):
    template = tmp_path / name
    if isinstance(content, bytes):
        template.write_bytes(content)
    else:
        template.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DataError) as error:
        load_job_data(write_rows(tmp_path / "d.json", ROWS), load_tokenizer(bpe_dir), template=str(template))
    assert_one_line(error, template, expected)


@pytest.mark.parametrize("source, rows, expected", [
    ("{{ data_point['output'] + 1 }}", ROWS, "template fails (TypeError: can only concatenate str"),
    ("{{ data_point['nope'] + '\n' }}", ROWS, "template fails (UndefinedError: 'dict object' has no attribute 'nope')"),
    ("{{ raise_exception('bad row') }}", ROWS, "template: bad row"),
    ("{{ 'x' * 10**10 }}", ROWS, "template builds a value longer than"),
    (NESTED.replace("BODY", "x"), ROWS, "template writes more than 1000"),
    (NESTED.replace("BODY", ""), ROWS, "template takes longer than 1 s"),
    ("{{ data_point['instruction'] }}", [{"instruction": "\ud800"}], "the rendered text has a lone surrogate \\ud800"),
])
def test_jinja_template_render_errors(bpe_dir, tmp_path, monkeypatch, source, rows, expected):
    # Bounded as chat templates are; an error names the row, then the template's file.
    monkeypatch.setattr(tokenizer, "CHAT_TEMPLATE_SECONDS", 1.0)
    template = tmp_path / "t.jinja"
    template.write_text(source)
    path = write_rows(tmp_path / "d.json", rows)
    start = time.monotonic()
    with pytest.raises(DataError) as error:
        load_job_data(path, load_tokenizer(bpe_dir), template=str(template))
    assert time.monotonic() - start < 4
    assert_one_line(error, f"{path}: row 1: {template}", expected)
    with pytest.raises(DataError, match="expected an object, got list"):  # any fields, but an object
        load_job_data(write_rows(tmp_path / "l.json", [["a"]]), load_tokenizer(bpe_dir), template=str(PROMPT_YAML))
