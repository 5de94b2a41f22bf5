"""What a run reports: its jobs on held-out data (evaluate: the loss; evaluate_tasks: the task
score, generated), the metrics line of each step (log_step), and at the end summary.json,
run.json, loss.png, a table side by side (write_results) and a few held-out prompts answered by
the base and by each adapter (show_examples)."""
import json
import os
import re
import time
from pathlib import Path
from typing import NamedTuple

import torch

import data
import files
import generate
import lora
import peft_format
import scheduler
from config import CHOICE_METRICS, JobConfig
from eval import score as score_requests
from objectives import (METRIC_SUMS, job_loss, job_parts, loss_tokens, objective_of, reward_means,
                        token_losses)


@torch.no_grad()
def evaluate(model, job: JobConfig, examples: list, pad_id: int, device, rows: int = 8,
             packed: bool = True, d=None) -> tuple[float, dict | None]:
    """The job's adapter on held-out rows, `rows` of them (examples or pairs) per forward: its
    loss as in training over one step of all of them (SFT: the mean token loss; dpo/cpo: the
    mean pair loss) and its objective's metrics (reward_means: a preference job's mean rewards, margin, accuracy).
    d (data parallel, a dist.Dist): each rank takes every N-th forward, and the sums are summed over the ranks."""
    model.eval()
    step_loss_tokens = sum(loss_tokens(job, row) for row in examples)
    totals = torch.zeros(1 + METRIC_SUMS, dtype=torch.float64)
    starts = range(0, len(examples), rows)
    for start in starts if d is None else starts[d.rank::d.world]:
        chunk = examples[start:start + rows]
        batch = data.make_batch(job_parts(job, chunk), pad_id, packed).to(device)
        with lora.route(model, batch.adapter_names, lengths=batch.lengths, packed=batch.packed):
            token_nll, sequences = token_losses(model, batch)
        loss, rewards = job_loss(job, token_nll, sequences, len(chunk), step_loss_tokens, len(examples))
        totals += torch.cat([loss[None], rewards]).double().cpu()  # syncs the device
    if d is not None:
        d.sum_(totals)
    return totals[0].item(), reward_means(job, totals[1:].tolist())


class ChoiceRow(NamedTuple):
    """A multiple-choice test row (task_metric choice / choice_norm): each choice's tokens after the
    prompt (encoded as lm-eval encodes a continuation), the right one, each choice's length in characters."""
    choices: list[list[int]]
    answer: int
    chars: list[int]


def evaluate_tasks(model, tokenizer: data.Tokenizer, jobs: list[tuple[JobConfig, list[tuple[list[int], object]]]]
                   ) -> list[float]:
    """Each job's task score (the fraction of its held-out rows answered right). Generated answers:
    every such job's prompts in ONE generation batch, row i through its job's adapter
    (generate.generate, greedy), each job's answers cut at its task_max_new_tokens (greedy: as if
    generated alone). Multiple choice: every choice of every such job's rows scored in one fused
    pass (eval.score); a row is right when its answer has the highest log-likelihood (choice: lm-eval's
    acc) or the highest log-likelihood per character (choice_norm: acc_norm)."""
    scores = [0.0 for _ in jobs]
    generated = [(i, job, rows) for i, (job, rows) in enumerate(jobs) if job.task_metric not in CHOICE_METRICS and rows]
    chosen = [(i, job, rows) for i, (job, rows) in enumerate(jobs) if job.task_metric in CHOICE_METRICS and rows]
    if generated:
        outputs = iter(generate.generate(model, [ids for _, _, rows in generated for ids, _ in rows],
                                         [job.name for _, job, rows in generated for _ in rows],
                                         max_new_tokens=max(job.task_max_new_tokens for _, job, _ in generated),
                                         stop_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id,
                                         vocab_size=tokenizer.vocab_size))
        for i, job, rows in generated:
            right = sum(task_correct(job.task_metric, tokenizer.decode(next(outputs)[:job.task_max_new_tokens], skip_special=True),
                                     expected, job.task_pattern) for _, expected in rows)
            scores[i] = right / len(rows)
    if chosen:
        requests = [(job.name, ids, choice) for _, job, rows in chosen for ids, row in rows for choice in row.choices]
        likelihoods = iter(lp for lp, _ in score_requests(model, requests, max_length=max(len(c) + len(p) for _, p, c in requests)))
        for i, job, rows in chosen:
            right = 0
            for _, row in rows:
                lls = [next(likelihoods) for _ in row.choices]
                if job.task_metric == "choice_norm":
                    lls = [ll / n for ll, n in zip(lls, row.chars)]
                right += max(range(len(lls)), key=lls.__getitem__) == row.answer   # the first of ties, as numpy's argmax
            scores[i] = right / len(rows)
    return scores


def load_task_rows(path: str | Path, tokenizer: data.Tokenizer, template: str = "alpaca",
                   cutoff_len: int = 256, metric: str = "exact") -> list[tuple[list[int], object]]:
    """Held-out rows for task evaluation: per row {instruction, input?, output} (generated answers),
    or {instruction, input?, choices: [text, ...], answer: index} (metric choice / choice_norm), as
    (the prompt's token ids as training reads them (template, BOS; at most cutoff_len), the expected
    output or a ChoiceRow)."""
    path = Path(path)
    if data.jinja_template(template):
        raise data.DataError(f"{path}: a Jinja template renders whole rows, with no prompt to answer; "
                        f"task_metric needs another template")
    choice = metric in CHOICE_METRICS
    rows = []
    for where, row in data.numbered_rows(path, tokenizer, template):
        row = data.string_fields(where, row, ("instruction", "input") if choice else ("instruction", "input", "output"),
                                 optional=("input",))
        try:
            prompt = data.build_prompt(template, tokenizer, row["instruction"], row["input"])
        except data.DataError as e:
            raise data.DataError(f"{where}: {e}") from None
        ids = tokenizer.add_prefix(tokenizer.encode(prompt))[:cutoff_len]
        rows.append((ids, choice_row(where, row, tokenizer, prompt) if choice else row["output"]))
    return rows


def checked_choices(where: str, row: dict) -> tuple[list[str], int]:
    """A multiple-choice row's choices (at least 2 non-empty texts) and answer (an index into them)."""
    choices, answer = row.get("choices"), row.get("answer")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise data.DataError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise data.DataError(f"{where}: 'answer' must be the index of the right choice (0 to {len(choices) - 1}), got {answer!r}")
    return choices, answer


def choice_row(where: str, row: dict, tokenizer: data.Tokenizer, prompt: str) -> ChoiceRow:
    """A row's choices, each choice's tokens as the part of encode(prompt + choice) after
    encode(prompt) (lm-eval's way: a word that joins the prompt's last piece is tokenized as it
    would be in the text)."""
    choices, answer = checked_choices(where, row)
    context = tokenizer.encode(prompt)
    tokens = [tokenizer.encode(prompt + c)[len(context):] for c in choices]
    if not all(tokens):
        raise data.DataError(f"{where}: a choice encodes to no tokens of its own after the prompt")
    return ChoiceRow(tokens, answer, [len(c) for c in choices])


def choice_examples(path: str | Path, tokenizer: data.Tokenizer, job: JobConfig) -> list[data.Example]:
    """A multiple-choice test file (task_metric choice / choice_norm) as held-out SFT examples: each
    row's prompt with its right choice as the response, for the held-out loss."""
    examples = []
    for where, row in data.numbered_rows(Path(path), tokenizer, job.template):
        row = data.string_fields(where, row, ("instruction", "input"), optional=("input",))
        choices, answer = checked_choices(where, row)
        try:
            prompt, response = data.format_example(job.template, tokenizer, row["instruction"], row["input"], choices[answer])
        except data.DataError as e:
            raise data.DataError(f"{where}: {e}") from None
        examples.append(data.make_example(tokenizer, prompt, response, job.cutoff_len, False))
    return examples


def task_correct(metric: str, answer: str, expected: str, pattern: str | None = None) -> bool:
    """One generated answer (stripped) against a held-out row's output: exact (equal, stripped),
    contains (the stripped output is in it) or regex (re.fullmatch(pattern, answer))."""
    answer = answer.strip()
    if metric == "exact":
        return answer == expected.strip()
    if metric == "contains":
        return expected.strip() in answer
    if metric == "regex":
        return re.fullmatch(pattern, answer) is not None
    raise ValueError(f"task metric {metric!r}: expected exact, contains or regex")


def log_step(run, micro_batches: list, counts: list[int], elapsed: float, between_mb: float, step_mb: float):
    """Count the step (counts: its real and processed tokens), teach the memory model its peak,
    and log a line (every log_every steps)."""
    tokens, processed = counts
    run.step += 1
    run.tokens, run.padded_tokens = run.tokens + tokens, run.padded_tokens + processed
    run.peak_mb = max(run.peak_mb, between_mb, step_mb)
    for s in run.jobs.values():  # a job's peak: the run's peak while it was admitted
        s.peak_mb = max(s.peak_mb, between_mb, step_mb)
    # The memory model's prediction for this step, made before it ran (None until it has data).
    predicted_mb = None if run.sched.predicted_peak is None else run.sched.predicted_peak / 2**20
    prediction_error = None if predicted_mb is None else (predicted_mb - step_mb) / step_mb
    if prediction_error is not None:
        run.prediction_errors.append(prediction_error)
    run.sched.memory.observe(*run.sched.features(micro_batches), step_mb * 2**20)
    run.bar.update(len(micro_batches))
    if run.step % run.cfg.log_every:
        return
    jobs = {mb.job: run.jobs[mb.job] for mb in micro_batches}
    # A job shows no loss before its first optimizer step.
    run.bar.set_postfix({name: round(s.last_loss, 4) for name, s in jobs.items() if s.last_loss is not None})
    run.log({"step": run.step, "time": run.now(), "ms": 1000 * elapsed,
             "tokens": tokens, "padded_tokens": processed, "padding": 1 - tokens / processed,
             "tokens_per_s": tokens / max(elapsed, 1e-9),
             "peak_mem_mb": step_mb, "pred_peak_mb": predicted_mb, "mem_pred_error": prediction_error,
             "jobs": {name: job_record(s) for name, s in jobs.items()}})


def job_record(s) -> dict:
    """A job's part of a metrics line: its last optimizer step (a preference job's rewards too)."""
    record = {"step": s.step, "loss": s.last_loss, "lr": s.lr}
    # Its objective's metrics (none for SFT): null before its first step, as its loss.
    record.update(s.last_rewards or dict.fromkeys(objective_of(s.config).metrics))
    return record


def write_results(run):
    """Run totals (the seed's table's columns), summary.json, run.json, loss.png and a table."""
    run.peak_mb = max(run.peak_mb, scheduler.peak_memory(run.device))
    total_s = run.now()
    memory = run.sched.memory
    errors = run.prediction_errors
    totals = {"total_s": total_s, "steps": run.step, "tokens": run.tokens, "padded_tokens": run.padded_tokens,
              "padding": 1 - run.tokens / max(run.padded_tokens, 1), "tokens_per_s": run.tokens / max(total_s, 1e-9),
              "peak_mem_mb": run.peak_mb, "strategy": run.cfg.scheduler.strategy,
              # How well the memory model predicted each step's peak (relative error, predicted - measured).
              "mem_pred_mean_abs_error": sum(map(abs, errors)) / len(errors) if errors else None,
              # b0 + b1*tokens + b2*squares in bytes (scheduler.MemoryModel); null until enough
              # steps of 3+ shapes were measured.
              "mem_model": memory.coefficients, "mem_model_points": len(memory.points),
              "mem_model_shapes": len({p[0] for p in memory.points})}
    run.log({"run": totals})
    os.fsync(run.metrics.fileno())
    run.metrics.close()
    files.atomic_write(run.out_dir / "summary.json", json.dumps(run.summary, indent=2) + "\n")
    plot_losses(run.out_dir / "metrics.jsonl", run.out_dir / "loss.png")
    files.atomic_write(run.out_dir / "run.json", json.dumps(totals, indent=2) + "\n")   # last: the run is finished
    files.remove(run.out_dir / "checkpoint")
    # One row per job, side by side: its method, training and held-out loss (a preference job's
    # loss is its objective's), a preference job's held-out reward margin and accuracy, and where
    # any job has a task_metric, its held-out task score before and after.
    number = lambda value, digits=4: "-" if value is None else f"{value:.{digits}f}"
    tasks = any(job.task_metric for job in run.cfg.jobs)
    print(f"\n{'job':<16} {'method':<14} {'steps':>6} {'tokens':>8} {'latency s':>10} {'tokens/s':>9} "
          f"{'loss':>8} {'eval before':>12} {'eval':>8} {'margin':>7} {'accuracy':>8}"
          + (f" {'task before':>11} {'task':>6}" if tasks else ""))
    for name, s in run.summary.items():
        print(f"{name:<16} {method(next(j for j in run.cfg.jobs if j.name == name)):<14} {s['steps']:>6} {s['tokens']:>8} {s['latency_s']:>10.1f} "
              f"{s['tokens_per_s']:>9.1f} {number(s['final_loss']):>8} {number(s['initial_eval_loss']):>12} "
              f"{number(s['eval_loss']):>8} {number(s.get('eval_margin'), 3):>7} {number(s.get('eval_accuracy'), 2):>8}"
              + (f" {number(s.get('initial_eval_task'), 2):>11} {number(s.get('eval_task'), 2):>6}" if tasks else ""))
    print(f"total {total_s:.1f}s, {totals['tokens_per_s']:.0f} tokens/s, padding {100 * totals['padding']:.1f}%, "
          f"peak memory {run.peak_mb:.0f} MiB; adapters in {run.out_dir}/")
    show_examples(run)


EXAMPLE_TOKENS = 48   # new tokens of each answer in show_examples: enough to tell base and adapter apart
EXAMPLE_WIDTH = 100   # characters of a prompt or answer shown there


def example_prompts(run, name: str) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, expected answer ids) of the job's first show_examples held-out rows, as training
    read them (a pair's: its chosen answer); rows with no prompt (a Jinja template's) left out."""
    prefix = len(run.tokenizer.add_prefix([]))
    rows = []
    for row in run.test_sets[name][:run.cfg.show_examples]:
        example = row.chosen if isinstance(row, data.Pair) else row
        start = next(i for i, label in enumerate(example.labels) if label != data.IGNORE_INDEX)
        if start > prefix:
            rows.append((example.input_ids[:start], example.input_ids[start:]))
    return rows


def show_examples(run):
    """The first show_examples held-out prompts of each job with test_data, answered by the bare base
    and by its adapter (loaded back from out_dir/<job>): every row in ONE generation batch, greedy.
    Not for a sweep's trials (its table ranks them), nor a base sharded over ranks (its forward
    needs them all)."""
    if run.cfg.show_examples == 0 or run.cfg.shard_base:
        return
    trials = set(run.sweep.names) if run.sweep is not None else set()
    shown = {name: example_prompts(run, name) for name in run.summary if name in run.test_sets
             and name not in trials and (run.out_dir / name / "adapter_config.json").exists()}
    shown = {name: rows for name, rows in shown.items() if rows}
    if not shown:
        return
    prompts, adapters, index = [], [], {}
    for name, rows in shown.items():
        for prompt, _ in rows:
            for adapter in (None, name):   # the base's answer to a prompt that two jobs share is generated once
                if (tuple(prompt), adapter) not in index:
                    index[tuple(prompt), adapter] = len(prompts)
                    prompts.append(prompt)
                    adapters.append(adapter)
    tokenizer, t0 = run.tokenizer, time.time()
    for name in shown:
        peft_format.load_peft(run.model, run.out_dir / name, name)
    try:
        outputs = generate.generate(run.model, prompts, adapters, max_new_tokens=EXAMPLE_TOKENS,
                                    stop_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size)
    finally:
        for name in shown:
            lora.remove_adapter(run.model, name)
    text = lambda ids, keep_end=False: short(tokenizer.decode(ids, skip_special=True), keep_end)
    print(f"\nheld-out prompts, base vs adapter ({len(prompts)} rows in one batch, {time.time() - t0:.1f}s; "
          f"show_examples={run.cfg.show_examples}, 0 shows none):")
    for name, rows in shown.items():
        for prompt, expected in rows:
            print(f"{name}  > {text(prompt, keep_end=True)}\n    expected  {text(expected)}")
            for adapter in (None, name):
                print(f"    {adapter or 'base':<8}  {text(outputs[index[tuple(prompt), adapter]])}")


def short(text: str, keep_end: bool = False) -> str:
    """text on one line, at most EXAMPLE_WIDTH characters: its start (or, keep_end, its end: a prompt's question)."""
    text = " ".join(text.split())
    if len(text) <= EXAMPLE_WIDTH:
        return text
    return "..." + text[-EXAMPLE_WIDTH:] if keep_end else text[:EXAMPLE_WIDTH] + "..."


def method(job: JobConfig) -> str:
    """A job's method in a few characters: objective and LoRA variant (lora.VARIANTS' name; rsLoRA's
    scaling added), e.g. "dpo lora", "sft dora+", "sft rslora,pissa"."""
    variant = job.resolved_variant
    if job.use_rslora:
        variant = "rslora" if variant == "lora" else f"rslora,{variant}"
    return f"{job.objective} {variant}{'+' if job.loraplus_lr_ratio else ''}"


def metrics_records(metrics_file: Path) -> list[dict]:
    """metrics.jsonl's lines; a torn line (a process killed mid-write) is left out, with one warning."""
    records, torn = [], 0
    for line in metrics_file.read_bytes().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            torn += 1
    if torn:
        print(f"warning: {metrics_file}: {torn} torn line(s) left out")
    return records


def plot_losses(metrics_file: Path, png: Path):
    """One training-loss line per job (and its held-out loss as dots) against fused steps."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss.png")
        return
    curves, evals = {}, {}
    for record in metrics_records(metrics_file):
        for name, job in record.get("jobs", {}).items():
            if job["loss"] is not None:  # None until the job's first optimizer step
                curves.setdefault(name, []).append((record["step"], job["loss"]))
        if record.get("event") == "eval":
            evals.setdefault(record["job"], []).append((record["fused_step"], record["eval_loss"]))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, points in curves.items():
        line, = ax.plot(*zip(*points), label=f"{name} (train)")
        if name in evals:
            ax.plot(*zip(*evals[name]), "o--", color=line.get_color(), label=f"{name} (held-out)")
    ax.set_xlabel("fused step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    files.atomic_write(png, write=lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
