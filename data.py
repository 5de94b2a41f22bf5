"""Data: prompt templates, Alpaca-style json/jsonl rows, loss masks, fused batches.

Text flows: row {instruction, input, output} -> template -> (prompt, response) text
-> token ids with labels (-100 on the prompt) -> one Example per row (a preference row
{prompt, input, chosen, rejected}: a Pair of two Examples, one per answer) -> pack() lays the
micro-batches of several jobs end to end in one row (fuse() pads them into rows instead),
each example tagged with its adapter. A Jinja template file (m-LoRA's 2025 format) instead
renders a row of any fields into one text, all of it the response.

The tokenizer (and DataError, the error of every bad input file) is in tokenizer.py.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

# Tokenizer, load_tokenizer, DataError and CHATGLM_SPECIAL/CHATGLM3_ROLES are used as data.X by other files.
from tokenizer import (CHATGLM3_ROLES, CHATGLM_SPECIAL, SURROGATE, DataError, Tokenizer,  # noqa: F401
                       load_tokenizer, parse_json, read_text)
from templates import NAMED_TEMPLATES, TemplateFile, file_texts, jinja_template, render_row, template_file  # noqa: F401

IGNORE_INDEX = -100  # label of a position with no loss (torch's cross_entropy default ignore_index)


# -----------------------------------------------------------------------------
# Prompt templates

# Alpaca-LoRA's templates/alpaca.json, verbatim.
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n")
# m-LoRA 2024's default template (mlora/prompter.py, default_prompt_template), verbatim.
MLORA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Output:\n"
MLORA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Output:\n"
NAMED_PROMPTS = {"alpaca": (ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT),
                 "mlora": (MLORA_PROMPT_INPUT, MLORA_PROMPT_NO_INPUT)}


def check_template(template: str, tokenizer: Tokenizer) -> None:
    """Raise DataError if template is unusable: an unknown or bad template file, or 'chat' without a chat template."""
    if template == "chat" and tokenizer.chat_template is None and tokenizer.chatglm is None:
        raise DataError(f"template 'chat': {tokenizer.path} has no chat template")
    if template not in NAMED_TEMPLATES:
        template_file(str(template))


def _chat_messages(instruction: str, input: str | None) -> list[dict]:
    return [{"role": "user", "content": instruction + ("\n\n" + input if input else "")}]


def build_prompt(template: str, tokenizer: Tokenizer, instruction: str, input: str | None = "") -> str:
    """The text the model reads before its response: 'alpaca', 'mlora', 'chat', 'plain' or a JSON
    template file's path. input None: the row has no input field (m-LoRA's templates tell it from "")."""
    if template in NAMED_PROMPTS:
        prompt_input, prompt_no_input = NAMED_PROMPTS[template]
        return (prompt_input if input else prompt_no_input).format(instruction=instruction, input=input or "")
    if template == "chat":
        return tokenizer.apply_chat_template(_chat_messages(instruction, input), add_generation_prompt=True)
    if template == "plain":
        return instruction + ("\n" + input if input else "")
    return file_texts(template_file(str(template)), instruction, input, "")[0]


def format_example(template: str, tokenizer: Tokenizer, instruction: str, input: str | None,
                   output: str) -> tuple[str, str]:
    """(prompt, response) texts of one row; for 'chat' the response is the whole assistant turn,
    end-of-turn markup included; for an m-LoRA JSON template the output and what follows {output}."""
    if template not in NAMED_TEMPLATES:
        return file_texts(template_file(str(template)), instruction, input, output)
    prompt = build_prompt(template, tokenizer, instruction, input)
    if template != "chat":
        return prompt, output
    # The assistant's turn is whatever the template appends after the generation prompt.
    messages = _chat_messages(instruction, input) + [{"role": "assistant", "content": output}]
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    if not full.startswith(prompt):
        raise DataError("template 'chat': the conversation rendered with the reply does not start "
                        "with the prompt rendered with add_generation_prompt=True")
    return prompt, full[len(prompt):]


# -----------------------------------------------------------------------------
# Examples: token ids and labels

@dataclass
class Example:
    input_ids: list[int]  # [bos] + prompt + response (+ eos), at most cutoff_len long
    # Aligned with input_ids, not shifted: the loss compares logits[t] with labels[t + 1]; -100 = no loss.
    labels: list[int]


def make_example(tokenizer: Tokenizer, prompt: str, response: str, cutoff_len: int, train_on_inputs: bool) -> Example:
    """Token ids of prompt + response + EOS, truncated to cutoff_len, prompt labels -100 unless train_on_inputs."""
    # Only cutoff_len tokens are kept, so a long row is tokenized from a prefix of its text that
    # yields twice that many (32 characters a token to start, doubled while too few): the work is
    # bounded by cutoff_len, not by the row, and the extra tokens absorb what the cut changes near its end.
    chars = 32 * cutoff_len
    while len(prompt) + len(response) > chars:
        example = _tokenize(tokenizer, prompt[:chars], response[:max(0, chars - len(prompt))], train_on_inputs)
        if len(example.input_ids) >= 2 * cutoff_len:
            return Example(example.input_ids[:cutoff_len], example.labels[:cutoff_len])
        chars *= 2
    example = _tokenize(tokenizer, prompt, response, train_on_inputs)
    return Example(example.input_ids[:cutoff_len], example.labels[:cutoff_len])


def _tokenize(tokenizer: Tokenizer, prompt: str, response: str, train_on_inputs: bool) -> Example:
    # make_example's Example before truncation.
    prompt_ids = tokenizer.encode(prompt)
    # The response's ids are taken from the joint encoding, so its first token is the one
    # the model sees after this prompt (sentencepiece would put a dummy-prefix space on a
    # response encoded alone); if the two merged across the boundary, encode them apart.
    # ChatGLM2's own fine-tuning script (ptuning/main.py) always encodes the answer apart.
    full_ids = tokenizer.encode(prompt + response)
    if full_ids[:len(prompt_ids)] == prompt_ids and tokenizer.chatglm != 2:
        response_ids = full_ids[len(prompt_ids):]
    else:
        response_ids = tokenizer.encode(response)
    prompt_ids = tokenizer.add_prefix(prompt_ids)  # chat templates may write BOS themselves

    # End on exactly one stop token. A chat turn already ends with one (ChatML's <|im_end|>
    # is SmolLM2's and Qwen2's EOS) followed by a newline, which we drop so that the model
    # learns to stop right there; any other response gets the tokenizer's EOS.
    stops = [i for i, token_id in enumerate(response_ids) if token_id in tokenizer.eos_ids]
    if stops and tokenizer.decode(response_ids[stops[-1] + 1:]).strip() == "":
        response_ids = response_ids[:stops[-1] + 1]
    elif tokenizer.eos_id is not None:
        response_ids = response_ids + [tokenizer.eos_id]

    prompt_labels = list(prompt_ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids)
    return Example(input_ids=prompt_ids + response_ids, labels=prompt_labels + response_ids)


def _read_rows(path: Path) -> list[tuple[int, object]]:
    # (row number, parsed row): 1-based index in a .json list, the line number in a .jsonl.
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix not in (".json", ".jsonl"):
        raise DataError(f"{path}: expected a .json or .jsonl file")
    text = read_text(path)
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    if path.suffix == ".json":
        data = parse_json(text, str(path))
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
        return list(enumerate(data, start=1))
    # Lines end at "\n" only: str.splitlines() would also split at U+2028 or U+0085, which
    # JSON strings may hold as they are.
    return [(number, parse_json(line, str(path), number))
            for number, line in enumerate(text.split("\n"), start=1) if line.strip()]


def numbered_rows(path: Path, tokenizer: Tokenizer, template: str) -> list[tuple[str, object]]:
    # ("FILE: row N" or "FILE: line N", parsed row) of a data file, its template checked first.
    what = "line" if path.suffix == ".jsonl" else "row"
    check_template(template, tokenizer)
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    return [(f"{path}: {what} {number}", row) for number, row in rows]


def string_fields(where: str, row, fields: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    """The row with its fields checked to be text, in this order; an optional one missing or null reads as None."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    for field in fields:
        if field not in row and field not in optional:
            raise DataError(f"{where}: missing field '{field}'")
    # A missing optional field reads as None, as does null (converted datasets write "input": null).
    row = {**row, **{field: None for field in optional if row.get(field) is None}}
    for field in fields:
        if row[field] is None and field in optional:
            continue
        if not isinstance(row[field], str):
            raise DataError(f"{where}: field '{field}' must be a string, got {type(row[field]).__name__}")
        bad = SURROGATE.search(row[field])
        if bad:
            raise DataError(f"{where}: field '{field}' has a lone surrogate \\u{ord(bad.group()):04x} "
                            f"at character {bad.start()}, which is not text")
    return row


def _has_response(example: Example) -> bool:
    # labels[0] never enters the shifted loss, so an example needs a label past position 0.
    return any(label != IGNORE_INDEX for label in example.labels[1:])


def load_job_data(path: str | Path, tokenizer: Tokenizer, template: str = "alpaca", cutoff_len: int = 256,
                  train_on_inputs: bool = False) -> list[Example]:
    """Alpaca-style rows {instruction, input?, output} from a .json list or .jsonl file, as Examples in file order.
    With a Jinja template file a row is any object, and its whole rendering is the response: the loss
    covers every token, as in m-LoRA."""
    path = Path(path)
    jinja = jinja_template(template)
    examples = []
    for where, row in numbered_rows(path, tokenizer, template):
        if jinja:  # the whole rendering is the response
            examples.append(make_example(tokenizer, "", _rendered(where, jinja, row), cutoff_len, train_on_inputs))
            continue
        row = string_fields(where, row, ("instruction", "input", "output"), optional=("input",))
        try:
            prompt, response = format_example(template, tokenizer, row["instruction"], row["input"], row["output"])
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        examples.append(make_example(tokenizer, prompt, response, cutoff_len, train_on_inputs))

    kept = [ex for ex in examples if _has_response(ex)]
    if not kept:
        raise DataError(f"{path}: no example has a response token within cutoff_len={cutoff_len}")
    if len(kept) < len(examples):
        print(f"warning: {path}: dropped {len(examples) - len(kept)} of {len(examples)} examples "
              f"with no response token within cutoff_len={cutoff_len}")
    return kept


@dataclass
class Pair:
    """A preference row: one prompt with its chosen and with its rejected answer, two Examples
    (prompt + answer, labels on the answer only). A pair is never split: the scheduler's unit."""
    chosen: Example
    rejected: Example


def load_pairs(path: str | Path, tokenizer: Tokenizer, template: str = "alpaca", cutoff_len: int = 256) -> list[Pair]:
    """Preference rows {prompt, input?, chosen, rejected} from a .json list or .jsonl file, as Pairs
    in file order: the prompt (and input) formatted by the template as an SFT instruction, each
    answer as its response (EOS as SFT), each sequence cut to cutoff_len. With a Jinja template
    file a row is any object, rendered once per answer (_jinja_pair)."""
    path = Path(path)
    jinja = jinja_template(template)
    pairs = []
    for where, row in numbered_rows(path, tokenizer, template):
        if jinja:
            pairs.append(_jinja_pair(tokenizer, jinja, where, row, cutoff_len))
            continue
        row = string_fields(where, row, ("prompt", "input", "chosen", "rejected"), optional=("input",))
        answers = []
        for field in ("chosen", "rejected"):
            try:
                prompt, response = format_example(template, tokenizer, row["prompt"], row["input"], row[field])
            except DataError as e:
                raise DataError(f"{where}: {e}") from None
            answers.append(make_example(tokenizer, prompt, response, cutoff_len, train_on_inputs=False))
        pairs.append(Pair(*answers))

    # Both answers need a token to score: a pair whose prompt fills cutoff_len has none.
    kept = [pair for pair in pairs if _has_response(pair.chosen) and _has_response(pair.rejected)]
    if not kept:
        raise DataError(f"{path}: no pair has a token of both answers within cutoff_len={cutoff_len}")
    if len(kept) < len(pairs):
        print(f"warning: {path}: dropped {len(pairs) - len(kept)} of {len(pairs)} pairs "
              f"without a token of both answers within cutoff_len={cutoff_len}")
    return kept


def _rendered(where: str, spec: TemplateFile, row, **flags) -> str:
    # render_row of a data file's row: any fields, but an object; errors name the row first.
    row = string_fields(where, row, ())
    try:
        return render_row(spec, row, **flags)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None


def _jinja_pair(tokenizer: Tokenizer, spec: TemplateFile, where: str, row, cutoff_len: int) -> Pair:
    # m-LoRA renders a preference row twice, is_chosen true and false, and encodes each whole text.
    # The prompt is what the two share: their common prefix in tokens, so that the cut falls between
    # tokens and each answer keeps the tokens its whole text has (DPO's margin is the same wherever
    # the cut falls inside the shared part: those log-probs cancel).
    texts = [_rendered(where, spec, row, is_chosen=is_chosen) for is_chosen in (True, False)]
    if texts[0] == texts[1]:
        raise DataError(f"{where}: {spec.path}: renders the same text with is_chosen true and false "
                        "(a preference template tells the answers apart by is_chosen)")
    chosen, rejected = (make_example(tokenizer, "", text, cutoff_len, train_on_inputs=True) for text in texts)
    shared = 0
    while shared < min(len(chosen.input_ids), len(rejected.input_ids)) \
            and chosen.input_ids[shared] == rejected.input_ids[shared]:
        shared += 1
    for example in (chosen, rejected):
        example.labels[:shared] = [IGNORE_INDEX] * shared
    return Pair(chosen, rejected)


# -----------------------------------------------------------------------------
# Fusing the micro-batches of several jobs

@dataclass
class Batch:
    """A fused batch, one of two layouts:
    padded  one example per row, right-padded to a common length: input_ids [B, T]
    packed  every example laid end to end in ONE row with no padding: input_ids [1, N];
            positions restart and attention stays inside each example (`segments`)
    Either way lengths and adapter_names describe the examples in order, so a job's rows are
    the same examples in the same order whatever the layout."""
    input_ids: torch.Tensor  # [B, T] long, right-padded with pad_id, or [1, N] packed
    labels: torch.Tensor  # like input_ids, aligned (not shifted), -100 = no loss
    lengths: torch.Tensor  # [E] long, real tokens per example; kept on the CPU (bookkeeping, not model input)
    adapter_names: list[str | None]  # one per example; None = the bare base model
    packed: bool = False

    def to(self, device: str | torch.device) -> "Batch":
        """A copy with input_ids and labels on device."""
        return dataclasses.replace(self, input_ids=self.input_ids.to(device), labels=self.labels.to(device))

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def segments(self) -> tuple[int, ...] | None:
        """The examples' lengths in a packed row (the model's `segments`), None when padded."""
        return tuple(self.lengths.tolist()) if self.packed else None

    def example_of(self, keep: torch.Tensor) -> torch.Tensor:
        """The example index of each True position of keep (a bool mask like input_ids)."""
        if self.packed:
            example = torch.repeat_interleave(torch.arange(len(self.lengths)), self.lengths).to(keep.device)
            return example[keep[0]]
        return torch.arange(keep.size(0), device=keep.device)[:, None].expand_as(keep)[keep]


def fuse(parts: list[tuple[str | None, list[Example]]], pad_id: int, multiple_of: int = 8) -> Batch:
    """One right-padded batch of every job's examples, rows in order, T rounded up to multiple_of."""
    rows = [(name, example) for name, examples in parts for example in examples]
    if not rows:
        raise ValueError("fuse: no examples")
    longest = max(len(example.input_ids) for _, example in rows)
    T = -(-longest // multiple_of) * multiple_of  # round up: fewer distinct shapes, friendlier kernels
    # Right padding keeps every real token at the same position as when the row runs alone,
    # and with causal attention no real token attends to the padding after it, so no mask is needed.
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for b, (_, example) in enumerate(rows):
        n = len(example.input_ids)
        input_ids[b, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[b, :n] = torch.tensor(example.labels, dtype=torch.long)
    lengths = torch.tensor([len(example.input_ids) for _, example in rows], dtype=torch.long)
    return Batch(input_ids, labels, lengths, [name for name, _ in rows])


def pack(parts: list[tuple[str | None, list[Example]]]) -> Batch:
    """Every job's examples end to end in one row [1, N], in order: no padding at all.

    Each example keeps its own positions (the model restarts them per segment) and attends to
    itself only, so it computes what it computes alone. Its first label is set to -100: the
    token before it belongs to the previous example and must not learn to predict it (in a
    padded row that label is never read either: the loss compares logits[t] with labels[t+1]).
    """
    rows = [(name, example) for name, examples in parts for example in examples]
    if not rows:
        raise ValueError("pack: no examples")
    input_ids = torch.tensor([[t for _, example in rows for t in example.input_ids]], dtype=torch.long)
    labels = torch.tensor([[t for _, example in rows for t in [IGNORE_INDEX] + example.labels[1:]]],
                          dtype=torch.long)
    lengths = torch.tensor([len(example.input_ids) for _, example in rows], dtype=torch.long)
    return Batch(input_ids, labels, lengths, [name for name, _ in rows], packed=True)


PAD_MULTIPLE = 8  # fuse rounds a fused batch's length up to this in training; the scheduler plans with it


def make_batch(parts: list[tuple[str | None, list[Example]]], pad_id: int, packed: bool) -> Batch:
    """The fused batch of these jobs' examples: packed in one row, or padded rows."""
    return pack(parts) if packed else fuse(parts, pad_id, multiple_of=PAD_MULTIPLE)
