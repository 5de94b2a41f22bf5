"""Fine-tune many LoRA adapters at once on one frozen base: the one loop (config.py reads the
config; jobs.py admits, evaluates, stops and finishes the jobs around the steps).

    python train.py                                  the bundled demo (demo.py)
    python train.py --config cfg.json [--key=value ...] [--overwrite]
    python train.py --help-config                    every config field, its default and what it does
    python train.py --merge out/JOB --to DIR [--base DIR] [--quant nf4]   export base + adapter merged
    torchrun --nproc_per_node=N train.py --config cfg.json    N ranks (dist.py): gloo on CPUs, NCCL on GPUs

A run checkpoints to out_dir/checkpoint/ every `checkpoint_every` fused steps and on Ctrl-C
(SIGINT) or SIGTERM; rerunning the same command resumes it exactly. A different config into
a used out_dir is refused; --overwrite replaces that run's outputs (and only those).
Exit status: 0 done, 2 bad input (one line on stderr), 3 a job stopped on non-finite values,
4 another rank died or stalled (resumable), 128+N stopped by signal N (resumable).

Each step fuses the next micro-batches of several jobs into one batch (packed), runs one
forward and one backward through the shared base (each row routed to its job's adapter),
and steps each job's own optimizer when that job's gradient accumulation ends. A job's
objective is an entry of objectives.OBJECTIVES (job_loss); a DPO job's reference is the frozen
base itself: its pairs again, routed to no adapter, in the same fused batch.
"""
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import data
import lora
import model as M
import scheduler
from config import (ConfigError, JobConfig, RunConfig, SchedulerConfig, help_text, load_config,  # noqa: F401
                    parse_command_line, single_process_warnings, validate)
from jobs import (Fused, JobState, Run, admit_all, claim_and_lock, eval_due, evaluate_and_stop, finish,
                  finished_summary, load_base, open_run, prefetch_tasks, read_inputs, step_rows, stop_early)
from objectives import fuse_rows, job_losses, reward_means
from report import log_step, write_results


# ----------------------------------------------------------------------------- the steps

def get_lr(step: int, total_steps: int, job: JobConfig) -> float:
    """The lr of a job's optimizer step `step` (0-based: the steps it has taken), as transformers'
    get_{constant,linear,cosine}_schedule_with_warmup give a Trainer's step `step`: a linear warmup
    from 0 (step / warmup_steps), then constant, or decay to 0 at total_steps."""
    if step < job.warmup_steps:   # step 0 at lr 0, as in transformers: AdamW's moments start from its gradient
        return job.lr * (step / job.warmup_steps)
    progress = (step - job.warmup_steps) / max(1, total_steps - job.warmup_steps)
    if job.lr_schedule == "linear":
        return job.lr * max(0.0, 1 - progress)
    if job.lr_schedule == "cosine":
        return job.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return job.lr


def fused_step(model, jobs: list[JobConfig], examples: list[list], step_loss_tokens: list[int],
               generators: dict[str, torch.Generator], pad_id: int, device, packed: bool = True,
               check_finite: bool = False, step_rows: list[int] | None = None, fuse: bool | None = None,
               dropout_draw: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, data.Batch, bool]:
    """One forward and one backward over several jobs' micro-batches fused into one batch
    (packed: all sequences end to end in one row; else padded rows), each sequence routed to
    its job's adapter (a DPO job's reference copies to none: objectives.job_parts); returns each
    job's loss [k], its metric sums [k, METRIC_SUMS] (job_loss), its real and processed tokens
    [k, 2], the batch, and whether backward ran.

    examples[i] are job i's rows (examples, or pairs); step_loss_tokens[i] the loss tokens and
    step_rows[i] the rows of its whole optimizer step (None: each micro-batch is a whole step).
    check_finite: no backward when a job's loss is not finite (nonfinite.py runs the step again
    without that job; needed where adapters share matmuls). fuse, dropout_draw: how the LoRA
    layers compute (lora.route's; the same result).
    """
    fused = fuse_rows(jobs, examples, pad_id, packed, device)
    model.train()
    batch = fused.batch
    with lora.route(model, batch.adapter_names, lengths=batch.lengths, generators=generators, packed=batch.packed,
                    fuse=fuse, dropout_draw=dropout_draw):
        losses, rewards = job_losses(model, jobs, fused, examples, step_loss_tokens, step_rows)
        if check_finite and not bool(losses.isfinite().all()):  # syncs the device
            return losses.detach(), rewards, fused.counts, batch, False
        # Backward inside the routing block: a layer recomputed in backward (activation
        # checkpointing) reads the routing and redraws the same dropout masks.
        losses.sum().backward()
    return losses.detach(), rewards, fused.counts, batch, True


def optimizer_step(run: Run, s: JobState) -> str | None:
    """Clip, set the scheduled lr, step and clear the job's gradients (its accumulation ended).
    A non-finite loss or gradient skips the step, and a step that leaves non-finite weights is
    undone: returns why, and the job stops with its last finite weights."""
    params = lora.adapter_parameters(run.model, s.config.name)
    grads = [p.grad for p in params if p.grad is not None]
    if s.config.max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, s.config.max_grad_norm)
    else:
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=run.device)
    sums = torch.cat([s.loss_sum.float()[None], norm.float().to(s.loss_sum.device)[None], s.reward_sums.float()])
    loss, norm, *reward_sums = sums.tolist()  # syncs the device
    s.loss_sum, s.reward_sums = torch.zeros((), device=run.device), torch.zeros_like(s.reward_sums)
    if not math.isfinite(loss) or not math.isfinite(norm):
        s.optimizer.zero_grad(set_to_none=True)
        return f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {s.step + 1}"
    s.lr = get_lr(s.step, s.total_steps, s.config)
    for group in s.optimizer.param_groups:
        group["lr"] = s.lr * group.get("lr_ratio", 1.0)   # LoRA+: B's group runs at ratio x lr
    with torch.no_grad():
        before = torch._foreach_mul(params, 1.0)   # exact copies, in a few kernels (one per param: ~400 launches a job)
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    if not math.isfinite(torch.nn.utils.get_total_norm(params, norm_type=math.inf).item()):  # max |w|: no overflow
        with torch.no_grad():
            torch._foreach_copy_(params, before)
        return f"non-finite weights after step {s.step + 1} (undone)"
    s.last_loss, s.last_rewards = loss, reward_means(s.config, reward_sums)
    s.step += 1
    return None


# ----------------------------------------------------------------------------- the loop's named steps

def forward_backward(run: Run, micro_batches: list, check_finite: bool = False) -> Fused:
    """The fused step over these micro-batches of the run's jobs (fused_step)."""
    step = step_rows(run, micro_batches)
    losses, rewards, counts, _, stepped = fused_step(run.model, step.jobs, step.rows, step.loss_tokens,
                                                     step.generators, run.pad_id, run.device, run.cfg.packing,
                                                     check_finite, step.step_rows, *lora_path(run))
    return Fused(micro_batches, losses, rewards, counts, stepped)


def lora_path(run: Run) -> tuple[bool, str]:
    """How the LoRA layers compute (the run options fuse_adapters, dropout_draw): route's fuse, dropout_draw."""
    return lora.concatenates(run.device, run.cfg.fuse_adapters), run.cfg.dropout_draw


def accumulate(run: Run, fused: Fused) -> list[JobState]:
    """Add the step's losses and tokens to each job's optimizer step; the jobs whose step ends here."""
    ending = []
    for mb, loss, reward_sums, (tokens, processed) in zip(fused.micro_batches, fused.losses, fused.rewards,
                                                           fused.counts.tolist()):
        s = run.jobs[mb.job]
        s.loss_sum, s.reward_sums = s.loss_sum + loss, s.reward_sums + reward_sums
        s.tokens, s.padded_tokens = s.tokens + tokens, s.padded_tokens + processed
        if mb.last_in_step:
            ending.append(s)
    return ending


def optimize(run: Run, ending: list[JobState]) -> list[JobState]:
    """Each ending job's optimizer step (optimizer_step); a non-finite one stops the job. Returns those that stepped."""
    stepped = []
    for s in ending:
        reason = optimizer_step(run, s)
        if reason:
            stop_early(run, s, reason, nonfinite=True)
        else:
            stepped.append(s)
    return stepped


def evaluate_jobs(run: Run, stepped: list[JobState]):
    """Held-out evaluation where due, and early stopping; the task scores of all jobs evaluating
    now are generated in one batch (adapters are apart: evaluating after all steps changes nothing)."""
    prefetch_tasks(run, [s.config.name for s in stepped if eval_due(s)])
    for s in stepped:
        reason = evaluate_and_stop(run, s)
        if reason:
            stop_early(run, s, reason)


def finish_jobs(run: Run):
    """Jobs whose schedule ended (or that stopped): saved, their slots freed for waiting jobs."""
    finished = run.sched.pop_finished()
    prefetch_tasks(run, finished)
    for name in finished:
        finish(run, name)
    run.task_scores = {}


@dataclass
class Steps:
    """The loop's named steps. core_steps() gives the core's; a layer chosen once at the start
    (train(): torchrun, sweeps, CUDA graphs, resume, non-finite isolation) replaces or wraps one."""
    more: Callable[[Run], bool]                  # whether another turn runs
    turn: Callable[[Run], None]                  # one turn: train_step
    admit: Callable[[Run, list[str]], None]      # jobs the scheduler admitted into free slots
    forward_backward: Callable[..., Fused]       # (run, micro-batches, check_finite=False): one fused step
    peaks: Callable[[Run, float, float], tuple[float, float]]   # the memory peaks the step learns from
    optimize: Callable[[Run, list[JobState]], list[JobState]]   # optimizer steps whose accumulation ended
    evaluate: Callable[[Run, list[JobState]], None]             # held-out evaluation, early stopping
    finish: Callable[[Run], None]                # finished jobs saved, slots freed
    results: Callable[[Run], None]               # the run's outputs at the end (report.write_results)
    after_turn: Callable[[Run], None]            # what follows a turn (resume: a checkpoint when due)


def core_steps() -> Steps:
    return Steps(more=lambda run: not run.sched.done, turn=train_step, admit=admit_all,
                 forward_backward=forward_backward, peaks=lambda run, between, step: (between, step),
                 optimize=optimize, evaluate=evaluate_jobs, finish=finish_jobs, results=write_results,
                 after_turn=lambda run: None)


def train_step(run: Run):
    """Admit waiting jobs, run one fused step over the next micro-batches of several jobs, step
    the optimizers whose accumulation ended, evaluate, log, finish the jobs that are done."""
    steps = run.steps
    steps.admit(run, run.sched.admit())
    if run.sched.candidates:   # else only jobs with nothing to train (max_steps=0) were left
        t0 = time.time()
        micro_batches = run.sched.next_step()
        # The window since the last backward (optimizer steps, evals, admissions) counts toward
        # the peaks too; then a fresh window for this step, whose peak the memory model learns.
        between_mb = scheduler.peak_memory(run.device)
        scheduler.reset_peak_memory(run.device)
        fused = steps.forward_backward(run, micro_batches)
        between_mb, step_mb = steps.peaks(run, between_mb, scheduler.peak_memory(run.device))
        if fused.micro_batches:
            stepped = steps.optimize(run, accumulate(run, fused))
            steps.evaluate(run, stepped)
            log_step(run, fused.micro_batches, fused.counts.sum(0).tolist(), time.time() - t0, between_mb, step_mb)
        else:   # every job of the step stopped on a non-finite loss
            run.step += 1
    steps.finish(run)


def train_loop(run: Run):
    """Turns until every job is done, each followed by its after_turn step."""
    try:
        while run.steps.more(run):
            run.steps.turn(run)
            run.ticks += 1
            run.steps.after_turn(run)
    finally:   # the progress bar ends its line before an error is printed under it
        run.bar.close()


# ----------------------------------------------------------------------------- the entry: train() and main() pick the layers

def train(cfg: RunConfig, overwrite: bool = False) -> dict:
    """Train every job of `cfg`; returns the per-job summary (also in out_dir/summary.json).

    Everything is checked before out_dir is touched: the config, the base folder, every data
    row, and what out_dir holds (claim_out_dir). An unfinished run of the same config there is
    resumed from its checkpoint; `overwrite` replaces a previous run's outputs instead.
    Here the run's layers are picked: a sweep's trials (sweep.py), torchrun's ranks (dist.py),
    resume (state.py), CUDA graphs (graphs.py), non-finite isolation (nonfinite.py).
    """
    import dist
    import sweep
    validate(cfg, "config")
    cfg = sweep.expand(cfg, "config")   # its trials become jobs
    d = dist.setup(cfg.device, cfg.dist_timeout_s)
    if d is None:
        return train_on(cfg, overwrite)
    with dist.leaving(d):   # the process group left together, or at once after an error
        return train_on(cfg, overwrite, d)


def train_on(cfg: RunConfig, overwrite: bool, d=None) -> dict:
    """train() in this process (one of torchrun's ranks when d is a dist.Dist)."""
    import dist
    import state
    run, saved = start(cfg, overwrite) if d is None else dist.start(cfg, overwrite, d)
    if run is None:   # out_dir holds the finished run: `saved` is its summary
        return saved
    with run.lock:   # out_dir is this run's until it ends (files.lock_dir)
        run.steps = core_steps()
        if d is not None:
            dist.add_ranks(run)
        add_layers(run)
        if saved is not None:
            state.restore(run, saved)
        with state.signals_checkpoint(run):
            train_loop(run)
        run.steps.results(run)
    return run.summary


def start(cfg: RunConfig, overwrite: bool) -> tuple[Run | None, dict | None]:
    """The inputs read and checked, out_dir claimed (and its checkpoint read, to resume), the
    base loaded, the Run opened: (run, the checkpoint or None); a finished run: (None, its summary)."""
    import state
    read = read_inputs(cfg)
    for line in single_process_warnings(cfg):
        print(line)
    mode, lock = claim_and_lock(cfg, overwrite)
    if mode == "finished":
        return None, finished_summary(cfg)
    saved = state.read_checkpoint(Path(cfg.out_dir), read["inputs"]) if mode == "resume" else None
    device = M.resolve_device(cfg.device)
    run = open_run(cfg, read, load_base(cfg, device), device, mode, saved is not None)
    run.lock = lock
    return run, saved


def add_layers(run: Run):
    """The layers on the loop's steps that a run's options ask for (one process or each rank):
    a sweep's rungs, resume's checkpoints, the fixed-shape step (cuda_graphs), and non-finite
    isolation where adapters share matmuls."""
    import dist
    import graphs
    import nonfinite
    import state
    import sweep
    if run.cfg.sweep is not None:
        sweep.add_rungs(run)
    run.steps.after_turn = state.checkpoint_turn
    if run.cfg.cuda_graphs and not dist.rows_apart(run):
        run.steps.forward_backward = graphs.fixed_shape(run.steps.forward_backward)
    if lora.concatenates(run.device, run.cfg.fuse_adapters) or run.cfg.cuda_graphs:
        run.steps.forward_backward = nonfinite.isolating(run.steps.forward_backward)


def main(argv: list[str]) -> int:
    """`python train.py [--config FILE] [--key=value ...] [--overwrite]`, `--merge`, `--help(-config)`:
    see this file's docstring. Returns the exit status."""
    import demo
    import dist
    from export import export_merged
    from state import Interrupted
    try:
        command = parse_command_line(argv)
        if command.action == "help":
            print(__doc__.strip() if command.config is None else help_text())
        elif command.action == "merge":
            merge = command.merge
            export_merged(merge["merge"], merge["to"], merge.get("base"), merge.get("quant"))
        elif command.config is None:
            return nonfinite_status(demo.run(train, command.overrides, command.overwrite))
        else:
            cfg = demo.load_config_file(command.config, command.overrides)
            summary = train(cfg, command.overwrite)
            if Path(command.config).resolve() == demo.CONFIG.parent / "methods.json":
                demo.show_methods(cfg, summary)
            return nonfinite_status(summary)
    except (ConfigError, data.DataError, M.CheckpointError, FileNotFoundError) as e:
        if dist.first_rank():   # under torchrun the ranks agreed on it: rank 0 says it
            print(f"error: {e}", file=sys.stderr)
        return 2
    except dist.RankLost as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    except Interrupted as e:
        if dist.first_rank():   # all ranks stopped alike
            print(f"stopped by {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("interrupted before training started: nothing to resume", file=sys.stderr)
        return 130
    return 0


def nonfinite_status(summary: dict) -> int:
    """3 when a job stopped on non-finite values (each keeps its last finite adapter), else 0."""
    bad = [name for name, s in summary.items() if s.get("nonfinite")]
    if bad:
        print(f"error: non-finite loss, gradient or weights stopped {', '.join(bad)} (see summary.json; "
              f"each keeps its last finite adapter)", file=sys.stderr)
    return 3 if bad else 0


def exit_with(status: int):
    """sys.exit; but with a rank lost (4), leave at once: tearing the process group down with a
    dead peer can abort in gloo's threads, which would replace our exit status."""
    if status == 4:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    # Process-wide settings, set here only: the allocator keeps freed memory for the next step
    # (scheduler.keep_freed_memory), and SIGALRM stops a chat template past its time (tokenizer.py).
    import tokenizer
    scheduler.keep_freed_memory()
    tokenizer.alarm_stops_templates()
    exit_with(main(sys.argv[1:]))
