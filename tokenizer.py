"""Tokenizer: text <-> ids for a Hugging Face checkpoint folder (tokenizer.json or sentencepiece
tokenizer.model, ChatGLM2/3's special tokens), its chat template, and the bounded sandbox that
renders Jinja templates (the checkpoint's chat template, m-LoRA's prompt templates in data.py).

Also the one error of bad input files, DataError, and the file readers data.py shares.
"""

import json
import re
import signal
import threading
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path


# Every file of a checkpoint folder that Tokenizer reads besides config.json, present or not
# (a run digests each, so that resume notices a changed or added one: jobs.input_digests).
FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
         "generation_config.json", "chat_template.jinja", "tokenization_chatglm.py")


class DataError(ValueError):
    """Bad input data; the one-line message names the file and, where it applies, the row or line."""


def one_line(text: str, limit: int = 300) -> str:
    """text on one line and cut at limit: messages quote what a file or a template said, not all of a huge value."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


SURROGATE = re.compile("[\ud800-\udfff]")  # JSON's "\ud800" parses, but is no text: nothing can encode it


def read_text(path: Path) -> str:
    """The file's UTF-8 text, or a one-line DataError. A leading byte-order mark (as Windows editors
    write) is dropped, as Python's utf-8-sig does."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None


def parse_json(text: str, where: str, line: int | None = None):
    """json.loads(text), or a one-line DataError at where (a file) giving the line and the reason."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        line = line or e.lineno
        reason = f"{e.msg.removesuffix(' at')} at column {e.colno}"
    except RecursionError:
        reason = "nested too deeply"
    except ValueError as e:  # Python's limit on the digits of an integer
        reason = one_line(str(e).split(";")[0])
    raise DataError(f"{where}: " + (f"line {line}: " if line else "") + f"invalid JSON ({reason})")


def read_json(path: Path) -> dict:
    """The JSON object of a file, {} if there is no such file (a checkpoint folder may lack any of
    its optional json files); anything else is a one-line DataError."""
    if not path.is_file():
        return {}
    value = parse_json(read_text(path), str(path))
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(value).__name__}")
    bad = SURROGATE.search(json.dumps(value, ensure_ascii=False))
    if bad:
        raise DataError(f"{path}: has a lone surrogate \\u{ord(bad.group()):04x}, which is not text")
    return value


def _token_content(value) -> str | None:
    # tokenizer_config.json writes special tokens either as "<s>" or as {"content": "<s>", ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _check_token_fields(path: Path, config: dict) -> None:
    """Raise DataError unless the fields we read from tokenizer_config.json (or
    special_tokens_map.json) have the types transformers writes."""
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if config.get(key) is not None and _token_content(config[key]) is None:
            raise DataError(f"{path}: '{key}' must be a string or an object with a string 'content', "
                            f"got {type(config[key]).__name__}")
    if config.get("add_bos_token") is not None and not isinstance(config["add_bos_token"], bool):
        raise DataError(f"{path}: 'add_bos_token' must be true or false, got {type(config['add_bos_token']).__name__}")
    added = config.get("added_tokens_decoder", {})
    if not (isinstance(added, dict) and all(key.isdecimal() and _token_content(token) is not None
                                            for key, token in added.items())):
        raise DataError(f"{path}: 'added_tokens_decoder' must map ids to tokens, "
                        '{"32000": {"content": "<pad>", ...}, ...}')
    template = config.get("chat_template")
    named = isinstance(template, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in template)
    if not (template is None or isinstance(template, str) or named):
        raise DataError(f"{path}: 'chat_template' must be a string or a list of "
                        f'{{"name": ..., "template": ...}} objects, got {type(template).__name__}')


def _id_list(path: Path, config: dict, key: str, vocab_size: int) -> list[int]:
    # config.json / generation_config.json token ids: an int, a list of ints, or null;
    # a negative id means none (old Llama conversions write "pad_token_id": -1).
    value = config.get(key)
    ids = [] if value is None else [value] if isinstance(value, int) else value
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise DataError(f"{path}: '{key}' must be a token id, a list of them or null, got {type(value).__name__}")
    if any(i >= vocab_size for i in ids):
        raise DataError(f"{path}: '{key}' {one_line(value, 60)} is past the tokenizer's vocabulary "
                        f"(vocab_size {vocab_size})")
    return [i for i in ids if i >= 0]


# -----------------------------------------------------------------------------
# Tokenizer

# ChatGLM2/3's tokenization_chatglm.py adds these ids right after the sentencepiece vocabulary,
# in this order; ChatGLM3 adds its role tokens after them.
CHATGLM_SPECIAL = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
CHATGLM3_ROLES = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")


def _chatglm_version(folder: Path, config: dict, model_config: dict) -> int | None:
    """2 or 3 for a THUDM ChatGLM sentencepiece folder, None for any other.

    A ChatGLM folder says model_type "chatglm" (config.json) or tokenizer_class
    "ChatGLMTokenizer"; it is ChatGLM3 when its tokenizer defines the role tokens, i.e.
    "<|user|>" appears in tokenization_chatglm.py (the code that adds them) or in
    tokenizer_config.json (added_tokens_decoder, chat_template); otherwise ChatGLM2.
    """
    if model_config.get("model_type") != "chatglm" and config.get("tokenizer_class") != "ChatGLMTokenizer":
        return None
    code = folder / "tokenization_chatglm.py"
    sources = [json.dumps(config, ensure_ascii=False)] + ([read_text(code)] if code.is_file() else [])
    return 3 if any("<|user|>" in text for text in sources) else 2


def _load_tokenizer_json(path: Path):
    """The tokenizers library's Tokenizer of a tokenizer.json (a leading byte-order mark dropped);
    a file it cannot read is a DataError saying why."""
    from tokenizers import Tokenizer as TokenizersTokenizer
    text = read_text(path)
    try:
        return TokenizersTokenizer.from_str(text)
    except Exception as e:  # the library raises a bare Exception with a terse serde message
        reason = one_line(e)
    # Say plainly what is wrong where we can tell ("data did not match any variant of untagged enum ModelUntagged").
    spec = parse_json(text, str(path))
    if not isinstance(spec, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(spec).__name__}")
    if not isinstance(spec.get("model"), dict):
        raise DataError(f"{path}: no 'model' object (the vocabulary and its type)")
    model_type = spec["model"].get("type")
    if model_type is not None and model_type not in ("BPE", "Unigram", "WordLevel", "WordPiece"):
        raise DataError(f"{path}: model type {one_line(repr(model_type), 60)} is not supported by the tokenizers "
                        "library (BPE, Unigram, WordLevel, WordPiece)")
    raise DataError(f"{path}: the tokenizers library cannot read it ({reason})")


def _load_sentencepiece(folder: Path, config: dict, model_config: dict):
    """A folder's sentencepiece tokenizer.model: (the processor, its special tokens -> ids, 2 or 3 for
    ChatGLM2/3 else None). Special: control and unknown pieces, added tokens, ChatGLM's own."""
    import sentencepiece
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    except (RuntimeError, OSError):  # e.g. GLM-4's tokenizer.model, a tiktoken vocabulary
        raise DataError(f"{folder / 'tokenizer.model'}: not a sentencepiece model (GLM-4's is tiktoken, "
                        "which is not supported; use a folder with tokenizer.json)") from None
    special = {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)}
    # Tokens a checkpoint added after the sentencepiece vocab (e.g. a "<pad>" at 32000).
    for token_id, token in config.get("added_tokens_decoder", {}).items():
        special[_token_content(token)] = int(token_id)
    chatglm = _chatglm_version(folder, config, model_config)
    if chatglm is not None:
        added = CHATGLM_SPECIAL + (CHATGLM3_ROLES if chatglm == 3 else ())
        n = sp.get_piece_size()
        special.update({token: n + i for i, token in enumerate(added)})
    return sp, special, chatglm


def _specials_in_text(special: dict[str, int], chatglm: int | None) -> tuple[dict[str, int], re.Pattern | None]:
    """The special tokens text may spell out, and the pattern that splits text on them (longest first)."""
    # Not ChatGLM's masks and "sop"/"eop": THUDM's tokenizer reads none of them from text, and
    # "eop" is part of words ("people").
    in_text = {s: i for s, i in special.items() if not (chatglm and s in CHATGLM_SPECIAL)}
    longest_first = sorted(in_text, key=len, reverse=True)
    return in_text, re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if in_text else None


def _adds_bos(config: dict, tok, bos_id: int | None) -> bool:
    """Whether sequences start with BOS: the config says so, or else Llama 3 style tokenizer.json
    files show it by prepending BOS in their post-processor."""
    if isinstance(config.get("add_bos_token"), bool):
        return config["add_bos_token"]
    if tok is not None:
        return tok.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
    return True  # sentencepiece Llama 1/2 and HF's LlamaTokenizer default


def _read_chat_template(folder: Path, config: dict) -> tuple[str | None, Path]:
    """The checkpoint's chat template and its file: chat_template.jinja in newer checkpoints, else
    tokenizer_config.json's, some a list of named templates (the "default" one is used)."""
    template, file = config.get("chat_template"), folder / "tokenizer_config.json"
    if isinstance(template, list):
        template = next((t["template"] for t in template if t["name"] == "default"), None)
    if (folder / "chat_template.jinja").is_file():
        file = folder / "chat_template.jinja"
        template = read_text(file)
    return template, file


class Tokenizer:
    """Text <-> ids for one Hugging Face checkpoint folder: tokenizer.json (the tokenizers
    library: Llama 3, SmolLM, Qwen2) or sentencepiece tokenizer.model (Llama 1/2, ChatGLM2/3)."""

    def __init__(self, path: str | Path):
        folder = Path(path)
        self.path = folder
        config = read_json(folder / "tokenizer_config.json")
        special_map = read_json(folder / "special_tokens_map.json")
        _check_token_fields(folder / "tokenizer_config.json", config)
        _check_token_fields(folder / "special_tokens_map.json", special_map)
        model_config = read_json(folder / "config.json")

        self._tok = self._sp = None
        self.chatglm: int | None = None  # 2 or 3 for ChatGLM2/3 (sentencepiece plus THUDM's special tokens)
        # Special tokens written literally in text (e.g. "</s>" in Llama 2's chat template)
        # must encode to their one id; the tokenizers library does this itself for its added
        # tokens, for sentencepiece we split the text on them (_special_re).
        self._special: dict[str, int] = {}
        if (folder / "tokenizer.json").is_file():
            self._tok = _load_tokenizer_json(folder / "tokenizer.json")
            self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)  # ids are 0 .. vocab_size-1
        elif (folder / "tokenizer.model").is_file():
            self._sp, self._special, self.chatglm = _load_sentencepiece(folder, config, model_config)
            self.vocab_size = max([self._sp.get_piece_size()] + [i + 1 for i in self._special.values()])
        else:
            raise DataError(f"{folder}: no tokenizer.json or tokenizer.model")
        self._special_by_id = {i: s for s, i in self._special.items()}
        self._in_text, self._special_re = _specials_in_text(self._special, self.chatglm)
        self._set_special_ids(config, special_map, model_config)
        self._set_prefix(config)
        self._set_chat_template(config)

    def _set_special_ids(self, config: dict, special_map: dict, model_config: dict) -> None:
        # bos_id, eos_id, eos_ids, pad_id and their token strings.
        generation_config = read_json(self.path / "generation_config.json")
        sources = (("config.json", model_config), ("generation_config.json", generation_config))

        def config_ids(key: str) -> list[int]:  # config.json's, then generation_config.json's
            return [i for file, source in sources for i in _id_list(self.path / file, source, key, self.vocab_size)]

        def special_id(name: str) -> int | None:
            # The tokenizer's own files name the token; config.json ids are the fallback.
            token = _token_content(config.get(name)) or _token_content(special_map.get(name))
            token_id = self.token_to_id(token) if token is not None else None
            if token_id is None:
                ids = config_ids(name + "_id")
                token_id = ids[0] if ids else None
            return token_id

        self.bos_id: int | None = special_id("bos_token")
        self.eos_id: int | None = special_id("eos_token")
        if self._sp is not None:  # the sentencepiece model knows its own <s> and </s> (-1 = none)
            if self.bos_id is None and self._sp.bos_id() >= 0:
                self.bos_id = self._sp.bos_id()
            if self.eos_id is None and self._sp.eos_id() >= 0:
                self.eos_id = self._sp.eos_id()
        # Every id that ends generation: chat models stop on end-of-turn as well as end-of-text
        # (Llama 3.1's generation_config.json lists three).
        self.eos_ids: set[int] = {self.eos_id} if self.eos_id is not None else set()
        self.eos_ids |= set(config_ids("eos_token_id"))
        if self.chatglm == 3:  # a ChatGLM3 turn ends where the next one starts (THUDM's chat() stops on these)
            self.eos_ids |= {self._special["<|user|>"], self._special["<|observation|>"]}
        pad_id = special_id("pad_token")
        if pad_id is None and self.chatglm is not None:
            pad_id = self._sp.unk_id()  # THUDM's ChatGLM tokenizer pads with <unk>
        self.pad_id: int = pad_id if pad_id is not None else (self.eos_id if self.eos_id is not None else 0)
        self.bos_token: str | None = self.id_to_token(self.bos_id) if self.bos_id is not None else None
        self.eos_token: str | None = self.id_to_token(self.eos_id) if self.eos_id is not None else None

    def _set_prefix(self, config: dict) -> None:
        add_bos = _adds_bos(config, self._tok, self.bos_id)
        # The ids every sequence starts with: BOS, or ChatGLM's [gMASK] sop, which THUDM's
        # tokenizer always prepends (build_inputs_with_special_tokens), whatever add_bos_token says.
        if self.chatglm is not None:
            self.prefix_ids: list[int] = [self._special["[gMASK]"], self._special["sop"]]
            add_bos = True
        else:
            self.prefix_ids = [self.bos_id] if self.bos_id is not None else []
        self.add_bos: bool = add_bos and bool(self.prefix_ids)

    def _set_chat_template(self, config: dict) -> None:
        # Compiled now, so that a syntax error fails at load; ChatGLM's is never used (_chatglm_chat).
        template, file = _read_chat_template(self.path, config)
        self.chat_template: str | None = template
        self.chat_template_file: Path | None = file if template is not None else None
        self._compiled_template = None
        if template is not None and self.chatglm is None:
            self._compiled_template = compile_template(template, file)

    def token_to_id(self, token: str) -> int | None:
        """The id of a token string, or None if it is not in the vocabulary."""
        if self._tok is not None:
            return self._tok.token_to_id(token)
        if token in self._special:
            return self._special[token]
        token_id = self._sp.piece_to_id(token)  # unk's id for an unknown piece
        return token_id if self._sp.id_to_piece(token_id) == token else None

    def id_to_token(self, token_id: int) -> str | None:
        """The token string of an id, or None if out of range."""
        if self._tok is not None:
            return self._tok.id_to_token(token_id) if token_id >= 0 else None  # ids are unsigned there
        if token_id in self._special_by_id:
            return self._special_by_id[token_id]
        return self._sp.id_to_piece(token_id) if 0 <= token_id < self._sp.get_piece_size() else None

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Token ids of text, no special tokens added except prefix_ids (BOS) when bos=True."""
        if self._tok is not None:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        else:
            # Each piece between special tokens is encoded on its own, with sentencepiece's
            # dummy-prefix space, as Meta's Llama 2 code does around its [INST] markers.
            ids, after_role = [], False
            for chunk in (self._special_re.split(text) if self._special_re else [text]):
                if chunk in self._in_text:
                    ids.append(self._in_text[chunk])
                    after_role = chunk in CHATGLM3_ROLES
                elif chunk:
                    if self.chatglm == 3 and after_role and "\n" in chunk:
                        # ChatGLM3 encodes a message as role token, metadata line (usually
                        # empty) and content, each on its own (build_single_message).
                        line, content = chunk.split("\n", 1)
                        ids.extend(self._sp.encode(line + "\n") + self._sp.encode(content))
                    else:
                        ids.extend(self._sp.encode(chunk))
                    after_role = False
        if bos:
            ids = self.prefix_ids + ids
        return ids

    def add_prefix(self, ids: list[int]) -> list[int]:
        """ids starting with prefix_ids when the tokenizer adds them (unless a template wrote them)."""
        if not self.add_bos or ids[:len(self.prefix_ids)] == self.prefix_ids:
            return ids
        return self.prefix_ids + ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        """Text of ids; skip_special drops special tokens (BOS, EOS, chat markers).
        An id the tokenizer lacks (e.g. of a model's padded vocab) is a DataError."""
        ids = [int(i) for i in ids]
        # sentencepiece would raise a bare IndexError and the tokenizers library drop the id silently.
        unknown = [i for i in ids if self.id_to_token(i) is None]
        if unknown:
            raise DataError(f"{self.path}: ids {unknown[:8]} are not in the tokenizer's vocabulary "
                            f"(vocab_size {self.vocab_size}); generate with vocab_size= to never choose them")
        if self._tok is not None:
            return self._tok.decode(ids, skip_special_tokens=skip_special)
        parts, run = [], []
        for i in ids + [None]:  # None flushes the last run
            if i is None or i in self._special_by_id:
                if run:
                    parts.append(self._sp.decode(run))
                    run = []
                if i is not None and not skip_special:
                    parts.append(self._special_by_id[i])
            else:
                run.append(i)
        return "".join(parts)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        """Render messages with the checkpoint's jinja chat template, as transformers does
        (ChatGLM2/3: their own prompt formats, see _chatglm_chat)."""
        if self.chatglm is not None:
            return _chatglm_chat(self.chatglm, messages, add_generation_prompt)
        if self.chat_template is None:
            raise DataError(f"{self.path}: the tokenizer has no chat template")
        file = self.chat_template_file or self.path
        if self._compiled_template is None:  # a chat_template set after loading
            self._compiled_template = compile_template(self.chat_template, file)
        return render_template(self._compiled_template, file, dict(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs), len(str(messages)))


def _chatglm_chat(version: int, messages: list[dict], add_generation_prompt: bool) -> str:
    """ChatGLM2's rounds ("[Round 1]\\n\\n问：...\\n\\n答：...", its build_prompt) or ChatGLM3's role
    messages ("<|user|>\\n...<|assistant|>\\n...", its build_chat_input); [gMASK] sop come from prefix_ids.

    A ChatGLM folder's jinja chat_template, if it has one, is not used: the prefix comes from
    prefix_ids, and each message must be encoded apart as build_single_message does (encode).
    """
    if version == 3:
        text = "".join(f"<|{m['role']}|>\n{m['content']}" for m in messages)
        return text + ("<|assistant|>" if add_generation_prompt else "")
    rounds = []
    for m in messages:
        if m["role"] == "user":
            rounds.append(f"[Round {len(rounds) + 1}]\n\n问：{m['content']}\n\n答：")
        elif m["role"] == "assistant" and rounds:
            rounds[-1] += m["content"]
        else:
            raise DataError(f"ChatGLM2's prompt format has no {m['role']!r} message here (only user, assistant turns)")
    return "\n\n".join(rounds)


# A Jinja template is code from a file (the checkpoint's chat template, a prompt template file):
# its render is bounded in time and size.
CHAT_TEMPLATE_SECONDS = 5.0  # wall-clock limit of one render
CHAT_TEMPLATE_MAX_CHARS = 1_000_000  # the most a render may write beyond 8 times the size of its input
CHAT_TEMPLATE_MAX_BITS = 1_000_000  # the largest integer a template may compute with **


class _OverBudget(Exception):
    """A template went over CHAT_TEMPLATE_SECONDS or its size limits."""


def compile_template(source: str, file: Path, what: str = "chat template"):
    """The jinja template of source, in the environment of transformers' chat templates (m-LoRA's
    prompter uses the same sandbox): sandboxed, trim_blocks and lstrip_blocks, loop controls, a tojson
    that keeps non-ASCII text, raise_exception for the templates' own checks, strftime_now for
    Llama 3's "Today Date". what names the template in errors."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        # The sandbox already caps each range() at 100,000 items; a render also stops at its
        # deadline and max_chars (set by render_template), checked at every call and at
        # '*' and '**': one of those asks for gigabytes ('x' * 10**10) or for minutes of C code
        # that no signal interrupts (9 ** (9 ** 9)).
        intercepted_binops = frozenset({"*", "**"})
        deadline = float("inf")
        max_chars = CHAT_TEMPLATE_MAX_CHARS

        def check_time(self):
            if time.monotonic() > self.deadline:
                raise _OverBudget(f"takes longer than {CHAT_TEMPLATE_SECONDS:g} s")

        def call(__self, __context, __obj, *args, **kwargs):  # jinja's argument names: any keyword may follow
            __self.check_time()
            return super().call(__context, __obj, *args, **kwargs)

        def call_binop(self, context, operator, left, right):
            self.check_time()
            if operator == "*" and isinstance(left, int) and isinstance(right, (str, list, tuple)):
                left, right = right, left
            if operator == "*" and isinstance(left, (str, list, tuple)) and isinstance(right, int) \
                    and len(left) * right > self.max_chars:
                raise _OverBudget(f"builds a value longer than {self.max_chars} characters")
            if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 \
                    and right * abs(left).bit_length() > CHAT_TEMPLATE_MAX_BITS:
                raise _OverBudget(f"computes an integer over {CHAT_TEMPLATE_MAX_BITS} bits")
            return super().call_binop(context, operator, left, right)

    def raise_exception(message):
        raise DataError(str(message))

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    try:
        return env.from_string(source)
    except Exception as e:  # a syntax error, an unknown filter; RecursionError on deep nesting
        where = f" line {e.lineno}" if getattr(e, "lineno", None) else ""
        reason = one_line(getattr(e, "message", None) or e)
        raise DataError(f"{file}: {what}{where} does not compile ({reason})") from None


def on_alarm(signum, frame):
    """SIGALRM's handler, set once by a program's main() (alarm_stops_templates): the render
    in progress stops (render_template arms the timer only where this handler is set)."""
    raise _OverBudget(f"takes longer than {CHAT_TEMPLATE_SECONDS:g} s")


def alarm_stops_templates():
    """Process-wide, for main() alone: SIGALRM stops a chat template that runs past its time even
    where it calls nothing (a loop over a long string); elsewhere the render's clock checks stand alone."""
    signal.signal(signal.SIGALRM, on_alarm)


@contextmanager
def _alarm(seconds: float):
    """SIGALRM after `seconds` in this block, when main() set on_alarm, this is the main thread and
    no other timer runs."""
    if (not hasattr(signal, "setitimer") or signal.getsignal(signal.SIGALRM) is not on_alarm
            or threading.current_thread() is not threading.main_thread() or signal.getitimer(signal.ITIMER_REAL)[0] > 0):
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def render_template(template, file: Path, context: dict, input_chars: int, what: str = "chat template") -> str:
    """template.render(**context) within CHAT_TEMPLATE_SECONDS and CHAT_TEMPLATE_MAX_CHARS beyond
    8 x input_chars (the size of the text it is given); whatever goes wrong is a one-line
    DataError naming the template's file."""
    env = template.environment
    env.max_chars = CHAT_TEMPLATE_MAX_CHARS + 8 * input_chars
    env.deadline = time.monotonic() + CHAT_TEMPLATE_SECONDS
    try:
        with _alarm(CHAT_TEMPLATE_SECONDS):
            pieces, length = [], 0
            for piece in template.generate(**context):  # piece by piece, to stop at max_chars
                length += len(piece)
                if length > env.max_chars:
                    raise _OverBudget(f"writes more than {env.max_chars} characters")
                env.check_time()
                pieces.append(piece)
    except _OverBudget as e:
        raise DataError(f"{file}: {what} {e}") from None
    except DataError as e:  # the template's raise_exception()
        raise DataError(f"{file}: {what}: {one_line(e)}") from None
    except Exception as e:  # an undefined filter or attribute, a type error: the template's own bugs
        raise DataError(f"{file}: {what} fails ({type(e).__name__}: {one_line(e)})") from None
    finally:
        env.deadline = float("inf")
    return "".join(pieces)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a checkpoint folder (tokenizer.json preferred over tokenizer.model)."""
    return Tokenizer(path)

