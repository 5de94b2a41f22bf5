"""Evaluate a base and many LoRA adapters of it in ONE fused pass, through lm-evaluation-harness.

    python eval.py --base DIR --adapter out/demo/french --adapter out/demo/json \\
        --tasks arc_tiny,boolq_tiny,qa_tiny --include_path tasks [--limit N] [--batch_size 8]

lm-eval (`pip install lm-eval`, 0.4.x) builds each task's requests and scores the answers; this
file answers them. FusedLM is an lm-eval model (registered as "fused-lora") for one adapter (or
the base); all of them share one Evaluation, which holds the base once with every adapter on it.
The first adapter's run asks for a request's answer; the Evaluation then answers it for EVERY
adapter at once, and the other adapters' runs find their answers computed:
- loglikelihood / loglikelihood_rolling: every (adapter, context, continuation) row packed end to
  end, many per forward (score: each row routed to its adapter, logits only where a continuation
  token is predicted), the arithmetic of lm-eval's `hf` model (its encoding, truncation, windows);
- generate_until: every (adapter, context) row in one batched generation (generate.generate),
  greedy, cut at the task's stop strings as lm-eval cuts them.
lm-eval then computes each adapter's metrics as usual. Prints one table with a column per
adapter and writes every adapter's results to one JSON (--out).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

import data
import generate
import lora
import model as M
import peft_format

REGISTERED_NAME = "fused-lora"


# ----------------------------------------------------------------------------- scoring

def score(model, requests: list[tuple[str | None, list[int], list[int]]], max_length: int,
          rows_per_forward: int = 64, tokens_per_forward: int = 8192) -> list[tuple[float, bool]]:
    """(log p(continuation | context), whether greedy decoding gives the continuation) of each
    request (adapter name or None for the base, context ids, continuation ids), as lm-eval's `hf`
    model computes it: the row (context + continuation) cut to its last max_length + 1 tokens
    with the last dropped, the continuation's log-probabilities read at its last positions
    (log_softmax in fp32 over the model's whole output). Rows go longest first, packed end to
    end (data.pack's layout) up to rows_per_forward rows and tokens_per_forward tokens a forward;
    each row through its own adapter."""
    rows = []
    for i, (name, context, continuation) in enumerate(requests):
        if not continuation or len(continuation) > max_length:
            raise ValueError(f"request {i}: a continuation of {len(continuation)} tokens (expected 1 to max_length {max_length})")
        if not context:
            raise ValueError(f"request {i}: an empty context (lm-eval puts the prefix token there)")
        whole = (context + continuation)[-(max_length + 1):]
        rows.append((name, whole[:-1], whole[-len(continuation):]))
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][1]))
    adapter_order = {name: n for n, name in enumerate(dict.fromkeys(name for name, _, _ in rows))}
    results: list = [None] * len(rows)
    was_training = model.training
    model.eval()
    try:
        start = 0
        while start < len(order):
            chunk, tokens = [], 0
            for i in order[start:start + rows_per_forward]:
                if chunk and tokens + len(rows[i][1]) > tokens_per_forward:
                    break
                chunk.append(i)
                tokens += len(rows[i][1])
            start += len(chunk)
            chunk.sort(key=lambda i: adapter_order[rows[i][0]])       # a packed row holds each adapter's rows together
            lengths = [len(rows[i][1]) for i in chunk]
            ids = torch.tensor([t for i in chunk for t in rows[i][1]], device=device)[None]   # [1, T]
            keep = torch.zeros_like(ids, dtype=torch.bool)
            end = 0
            for i, n in zip(chunk, lengths):
                end += n
                keep[0, end - len(rows[i][2]):end] = True            # positions that predict the continuation
            targets = torch.tensor([t for i in chunk for t in rows[i][2]], device=device)   # [N]
            with torch.no_grad(), lora.route(model, [rows[i][0] for i in chunk], lengths=lengths, packed=True):
                logits = model(ids, output_mask=keep, segments=tuple(lengths))          # [N, V]
            logp = torch.log_softmax(logits.float(), dim=-1)
            token_logp = logp.gather(1, targets[:, None])[:, 0].cpu()
            greedy = (logp.argmax(dim=-1) == targets).cpu()
            for i, lp, g in zip(chunk, token_logp.split([len(rows[i][2]) for i in chunk]),
                                greedy.split([len(rows[i][2]) for i in chunk])):
                results[i] = (lp.sum().item(), bool(g.all()))
    finally:
        model.train(was_training)
    return results


class Evaluation:
    """One base with every adapter on it, and every answer computed so far. A request asked for
    one adapter is answered for all of them in the same fused pass (names: the adapters, None the
    base), so k adapters' lm-eval runs cost one pass over the requests."""

    def __init__(self, model, tokenizer: data.Tokenizer, names: list[str | None], max_length: int,
                 batch_size: int = 8, max_gen_toks: int = 256):
        self.model, self.tokenizer, self.names = model, tokenizer, names
        self.max_length, self.batch_size, self.max_gen_toks = max_length, batch_size, max_gen_toks
        self.answers: dict = {}
        self.passes = {"loglikelihood": 0, "generate_until": 0}   # fused passes run (tests, the summary)

    def loglikelihoods(self, name: str | None, pairs: list[tuple[tuple, tuple]]) -> list[tuple[float, bool]]:
        missing = [pair for pair in dict.fromkeys(pairs) if ("ll", name, pair) not in self.answers]
        if missing:
            requests = [(each, list(context), list(continuation)) for context, continuation in missing
                        for each in self.names]
            scores = score(self.model, requests, self.max_length, rows_per_forward=self.batch_size * len(self.names))
            for (each, context, continuation), result in zip(requests, scores):
                self.answers["ll", each, (tuple(context), tuple(continuation))] = result
            self.passes["loglikelihood"] += 1
        return [self.answers["ll", name, pair] for pair in pairs]

    def generations(self, name: str | None, prompts: list[tuple], settings: tuple) -> list[str]:
        """Decoded new text of each prompt (token ids) with settings (max new tokens, temperature,
        top_p, seed): every adapter's rows in batched generations of batch_size prompts each."""
        missing = [p for p in dict.fromkeys(prompts) if ("gen", name, p, settings) not in self.answers]
        max_new, temperature, top_p, seed = settings
        tok = self.tokenizer
        for start in range(0, len(missing), self.batch_size):
            part = missing[start:start + self.batch_size]
            rows = [(each, prompt) for prompt in part for each in self.names]
            outputs = generate.generate(self.model, [list(p) for _, p in rows], [each for each, _ in rows],
                                        max_new_tokens=max_new, stop_ids=tok.eos_ids, pad_id=tok.pad_id,
                                        temperature=temperature, top_p=top_p, seed=seed, vocab_size=tok.vocab_size)
            for (each, prompt), ids in zip(rows, outputs):
                self.answers["gen", each, prompt, settings] = tok.decode(ids, skip_special=True)
        if missing:
            self.passes["generate_until"] += 1
        return [self.answers["gen", name, p, settings] for p in prompts]


def load_evaluation(base: str, adapters: list[str], *, dtype: str | None = None, device: str = "auto",
                    max_length: int | None = None, batch_size: int = 8, with_base: bool = True) -> Evaluation:
    """The base loaded once, every PEFT adapter folder on it (named as generate.py names them)."""
    device = M.resolve_device(device)
    tokenizer = data.load_tokenizer(base)
    model = M.load_model(base, dtype=dtype or ("bfloat16" if device == "cuda" else "float32"), device=device)
    names: list[str | None] = [None] if with_base else []
    for folder in adapters:
        names.append(peft_format.load_peft(model, folder, generate.unique_name(folder, set(names) - {None})))
    if max_length is None:
        cfg = model.config
        max_length = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "seq_length", None) or 2048
    return Evaluation(model, tokenizer, names, max_length, batch_size)


# ----------------------------------------------------------------------------- lm-eval's model

def import_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise SystemExit("eval.py needs lm-evaluation-harness: pip install lm-eval") from None
    return lm_eval


class FusedLMMethods:
    """One adapter (None: the base) of an Evaluation, as an lm-eval model: FusedLM is this over
    lm-eval's TemplateLM (fused_lm_class). Alone (`lm_eval.simple_evaluate(model="fused-lora",
    model_args="base=DIR,adapter=DIR")`) it loads its own Evaluation of that one adapter."""

    def __init__(self, evaluation: Evaluation | None = None, name: str | None = None, base: str | None = None,
                 adapter: str | None = None, batch_size: int | str = 8, max_length: int | None = None,
                 dtype: str | None = None, device: str = "auto", **unused):
        super().__init__()
        if evaluation is None:
            if base is None:
                raise ValueError(f"{REGISTERED_NAME}: model_args needs base=DIR (and adapter=DIR for an adapter)")
            size = 8 if batch_size in (None, "auto") else int(str(batch_size).split(":")[0])
            evaluation = load_evaluation(base, [adapter] if adapter else [], dtype=dtype, device=device,
                                         max_length=max_length, batch_size=size, with_base=not adapter)
            name = evaluation.names[-1]
        self.evaluation, self.name = evaluation, name

    @property
    def tokenizer_name(self) -> str:
        return REGISTERED_NAME

    @property
    def eot_token_id(self) -> int:
        return self.evaluation.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:   # as lm-eval's hf model: BOS, else EOS
        tok = self.evaluation.tokenizer
        return tok.bos_id if tok.bos_id is not None else tok.eos_id

    @property
    def max_length(self) -> int:
        return self.evaluation.max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kw):
        """As the hf model's tokenizer.encode: the tokenizer's own BOS unless told otherwise or
        the string starts with it."""
        tok = self.evaluation.tokenizer
        bos = tok.add_bos if add_special_tokens is None else add_special_tokens and bool(tok.prefix_ids)
        if add_special_tokens is None and tok.bos_token and string.startswith(tok.bos_token):
            bos = False
        ids = tok.encode(string, bos=bos)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.evaluation.tokenizer.decode(tokens if isinstance(tokens, list) else [tokens],
                                                skip_special=skip_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw):
        pairs = [(tuple(context), tuple(continuation)) for _, context, continuation in requests]
        results = self.evaluation.loglikelihoods(self.name, pairs)
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The whole text's log-likelihood in lm-eval's disjoint windows of max_length tokens."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        windows = [[tuple(map(tuple, make_disjoint_window(w))) for w in get_rolling_token_windows(
            token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
            max_seq_len=self.max_length, context_len=1)] for (text,) in (r.args for r in requests)]
        scores = iter(self.evaluation.loglikelihoods(self.name, [w for each in windows for w in each]))
        totals = [sum(next(scores)[0] for _ in each) for each in windows]
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        answers = []
        for context, gen_kwargs in (r.args for r in requests):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.evaluation.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = kwargs.pop("max_gen_toks")
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            settings = (max_new, temperature, float(kwargs.pop("top_p", 1.0)), 1234)
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks {max_new} must be below the model's max_length {self.max_length}")
            prompt = tuple(self.tok_encode(context, left_truncate_len=self.max_length - max_new))
            answers.append((prompt, settings, until))
        # all requests of one setting in one call, so the Evaluation batches them together
        texts: dict = {}
        for settings in dict.fromkeys(s for _, s, _ in answers):
            prompts = [p for p, s, _ in answers if s == settings]
            texts.update({(p, settings): t for p, t in zip(prompts, self.evaluation.generations(self.name, prompts, settings))})
        results = [postprocess_generated_text(generation=texts[p, s], stop=until, think_end_token=None)
                   for p, s, until in answers]
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("generate_until", request.args, result)
        return results


def fused_lm_class():
    """FusedLM (FusedLMMethods over lm-eval's TemplateLM), made and registered with lm-eval as
    "fused-lora" on first use, so that this module imports without lm-eval (report.py uses score)."""
    global FusedLM
    if "FusedLM" not in globals():
        import_lm_eval()
        from lm_eval.api.model import TemplateLM
        from lm_eval.api.registry import register_model
        FusedLM = register_model(REGISTERED_NAME)(type("FusedLM", (FusedLMMethods, TemplateLM), {}))
    return FusedLM


# ----------------------------------------------------------------------------- running tasks

def evaluate(evaluation: Evaluation, tasks: list[str], *, include_path: str | None = None, limit: float | None = None,
             num_fewshot: int | None = None, bootstrap_iters: int = 0) -> dict[str, dict]:
    """lm-eval's simple_evaluate of every adapter (and the base) of the evaluation, by name
    ("base" for None): the first run computes every adapter's answers (fused), the rest read them."""
    lm_eval = import_lm_eval()
    from lm_eval.tasks import TaskManager
    lm_class = fused_lm_class()
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or not set(tasks) <= set(manager.all_tasks):   # lm-eval's own tasks too (seconds to index)
        manager = TaskManager(include_path=include_path)
    results = {}
    for name in evaluation.names:
        lm = lm_class(evaluation, name)
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                                      task_manager=manager, bootstrap_iters=bootstrap_iters, log_samples=False,
                                      batch_size=evaluation.batch_size)
        results["base" if name is None else name] = out
    return results


def side_by_side(results: dict[str, dict]) -> str:
    """A markdown table: one row per task and metric, one column per adapter."""
    names = list(results)
    rows = {}
    for name, out in results.items():
        for task, metrics in out["results"].items():
            for key, value in metrics.items():
                metric = key.partition(",")[0]
                if isinstance(value, (int, float)) and "," in key and not metric.endswith("_stderr"):   # metric,filter
                    rows.setdefault((task, key), {})[name] = value
    lines = ["| task | metric | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for (task, key), values in rows.items():
        cells = [f"{values[n]:.4f}" if n in values else "-" for n in names]
        lines.append(f"| {task} | {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the base checkpoint folder")
    p.add_argument("--adapter", action="append", default=[], help="a PEFT adapter folder (repeat for more)")
    p.add_argument("--tasks", required=True, help="comma list of lm-eval task names (tasks/: arc_tiny, boolq_tiny, qa_tiny)")
    p.add_argument("--include_path", default=None, help="a folder of task YAMLs (default: this repo's tasks/)")
    p.add_argument("--limit", type=float, default=None, help="at most this many documents a task (or a fraction < 1)")
    p.add_argument("--num_fewshot", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=8, help="requests a forward (or a generation) per adapter")
    p.add_argument("--max_length", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--no_base", action="store_true", help="the adapters only, not the base alone")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="eval_results.json", help="every adapter's results in one JSON")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch_size must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import_lm_eval()
    include = args.include_path or str(Path(__file__).resolve().parent / "tasks")
    try:
        evaluation = load_evaluation(args.base, args.adapter, dtype=args.dtype, device=args.device,
                                     max_length=args.max_length, batch_size=args.batch_size, with_base=not args.no_base)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from lm_eval.utils import handle_non_serializable
    results = evaluate(evaluation, [t for t in args.tasks.split(",") if t], include_path=include,
                       limit=args.limit, num_fewshot=args.num_fewshot)
    print(side_by_side(results))
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({name: {k: r[k] for k in ("results", "versions", "n-shot", "higher_is_better") if k in r}
                               for name, r in results.items()}, indent=2, default=handle_non_serializable) + "\n")
    tmp.replace(out)
    print(f"wrote {out} ({len(results)} models, {evaluation.passes['loglikelihood']} fused scoring passes, "
          f"{evaluation.passes['generate_until']} fused generation passes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
