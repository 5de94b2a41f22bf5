"""Batched generation where every row has its own adapter (or none), with a KV cache.

All rows run as one batch: prompts are left padded so that each row's next token lands
in the same column, the cache holds past keys/values, and `lora.route` sends row i
through adapter adapters[i]. Greedy by default; temperature + top-p sampling on request.
On the command line each adapter reads a prompt through the template it was trained with
(its training.json), as a row's instruction, unless --template names another.

    python generate.py --base DIR --adapter out/a --adapter out/b --with-base --prompt "Hi"
"""
import argparse
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

import data
import lora
import model as M
import peft_format

# Beside an adapter a run saved: {"template": ..., "cutoff_len": ...} of its job (jobs.training_record),
# the default template of its prompts here. A file of our own: a key PEFT does not know in
# adapter_config.json makes PEFT 0.21 warn on loading that the file needs a newer PEFT.
TRAINING_FILE = "training.json"


def sample(logits: torch.Tensor, temperature: float, top_p: float,
           generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row [B] from logits [B, V]: argmax, or temperature + nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)             # [B, V]
    if top_p < 1.0:
        # Nucleus sampling (Holtzman et al. 2019, section 3.1): keep the smallest set of
        # most likely tokens whose mass reaches top_p. A token goes when the mass before it
        # already does, so the most likely one always stays (top_p -> 0 is greedy).
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)  # [B, V]
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class RowGroup(NamedTuple):
    """Rows of a batched generation that sample alike (generate_rows): their own temperature,
    top-p, RNG and stop ids, so that what they draw never depends on the other rows."""
    rows: slice                          # contiguous rows of the batch
    temperature: float = 0.0             # 0: greedy
    top_p: float = 1.0
    generator: torch.Generator | None = None   # the group's own draws (None: torch's global RNG)
    stop_ids: frozenset = frozenset()    # a row is done at the first of these
    max_new_tokens: int | None = None    # a row is done after this many (None: the batch's max)


@torch.no_grad()
def generate(model, prompts: list[list[int]], adapters: list[str | None], *, max_new_tokens: int = 128,
             stop_ids: set[int] | None = None, pad_id: int = 0, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, vocab_size: int | None = None) -> list[list[int]]:
    """New token ids for each prompt, row i through adapter adapters[i] (None: the base).

    A row ends at its first stop id, which is kept in its output (as transformers'
    generate keeps EOS); seed makes sampling reproducible; only ids below vocab_size
    (the tokenizer's size) are chosen.
    """
    check_generate_args(prompts, adapters, temperature, top_p, vocab_size)
    if not prompts or max_new_tokens <= 0:
        return [[] for _ in prompts]
    stop_ids = set(stop_ids or ())
    generator = None
    if temperature > 0 and seed is not None:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    group = RowGroup(slice(0, len(prompts)), temperature, top_p, generator, frozenset(stop_ids))
    new_tokens, _ = generate_rows(model, prompts, adapters, [group], max_new_tokens, pad_id, vocab_size)
    return cut_at_stop(new_tokens, stop_ids)


@torch.no_grad()
def generate_rows(model, prompts: list[list[int]], adapters: list[str | None], groups: list[RowGroup],
                  max_new_tokens: int, pad_id: int = 0, vocab_size: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The new tokens [B, S] of every row (S <= max_new_tokens: it stops when every row is done;
    a done row runs on with the rest, its extra tokens for the caller to cut) and the
    log-probability of each under the model at temperature 1 [B, S] (log-softmax of the whole
    output layer's logits, whatever the sampling settings: what a training forward scores).
    Each group of rows samples with its own settings and generator (RowGroup)."""
    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad(prompts, pad_id, device)
    B, T = input_ids.shape
    last_column = torch.zeros(B, T, dtype=torch.bool, device=device)
    last_column[:, -1] = True  # only the last position's logits are needed: skip the vocab matmul elsewhere
    stops = [torch.tensor(sorted(group.stop_ids), dtype=torch.long, device=device) for group in groups]
    may_end_early = any(stop.numel() for stop in stops) or any(g.max_new_tokens is not None for g in groups)
    cache = model.new_cache(B, T + max_new_tokens)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    new_tokens, logprobs = [], []
    was_training = model.training
    model.eval()
    try:
        with lora.route(model, adapters):
            logits = model(input_ids, attention_mask=attention_mask, cache=cache, output_mask=last_column)  # [B, V]
            for step in range(max_new_tokens):
                # The output layer may have more rows than the tokenizer has ids (ChatGLM3: 65024
                # for 64798): choosing among the first vocab_size logits is masking the rest to
                # -inf, and leaves the argmax as it was whenever it is a real token.
                token = torch.cat([sample(logits[g.rows, :vocab_size], g.temperature, g.top_p, g.generator)
                                   for g in groups])                                           # [B]
                new_tokens.append(token)
                logprobs.append(torch.log_softmax(logits.float(), -1).gather(1, token[:, None])[:, 0])
                for group, stop in zip(groups, stops):   # finished rows run on with the rest
                    done[group.rows] |= torch.isin(token[group.rows], stop) | (step + 1 == group.max_new_tokens)
                if may_end_early and done.all().item():  # syncs the device: one small check per step
                    break
                if step == max_new_tokens - 1:
                    break  # the last token needs no forward pass of its own
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)  # [B, T_past+1]
                logits = model(token[:, None], attention_mask=attention_mask, cache=cache)[:, -1]  # [B, V]
    finally:
        model.train(was_training)
    return torch.stack(new_tokens, dim=1), torch.stack(logprobs, dim=1)


def check_generate_args(prompts: list[list[int]], adapters: list[str | None], temperature: float, top_p: float,
                        vocab_size: int | None) -> None:
    """Raise ValueError on arguments generate cannot run with."""
    if len(prompts) != len(adapters):
        raise ValueError(f"generate: {len(prompts)} prompts but {len(adapters)} adapters")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: empty prompt (give at least one token, e.g. BOS)")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate: need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if vocab_size is not None and vocab_size <= 0:
        raise ValueError(f"generate: vocab_size must be positive, got {vocab_size}")


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, T] of the prompts, each padded on the left to the longest."""
    B, T = len(prompts), max(len(p) for p in prompts)
    # Left padding: each row's last prompt token sits in column T-1, so the new tokens of
    # all rows form one column per step; the mask hides the padding from attention.
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        input_ids[b, T - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[b, T - len(prompt):] = 1
    return input_ids.to(device), attention_mask.to(device)


def cut_at_stop(new_tokens: torch.Tensor, stop_ids: set[int]) -> list[list[int]]:
    """Each row's tokens [B, steps] up to and including its first stop id (python lists: syncs the device)."""
    outputs = []
    for row in new_tokens.tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        outputs.append(row[:end])
    return outputs


def encode_prompt(tokenizer: data.Tokenizer, text: str, template: str = "plain") -> list[int]:
    """Token ids of a prompt as training reads it: the text as a row's instruction through the
    template (data.build_prompt; 'plain' leaves it as it is), then BOS if the tokenizer adds one."""
    data.check_template(template, tokenizer)
    # BOS (ChatGLM: [gMASK] sop) unless the chat template already wrote it.
    return tokenizer.add_prefix(tokenizer.encode(data.build_prompt(template, tokenizer, text)))


def generate_text(model, tokenizer: data.Tokenizer, texts: list[str], adapters: list[str | None], *,
                  template: str = "plain", **kw) -> list[str]:
    """Encode texts (encode_prompt), generate (stopping at the tokenizer's EOS ids, choosing only its
    ids), decode without special tokens."""
    prompts = [encode_prompt(tokenizer, text, template) for text in texts]
    kw = {"stop_ids": tokenizer.eos_ids, "pad_id": tokenizer.pad_id, "vocab_size": tokenizer.vocab_size, **kw}
    outputs = generate(model, prompts, adapters, **kw)
    return [tokenizer.decode(ids, skip_special=True) for ids in outputs]


# ----------------------------------------------------------------------------- command line

def unique_name(folder: str, taken: set[str]) -> str:
    """The folder's name as adapter name ('.' is not allowed in one); name-2, name-3 ... on a clash."""
    base = Path(folder).resolve().name.replace(".", "_")
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    return name


def read_training(adapter_dir) -> dict | None:
    """The adapter folder's training.json (None: it has none, e.g. an adapter trained elsewhere)."""
    file = Path(adapter_dir) / TRAINING_FILE
    if not file.exists():
        return None
    try:
        training = json.loads(file.read_text())
    except ValueError as e:
        raise ValueError(f"{file}: not JSON ({e})") from None
    if not isinstance(training, dict) or not isinstance(training.get("template"), str):
        raise ValueError(f"{file}: expected an object with a 'template' string")
    return training


def adapter_template(folder: str, template: str | None) -> tuple[str, str]:
    """(template, where it comes from) of an adapter's prompts: --template, else the one it was
    trained with (training.json beside it), else plain."""
    if template is not None:
        return template, "--template"
    training = read_training(folder)
    if training is None:
        print(f"note: {folder} has no {TRAINING_FILE}: its prompts go in as plain text "
              f"(--template NAME chooses one)")
        return "plain", "the default"
    return training["template"], str(Path(folder) / TRAINING_FILE)


def plan_rows(adapters: list[tuple[str, str, str]], with_base: bool, template: str | None
              ) -> list[tuple[str | None, str, str, str]]:
    """(adapter or None, template, where the template comes from, label) of each prompt's rows:
    each adapter with its own template; the bare base (with_base, or no adapter) with --template,
    else once per template the adapters use, so that it reads each prompt as they do."""
    rows = [(name, t, source, name) for name, t, source in adapters]
    if adapters and not with_base:
        return rows
    uses = {template or "plain": "--template" if template else "the default"}
    if adapters and template is None:
        uses = {}
        for _, t, source in adapters:
            uses.setdefault(t, source)
    return [(None, t, source, "base" if len(uses) == 1 else f"base, {Path(t).name}")
            for t, source in uses.items()] + rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Batched generation, one row per (prompt, adapter).")
    parser.add_argument("--base", required=True, help="Hugging Face checkpoint folder")
    parser.add_argument("--adapter", action="append", default=[], help="PEFT LoRA folder (repeatable)")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    parser.add_argument("--template", default=None,
                        help="each prompt as a row's instruction through this template, as a job's: alpaca, "
                             "chat, plain, mlora or a template file; default: each adapter's own "
                             f"({TRAINING_FILE} beside it), else plain (the text as it is)")
    parser.add_argument("--chat", action="store_true", help="the same as --template chat")
    parser.add_argument("--with-base", action="store_true", help="also answer each prompt with the bare base")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=None,
                        help="0 = greedy (the default); 1 when only --top-p or --seed is given")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep this much probability mass")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling RNG")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = parser.parse_args(argv)
    if args.chat:
        if args.template not in (None, "chat"):
            parser.error(f"--chat is --template chat; it cannot go with --template {args.template}")
        args.template = "chat"
    if args.temperature is None:  # greedy unless a sampling flag asks otherwise
        args.temperature = 1.0 if args.top_p < 1.0 or args.seed is not None else 0.0
    return args


def load(args: argparse.Namespace) -> tuple:
    """(tokenizer, model with the adapters, plan_rows' plan, {(prompt text, template): token ids})."""
    device = M.resolve_device(args.device)
    tokenizer = data.load_tokenizer(args.base)
    model = M.load_model(args.base, dtype=args.dtype or ("bfloat16" if device == "cuda" else "float32"), device=device)
    adapters = []
    for folder in args.adapter:
        name = peft_format.load_peft(model, folder, unique_name(folder, {a[0] for a in adapters}))
        adapters.append((name, *adapter_template(folder, args.template)))
    plan = plan_rows(adapters, args.with_base, args.template)
    prompts = {}
    for text in args.prompt:
        for _, template, source, _ in plan:
            try:
                prompts[text, template] = encode_prompt(tokenizer, text, template)
            except data.DataError as e:
                raise data.DataError(f"template of {source}: {e} (--template NAME chooses another)") from None
    return tokenizer, model, plan, prompts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        tokenizer, model, plan, prompts = load(args)
    except (FileNotFoundError, KeyError, ValueError) as e:  # data.DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.adapter:
        print("templates: " + ", ".join(f"{label} {template}" for _, template, _, label in plan))
    # Prompt-major rows, so the answers to one prompt print together.
    rows = [(text, name, template) for text in args.prompt for name, template, _, _ in plan]
    t0 = time.time()
    outputs = generate(model, [prompts[text, template] for text, _, template in rows], [name for _, name, _ in rows],
                       max_new_tokens=args.max_new_tokens, stop_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id,
                       temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                       vocab_size=tokenizer.vocab_size)  # python lists: synced
    elapsed = time.time() - t0
    for i, text in enumerate(args.prompt):
        print(f"\n=== prompt {i + 1}: {text!r}")
        for j, (_, _, _, label) in enumerate(plan):
            answer = tokenizer.decode(outputs[i * len(plan) + j], skip_special=True)
            print(f"[{label}] {answer}")
    n_tokens = sum(len(ids) for ids in outputs)
    print(f"\n{n_tokens} new tokens in {len(rows)} rows, {elapsed:.2f}s, {n_tokens / elapsed:.1f} tokens/s")
    return 0


if __name__ == "__main__":
    import tokenizer
    tokenizer.alarm_stops_templates()   # process-wide, here only: SIGALRM stops a chat template past its time
    sys.exit(main())
