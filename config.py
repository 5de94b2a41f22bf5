"""The run's configuration: one dataclass per concern (run, job, scheduler), read from JSON/TOML
(ours or m-LoRA's) with `--key=value` overrides, every value checked before anything is read or
written; and what a run may do with its out_dir (claim_out_dir), decided before it is touched.
"""
import ast
import dataclasses
import difflib
import errno
import hashlib
import inspect
import io
import json
import math
import os
import re
import sys
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

import files
import lora
import mlora_config
import objectives
from data import NAMED_TEMPLATES
from scheduler import STRATEGIES



@dataclass(kw_only=True)
class JobConfig(lora.LoRAConfig):
    """One job: an adapter (LoRAConfig's fields, by PEFT's names: r, alpha, dropout, targets,
    variant, init, use_rslora, use_dora) plus its data, objective, optimizer and schedule."""
    name: str                              # adapter name; outputs go to out_dir/<name>/
    data: str                              # .json / .jsonl: sft rows {instruction, input, output}; preference rows {prompt, chosen, rejected}
    objective: str = "sft"                 # a key of objectives.OBJECTIVES; the fields below are read by those that declare them
    loss_type: str = "sigmoid"             # a preference objective's loss_types: sigmoid | ipo (as TRL's loss_type)
    beta: float = 0.1                      # preference objectives: the preference term's temperature (or weight)
    label_smoothing: float = 0.0           # sigmoid preference loss: assumed chance that a pair's labels are flipped
    cpo_alpha: float = 1.0                 # cpo: weight of the chosen answers' NLL term
    test_data: str | None = None           # held-out rows of the same format, for eval loss
    template: str = "alpaca"               # alpaca | chat (the model's own) | plain | mlora | a template file (alpaca-lora or m-LoRA JSON, m-LoRA YAML/Jinja)
    cutoff_len: int = 256                  # tokens per example after truncation
    train_on_inputs: bool = False          # also put loss on the prompt tokens
    dropout: float = 0.05                  # LoRAConfig's, drawn from the job's own RNG; a training default
    optimizer: str = "adamw"               # adamw | sgd
    lr: float = 3e-4                       # peak learning rate
    loraplus_lr_ratio: float | None = None  # LoRA+ (Hayou et al. 2024): B's lr is this x lr (PEFT's create_loraplus_optimizer)
    weight_decay: float = 0.0              # decoupled for adamw, L2 for sgd
    momentum: float = 0.0                  # sgd only
    lr_schedule: str = "constant"          # constant | linear | cosine (decay to 0 after warmup)
    warmup_steps: int = 0                  # linear warmup from lr 0 at the first step, in optimizer steps (as transformers)
    max_grad_norm: float | None = 1.0      # clip this job's gradient norm (None: no clipping)
    batch_size: int = 16                   # rows per optimizer step
    micro_batch_size: int = 4              # rows per fused forward; batch_size must be a multiple
    epochs: int = 3                        # passes over the data
    max_steps: int | None = None           # stop after this many optimizer steps (None: all epochs)
    eval_every: int = 0                    # held-out loss every N optimizer steps (0: only at the end)
    save_every: int = 0                    # also write the adapter to snapshots/<name>/step-<step>/ every N steps
    group_by_length: bool = False          # order each epoch so a micro-batch holds rows of similar length
    priority: int = 0                      # higher is admitted first; FIFO within a priority
    early_stop: int | None = None          # stop after N evals without a better held-out loss (needs eval_every)
    diverge_factor: float = 2.0            # with early_stop: also stop when held-out loss > this x its best
    early_stop_metric: str = "loss"        # what early_stop watches: loss (held-out, lower is better) | task (task score, higher is better; no divergence test)
    task_metric: str | None = None         # sft: also score test_data at each eval: generated answers (exact | contains | regex) or log-likelihood multiple choice (choice: acc | choice_norm: acc_norm, as lm-eval) (null: none)
    task_pattern: str | None = None        # regex: an answer is right when re.fullmatch(task_pattern, answer) (the row's output is not read)
    task_max_new_tokens: int = 32          # task_metric: greedy tokens generated per held-out prompt

    def lora_config(self) -> lora.LoRAConfig:
        """The adapter part of the job, field by field."""
        return lora.LoRAConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(lora.LoRAConfig)})


@dataclass
class SchedulerConfig:
    strategy: str = "trivial"              # trivial | optimal-fit | fast-fit (see scheduler.py)
    max_candidates: int = 4                # jobs admitted at once (adapter + optimizer in memory)
    max_concurrent: int = 2                # jobs fused into one step
    memory_budget_gb: float | None = None  # cap on each step's predicted peak memory, GiB (None: no cap)
    token_budget: int | None = None        # cap on each step's processed tokens (padding included); fast-fit fills up to it
    placement: str = "data"                # under torchrun (dist.py): data (each step's rows split over the ranks) | job (each rank its own jobs)


@dataclass
class SweepConfig:
    """A hyperparameter search (sweep.py): one trial job per point of `space`, each `job` with
    that point's values, named <name>-t00, <name>-t01, ...; the metric is held-out loss or task score."""
    name: str                              # the sweep's name; trial jobs are <name>-tNN (out_dir/<name>-tNN/)
    job: JobConfig                         # the base job: any job fields but name (test_data is required: the metric)
    space: dict                            # job field -> list of values; random search also {"uniform": [lo, hi]} or {"log_uniform": [lo, hi]}
    search: str = "grid"                   # grid (every combination, in order) | random (`trials` seeded draws)
    trials: int | None = None              # random: the number of trials (grid: null, every combination)
    seed: int | None = None                # random: the draws' seed (null: the run's seed)
    policy: str = "halving"                # full (every trial runs its whole schedule) | halving (synchronous successive halving)
    eta: int = 3                           # at each rung the best 1/eta of the trials that reached it go on (at least one)
    rung_steps: int = 1                    # the first rung, in a trial's optimizer steps; rung k at rung_steps x eta^k
    rung_tokens: int | None = None         # rungs by tokens instead: rung k at the first optimizer step where the trial has trained rung_tokens x eta^k tokens
    metric: str = "loss"                   # what ranks trials: loss (held-out, lower is better) | task (the job's task_metric score, higher is better)


@dataclass
class RunConfig:
    base_model: str                        # Hugging Face checkpoint folder
    jobs: list[JobConfig] = field(default_factory=list)   # the adapters to train (may be empty beside a sweep)
    dtype: str = "auto"                    # base weights: auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16; adapters stay fp32
    device: str = "auto"                   # auto | cpu | cuda | cuda:N
    quant: str | None = None               # QLoRA base: nf4 | fp4 | nf4-dq | fp4-dq (double quant.) | int8 | null
    seed: int = 42                         # adapter init, data order and dropout derive from it and the job name
    out_dir: str = "out"                   # adapters, metrics.jsonl, config.json
    log_every: int = 1                     # metrics.jsonl / progress bar interval, in fused steps
    checkpoint_every: int = 50             # write the run checkpoint (out_dir/checkpoint/) every N fused steps (0: only on SIGINT/SIGTERM)
    show_examples: int = 3                 # at the end, the first N held-out prompts of each job with test_data: base vs adapter answers (0: none)
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute
    packing: bool = True                   # each step's examples end to end in one row, no padding (data.pack)
    cuda_graphs: bool = False              # steps at fixed shapes, replayed as CUDA graphs (graphs.py; packed SFT, plain LoRA, llama family, one process)
    fuse_adapters: str = "auto"            # auto (all adapters of a layer in shared matmuls on GPUs, per adapter on CPUs) | always | never; same result, speed only
    dropout_draw: str = "auto"             # auto (dropped positions on CPUs, bool masks on GPUs) | masks (the GPU's draw everywhere: other masks than a CPU's positions, same distribution)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    dist_timeout_s: float = 600.0          # under torchrun: a collective waiting longer than this ends the run (a rank stalled)
    shard_base: bool = False               # under torchrun, data placement: the frozen base split over the ranks (FSDP2), for a base too big for one device
    sweep: SweepConfig | None = None       # a hyperparameter search whose trials run as jobs beside `jobs` (sweep.py)


class ConfigError(ValueError):
    pass


# What out_dir holds besides one folder per job; no job may take these names.
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "run.json", "loss.png", "checkpoint", "snapshots",
             "sweep.json", "sweep.png", "best.json")
# Config fields a resumed run may change: they change no result.
RESUMABLE_CHANGES = ("log_every", "checkpoint_every", "dist_timeout_s", "show_examples")
OPTIMIZERS, SCHEDULES, DTYPES = ("adamw", "sgd"), ("constant", "linear", "cosine"), ("auto", "float32", "bfloat16", "float16")
SEARCHES, POLICIES, RANGES = ("grid", "random"), ("full", "halving"), ("uniform", "log_uniform")
CHOICE_METRICS = ("choice", "choice_norm")   # task metrics scored by log-likelihood (report.py), not generated
TASK_METRICS, EVAL_METRICS = ("exact", "contains", "regex", *CHOICE_METRICS), ("loss", "task")
PLACEMENTS = ("data", "job")
MAX_TRIALS = 10_000
FLOAT32_MAX = 3.4028234663852886e38
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def validate(cfg: RunConfig, where: str, inputs: bool = True):
    """Every value's range and enum, before anything is read or written: a ConfigError naming
    the field. `inputs`: also that the base folder, data and template files exist (load_config
    leaves that to train, which runs where the paths resolve). (Their contents and the targets
    are checked by prepare, still before out_dir.)"""
    def need(ok: bool, field: str, value, expected: str):
        if not ok:
            raise ConfigError(f"{where}: {field}: {expected}, got {value!r}")

    validate_run(cfg, where)
    need(bool(cfg.jobs) or cfg.sweep is not None, "jobs", cfg.jobs, "expected a non-empty list of jobs (or a sweep)")
    seen = {}
    for i, job in enumerate(cfg.jobs):
        validate_job(job, where, f"jobs[{i}]")
        need(job.name.lower() not in seen, f"jobs[{i}].name", job.name,
             f"expected a unique name (jobs[{seen.get(job.name.lower())}] has it)")
        seen[job.name.lower()] = i
    if cfg.sweep is not None:
        validate_sweep(cfg.sweep, where)
    if inputs:
        check_inputs(cfg, where)


def validate_run(cfg: RunConfig, where: str):
    """The run's own values (all but its jobs and sweep), each against its range or enum: a
    ConfigError "where: field: ...". validate's first part; serve.py's settings, which start with no job."""
    def need(ok: bool, field: str, value, expected: str):
        if not ok:
            raise ConfigError(f"{where}: {field}: {expected}, got {value!r}")

    def finite(x) -> bool:
        return x is not None and math.isfinite(x)

    need(cfg.dtype in DTYPES, "dtype", cfg.dtype, f"expected one of {', '.join(DTYPES)}")
    need(cfg.device in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", cfg.device) is not None,
         "device", cfg.device, "expected auto, cpu, cuda or cuda:N")
    if cfg.device.startswith("cuda"):
        index = int(cfg.device.partition(":")[2] or 0)
        need(torch.cuda.is_available() and index < torch.cuda.device_count(), "device", cfg.device,
             f"not available here ({torch.cuda.device_count()} CUDA devices)")
    need(isinstance(cfg.out_dir, str) and cfg.out_dir.strip() != "", "out_dir", cfg.out_dir, "expected a folder path")
    check_path(cfg.out_dir, where, "out_dir", to_make=True)
    check_path(cfg.base_model, where, "base_model")
    need(cfg.scheduler.strategy in STRATEGIES, "scheduler.strategy", cfg.scheduler.strategy,
         f"expected one of {', '.join(STRATEGIES)}")
    need(cfg.log_every >= 1, "log_every", cfg.log_every, "expected >= 1")
    need(cfg.fuse_adapters in lora.FUSE_OPTIONS, "fuse_adapters", cfg.fuse_adapters,
         f"expected one of {', '.join(lora.FUSE_OPTIONS)}")
    need(cfg.dropout_draw in lora.DROPOUT_DRAWS, "dropout_draw", cfg.dropout_draw,
         f"expected one of {', '.join(lora.DROPOUT_DRAWS)}")
    need(cfg.checkpoint_every >= 0, "checkpoint_every", cfg.checkpoint_every, "expected >= 0")
    need(cfg.show_examples >= 0, "show_examples", cfg.show_examples, "expected >= 0")
    sc = cfg.scheduler
    need(sc.max_candidates >= 1, "scheduler.max_candidates", sc.max_candidates, "expected >= 1")
    need(sc.max_concurrent >= 1, "scheduler.max_concurrent", sc.max_concurrent, "expected >= 1")
    need(sc.memory_budget_gb is None or finite(sc.memory_budget_gb) and sc.memory_budget_gb > 0,
         "scheduler.memory_budget_gb", sc.memory_budget_gb, "expected null or a number > 0")
    need(sc.token_budget is None or sc.token_budget >= 1, "scheduler.token_budget", sc.token_budget, "expected null or >= 1")
    need(sc.placement in PLACEMENTS, "scheduler.placement", sc.placement, f"expected one of {', '.join(PLACEMENTS)}")
    need(0 < cfg.dist_timeout_s <= 86400, "dist_timeout_s", cfg.dist_timeout_s, "expected seconds in (0, 86400]")
    need(not cfg.shard_base or cfg.quant is None, "shard_base", cfg.shard_base,
         f"a {cfg.quant} base cannot be sharded (bitsandbytes' packed weights are not FSDP2's); use quant null")
    need(not cfg.shard_base or sc.placement == "data", "shard_base", cfg.shard_base,
         "works with scheduler.placement 'data' only (job parallel ranks run different steps)")


def check_path(path: str, where: str, field: str, to_make: bool = False):
    """A path from the config as the OS will take it: no NUL byte, no longer than the OS allows,
    and a folder to be made (out_dir) not below a file: a ConfigError naming the field. Whether
    it exists is check_inputs' question."""
    shown = repr(path) if len(path) <= 80 else f"{path[:60]!r}... ({len(path)} characters)"
    if "\x00" in path:
        raise ConfigError(f"{where}: {field}: a path cannot hold a NUL byte, got {shown}")
    try:
        os.stat(path)
    except (FileNotFoundError, PermissionError):
        pass
    except NotADirectoryError:   # a file where a folder of the path should be
        if to_make:
            file = next(p for p in reversed(Path(path).absolute().parents) if p.exists() and not p.is_dir())
            raise ConfigError(f"{where}: {field}: {file} is a file, so no folder can be made below it, got {shown}") from None
    except OSError as e:
        reason = "longer than the OS allows" if e.errno == errno.ENAMETOOLONG else "not a usable path"
        raise ConfigError(f"{where}: {field}: {reason} ({e.strerror}), got {shown}") from None


def check_inputs(cfg: RunConfig, where: str):
    """The base folder, every job's data, test_data and template file exist: else one line
    naming the job, the field and the full path tried (relative paths resolve against the
    working directory, as in m-LoRA)."""
    def missing(path: str, field: str, what: str, job: str | None = None) -> ConfigError:
        whose = "" if job is None else f" (job {job!r})"
        return ConfigError(f"{where}: {field}{whose}: {what} not found: {Path(path).absolute()} "
                           f"(a relative path resolves against the working directory)")
    if not Path(cfg.base_model).is_dir():
        raise missing(cfg.base_model, "base_model", "checkpoint folder")
    jobs = [(f"jobs[{i}]", job) for i, job in enumerate(cfg.jobs)] + ([("sweep.job", cfg.sweep.job)] if cfg.sweep else [])
    for label, job in jobs:
        for key in ("data", "test_data"):
            path = getattr(job, key)
            if path and not Path(path).is_file():
                raise missing(path, f"{label}.{key}", "file", job.name)
        if job.template not in NAMED_TEMPLATES and not Path(job.template).is_file():
            raise missing(job.template, f"{label}.template", f"not a named template ({', '.join(NAMED_TEMPLATES)}), and file",
                          job.name)


def validate_job(job: JobConfig, where: str, label: str):
    """One job's values, each against its range or enum: a ConfigError "where: label.field: ..."."""
    def finite(x) -> bool:   # and within fp32's range: the optimizers do their arithmetic in it
        return x is not None and math.isfinite(x) and abs(x) <= FLOAT32_MAX

    def check(name: str, ok: bool, expected: str):
        if not ok:
            raise ConfigError(f"{where}: {label}.{name}: {expected}, got {getattr(job, name)!r}")
    check("name", SAFE_NAME.fullmatch(job.name) is not None and job.name not in RUN_FILES,
          "expected a plain folder name (letters, digits, '_', '.', '-'; not " + ", ".join(RUN_FILES) + ")")
    check("data", job.data.strip() != "", "expected a file path")
    for name in ("data", "test_data", "template"):
        if getattr(job, name):
            check_path(getattr(job, name), where, f"{label}.{name}")
    check("r", 1 <= job.r <= 65536, "expected 1 <= r <= 65536")
    check("alpha", finite(job.alpha) and job.alpha > 0, "expected a finite number > 0")
    check("dropout", finite(job.dropout) and 0 <= job.dropout < 1, "expected 0 <= dropout < 1")
    check("targets", job.targets is None or len(job.targets) > 0, "expected null (the model's defaults) or a non-empty list")
    check("init", job.init in lora.INITS, f"expected one of {', '.join(lora.INITS)}")
    check("init", not (job.use_dora and job.init in ("pissa", "olora")), "use_dora goes with kaiming or gaussian only")
    check("variant", job.variant in lora.VARIANTS, f"expected one of {', '.join(lora.VARIANTS)}")
    check("variant", job.variant in ("lora", job.resolved_variant), f"{job.resolved_variant} is set by use_dora "
          "or init already; give variant alone")
    check("cutoff_len", 2 <= job.cutoff_len <= 2**20, "expected 2 <= cutoff_len <= 1048576")
    check("optimizer", job.optimizer in OPTIMIZERS, f"expected one of {', '.join(OPTIMIZERS)}")
    check("lr", finite(job.lr) and job.lr > 0, "expected a finite number > 0")
    check("weight_decay", finite(job.weight_decay) and job.weight_decay >= 0, "expected a finite number >= 0")
    check("momentum", finite(job.momentum) and 0 <= job.momentum < 1, "expected 0 <= momentum < 1")
    check("lr_schedule", job.lr_schedule in SCHEDULES, f"expected one of {', '.join(SCHEDULES)}")
    check("warmup_steps", job.warmup_steps >= 0, "expected >= 0")
    check("max_grad_norm", job.max_grad_norm is None or finite(job.max_grad_norm) and job.max_grad_norm > 0,
          "expected null (no clipping) or a finite number > 0")
    check("batch_size", 1 <= job.batch_size <= 2**20, "expected 1 <= batch_size <= 1048576")
    check("micro_batch_size", 1 <= job.micro_batch_size <= job.batch_size and job.batch_size % job.micro_batch_size == 0,
          f"expected a divisor of batch_size {job.batch_size}")
    check("epochs", 1 <= job.epochs <= 100_000, "expected 1 <= epochs <= 100000")
    check("max_steps", job.max_steps is None or job.max_steps >= 0, "expected null or >= 0")
    check("eval_every", job.eval_every >= 0, "expected >= 0")
    check("save_every", job.save_every >= 0, "expected >= 0")
    check("early_stop", job.early_stop is None or job.early_stop >= 1, "expected null or >= 1")
    check("early_stop", job.early_stop is None or job.test_data and job.eval_every > 0,
          "needs test_data and eval_every > 0")
    check("diverge_factor", finite(job.diverge_factor) and job.diverge_factor > 1, "expected a finite number > 1")
    check("objective", job.objective in objectives.OBJECTIVES, f"expected one of {', '.join(objectives.OBJECTIVES)}")
    check("task_metric", job.task_metric is None or job.task_metric in TASK_METRICS,
          f"expected null or one of {', '.join(TASK_METRICS)}")
    check("task_metric", job.task_metric is None or job.test_data, "needs test_data (its prompts and expected outputs)")
    check("task_metric", job.task_metric is None or not objectives.objective_of(job).pairs,
          f"{', '.join(name for name, o in objectives.OBJECTIVES.items() if not o.pairs)} jobs only "
          "(a preference row has no one expected answer)")
    check("task_pattern", (job.task_metric == "regex") == (job.task_pattern is not None),
          "expected a regular expression with task_metric regex, null otherwise")
    check("task_pattern", job.task_pattern is None or _compiles(job.task_pattern), "expected a valid regular expression")
    check("task_max_new_tokens", 1 <= job.task_max_new_tokens <= 4096, "expected 1 <= task_max_new_tokens <= 4096")
    check("early_stop_metric", job.early_stop_metric in EVAL_METRICS, f"expected one of {', '.join(EVAL_METRICS)}")
    check("early_stop_metric", job.early_stop_metric == "loss" or job.task_metric is not None, "task needs a task_metric")
    for name, ok, expected in objectives.objective_of(job).checks(job):   # the fields its objective reads
        check(name, ok, expected)
    check("loraplus_lr_ratio", job.loraplus_lr_ratio is None or finite(job.loraplus_lr_ratio) and job.loraplus_lr_ratio > 0,
          "expected null or a finite number > 0")


def trial_names(sweep: SweepConfig) -> list[str]:
    """<name>-t00, <name>-t01, ... (wider indices for 101+ trials), one per trial."""
    space = sweep_space(sweep, "sweep")
    count = sweep.trials if sweep.search == "random" else math.prod(len(values) for values in space.values())
    width = max(2, len(str(count - 1)))
    return [f"{sweep.name}-t{i:0{width}d}" for i in range(count)]



def field_label(cfg: RunConfig, i: int, field: str) -> str:
    """Where job i's field comes from, for an error: jobs[i].field, or a trial's sweep.job / sweep.space."""
    name = cfg.jobs[i].name
    if cfg.sweep is None or name not in trial_names(cfg.sweep):
        return f"jobs[{i}].{field}"
    return f"sweep.space.{field} (trial {name})" if field in cfg.sweep.space else f"sweep.job.{field}"



def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError):
        return False
    return True


def validate_sweep(sweep: SweepConfig, where: str):
    """The sweep's own fields, its base job, and every value of its space tried on the base job:
    a ConfigError naming the field (sweep.expand checks each trial's combination of values)."""
    def need(ok: bool, name: str, expected: str):
        if not ok:
            raise ConfigError(f"{where}: sweep.{name}: {expected}, got {getattr(sweep, name)!r}")
    need(isinstance(sweep.name, str) and SAFE_NAME.fullmatch(sweep.name) is not None and len(sweep.name) <= 90,
         "name", "expected a plain name of at most 90 characters (letters, digits, '_', '.', '-')")
    need(sweep.search in SEARCHES, "search", f"expected one of {', '.join(SEARCHES)}")
    need(sweep.policy in POLICIES, "policy", f"expected one of {', '.join(POLICIES)}")
    need(2 <= sweep.eta <= 1000, "eta", "expected 2 <= eta <= 1000")
    need(1 <= sweep.rung_steps <= 2**30, "rung_steps", "expected 1 <= rung_steps <= 1073741824")
    need(sweep.rung_tokens is None or 1 <= sweep.rung_tokens <= 2**50, "rung_tokens", "expected null or 1 <= rung_tokens <= 2**50")
    need(sweep.metric in EVAL_METRICS, "metric", f"expected one of {', '.join(EVAL_METRICS)}")
    need(sweep.metric == "loss" or isinstance(sweep.job, JobConfig) and sweep.job.task_metric is not None,
         "metric", "task needs sweep.job.task_metric")
    need(sweep.seed is None or 0 <= sweep.seed < 2**63, "seed", "expected null or 0 <= seed < 2**63")
    if sweep.search == "random":
        need(sweep.trials is not None and 1 <= sweep.trials <= MAX_TRIALS, "trials",
             f"random search: expected 1 <= trials <= {MAX_TRIALS}")
    else:
        need(sweep.trials is None, "trials", "a grid runs every combination: expected null")
    validate_job(sweep.job, where, "sweep.job")
    if not sweep.job.test_data:
        raise ConfigError(f"{where}: sweep.job.test_data: the sweep's metric is held-out loss: "
                          f"expected a file of held-out rows, got {sweep.job.test_data!r}")
    space = sweep_space(sweep, where)
    combinations = math.prod(len(v) for v in space.values() if isinstance(v, list))
    need(sweep.search == "random" or combinations <= MAX_TRIALS, "space",
         f"a grid of {combinations} combinations: expected at most {MAX_TRIALS}")
    for name, values in space.items():
        for value in values if isinstance(values, list) else values[1:]:
            validate_job(dataclasses.replace(sweep.job, **{name: value}), where, "sweep.space")


def sweep_space(sweep: SweepConfig, where: str) -> dict[str, list | tuple[str, float, float]]:
    """The search space, type-checked against JobConfig's fields: field -> its list of values
    (ints made floats for a float field), or (range kind, lo, hi) for random search (an int
    field's bounds rounded)."""
    if not isinstance(sweep.space, dict) or not sweep.space:
        raise ConfigError(f"{where}: sweep.space: expected an object of job field -> values, got {sweep.space!r}")
    hints = typing.get_type_hints(JobConfig)
    space = {}
    for name, values in sweep.space.items():
        at = f"{where}: sweep.space.{name}"
        if name not in hints or name in ("name", "test_data"):
            close = difflib.get_close_matches(name, [h for h in hints if h not in ("name", "test_data")], n=1)
            raise ConfigError(f"{at}: not a job field a sweep can vary (name and test_data stay)"
                              + (f" (did you mean {close[0]!r}?)" if close else ""))
        if isinstance(values, dict):
            kind, bounds = next(iter(values.items())) if len(values) == 1 else (None, None)
            if sweep.search != "random" or kind not in RANGES:
                raise ConfigError(f"{at}: expected a list of values" + (" or, for random search, {\"uniform\": [lo, hi]} "
                                  "or {\"log_uniform\": [lo, hi]}" if sweep.search == "random" else " (a grid takes lists)")
                                  + f", got {values!r}")
            if hints[name] not in (int, float):
                raise ConfigError(f"{at}: a range needs a number field ({name} is not), got {values!r}")
            if not (isinstance(bounds, list) and len(bounds) == 2 and all(
                    isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) for b in bounds)
                    and bounds[0] < bounds[1] and (kind == "uniform" or bounds[0] > 0)):
                raise ConfigError(f"{at}.{kind}: expected [lo, hi], finite numbers, lo < hi"
                                  f"{' and lo > 0' if kind == 'log_uniform' else ''}, got {bounds!r}")
            lo, hi = (round(b) for b in bounds) if hints[name] is int else map(float, bounds)
            space[name] = (kind, lo, hi)
        elif isinstance(values, list) and 1 <= len(values) <= MAX_TRIALS:
            space[name] = [_check_type(v, hints[name], f"{at}[{i}]") for i, v in enumerate(values)]
        else:
            raise ConfigError(f"{at}: expected a non-empty list of at most {MAX_TRIALS} values, got {values!r}")
    return space


# Names other trainers give our fields (transformers' TrainingArguments, PEFT's LoraConfig, m-LoRA),
# for the unknown-key message; the key is looked up in lower case, '-' as '_'.
ALIASES = {"learning_rate": "lr", "lr_scheduler_type": "lr_schedule", "scheduler_type": "lr_schedule",
           "num_train_epochs": "epochs", "num_epochs": "epochs", "epoch": "epochs", "lora_r": "r", "rank": "r",
           "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets",
           "per_device_train_batch_size": "micro_batch_size", "max_seq_length": "cutoff_len", "max_length": "cutoff_len",
           "max_seq_len": "cutoff_len", "eval_steps": "eval_every", "save_steps": "save_every",
           "logging_steps": "log_every", "output_dir": "out_dir", "model_name_or_path": "base_model",
           "model": "base_model", "train_file": "data", "dataset": "data", "validation_file": "test_data",
           "eval_data": "test_data", "gradient_checkpointing": "activation_checkpointing", "torch_dtype": "dtype",
           "warmup": "warmup_steps", "optim": "optimizer", "prompt_template": "template"}


def config_levels() -> dict:
    """Where each dataclass's fields go: {override prefix: (class, its fields there)}."""
    return {"": (RunConfig, [f.name for f in dataclasses.fields(RunConfig) if f.name not in ("jobs", "scheduler", "sweep")]),
            "scheduler.": (SchedulerConfig, [f.name for f in dataclasses.fields(SchedulerConfig)]),
            "jobs.NAME.": (JobConfig, [f.name for f in dataclasses.fields(JobConfig)]),
            "sweep.": (SweepConfig, [f.name for f in dataclasses.fields(SweepConfig)])}


def nearest_field(key: str, cls) -> tuple[str, str] | None:
    """The field an unknown key of `cls` most likely meant, as (override prefix, name): the field
    itself or its alias (learning_rate -> lr) at any level (a top-level max_steps -> ("jobs.NAME.",
    "max_steps")), else the closest spelling in cls, else at another level; None when nothing is near."""
    name = ALIASES.get(key.lower().replace("-", "_"), key)
    levels = [("", [f.name for f in dataclasses.fields(cls)])]   # cls's own first, jobs / scheduler / sweep too
    levels += [(prefix, names) for prefix, (level, names) in config_levels().items() if level is not cls]
    for prefix, names in levels:
        if name in names:
            return prefix, name
    for prefix, names in levels:
        close = difflib.get_close_matches(name, names, n=1)
        if close:
            return prefix, close[0]
    return None


def _unknown_key(key: str, cls, override: bool) -> str:
    """' (did you mean ...?)' for an unknown key, or the list of cls's fields when nothing is near."""
    near = nearest_field(key, cls)
    if near is None:
        return f" (valid: {', '.join(f.name for f in dataclasses.fields(cls))}; all: python train.py --help-config)"
    prefix, name = near
    if not prefix:
        return f" (did you mean {name!r}?)"
    if override:
        return f" (did you mean '--{prefix}{name}'?)"
    where = {"scheduler.": "in scheduler", "jobs.NAME.": "in each job", "sweep.": "in sweep"}[prefix]
    return f" (did you mean {name!r} {where}?)"


def _field_comments(cls) -> dict[str, str]:
    """{field: its comment} from the source of cls and the dataclasses it extends (the comments are
    the documentation: read, never copied)."""
    comments = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        source = textwrap.dedent(inspect.getsource(klass))
        on_line = {token.start[0]: token.string.lstrip("# ").strip()
                   for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}
        for node in ast.parse(source).body[0].body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                text = " ".join(on_line[n] for n in range(node.lineno, node.end_lineno + 1) if n in on_line)
                comments[node.target.id] = text or comments.get(node.target.id, "")
    return comments


def help_text() -> str:
    """Every config field: where it goes, its type and default, and its comment in config.py (or
    lora.py for the adapter's own fields), for `python train.py --help-config`."""
    out = ["Config fields (config.py). In a JSON / TOML / YAML file, or on the command line as --FIELD=value,",
           "--scheduler.FIELD=value, --jobs.NAME.FIELD=value, --sweep.FIELD=value, --sweep.job.FIELD=value."]
    titles = {"": "Run (top level)", "scheduler.": "scheduler", "jobs.NAME.": "jobs: a list, each job",
              "sweep.": "sweep (its `job` takes any job field but name)"}
    for prefix, (cls, names) in config_levels().items():
        comments, hints = _field_comments(cls), {f.name: f for f in dataclasses.fields(cls)}
        out.append(f"\n{titles[prefix]}:")
        for name in names:
            f = hints[name]
            if f.default is not dataclasses.MISSING:
                default = json.dumps(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = json.dumps(f.default_factory())
            else:
                default = "required"
            kind = f.type.__name__ if isinstance(f.type, type) else str(f.type)   # int, str | None, list[str] | None
            out.append(f"  {name:<24} {kind:<18} {default:<12} {comments.get(name, '')}")
    return "\n".join(out)


def _check_type(value, hint, where: str):
    """Check (and lightly coerce) a JSON value against a dataclass field's type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_type(value, inner, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    if isinstance(value, str) and not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ConfigError(f"{where}: not valid Unicode (a lone surrogate), got {value!r}") from None
    return value


def _fill(cls, raw: dict, where: str, file: str):
    """Build dataclass `cls` from a dict; unknown keys name the closest valid one. Errors read
    "FILE: where.key: ..." (where is "" at the top)."""
    def at(key: str) -> str:
        return f"{where}.{key}" if where else key
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: {where or 'the config'}: expected an object, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{file}: {at(key)}: unknown key{_unknown_key(key, cls, override=False)}")
        if key == "jobs":
            if not isinstance(value, list) or not value and "sweep" not in raw:
                raise ConfigError(f"{file}: jobs: expected a non-empty list of jobs")
            kwargs[key] = [_fill(JobConfig, j, f"jobs[{i}]", file) for i, j in enumerate(value)]
        elif key == "scheduler":
            kwargs[key] = _fill(SchedulerConfig, value, "scheduler", file)
        elif key == "sweep" and value is not None:
            kwargs[key] = _fill(SweepConfig, value, "sweep", file)
        elif key == "job" and cls is SweepConfig:   # the base job: trials take their names from the sweep's
            if isinstance(value, dict) and "name" in value:
                raise ConfigError(f"{file}: sweep.job.name: trials are named <sweep.name>-tNN; remove it")
            name = raw.get("name") if isinstance(raw.get("name"), str) else "sweep"
            kwargs[key] = _fill(JobConfig, {"name": name, **value} if isinstance(value, dict) else value, "sweep.job", file)
        else:
            kwargs[key] = _check_type(value, hints[key], f"{file}: {at(key)}")
    missing = [n for n, f in fields.items() if n not in kwargs
               and (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                    or cls is RunConfig and n == "jobs" and "sweep" not in raw)]   # jobs may be left out beside a sweep
    if missing:
        raise ConfigError(f"{file}: {where or 'the config'}: missing required key(s) {', '.join(missing)}")
    return cls(**kwargs)


def read_job(raw, where: str, label: str = "job") -> JobConfig:
    """One job's object (a config file's jobs[i], or one submitted to serve.py) filled and checked as
    load_config and validate check a file's jobs: a ConfigError "where: label.field: ..."."""
    job = _fill(JobConfig, raw, label, where)
    validate_job(job, where, label)
    return job

def _parse_override(text: str, hint):
    """`--key=value` text -> a JSON-like value; a bare string when it is not JSON."""
    if text.lower() in ("none", "null"):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    wants_list = list in (typing.get_origin(hint), *map(typing.get_origin, typing.get_args(hint)))
    if wants_list and isinstance(value, str):
        value = [v for v in value.split(",") if v]
    return value


def _check_keys(value, file: str):
    """YAML allows keys of any type; a config's keys are names."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"{file}: key {key!r}: expected a name (a string)")
            _check_keys(item, file)
    elif isinstance(value, list):
        for item in value:
            _check_keys(item, file)


def _yaml_load(text: str):
    """yaml.safe_load, but 3e-4 is a number, as in YAML 1.2 (PyYAML's YAML 1.1 reads a string)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))
    return yaml.load(text, Loader=Loader)


def _yaml_problem(e: Exception) -> str:
    # PyYAML's messages span lines (context, problem, a quoted snippet); keep the problem and where.
    problem = getattr(e, "problem", None) or (str(e).splitlines() or [type(e).__name__])[0]
    mark = getattr(e, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def load_config(path: str | None, overrides: list[str]) -> RunConfig:
    """Read JSON/TOML/YAML (ours or m-LoRA's), apply `--key=value` overrides, type-check."""
    if path is None:
        raise ConfigError("no config: pass --config FILE")
    file = Path(path)
    raw = read_config_file(file)
    mlora = "jobs" not in raw and bool(raw.keys() & {"lora", "dispatcher", "datasets", "adapters", "tasks"})
    if mlora:
        try:
            raw, warning = mlora_config.from_mlora(raw, str(file))
        except mlora_config.MloraError as e:
            raise ConfigError(str(e)) from None
        if warning:
            print(warning, file=sys.stderr)
    for arg in overrides:
        apply_override(raw, arg)
    if mlora and "base_model" not in raw:
        raise ConfigError(f"{file}: base_model: an m-LoRA config names none; pass --base_model=DIR")
    cfg = _fill(RunConfig, raw, "", str(file))
    try:
        import quant
        quant.check_quant(cfg.quant)
    except ValueError as e:
        raise ConfigError(f"{file}: quant: {e}") from None
    validate(cfg, str(file), inputs=False)
    return cfg


def read_config_file(file: Path) -> dict:
    """The config file's object, parsed by its suffix (.yaml/.yml, .toml, else JSON); one line naming the file otherwise."""
    try:
        text = file.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{file}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{file}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if file.suffix in (".yaml", ".yml"):
        import yaml
        try:
            raw = _yaml_load(text)
        except (yaml.YAMLError, ValueError, RecursionError) as e:  # ValueError: a bad date, e.g. 2024-13-01
            raise ConfigError(f"{file}: cannot parse YAML: {_yaml_problem(e)}") from None
        try:
            _check_keys(raw, str(file))
        except RecursionError:  # an alias inside itself: a: &x [*x]
            raise ConfigError(f"{file}: nests too deep, or an alias refers to itself") from None
    else:
        try:
            if file.suffix == ".toml":
                import tomllib
                raw = tomllib.loads(text)
            else:
                raw = json.loads(text)
        except (ValueError, RecursionError) as e:   # JSONDecodeError and TOMLDecodeError are ValueErrors
            raise ConfigError(f"{file}: cannot parse: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: the config: expected an object, got {type(raw).__name__}")
    return raw


def apply_override(raw: dict, arg: str):
    """One `--key=value` (--field, --scheduler.field, --sweep.field, --sweep.job.field or
    --jobs.NAME.field) written into the raw config, type-checked against its field."""
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"argument {arg!r}: expected --key=value")
    key, text_value = arg[2:].split("=", 1)
    parts = key.split(".")
    if parts[0] == "jobs":  # --jobs.NAME.field=value
        if len(parts) != 3:
            raise ConfigError(f"--{key}: expected --jobs.NAME.FIELD=value")
        matches = [j for j in raw.get("jobs", []) if j.get("name") == parts[1]]
        if not matches:
            raise ConfigError(f"--{key}: no job named {parts[1]!r}")
        target, cls, leaf = matches[0], JobConfig, parts[2]
    elif parts[0] == "scheduler" and len(parts) == 2:
        target, cls, leaf = raw.setdefault("scheduler", {}), SchedulerConfig, parts[1]
    elif parts[0] == "sweep" and len(parts) in (2, 3) and isinstance(raw.get("sweep"), dict):
        if len(parts) == 3 and (parts[1] != "job" or not isinstance(raw["sweep"].get("job"), dict)):
            raise ConfigError(f"--{key}: expected --sweep.FIELD=value or --sweep.job.FIELD=value")
        target, cls, leaf = (raw["sweep"], SweepConfig, parts[1]) if len(parts) == 2 else (raw["sweep"]["job"], JobConfig, parts[2])
    elif len(parts) == 1:
        target, cls, leaf = raw, RunConfig, parts[0]
    else:
        raise ConfigError(f"--{key}: unknown key")
    hints = typing.get_type_hints(cls)
    if parts[0] == "sweep" and cls is JobConfig and leaf == "name":
        raise ConfigError(f"--{key}: trials are named <sweep.name>-tNN; set --sweep.name")
    if leaf not in hints or cls is RunConfig and leaf in ("jobs", "scheduler", "sweep"):
        raise ConfigError(f"--{key}: unknown key{_unknown_key(leaf, cls, override=True)}")
    target[leaf] = _parse_override(text_value, hints[leaf])


# ----------------------------------------------------------------------------- out_dir

def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def config_difference(old: dict, new: dict, where: str = "") -> str | None:
    """The first field where two resolved configs differ, as 'field: A there, B here' (None: same)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(old.keys() | new.keys()):
            if not where and key in RESUMABLE_CHANGES:
                continue
            diff = config_difference(old.get(key), new.get(key), f"{where}.{key}" if where else key)
            if diff:
                return diff
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return next(filter(None, (config_difference(a, b, f"{where}[{i}]") for i, (a, b) in enumerate(zip(old, new)))), None)
    return None if old == new else f"{where}: {json.dumps(old)} there, {json.dumps(new)} here"


def claim_out_dir(cfg: RunConfig, overwrite: bool) -> str:
    """What this run does with out_dir, decided before anything is written (nothing is):
    "fresh" (missing or empty), "overwrite" (a run of ours, --overwrite), "resume" (an unfinished
    run of this config with a checkpoint), "restart" (one that never checkpointed), "finished"."""
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {out}: exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return "fresh"
    try:
        old = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        old = None
    if not isinstance(old, dict) or not isinstance(old.get("jobs"), list):
        raise ConfigError(f"out_dir {out}: not empty and holds no run of train.py (no readable config.json); "
                          "choose another out_dir")
    if overwrite:
        return "overwrite"
    diff = config_difference(old, dataclasses.asdict(cfg))
    if diff:
        raise ConfigError(f"out_dir {out} holds a run of another config ({diff}); choose another out_dir, "
                          "or pass --overwrite to replace that run")
    if (out / "run.json").exists():
        return "finished"
    return "resume" if (out / "checkpoint" / "state.pt").exists() else "restart"


def clear_run(out: Path):
    """Remove a previous run's outputs from out (--overwrite): only what train.py writes there."""
    try:
        old = json.loads((out / "config.json").read_text())
        names = [j["name"] for j in old["jobs"] if isinstance(j, dict) and SAFE_NAME.fullmatch(str(j.get("name")))]
    except (OSError, ValueError, KeyError, TypeError):
        names = []
    remove_partial_writes(out)
    for name in (*names, *RUN_FILES):
        files.remove(out / name)


def remove_partial_writes(out: Path):
    """What a killed run left half-written: files.atomic_write's and replace_dir's temporary
    files and folders (.NAME.tmp-PID, .NAME.old-PID), in out_dir and the folders it writes.
    A link is never followed: a linked folder is not searched, a linked temporary is unlinked."""
    def folders(parent: Path) -> list[Path]:
        return [p for p in parent.iterdir() if p.is_dir() and not p.is_symlink()]
    snapshots = out / "snapshots"
    real_snapshots = snapshots.is_dir() and not snapshots.is_symlink()
    for folder in (out, *folders(out), *(folders(snapshots) if real_snapshots else ())):
        for path in (*folder.glob(".*.tmp-*"), *folder.glob(".*.old-*")):
            files.remove(path)


class Command(NamedTuple):
    """What train.py's command line asks for (train.main)."""
    action: str                 # train | merge | help (config: "fields" for --help-config)
    config: str | None          # --config FILE (None: the bundled demo)
    overrides: list[str]        # --key=value
    overwrite: bool             # --overwrite
    merge: dict[str, str]       # --merge ADAPTER --to DIR [--base DIR] [--quant Q]


def parse_command_line(argv: list[str]) -> Command:
    """train.py's arguments; a --merge without --to (or the reverse) is a ConfigError."""
    config_path, overrides, args, merge, overwrite = None, [], list(argv), {}, False
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help", "--help-config"):
            return Command("help", None if arg != "--help-config" else "fields", [], False, {})
        if arg == "--overwrite":
            overwrite = True
        elif arg in ("--config", "--merge", "--to", "--base", "--quant") and args:
            value = args.pop(0)
            if arg == "--config":
                config_path = value
            else:
                merge[arg[2:]] = value
        elif arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        else:
            overrides.append(arg)
    if "quant" in merge and not merge.keys() & {"merge", "to", "base"}:
        overrides.append(f"--quant={merge.pop('quant')}")  # `--quant nf4` for a training run
    if merge and ("merge" not in merge or "to" not in merge):
        raise ConfigError("usage: python train.py --merge ADAPTER_DIR --to OUT_DIR [--base BASE_DIR] [--quant Q]")
    return Command("merge" if merge else "train", config_path, overrides, overwrite, merge)


def single_process_warnings(cfg: RunConfig) -> list[str]:
    """One line for each torchrun setting changed from its default that does nothing in one process."""
    run = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    defaults = {"shard_base": (cfg.shard_base, run["shard_base"]), "dist_timeout_s": (cfg.dist_timeout_s, run["dist_timeout_s"]),
                "scheduler.placement": (cfg.scheduler.placement, SchedulerConfig().placement)}
    return [f"warning: {name} {value!r} does nothing in one process (it is read under torchrun only)"
            for name, (value, default) in defaults.items() if value != default]
