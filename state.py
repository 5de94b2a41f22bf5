"""A run's state and its checkpoint: what train.py's loop works on and how a run resumes.

Run (what every step shares: the model, the scheduler, the admitted jobs, the log), JobState
(one admitted job), add_job (its adapter, optimizer and dropout RNG), and the run checkpoint:
save_checkpoint writes the whole run into out_dir/checkpoint/state.pt, read_checkpoint and
restore put it back, so that the same command goes on exactly where it stopped.
"""
import dataclasses
import json
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

import data
import dist
import files
import lora
from config import ConfigError, JobConfig, RunConfig
from objectives import METRIC_SUMS
from scheduler import JobPlan, Scheduler


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
    if job.optimizer == "adamw":   # fused (one kernel for all tensors): on 2 CPU cores 6 ms a step, not 28
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


# The JobState fields a run checkpoint stores as they are (tensors and objects apart).
COUNTERS = ("step", "lr", "last_loss", "last_rewards", "tokens", "padded_tokens", "peak_mb", "initial_eval_loss",
            "eval_loss", "eval_rewards", "initial_eval_task", "eval_task", "evals_since_best", "stopped",
            "nonfinite")


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
    metrics: typing.BinaryIO               # metrics.jsonl, appended line by line
    start: float                           # time.time() at the first step (earlier on resume)
    bar: typing.Any                        # the tqdm progress bar, in micro-batches
    jobs: dict[str, JobState] = field(default_factory=dict)   # admitted, not finished (admission order)
    summary: dict[str, dict] = field(default_factory=dict)    # finished jobs
    step: int = 0                          # fused steps taken
    tokens: int = 0
    padded_tokens: int = 0
    peak_mb: float = 0.0
    prediction_errors: list[float] = field(default_factory=list)
    signal: int | None = None              # SIGINT/SIGTERM received: checkpoint and stop after this step
    sweep: typing.Any = None               # sweep.Sweep: a sweep's rungs and decisions (sweep.py)
    parked: dict[str, dict] = field(default_factory=dict)   # sweep trials waiting at a rung: job_state(), on the CPU
    dist: "dist.Dist | None" = None        # under torchrun: this rank and its collectives (dist.py)
    outbox: list | None = None             # job parallel, ranks > 0: what rank 0 is to write (flush_outbox)
    ticks: int = 0                         # loop turns (job parallel: its checkpoints count these, as all ranks do)
    pending: list[str] = field(default_factory=list)   # job parallel: jobs no rank has taken yet (the same on every rank)
    free: list[int] = field(default_factory=list)      # job parallel: each rank's free slots, as last agreed
    tokenizer: typing.Any = None           # data.Tokenizer: task evaluation generates and decodes
    task_sets: dict[str, list] = field(default_factory=dict)   # task_metric jobs: (prompt ids, expected output) rows
    task_scores: dict[str, float] = field(default_factory=dict)   # scores prefetch_tasks batched, until task_score takes them
    graphs: typing.Any = None              # graphs.Graphs with cuda_graphs: the captured steps

    def log(self, record: dict):
        if self.jobs_apart:   # job parallel: each rank's lines say whose
            record = {"rank": self.dist.rank, **record}   # a line sent from another rank keeps its own
        if self.metrics is None:   # under torchrun, rank 0 writes (job parallel: sent to it)
            if self.outbox is not None:
                self.outbox.append(("log", record))
            return
        self.metrics.write((json.dumps(record) + "\n").encode())
        self.metrics.flush()

    @property
    def jobs_apart(self) -> bool:
        """Job parallel under torchrun: each rank its own jobs."""
        return self.dist is not None and self.cfg.scheduler.placement == "job"

    @property
    def rows_apart(self) -> bool:
        """Data parallel under torchrun: each step's rows split over the ranks."""
        return self.dist is not None and self.cfg.scheduler.placement == "data"

    @property
    def writes(self) -> bool:
        """Whether this process writes out_dir: one process, or rank 0 of several."""
        return self.dist is None or self.dist.main

    def now(self) -> float:
        return time.time() - self.start


class Interrupted(Exception):
    """SIGINT or SIGTERM: the run checkpointed and stopped; the same command resumes it."""
    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


# ----------------------------------------------------------------------------- jobs

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


# ----------------------------------------------------------------------------- checkpoint and resume

def job_state(run: Run, s: JobState) -> dict:
    """An admitted job's whole state on the CPU: for the run checkpoint and a parked sweep trial."""
    params = lora.adapter_parameters(run.model, s.config.name)
    optimizer = s.optimizer.state_dict()
    optimizer["state"] = {i: {key: value.cpu() if torch.is_tensor(value) else value for key, value in state.items()}
                          for i, state in optimizer["state"].items()}   # load_state_dict moves them back
    return {"weights": [p.detach().cpu() for p in params],
            "grads": [None if p.grad is None else p.grad.cpu() for p in params],
            "optimizer": optimizer, "generator": s.generator.get_state(),
            "loss_sum": s.loss_sum.cpu(), "reward_sums": s.reward_sums.cpu(),
            "admitted_s": s.admitted_at - run.start,
            "best": None if s.best is None else {"loss": s.best.loss, "step": s.best.step,
                                                 "weights": [w.cpu() for w in s.best.weights],
                                                 "rewards": s.best.rewards, "task": s.best.task},
            **{key: getattr(s, key) for key in COUNTERS}}


def load_job(run: Run, name: str, saved: dict) -> JobState:
    """The job admitted again as job_state() left it."""
    s = add_job(run, name)
    params = lora.adapter_parameters(run.model, name)
    with torch.no_grad():
        for param, weight, grad in zip(params, saved["weights"], saved["grads"]):
            param.copy_(weight)
            param.grad = None if grad is None else grad.to(param.device)
    s.optimizer.load_state_dict(saved["optimizer"])
    s.generator.set_state(saved["generator"])
    s.loss_sum = saved["loss_sum"].to(run.device)
    s.reward_sums = saved.get("reward_sums", s.reward_sums).to(run.device)   # absent before preference jobs
    s.admitted_at = run.start + saved["admitted_s"]
    for key in COUNTERS:
        setattr(s, key, saved.get(key, getattr(s, key)))
    if saved["best"] is not None:
        best = saved["best"]
        s.best = Best(best["loss"], best["step"], [w.to(run.device) for w in best["weights"]], best.get("rewards"),
                      best.get("task"))
    return s


def save_checkpoint(run: Run):
    """The whole run's state in one file, written atomically (out_dir/checkpoint/state.pt):
    enough for the same command to go on exactly where this step ended."""
    if run.rows_apart:   # rank 0 holds the summed gradients
        dist.reduce_gradients(run, list(run.jobs.values()), settle=True)
    # Admission order, as the adapters sit in the layers.
    jobs = {name: job_state(run, s) for name, s in run.jobs.items()}
    own = {"elapsed_s": run.now(), "step": run.step, "ticks": run.ticks, "pending": run.pending, "tokens": run.tokens,
           "padded_tokens": run.padded_tokens, "peak_mb": run.peak_mb, "prediction_errors": run.prediction_errors,
           "summary": run.summary, "bar": [run.bar.n, run.bar.total], "scheduler": run.sched.state_dict(),
           "jobs": jobs, "torch_rng": torch.get_rng_state(),
           "sweep": None if run.sweep is None else run.sweep.state_dict(), "parked": run.parked}
    ranks = run.dist.gather(None if run.writes else own) if run.jobs_apart else None   # job parallel: each rank's own
    if not run.writes:
        return
    state = {"version": 1, "config": dataclasses.asdict(run.cfg), "inputs": run.inputs,
             "metrics_bytes": run.metrics.tell(), **own, "ranks": ranks}
    folder = run.out_dir / "checkpoint"
    folder.mkdir(exist_ok=True)
    t0 = time.time()
    files.atomic_write(folder / "state.pt", write=lambda p: torch.save(state, p))
    run.log({"event": "checkpoint", "fused_step": run.step, "ms": 1000 * (time.time() - t0),
             "bytes": (folder / "state.pt").stat().st_size})


def restore(run: Run, state: dict):
    """Put a run back as save_checkpoint left it (read_checkpoint checked its inputs)."""
    metrics_bytes = state["metrics_bytes"]
    if run.jobs_apart and not run.writes:   # job parallel: this rank's own part
        state = state["ranks"][run.dist.rank]
    run.start = time.time() - state["elapsed_s"]
    run.ticks, run.pending = state.get("ticks", 0), state.get("pending", [])
    run.step, run.tokens, run.padded_tokens = state["step"], state["tokens"], state["padded_tokens"]
    run.peak_mb, run.prediction_errors, run.summary = state["peak_mb"], state["prediction_errors"], state["summary"]
    run.bar.n, run.bar.total = state["bar"]
    run.bar.refresh()
    if run.jobs_apart:   # this rank's scheduler holds the jobs it was given
        run.sched.waiting = [run.plans[name] for name in state["scheduler"]["waiting"] + state["scheduler"]["candidates"]]
    run.sched.load_state_dict(state["scheduler"])
    for name, saved in state["jobs"].items():
        s = load_job(run, name, saved)
        if not run.writes:   # data parallel: rank 0 carries the gradients summed so far
            s.optimizer.zero_grad(set_to_none=True)
    if run.sweep is not None:
        run.sweep.load_state_dict(state["sweep"])
        run.parked = state["parked"]
        for name, saved in run.parked.items():   # a plan the scheduler does not hold (a promoted one it does)
            if name not in state["scheduler"]["popped"]:
                for _ in range(saved["popped"]):
                    run.plans[name].pop()
    torch.set_rng_state(state["torch_rng"])
    if run.metrics is not None:
        run.metrics.truncate(metrics_bytes)   # lines after the checkpoint are written again
        run.metrics.seek(metrics_bytes)


def read_checkpoint(out_dir: Path, inputs: dict[str, str]) -> dict:
    """The run checkpoint, if its input files are still the same."""
    file = out_dir / "checkpoint" / "state.pt"
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever torch says, the file is unusable
        raise ConfigError(f"{file}: unreadable ({type(e).__name__}); pass --overwrite to start the run again") from None
    for path, digest in state["inputs"].items():
        if inputs.get(path) != digest:
            raise ConfigError(f"{path}: changed since the run in {out_dir} started; "
                              f"restore it, or pass --overwrite to start again")
    return state
