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
objective is SFT, DPO or CPO (job_loss); a DPO job's reference is the frozen base itself:
its pairs again, routed to no adapter, in the same fused batch.
"""
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch

import data
import dist
import files
import graphs
import lora
import model as M
import sweep
from export import MERGE_MARKER, export_merged  # noqa: F401
from objectives import (job_loss, job_parts, loss_tokens, reward_means, sequence_lengths,  # noqa: F401
                        task_correct, token_losses)
from config import (ConfigError, JobConfig, RunConfig, SchedulerConfig, claim_out_dir, clear_run,  # noqa: F401
                    file_digest, load_config, remove_partial_writes, validate)
from jobs import admit_all, eval_due, evaluate_and_stop, finish, park, prefetch_tasks, reach_rung, settle_rungs, stop_early
from scheduler import JobPlan, Scheduler
from data import PAD_MULTIPLE, make_batch  # noqa: F401
from report import evaluate, evaluate_tasks, log_step, plot_losses, write_results  # noqa: F401
from state import Interrupted, JobState, Run, make_optimizer, read_checkpoint, restore, save_checkpoint  # noqa: F401


# ----------------------------------------------------------------------------- helpers

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


def load_rows(job: JobConfig, path: str, tokenizer: data.Tokenizer, train_on_inputs: bool) -> list:
    """A job's data file: SFT examples, or preference pairs for dpo/cpo."""
    if job.objective == "sft":
        return data.load_job_data(path, tokenizer, job.template, job.cutoff_len, train_on_inputs)
    return data.load_pairs(path, tokenizer, job.template, job.cutoff_len)


# ----------------------------------------------------------------------------- the steps

def fused_step(model, jobs: list[JobConfig], examples: list[list], step_loss_tokens: list[int],
               generators: dict[str, torch.Generator], pad_id: int, device, packed: bool = True,
               check_finite: bool = False, step_rows: list[int] | None = None, share: dict | None = None,
               reduce=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, data.Batch | None, bool]:
    """One forward and one backward over several jobs' micro-batches fused into one batch
    (packed: all sequences end to end in one row; else padded rows), each sequence routed as
    job_parts says (its job's adapter; a DPO job's reference copies to none); returns each job's
    loss [k], its reward sums [k, 4] (job_loss), its real and processed tokens [k, 2], the
    batch (None: nothing here), and whether backward ran.

    examples[i] are job i's rows (examples, or pairs); step_loss_tokens[i] the loss tokens and
    step_rows[i] the rows of its whole optimizer step (None: each micro-batch is a whole step).
    check_finite: no backward when a job's loss is not finite (the caller drops that job and
    runs the step again without it). Needed where adapters share matmuls (lora.concatenates):
    there a NaN row would reach every adapter's gradient as 0 x NaN.
    Data parallel (split_step): `examples` are this rank's rows (a job may have none here),
    `share` routes their dropout, and reduce(stats) sums the losses, rewards and token counts
    over the ranks before the finite check; backward stays this rank's part.
    """
    k = len(jobs)
    share = dict(share or {"dropout_tokens": None, "elsewhere": (), "stand_ins": ()})
    # A sharded base (FSDP2) gathers each block's weights from all ranks in every forward and
    # backward: every rank must run the same blocks, so a job with no rows here gets one
    # 1-token row without labels (routed to its adapter; it adds nothing to any loss).
    stand_ins = share.pop("stand_ins")
    parts = [job_parts(job, rows) if rows else [(job.name, [data.Example([pad_id], [data.IGNORE_INDEX])])]
             if job.name in stand_ins else [] for job, rows in zip(jobs, examples)]
    sequences = [sum(len(seqs) for _, seqs in job_part) for job_part in parts]
    model.train()
    losses = torch.zeros(k, device=device)
    rewards = torch.zeros(k, 4, device=device)
    counts = torch.zeros(k, 2, dtype=torch.long)   # on the CPU: bookkeeping
    if not any(sequences):   # data parallel: nothing here this step; the dropout streams still advance
        with lora.route(model, [], generators=generators, elsewhere=tuple(job.name for job in jobs)):
            pass
        stats = reduce(torch.cat([losses[:, None], rewards, counts.to(device)], 1))
        return stats[:, 0], stats[:, 1:5], stats[:, 5:].long().cpu(), None, False
    batch = make_batch([part for job_part in parts for part in job_part], pad_id, packed).to(device)
    job_of_row = torch.tensor([i for i, n in enumerate(sequences) for _ in range(n)], device=device)
    first_row = [sum(sequences[:i]) for i in range(k)]
    step_rows = step_rows or [len(rows) for rows in examples]
    for i, lengths in enumerate(batch.lengths.split(sequences)):   # real tokens, and processed (padding too)
        if not examples[i]:   # a stand-in row
            continue
        counts[i, 0] = lengths.sum()
        counts[i, 1] = lengths.sum() if batch.packed else len(lengths) * batch.input_ids.size(1)
    with lora.route(model, batch.adapter_names, lengths=batch.lengths, generators=generators, packed=batch.packed,
                    **share):
        token_nll, rows = token_losses(model, batch)
        token_job = job_of_row[rows]
        here = [i for i in range(k) if examples[i]]
        results = [job_loss(jobs[i], token_nll[token_job == i], rows[token_job == i] - first_row[i],
                            len(examples[i]), step_loss_tokens[i], step_rows[i]) for i in here]
        local = losses
        if here:
            local = losses.index_put((torch.tensor(here, device=device),), torch.stack([loss for loss, _ in results]))
            rewards[here] = torch.stack([reward_sums for _, reward_sums in results]).detach()
        if stand_ins:   # backward through the whole batch, stand-ins too (their part is zero)
            local = local + 0 * token_nll.sum()
        losses = local.detach()
        if reduce:   # syncs the device
            stats = reduce(torch.cat([losses[:, None], rewards, counts.to(device)], 1))
            losses, rewards, counts = stats[:, 0], stats[:, 1:5], stats[:, 5:].long().cpu()
        if check_finite and not bool(losses.isfinite().all()):  # syncs the device
            return losses, rewards, counts, batch, False
        # Backward inside the routing block: a layer recomputed in backward (activation
        # checkpointing) reads the routing and redraws the same dropout masks.
        local.sum().backward()
    return losses, rewards, counts, batch, True


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
    s.loss_sum, s.reward_sums = torch.zeros((), device=run.device), torch.zeros(4, device=run.device)
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
    s.last_loss, s.last_rewards = loss, reward_means(reward_sums)
    s.step += 1
    return None


# ----------------------------------------------------------------------------- the loop

def check_base(cfg: RunConfig) -> torch.nn.Module:
    """The base folder checked without reading a weight (model.check_checkpoint), the model
    built on the meta device, and every job's targets and cutoff_len checked against it."""
    where = f"{cfg.base_model}/config.json"
    skeleton_config = M.check_checkpoint(cfg.base_model)
    with torch.device("meta"):
        skeleton = M.build_model(skeleton_config)
    positions = getattr(skeleton.config, "max_position_embeddings", None) or getattr(skeleton.config, "seq_length", None)
    for i, job in enumerate(cfg.jobs):
        bad = [t for t in job.targets or () if t not in skeleton.LORA_TARGETS]
        if bad:
            raise ConfigError(f"{sweep.field_label(cfg, i, 'targets')}: {', '.join(map(repr, bad))} not in {where} "
                              f"({skeleton.config.model_type}); LoRA targets: {', '.join(skeleton.LORA_TARGETS)}")
        if positions and job.cutoff_len > positions:
            raise ConfigError(f"{sweep.field_label(cfg, i, 'cutoff_len')}: {job.cutoff_len} is more than the "
                              f"{positions} positions of {where}")
    return skeleton


def prepare(cfg: RunConfig) -> tuple[data.Tokenizer, dict, dict, list[JobPlan], Scheduler]:
    """Read and check every job's data and the scheduler settings: a bad row fails now, not hours in."""
    for i, job in enumerate(cfg.jobs):
        if job.objective != "sft" and job.train_on_inputs:
            raise ConfigError(f"{sweep.field_label(cfg, i, 'train_on_inputs')}: a {job.objective} job scores its "
                              f"answers only; set it false")
        if job.objective != "sft" and job.loss_type == "ipo" and job.label_smoothing:
            print(f"warning: job {job.name!r}: label_smoothing is not used by the ipo loss (TRL ignores it too)")
    tokenizer = data.load_tokenizer(cfg.base_model)
    train_sets, test_sets, plans, loaded = {}, {}, [], {}

    def rows_of(job: JobConfig, path: str, train_on_inputs: bool) -> list:   # sweep trials share their files
        key = (job.objective, path, job.template, job.cutoff_len, train_on_inputs)
        if key not in loaded:
            loaded[key] = load_rows(job, path, tokenizer, train_on_inputs)
        return loaded[key]
    for job in cfg.jobs:
        train_sets[job.name] = rows_of(job, job.data, job.train_on_inputs)
        if job.test_data:
            test_sets[job.name] = rows_of(job, job.test_data, False)
        rows = train_sets[job.name]
        # A row is the scheduler's unit: a pair's sequences are never split, and all of them count.
        plans.append(JobPlan(job.name, [sequence_lengths(job, row) for row in rows],
                             [loss_tokens(job, row) for row in rows], job.batch_size, job.micro_batch_size,
                             job.epochs, cfg.seed, job.max_steps, group_by_length=job.group_by_length,
                             priority=job.priority))
    return tokenizer, train_sets, test_sets, plans, make_scheduler(cfg, plans)


def make_scheduler(cfg: RunConfig, plans: list[JobPlan]) -> Scheduler:
    sc = cfg.scheduler
    try:
        return Scheduler(plans, sc.strategy, sc.max_candidates, sc.max_concurrent, token_budget=sc.token_budget,
                         memory_budget=None if sc.memory_budget_gb is None else sc.memory_budget_gb * 2**30,
                         pad_multiple=PAD_MULTIPLE, packed=cfg.packing)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def describe(cfg: RunConfig, device: str, train_sets: dict) -> str:
    """A few lines on what will run (the whole resolved config goes to out_dir/config.json)."""
    sc = cfg.scheduler
    dtype = str(M.resolve_dtype(cfg.dtype, device)).removeprefix("torch.")
    lines = [f"base {cfg.base_model} ({dtype}, {device}{f', {cfg.quant} base' if cfg.quant else ''}), "
             f"{sc.strategy}: {sc.max_concurrent} of {sc.max_candidates} admitted jobs per step, out_dir {cfg.out_dir}"]
    for j in cfg.jobs:
        objective = "" if j.objective == "sft" else f"{j.objective} ({j.loss_type}, beta={j.beta:g}), "
        lines.append(f"  {j.name}: {objective}{len(train_sets[j.name])} rows x {j.epochs} epochs, r={j.r} "
                     f"alpha={j.alpha:g} {','.join(j.targets) if j.targets else 'default targets'}, "
                     f"{j.optimizer} lr={j.lr:g}, batch {j.batch_size} (micro {j.micro_batch_size})")
    return "\n".join(lines)


def train(cfg: RunConfig, overwrite: bool = False) -> dict:
    """Train every job of `cfg`; returns the per-job summary (also in out_dir/summary.json).

    Everything is checked before out_dir is touched: the config, the base folder, every data
    row, and what out_dir holds (claim_out_dir). An unfinished run of the same config there is
    resumed from its checkpoint; `overwrite` replaces a previous run's outputs instead.
    Under torchrun (dist.py) every rank runs this; rank 0 alone reads and writes out_dir.
    """
    validate(cfg, "config")
    cfg = sweep.expand(cfg, "config")   # its trials become jobs
    d = dist.setup(cfg.device, cfg.dist_timeout_s)
    if d is None:
        return train_on(cfg, overwrite, d)
    try:
        summary = train_on(cfg, overwrite, d)
    except (Interrupted, ConfigError):   # every rank stopped at the same step, or on the same (agreed) error
        d.close()
        raise
    except dist.RankLost:   # no teardown with a dead peer (gloo can abort in it): main's exit skips it
        raise
    except BaseException:
        d.close(together=False)
        raise
    d.close()
    return summary


def train_on(cfg: RunConfig, overwrite: bool, d: "dist.Dist | None") -> dict:
    """train() in this process (one of the ranks when d is set)."""
    from tqdm import tqdm
    writes = d is None or d.main
    device = M.resolve_device(cfg.device) if d is None else d.device
    error = mode = state = None
    try:
        check_base(cfg)
        tokenizer, train_sets, test_sets, plans, sched = prepare(cfg)
        task_sets = {job.name: data.load_task_rows(job.test_data, tokenizer, job.template, job.cutoff_len)
                     for job in cfg.jobs if job.task_metric}
        sources = [Path(cfg.base_model) / "config.json"] + [Path(f) for j in cfg.jobs for f in (j.data, j.test_data) if f]
        inputs = {str(f): file_digest(f) for f in sources}
        if d is not None and d.world > 1 and cfg.sweep is not None and cfg.scheduler.placement == "job":
            raise ConfigError("sweep: its rungs compare trials across ranks; use scheduler.placement 'data' under torchrun")
        if writes:
            mode = claim_out_dir(cfg, overwrite)
            state = read_checkpoint(Path(cfg.out_dir), inputs) if mode == "resume" else None
    except (ConfigError, data.DataError, M.CheckpointError, FileNotFoundError) as e:
        if d is None:
            raise
        error = e
    if d is not None:   # every rank checked the same inputs: all go on, or all stop with the first error
        message = d.agree(error)
        if message:
            raise ConfigError(message)
        mode, state = d.broadcast((mode, state))
    out_dir = Path(cfg.out_dir)
    if mode == "finished":
        if writes:
            print(f"{out_dir} holds the finished run of this config (run.json): nothing to do; "
                  f"--overwrite trains it again")
        summary = json.loads((out_dir / "summary.json").read_text()) if writes else None
        return summary if d is None else d.broadcast(summary)
    apart = d is not None and cfg.scheduler.placement == "job"
    if apart:   # each rank's own scheduler, given jobs as it has room (assign_waiting)
        sched = make_scheduler(cfg, [])
    written_by = len(state.get("ranks") or ()) if state is not None else 0   # job parallel: its ranks
    if state is not None and written_by != (d.world if apart else 0):
        raise ConfigError(f"{out_dir}/checkpoint: a job parallel run's, on {written_by} ranks; it resumes under "
                          f"torchrun on as many" if written_by else
                          f"{out_dir}/checkpoint: not a job parallel run's; resume it with scheduler.placement 'data' "
                          f"or in one process")
    torch.manual_seed(cfg.seed)
    model = M.load_model(cfg.base_model, dtype=cfg.dtype, device=device, quant=cfg.quant)
    model.checkpoint_blocks = cfg.activation_checkpointing
    if d is not None and cfg.shard_base:
        dist.shard_base(model, d)
        if writes:
            local = sum(getattr(p, "to_local", lambda p=p: p)().numel() for p in model.parameters())
            print(f"base sharded (FSDP2) over {d.world} ranks: {local:,} of {sum(p.numel() for p in model.parameters()):,} "
                  f"parameters on this rank")
    metrics = None
    if writes:
        if mode == "overwrite":
            clear_run(out_dir)
        elif mode in ("resume", "restart"):
            remove_partial_writes(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if state is None:
            files.atomic_write(out_dir / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        print(describe(cfg, device, train_sets) + f"\nresolved config: {out_dir / 'config.json'}"
              + ("" if d is None else f"\n{d.describe(cfg.scheduler.placement)}"))
        metrics = open(out_dir / "metrics.jsonl", "r+b" if state else "wb")
    run = Run(cfg, device, out_dir, model, tokenizer.pad_id, sched, {p.name: p for p in plans},
              train_sets, test_sets, inputs, metrics=metrics, start=time.time(), tokenizer=tokenizer,
              task_sets=task_sets, dist=d, outbox=[] if apart and not writes else None,
              pending=[p.name for p in sorted(plans, key=lambda p: -p.priority)] if apart else [],
              bar=tqdm(total=None if apart else sum(p.num_micro_batches for p in plans), unit="mb", desc="train",
                       dynamic_ncols=True, disable=not writes), graphs=graphs.Graphs() if cfg.cuda_graphs else None)
    if cfg.sweep is not None:
        run.sweep = sweep.Sweep(cfg, run.plans)
        if writes:
            print(run.sweep.describe())
    if state is not None:
        restore(run, state)
        if writes:   # below the progress bar, not inside its line
            run.bar.write(f"resumed {out_dir} at fused step {run.step} ({len(run.summary)} jobs finished, "
                          f"{len(run.jobs)} admitted)")
    with signals_checkpoint(run), closing_bar(run):
        more = not sched.done if d is None else dist.agree_turn(run)
        while more:
            if apart:
                dist.assign_waiting(run)
            if not sched.done:   # job parallel: a rank with no job waits for the others
                train_step(run)
            more = not sched.done if d is None else dist.agree_turn(run)
            run.ticks += 1
            due = cfg.checkpoint_every and (run.ticks if apart else run.step) % cfg.checkpoint_every == 0
            if run.signal is not None or due:
                save_checkpoint(run)
            if run.signal is not None:
                run.bar.close()
                raise Interrupted(run.signal, f"{signal.Signals(run.signal).name}: checkpoint of fused step "
                                              f"{run.step} in {out_dir}/checkpoint; the same command resumes")
    run.bar.close()
    if apart:   # every rank's finished jobs and totals, to rank 0
        dist.gather_results(run)
    if writes:
        write_results(run)
    return run.summary if d is None else d.broadcast(run.summary)


@contextlib.contextmanager
def closing_bar(run: Run):
    """The progress bar ends its line before an error is printed under it."""
    try:
        yield
    except BaseException:
        run.bar.close()
        raise


@contextlib.contextmanager
def signals_checkpoint(run: Run):
    """SIGINT / SIGTERM during the loop: note it; the loop checkpoints after the step and stops.
    A second one acts as it normally would."""
    def note(signum, frame):
        run.signal = signum
        if run.dist is None:   # under torchrun, its SIGTERM follows a Ctrl-C's SIGINT: both mean stop after this step
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        print(f"\n{signal.Signals(signum).name}: checkpointing after this step (again to stop at once)", file=sys.stderr)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train_step(run: Run):
    """Admit waiting jobs, run one fused step, step the optimizers whose accumulation ended,
    finish the jobs that are done."""
    sched, cfg = run.sched, run.cfg
    admit_all(run, sched.admit())
    if not sched.candidates:  # only jobs with nothing to train (max_steps=0) were left
        for name in sched.pop_finished():
            finish(run, name)
        settle_rungs(run)
        return

    # ---- one forward + backward over the next micro-batches of several jobs, fused
    t0 = time.time()
    micro_batches = sched.next_step()
    # The window since the last backward (optimizer steps, evals, admissions) counts toward
    # the peaks too; then a fresh window for this step, whose peak the memory model learns.
    between_mb = M.peak_memory(run.device)
    M.reset_peak_memory(run.device)
    parallel = run.rows_apart
    while micro_batches:
        states = [run.jobs[mb.job] for mb in micro_batches]
        rng = [s.generator.get_state() for s in states]   # a step run again draws the same dropout
        rows = [[s.train_set[i] for i in mb.indices] for s, mb in zip(states, micro_batches)]
        share = None
        if parallel:   # this rank's part of the step
            rows, share = dist.split_step([s.config for s in states], rows, run.dist, sharded=cfg.shard_base)
        configs, generators = [s.config for s in states], {s.config.name: s.generator for s in states}
        loss_tokens = [mb.step_loss_tokens for mb in micro_batches]
        fixed = run.graphs is not None and run.graphs.fits(run.model, configs, rows, parallel, cfg.packing)
        if fixed:   # the same step at fixed shapes, a CUDA graph replayed on GPUs (it checks the losses)
            losses, rewards, counts, _, stepped = run.graphs.step(run.model, configs, rows, loss_tokens, generators,
                                                                  run.pad_id, run.device)
        else:
            losses, rewards, counts, _, stepped = fused_step(
                run.model, configs, rows, loss_tokens, generators, run.pad_id, run.device, cfg.packing,
                check_finite=lora.concatenates(run.device), step_rows=[mb.step_rows for mb in micro_batches],
                share=share, reduce=run.dist.sum_ if parallel else None)
        if stepped or parallel and not lora.concatenates(run.device):
            break
        # A job whose loss is not finite stops; the others run the step again without it.
        finite = [math.isfinite(loss) for loss in losses.tolist()]
        if all(finite):   # data parallel: nothing of this step was here
            break
        for s, ok, state in zip(states, finite, rng):
            s.generator.set_state(state)
            if not ok:
                stop_early(run, s, f"non-finite loss at step {s.step + 1}", nonfinite=True)
        micro_batches = [mb for mb, ok in zip(micro_batches, finite) if ok]
    step_mb = M.peak_memory(run.device)  # forward + backward: where a step's memory peaks
    if parallel:   # every rank's memory model learns the same peaks: the largest of any rank
        between_mb, step_mb = run.dist.max_(torch.tensor([between_mb, step_mb], dtype=torch.float64,
                                                         device=run.device)).tolist()

    if micro_batches:
        # ---- per job: accumulate; where its optimizer step ends, step, evaluate, maybe stop
        ending = [s for s, mb in zip(states, micro_batches) if mb.last_in_step]
        if parallel:   # their gradients summed over the ranks, in a few buckets
            dist.reduce_gradients(run, ending)
        stepped = []
        for s, mb, loss, reward_sums, (tokens, processed) in zip(states, micro_batches, losses, rewards,
                                                                  counts.tolist()):
            s.loss_sum = s.loss_sum + loss
            s.reward_sums = s.reward_sums + reward_sums
            s.tokens += tokens
            s.padded_tokens += processed
            if mb.last_in_step:
                reason = optimizer_step(run, s)
                if reason:
                    stop_early(run, s, reason, nonfinite=True)
                else:
                    stepped.append(s)
        # Every job evaluating now (eval_every, or a sweep rung) has its task score generated in
        # one batch; evaluating after all optimizer steps changes nothing: adapters are apart.
        prefetch_tasks(run, [s.config.name for s in stepped if eval_due(s) or run.sweep is not None
                             and run.sweep.rung_at(s.config.name, s.step, s.tokens) is not None])
        for s in stepped:
            reason = evaluate_and_stop(run, s)
            if reason:
                stop_early(run, s, reason)
            elif run.sweep is not None:
                reach_rung(run, s)
        log_step(run, micro_batches, counts.sum(0).tolist(), time.time() - t0, between_mb, step_mb)
    else:
        run.step += 1
    # ---- finished jobs: save, free their slot (the next waiting job is admitted next time);
    # sweep trials at a rung park there, and rungs whose trials are all in are decided
    finished = sched.pop_finished()
    prefetch_tasks(run, [name for name in finished if run.sweep is None or not run.sweep.waits(name)])
    for name in finished:
        if run.sweep is not None and run.sweep.waits(name) and name in run.jobs:
            park(run, name)
        else:
            finish(run, name)
    run.task_scores = {}
    settle_rungs(run)


def run_demo(overrides: list[str] | None = None, overwrite: bool = False) -> dict:
    """The bundled demo (demo.py): four adapters trained fused, then shown side by side."""
    import demo
    t0 = time.time()
    cfg = load_config(str(demo.CONFIG), overrides or [])
    demo.resolve_paths(cfg)
    summary = train(cfg, overwrite)
    demo.show_results(cfg, summary)
    print(f"\ndemo finished in {time.time() - t0:.0f}s; adapters, metrics.jsonl and loss.png in {cfg.out_dir}/")
    return summary


def load_config_file(path: str, overrides: list[str]) -> RunConfig:
    """load_config; a config bundled in demo/ (e.g. demo/methods.json) has its paths relative to
    the repository, as the demo's own (demo.resolve_paths)."""
    cfg = load_config(path, overrides)
    import demo
    if Path(path).resolve().parent == demo.CONFIG.parent:
        demo.resolve_paths(cfg, path)
    return cfg


def main(argv: list[str]) -> int:
    config_path, overrides, args, merge_args, overwrite = None, [], list(argv), {}, False
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            print(__doc__.strip())
            return 0
        if arg == "--help-config":   # every config field with its comment, from config.py's dataclasses
            import config
            print(config.help_text())
            return 0
        if arg == "--overwrite":
            overwrite = True
        elif arg in ("--config", "--merge", "--to", "--base", "--quant") and args:
            value = args.pop(0)
            if arg == "--config":
                config_path = value
            else:
                merge_args[arg[2:]] = value
        elif arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        else:
            overrides.append(arg)
    try:
        if "quant" in merge_args and not merge_args.keys() & {"merge", "to", "base"}:
            overrides.append(f"--quant={merge_args.pop('quant')}")  # `--quant nf4` for a training run
        if merge_args:
            if "merge" not in merge_args or "to" not in merge_args:
                raise ConfigError("usage: python train.py --merge ADAPTER_DIR --to OUT_DIR [--base BASE_DIR] [--quant Q]")
            export_merged(merge_args["merge"], merge_args["to"], merge_args.get("base"), merge_args.get("quant"))
        else:
            if config_path is None:
                summary = run_demo(overrides, overwrite)
            else:
                cfg = load_config_file(config_path, overrides)
                summary = train(cfg, overwrite)
                if Path(config_path).resolve() == Path(__file__).resolve().parent / "demo" / "methods.json":
                    import demo
                    demo.show_methods(cfg, summary)
            bad = [name for name, s in summary.items() if s.get("nonfinite")]
            if bad:
                print(f"error: non-finite loss, gradient or weights stopped {', '.join(bad)} (see summary.json; "
                      f"each keeps its last finite adapter)", file=sys.stderr)
                return 3
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


def exit_with(status: int):
    """sys.exit; but with a rank lost (4), leave at once: tearing the process group down with a
    dead peer can abort in gloo's threads, which would replace our exit status."""
    if status == 4:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    M.keep_freed_memory()   # this process's allocator keeps freed memory for the next step (model.py)
    exit_with(main(sys.argv[1:]))
