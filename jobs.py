"""A job's life in a run, around train.py's steps, and what the loop works on.

Run (what every step shares: the model, the scheduler, the admitted jobs, the log) and JobState
(one admitted job); reading and checking every job's rows before anything is written (check_base,
prepare); a job admitted (its adapter, optimizer and dropout RNG; its held-out loss at init),
evaluated and stopped early (ASPEN), finished (the best adapter saved, its slot freed).
"""
import contextlib
import dataclasses
import json
import math
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

import data
import files
from checkpoint import weights_digests
import generate
import lora
import model as M
import peft_format
from config import (CHOICE_METRICS, ConfigError, JobConfig, RunConfig, claim_out_dir, clear_run, field_label, file_digest,
                    remove_partial_writes)
from objectives import METRIC_SUMS, loss_tokens, objective_of, sequence_lengths, unused_fields
from report import choice_examples, evaluate, evaluate_tasks, load_task_rows
import scheduler
from scheduler import JobPlan, MicroBatch, Scheduler
from templates import NAMED_TEMPLATES
from tokenizer import FILES as TOKENIZER_FILES


# ----------------------------------------------------------------------------- what the loop works on

def make_optimizer(params, job: JobConfig, lora_B: set | None = None) -> torch.optim.Optimizer:
    """The job's optimizer. LoRA+ (loraplus_lr_ratio): the B matrices (`lora_B`, a set of their
    ids) in a second group whose lr is ratio x lr, as PEFT's create_loraplus_optimizer (which
    also puts embedding adapters in a third group: we have none)."""
    groups = [{"params": params}]
    if job.loraplus_lr_ratio is not None:
        groups = [{"params": [p for p in params if id(p) not in lora_B], "lr_ratio": 1.0},
                  {"params": [p for p in params if id(p) in lora_B], "lr_ratio": job.loraplus_lr_ratio}]
        for group in groups:
            group["lr"] = job.lr * group["lr_ratio"]
    if job.optimizer == "adamw":   # fused: one kernel for all of a job's tensors, not a loop over them
        fused = all(p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.AdamW(groups, lr=job.lr, weight_decay=job.weight_decay, fused=fused or None)
    if job.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=job.lr, momentum=job.momentum, weight_decay=job.weight_decay)
    raise ConfigError(f"job {job.name!r}: optimizer {job.optimizer!r}: expected adamw or sgd")


@dataclass
class Best:
    """The best held-out loss so far and the adapter weights that gave it (early stopping)."""
    loss: float
    step: int
    weights: list[torch.Tensor]
    rewards: dict | None = None            # a preference job's held-out metrics there
    task: float | None = None              # its task score there (task_metric)


@dataclass
class JobState:
    """One admitted job: what it trains on and where its training stands."""
    config: JobConfig
    total_steps: int                       # optimizer steps it will take (unless stopped early)
    train_set: list[data.Example] | list[data.Pair]
    test_set: list[data.Example] | list[data.Pair] | None
    optimizer: torch.optim.Optimizer
    generator: torch.Generator             # its dropout RNG: one seed drawn per fused step (CPU)
    admitted_at: float                     # time.time() at admission
    loss_sum: torch.Tensor                 # this optimizer step's loss so far (on device: no sync)
    reward_sums: torch.Tensor              # this step's metric sums so far [METRIC_SUMS] (job_loss; zeros for SFT)
    step: int = 0                          # optimizer steps taken
    lr: float | None = None                # lr of its last optimizer step
    last_loss: float | None = None         # training loss of its last optimizer step
    last_rewards: dict | None = None       # its last optimizer step's objective metrics (None for SFT)
    tokens: int = 0                        # real tokens through the forward
    padded_tokens: int = 0                 # its rows x padded length
    peak_mb: float = 0.0                   # the run's peak memory while it was admitted
    initial_eval_loss: float | None = None
    eval_loss: float | None = None
    eval_rewards: dict | None = None       # its objective's metrics on the held-out rows (None for SFT)
    initial_eval_task: float | None = None  # task_metric: the task score at init
    eval_task: float | None = None         # task_metric: the task score at its last evaluation
    best: Best | None = None               # with early_stop
    evals_since_best: int = 0
    stopped: str | None = None             # why it stopped early
    nonfinite: bool = False                # stopped because its loss, gradient or weights went non-finite


@dataclass
class Run:
    """What every step of a run shares: the model, the scheduler, the admitted jobs, the log."""
    cfg: RunConfig
    device: str
    out_dir: Path
    model: torch.nn.Module
    pad_id: int
    sched: Scheduler
    plans: dict[str, JobPlan]
    train_sets: dict[str, list[data.Example] | list[data.Pair]]
    test_sets: dict[str, list[data.Example] | list[data.Pair]]
    inputs: dict[str, str]                 # sha256 of every input file: a resumed run must read the same
    metrics: typing.BinaryIO | None        # metrics.jsonl, appended line by line (None: this process writes none)
    start: float                           # time.time() at the first step (earlier on resume)
    bar: typing.Any                        # the tqdm progress bar, in micro-batches
    steps: typing.Any = None               # train.Steps: the loop's named steps, picked at the start
    jobs: dict[str, JobState] = field(default_factory=dict)   # admitted, not finished (admission order)
    summary: dict[str, dict] = field(default_factory=dict)    # finished jobs
    step: int = 0                          # fused steps taken
    tokens: int = 0
    padded_tokens: int = 0
    peak_mb: float = 0.0
    prediction_errors: list[float] = field(default_factory=list)
    signal: int | None = None              # SIGINT/SIGTERM received: checkpoint and stop after this step
    ticks: int = 0                         # loop turns
    checkpoint_step: int | None = None     # the fused step of the last run checkpoint (state.py), if any
    writes: bool = True                    # this process writes out_dir (under torchrun: rank 0 alone)
    tokenizer: typing.Any = None           # data.Tokenizer: task evaluation generates and decodes
    task_sets: dict[str, list] = field(default_factory=dict)   # task_metric jobs: (prompt ids, expected output) rows
    task_scores: dict[str, float] = field(default_factory=dict)   # scores prefetch_tasks batched, until task_score takes them
    # What a layer adds (None without it): torchrun's ranks, held-out evaluation split over data
    # parallel ranks (dist.Dist), a sweep's rungs (sweep.Sweep), job parallel ranks' outbox to rank 0.
    lock: typing.Any = contextlib.nullcontext()   # out_dir held for the run (files.DirLock; ranks that write none: nothing)
    dist: typing.Any = None                # under torchrun: this rank and its collectives (dist.Dist)
    eval_ranks: typing.Any = None
    tag: dict = field(default_factory=dict)   # job parallel: {"rank": r} on every line this rank logs
    sweep: typing.Any = None
    outbox: list | None = None

    def log(self, record: dict):
        """One line of metrics.jsonl (a process that writes none sends it to rank 0's outbox, if any)."""
        record = {**self.tag, **record}   # a line sent from another rank keeps its own tag
        if self.metrics is None:
            if self.outbox is not None:
                self.outbox.append(("log", record))
            return
        self.metrics.write((json.dumps(record) + "\n").encode())
        self.metrics.flush()

    def now(self) -> float:
        return time.time() - self.start


class Interrupted(Exception):
    """SIGINT or SIGTERM: the run checkpointed and stopped; the same command resumes it."""
    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum



class StepRows(NamedTuple):
    """The rows of one fused step, job by job: what a forward_backward step reads."""
    states: list[JobState]
    jobs: list[JobConfig]
    rows: list[list]                        # job i's rows (examples, or pairs)
    loss_tokens: list[int]                  # its whole optimizer step's loss tokens
    step_rows: list[int]                    # and rows
    generators: dict[str, torch.Generator]  # dropout RNG streams, by job


def step_rows(run: Run, micro_batches: list[MicroBatch]) -> StepRows:
    states = [run.jobs[mb.job] for mb in micro_batches]
    return StepRows(states, [s.config for s in states],
                    [[s.train_set[i] for i in mb.indices] for s, mb in zip(states, micro_batches)],
                    [mb.step_loss_tokens for mb in micro_batches], [mb.step_rows for mb in micro_batches],
                    {s.config.name: s.generator for s in states})


class Fused(NamedTuple):
    """What one fused forward + backward gives the loop: the micro-batches that ran (a job stopped
    on a non-finite loss drops out), each job's loss [k] (detached), metric sums [k, METRIC_SUMS]
    (objectives.job_loss), real and processed tokens [k, 2], and whether backward ran."""
    micro_batches: list[MicroBatch]
    losses: torch.Tensor
    rewards: torch.Tensor
    counts: torch.Tensor
    stepped: bool = True


def add_job(run: Run, name: str) -> JobState:
    """The job's adapter (initialised from the seed), optimizer and dropout RNG."""
    job = next(j for j in run.cfg.jobs if j.name == name)
    lora.add_adapters(run.model, {name: job.lora_config()}, seed=run.cfg.seed)
    params = lora.adapter_parameters(run.model, name)
    lora_B = {id(p) for p in lora.adapter_parameters(run.model, name, "lora_B")}
    # The dropout stream is seeded apart from the init's (adapter_seed itself seeds A's init).
    generator = torch.Generator().manual_seed(lora.mix_seed(lora.adapter_seed(run.cfg.seed, name), 1))
    s = run.jobs[name] = JobState(job, run.plans[name].total_steps, run.train_sets[name],
                                  run.test_sets.get(name), make_optimizer(params, job, lora_B), generator,
                                  admitted_at=time.time(), loss_sum=torch.zeros((), device=run.device),
                                  reward_sums=torch.zeros(METRIC_SUMS, device=run.device))
    return s


# ----------------------------------------------------------------------------- a run's inputs, checked before anything is written

def load_rows(job: JobConfig, path: str, tokenizer: data.Tokenizer, train_on_inputs: bool) -> list:
    """A job's data file: SFT examples, or preference pairs where its objective's rows are pairs."""
    if path == job.test_data and job.task_metric in CHOICE_METRICS:   # its right choices are the held-out answers
        return choice_examples(path, tokenizer, job)
    if not objective_of(job).pairs:
        return data.load_job_data(path, tokenizer, job.template, job.cutoff_len, train_on_inputs)
    return data.load_pairs(path, tokenizer, job.template, job.cutoff_len)



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
            raise ConfigError(f"{field_label(cfg, i, 'targets')}: {', '.join(map(repr, bad))} not in {where} "
                              f"({skeleton.config.model_type}); LoRA targets: {', '.join(skeleton.LORA_TARGETS)}")
        if positions and job.cutoff_len > positions:
            raise ConfigError(f"{field_label(cfg, i, 'cutoff_len')}: {job.cutoff_len} is more than the "
                              f"{positions} positions of {where}")
    return skeleton



def prepare(cfg: RunConfig) -> tuple[data.Tokenizer, dict, dict, list[JobPlan], Scheduler]:
    """Read and check every job's data and the scheduler settings: a bad row fails now, not hours in."""
    for i, job in enumerate(cfg.jobs):
        if objective_of(job).pairs and job.train_on_inputs:
            raise ConfigError(f"{field_label(cfg, i, 'train_on_inputs')}: a {job.objective} job scores its "
                              f"answers only; set it false")
        for name in unused_fields(job):
            print(f"warning: job {job.name!r}: {name} is not read by its objective, "
                  f"{objective_of(job).describe(job) or job.objective}")
    tokenizer = data.load_tokenizer(cfg.base_model)
    train_sets, test_sets, plans, loaded = {}, {}, [], {}

    def rows_of(job: JobConfig, path: str, train_on_inputs: bool) -> list:   # sweep trials share their files
        key = (objective_of(job).pairs, path, job.template, job.cutoff_len, train_on_inputs,
               path == job.test_data and job.task_metric in CHOICE_METRICS)
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
                         pad_multiple=data.PAD_MULTIPLE, packed=cfg.packing)
    except ValueError as e:
        raise ConfigError(str(e)) from None



def describe(cfg: RunConfig, device: str, train_sets: dict) -> str:
    """A few lines on what will run (the whole resolved config goes to out_dir/config.json)."""
    sc = cfg.scheduler
    dtype = str(M.resolve_dtype(cfg.dtype, device)).removeprefix("torch.")
    lines = [f"base {cfg.base_model} ({dtype}, {device}{f', {cfg.quant} base' if cfg.quant else ''}), "
             f"{sc.strategy}: {sc.max_concurrent} of {sc.max_candidates} admitted jobs per step, out_dir {cfg.out_dir}"]
    model_type = json.loads((Path(cfg.base_model) / "config.json").read_text())["model_type"]   # checked by now
    defaults = ",".join(M.FAMILIES[model_type].DEFAULT_TARGETS)
    for j in cfg.jobs:
        objective = objective_of(j).describe(j)
        rows = len(train_sets[j.name])
        steps = math.ceil(rows / j.batch_size) * j.epochs   # as scheduler.JobPlan counts them
        cut = f", max_steps {j.max_steps}" if j.max_steps is not None and j.max_steps < steps else ""
        lines.append(f"  {j.name}: {objective + ', ' if objective else ''}{rows} rows x {j.epochs} epochs{cut}: "
                     f"{j.max_steps if cut else steps} optimizer steps, r={j.r} alpha={j.alpha:g} "
                     f"{','.join(j.targets) if j.targets else defaults + ' (the default targets)'}, "
                     f"{j.optimizer} lr={j.lr:g}, batch {j.batch_size} (micro {j.micro_batch_size})")
    return "\n".join(lines)


def read_inputs(cfg: RunConfig) -> dict:
    """Everything a run reads, checked before out_dir is touched: the base folder, every job's
    rows, the task rows, and a digest of each input file (a resumed run must read the same)."""
    check_base(cfg)
    tokenizer, train_sets, test_sets, plans, sched = prepare(cfg)
    task_sets = {job.name: load_task_rows(job.test_data, tokenizer, job.template, job.cutoff_len, job.task_metric)
                 for job in cfg.jobs if job.task_metric}
    return dict(tokenizer=tokenizer, train_sets=train_sets, test_sets=test_sets, plans=plans, sched=sched,
                task_sets=task_sets, inputs=input_digests(cfg))


def input_digests(cfg: RunConfig) -> dict[str, str | None]:
    """{file: digest} of every file the run reads: the base's config.json, tokenizer files (None:
    absent) and weights (checkpoint.weights_digests: cheap for large files), each job's data and
    template file. state.read_checkpoint refuses to resume when one differs from the checkpoint's."""
    base = Path(cfg.base_model)
    sources = [base / name for name in ("config.json", *TOKENIZER_FILES)]
    sources += [Path(f) for j in cfg.jobs for f in (j.data, j.test_data) if f]
    sources += [Path(j.template) for j in cfg.jobs if j.template not in NAMED_TEMPLATES]   # a template file
    return {**{str(f): file_digest(f) if f.is_file() else None for f in sources}, **weights_digests(base)}



def claim_and_lock(cfg: RunConfig, overwrite: bool) -> tuple[str, "files.DirLock | None"]:
    """What this run does with out_dir (claim_out_dir, which touches nothing) and, unless it holds a
    finished run, an OS lock on out_dir for the whole run: a second run at once on the same out_dir
    stops in one line naming the first one's pid (files.InUse), and nothing is written."""
    mode = claim_out_dir(cfg, overwrite)
    if mode == "finished":
        return mode, None
    try:
        lock = files.lock_dir(cfg.out_dir)
    except files.InUse as e:
        raise ConfigError(f"out_dir {e}") from None
    mode = claim_out_dir(cfg, overwrite)   # as it is now that no other run writes it
    if mode == "restart":
        print(f"{cfg.out_dir} holds an unfinished run of this config that wrote no checkpoint: it starts over")
    return mode, lock


def finished_summary(cfg: RunConfig) -> dict:
    """The summary of the finished run out_dir holds (claim_out_dir said "finished"): nothing to train."""
    print(f"{cfg.out_dir} holds the finished run of this config (run.json): nothing to do; --overwrite trains it again")
    return json.loads((Path(cfg.out_dir) / "summary.json").read_text())


def placement(run: Run) -> str | None:
    """Under torchrun, how the ranks share the work (scheduler.placement: data | job); None in one process."""
    return None if run.dist is None else run.cfg.scheduler.placement


def load_base(cfg: RunConfig, device: str) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    model = M.load_model(cfg.base_model, dtype=cfg.dtype, device=device, quant=cfg.quant)
    model.checkpoint_blocks = cfg.activation_checkpointing
    return model



def open_run(cfg: RunConfig, read: dict, model, device: str, mode: str | None, resuming: bool, writes: bool = True,
             about: str = "") -> Run:
    """The Run over a prepared out_dir: a previous run's outputs cleared (overwrite) or its
    partial writes removed (resume), the resolved config saved, what will run printed (and
    `about`, a layer's line), metrics.jsonl opened."""
    from tqdm import tqdm
    out_dir, metrics = Path(cfg.out_dir), None
    if writes:
        print(describe(cfg, device, read["train_sets"]) + f"\nresolved config: {out_dir / 'config.json'}" + about)
        if mode == "overwrite":
            clear_run(out_dir)
        elif mode in ("resume", "restart"):
            remove_partial_writes(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if not resuming:
            files.atomic_write(out_dir / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        metrics = open(out_dir / "metrics.jsonl", "r+b" if resuming else "wb")
    plans = read["plans"]
    return Run(cfg, device, out_dir, model, read["tokenizer"].pad_id, read["sched"], {p.name: p for p in plans},
               read["train_sets"], read["test_sets"], read["inputs"], metrics=metrics, start=time.time(),
               tokenizer=read["tokenizer"], task_sets=read["task_sets"], writes=writes,
               bar=tqdm(total=sum(p.num_micro_batches for p in plans), unit="mb", desc="train", dynamic_ncols=True,
                        disable=not writes))



# ----------------------------------------------------------------------------- admission

def stop_value(job: JobConfig, loss: float | None, task: float | None) -> float:
    """What early stopping compares, lower is better: the held-out loss, or minus the task score."""
    if job.early_stop_metric == "task":
        return -task if task is not None else math.inf
    return loss if loss is not None else math.inf


def prefetch_tasks(run: Run, names: list[str]):
    """The task scores of these admitted jobs (those with a task_metric), generated in one batch
    (evaluate_tasks) for the evaluations about to run at this point; task_score hands them out."""
    states = [run.jobs[name] for name in names if name in run.jobs and run.jobs[name].config.task_metric]
    scores = evaluate_tasks(run.model, run.tokenizer, [(s.config, run.task_sets[s.config.name]) for s in states])
    run.task_scores = {s.config.name: score for s, score in zip(states, scores)}


def task_score(run: Run, s: JobState) -> float | None:
    """The job's task score now: prefetched with the others due at this point, else generated alone
    (None: no task_metric)."""
    if not s.config.task_metric:
        return None
    if s.config.name in run.task_scores:
        return run.task_scores.pop(s.config.name)
    return evaluate_tasks(run.model, run.tokenizer, [(s.config, run.task_sets[s.config.name])])[0]


def admit_all(run: Run, names: list[str]):
    """Admit these jobs (admit); the adapters of the new ones with a task_metric first, so that
    their task scores at init are generated in one batch."""
    jobs = {job.name: job for job in run.cfg.jobs}
    new = [name for name in names if jobs[name].task_metric]
    for name in new:
        add_job(run, name)
    prefetch_tasks(run, new)
    for name in names:
        admit(run, name)


def admit(run: Run, name: str):
    """Add the job (admit_all may have); its held-out loss (and task score) at init is the starting point."""
    s = run.jobs[name] if name in run.jobs else add_job(run, name)
    initial_rewards = None
    if s.test_set:
        s.initial_eval_loss, initial_rewards = evaluate(run.model, s.config, s.test_set, run.pad_id, run.device,
                                                        packed=run.cfg.packing, d=run.eval_ranks)
        s.initial_eval_task = task_score(run, s)
    if s.config.early_stop is not None:  # the adapter at init (the base model) is the first "best"
        s.best = Best(s.initial_eval_loss, 0, [p.detach().clone() for p in lora.adapter_parameters(run.model, name)],
                      initial_rewards, s.initial_eval_task)
    task = {} if s.config.task_metric is None else {"initial_eval_task": s.initial_eval_task}
    run.log({"event": "admit", "job": name, "time": run.now(), "initial_eval_loss": s.initial_eval_loss, **task,
             **{f"initial_eval_{key}": value for key, value in (initial_rewards or {}).items()}})


# ----------------------------------------------------------------------------- evaluation, stopping, finishing

def eval_due(s: JobState) -> bool:
    """Whether evaluate_and_stop evaluates the job after its current optimizer step."""
    return bool(s.config.eval_every and s.test_set and s.step % s.config.eval_every == 0)


def evaluate_and_stop(run: Run, s: JobState) -> str | None:
    """Held-out loss (and task score) when due, snapshots, and early stopping (ASPEN): a job whose
    held-out loss (or task score: early_stop_metric) stalls, or whose loss diverges, stops,
    freeing its slot for a waiting job. Returns why it stops, or None."""
    job, name = s.config, s.config.name
    stop_reason = None
    if eval_due(s):
        s.eval_loss, s.eval_rewards = evaluate(run.model, job, s.test_set, run.pad_id, run.device,
                                               packed=run.cfg.packing, d=run.eval_ranks)
        s.eval_task = task_score(run, s)
        record = {"event": "eval", "job": name, "step": s.step, "fused_step": run.step + 1, "eval_loss": s.eval_loss}
        if s.eval_rewards is None:
            record["eval_ppl"] = math.exp(min(s.eval_loss, 50))
        else:   # a pair loss has no perplexity
            record.update({f"eval_{key}": value for key, value in s.eval_rewards.items()})
        if job.task_metric is not None:
            record["eval_task"] = s.eval_task
        run.log(record)
        if job.early_stop is not None:
            watched = "loss" if job.early_stop_metric == "loss" else "task score"
            if job.early_stop_metric == "loss" and (not math.isfinite(s.eval_loss)
                                                    or s.eval_loss > job.diverge_factor * s.best.loss):
                stop_reason = f"diverged: held-out loss {s.eval_loss:.4g}, best {s.best.loss:.4g}"
            elif stop_value(job, s.eval_loss, s.eval_task) < stop_value(job, s.best.loss, s.best.task):
                weights = [p.detach().clone() for p in lora.adapter_parameters(run.model, name)]   # the best, not the last
                s.best = Best(s.eval_loss, s.step, weights, s.eval_rewards, s.eval_task)
                s.evals_since_best = 0
            else:
                s.evals_since_best += 1
                if s.evals_since_best >= job.early_stop:
                    stop_reason = f"no better held-out {watched} in {job.early_stop} evaluations"
    if job.save_every and s.step % job.save_every == 0:
        save_adapter(run, name, run.out_dir / "snapshots" / name / f"step-{s.step}")
    return stop_reason


def stop_early(run: Run, s: JobState, reason: str, nonfinite: bool = False):
    """Take the job off the scheduler; finish() then saves its best (or last finite) adapter and frees its slot."""
    name = s.config.name
    if run.sched.stop(name):
        run.bar.total -= run.plans[name].remaining
    elif not nonfinite:   # its last micro-batch already ran: it finishes as planned
        return
    if s.stopped is None:
        s.stopped, s.nonfinite = reason, nonfinite
        s.optimizer.zero_grad(set_to_none=True)   # a step's accumulation cut short
        s.loss_sum, s.reward_sums = torch.zeros((), device=run.device), torch.zeros_like(s.reward_sums)
        run.log({"event": "early_stop", "job": name, "step": s.step, "fused_step": run.step + 1,
                 "reason": reason, "nonfinite": nonfinite,
                 "best_eval_loss": None if s.best is None else s.best.loss,
                 "best_step": None if s.best is None else s.best.step})
        if nonfinite:
            print(f"\nwarning: job {name!r} stopped: {reason}; it keeps its adapter of step {s.step}", file=sys.stderr)


def finish(run: Run, name: str):
    """Final held-out loss, the best adapter restored under early stopping, saved; slot freed."""
    if name not in run.jobs:  # nothing to train (max_steps=0): never admitted, no adapter
        run.log({"event": "finish", "job": name, "time": run.now(), "steps": 0})
        return
    s = run.jobs[name]
    if s.test_set:
        s.eval_loss, s.eval_rewards = evaluate(run.model, s.config, s.test_set, run.pad_id, run.device,
                                               packed=run.cfg.packing, d=run.eval_ranks)
        s.eval_task = task_score(run, s)
    del run.jobs[name]
    best = s.best
    if best is not None and not stop_value(s.config, s.eval_loss, s.eval_task) < stop_value(s.config, best.loss, best.task):
        with torch.no_grad():   # keep the best adapter, not the last
            for param, weight in zip(lora.adapter_parameters(run.model, name), best.weights):
                param.copy_(weight)
        s.eval_loss, s.eval_rewards, s.eval_task = best.loss, best.rewards, best.task
    elif best is not None:
        best.loss, best.step, best.rewards, best.task = s.eval_loss, s.step, s.eval_rewards, s.eval_task
    save_adapter(run, name, run.out_dir / name)
    lora.remove_adapter(run.model, name)
    latency = time.time() - s.admitted_at
    run.summary[name] = {"steps": s.step, "tokens": s.tokens, "latency_s": latency, "finish_s": run.now(),
                         "tokens_per_s": s.tokens / max(latency, 1e-9), "final_loss": s.last_loss,
                         "initial_eval_loss": s.initial_eval_loss, "eval_loss": s.eval_loss,
                         "padded_tokens": s.padded_tokens, "padding": 1 - s.tokens / max(s.padded_tokens, 1),
                         "peak_mem_mb": max(s.peak_mb, scheduler.peak_memory(run.device)),
                         "stopped": s.stopped, "nonfinite": s.nonfinite, "best_step": None if best is None else best.step}
    if s.config.task_metric is not None:
        run.summary[name].update({"initial_eval_task": s.initial_eval_task, "eval_task": s.eval_task})
    # Its objective's metrics (none for SFT), of its last training step and held out.
    run.summary[name].update({f"final_{key}": value for key, value in (s.last_rewards or {}).items()})
    run.summary[name].update({f"eval_{key}": value for key, value in (s.eval_rewards or {}).items()})
    run.log({"event": "finish", "job": name, "time": run.now(), **run.summary[name]})


def save_adapter(run: Run, name: str, folder: Path):
    """The job's adapter as a PEFT folder, with its training.json (training_record): written by
    rank 0; job parallel, the others send it there."""
    extra = {generate.TRAINING_FILE: training_record(next(job for job in run.cfg.jobs if job.name == name))}
    if run.writes:
        peft_format.write_peft(folder, *peft_format.peft_files(run.model, name, run.cfg.base_model), extra)
    elif run.outbox is not None:
        run.outbox.append(("peft", str(folder), *peft_format.peft_files(run.model, name, run.cfg.base_model), extra))


def training_record(job: JobConfig) -> dict:
    """How the job made its prompts, for generate.py to make them alike: its template (a file's
    as an absolute path, so that it is found from any folder) and cutoff_len."""
    template = job.template if job.template in data.NAMED_TEMPLATES else str(Path(job.template).resolve())
    return {"template": template, "cutoff_len": job.cutoff_len}
