"""m-LoRA's own config files (TUDB-Labs/mLoRA), all three generations, translated into ours
(config.load_config calls from_mlora for a file with a "lora" list or m-LoRA's YAML sections).

m-LoRA (TUDB-Labs/mLoRA) changed its config format twice; load_config reads all three.
  2023  JSON: globals and a "lora" list with alpha, dropout, output (mlora.py, mlora/dispatcher.py;
        aspen/dataset.py before them). Templates {"parameter", "prompt", "prompt_no_input"} whose
        prompt holds {output}.
  2024  JSON: the same list with lora_alpha, lora_dropout, use_rslora, use_dora, lora_init,
        loraplus_lr_ratio, weight_decay, scheduler_type, warmup_steps / warmup_ratio
        (mlora/common/modelargs.py, mlora/trainer.py). Alpaca-LoRA templates, "mlora" by default.
  2025  YAML: dispatcher, datasets, adapters (lora, loraplus, dora, vera), tasks (train, dpo, cpo,
        cit, ppo) (mlora/config/*.py). Templates are YAML files holding a Jinja "template".
Each field is translated, or named in one printed warning line, or, where ignoring it would
change what is trained and we cannot do it, a one-line error. What m-LoRA does in every
generation: loss on every token of the rendered text (train_on_inputs), no gradient clipping,
torch's AdamW weight decay (0.01), intervals (save_step, early_stop_test_step) in micro-batches.
"""
import json
from pathlib import Path

from model import FAMILIES


class MloraError(ValueError):
    """A field of an m-LoRA file we cannot translate (config.load_config reports it as a ConfigError)."""


MLORA_OPTIMIZERS = ("adamw", "sgd")   # m-LoRA's optimizers that we train (its "adam" raised there too)


MLORA_REQUIRED = object()  # MloraFile.take: the field has no default in m-LoRA
MLORA_STRATEGIES = {"optim": "optimal-fit", "none": "trivial"}  # 2023-24 train_strategy
# 2025 dispatcher.name: each runs concurrency_num tasks together, every one in each step (our trivial).
MLORA_DISPATCHERS = {"default": None, "backend": "m-LoRA's server mode; scheduled as its default dispatcher",
                     "pipe": "pipeline parallelism over devices; one device here, the same updates"}
# 2024 scheduler_type (transformers' get_scheduler names) -> our lr_schedule; others are errors.
MLORA_SCHEDULES = {"constant": "constant", "constant_with_warmup": "constant", "linear": "linear", "cosine": "cosine"}
MLORA_INITS = {"original": "kaiming", "gaussian": "gaussian"}  # 2024 lora_init
MLORA_ADAPTERS = {"lora": {}, "loraplus": {}, "dora": {"use_dora": True}}  # 2025 adapter types we train
MLORA_TASKS = {"train": "sft", "dpo": "dpo", "cpo": "cpo"}  # 2025 task types we train
MLORA_PROMPT_TYPES = {"sft": "instruction", "dpo": "preference", "cpo": "preference"}  # 2025 dataset prompt_type
_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object",
               list: "a list", (dict, list): "an object or a list"}


class MloraFile:
    """One m-LoRA config being translated. Fields are popped as they are read, so what is left
    in an object was read by no one; ignored fields gather for the one warning line."""

    def __init__(self, file: str):
        self.file = file
        self.ignored: dict[str, list[str]] = {}  # reason -> fields

    def error(self, field: str, message: str) -> MloraError:
        return MloraError(f"{self.file}: {field}: {message}")

    def take(self, obj: dict, key: str, where: str, kind, default=MLORA_REQUIRED):
        """obj[key] (popped) as kind, or m-LoRA's default; a missing required field is an error."""
        field = f"{where}.{key}" if where else key
        if key not in obj:
            if default is MLORA_REQUIRED:
                raise self.error(field, "missing (m-LoRA requires it)")
            return default
        value = obj.pop(key)
        if kind in (int, float):
            # m-LoRA casts its numbers (int(), float()): YAML's 3e-4, a string to PyYAML, is a number.
            try:
                number = float(value) if isinstance(value, str) else value
                if isinstance(number, (int, float)) and not isinstance(number, bool) \
                        and (kind is float or float(number).is_integer()):
                    return kind(number)
            except (ValueError, OverflowError):
                pass
        elif isinstance(value, kind):
            return value
        raise self.error(field, f"expected {_KIND_NAMES[kind]}, got {value!r}")

    def ignore(self, field: str, reason: str):
        fields = self.ignored.setdefault(reason, [])
        if field not in fields:  # a global (expand_right) may be ignored for several adapters
            fields.append(field)

    def leftovers(self, obj: dict, where: str):
        """Keys no reader took: m-LoRA never read them either."""
        for key in obj:
            self.ignore(f"{where}.{key}" if where else key, "not an m-LoRA field")

    def warning(self) -> str | None:
        if not self.ignored:
            return None
        parts = [f"{', '.join(fields)} ({reason})" for reason, fields in self.ignored.items()]
        return f"warning: m-LoRA config {self.file}: ignored: " + "; ".join(parts)


def _mlora_targets(m: MloraFile, value, field: str) -> list[str]:
    """target_modules ({name: true/false}; a list too in 2024) in the family's module names."""
    named = list(value)   # every name the file gives, on or off: what tells the family
    if isinstance(value, dict):
        for key, on in value.items():
            if not isinstance(on, bool):
                raise m.error(f"{field}.{key}", f"expected true or false, got {on!r}")
        value = [key for key, on in value.items() if on]
    elif not all(isinstance(name, str) for name in value):
        raise m.error(field, f"expected module names, got {value!r}")
    return _family_names(m, value, named, field)


def _family_names(m: MloraFile, names: list[str], named: list[str], field: str) -> list[str]:
    """m-LoRA's module names in the family's own (its MLORA_NAMES; other names pass as they are).
    The base is not read yet, so the family is the one whose LORA_TARGETS hold most of the names
    the file gives; families that hold as many but read a name apart are an error."""
    families = list(dict.fromkeys(FAMILIES.values()))
    held = {family: sum(family.MLORA_NAMES.get(n, n) in family.LORA_TARGETS for n in named) for family in families}
    best = [family for family in families if held[family] == max(held.values())]
    readings = {family.MODEL_TYPES[0]: list(dict.fromkeys(family.MLORA_NAMES.get(n, n) for n in names))
                for family in best}
    if len({tuple(reading) for reading in readings.values()}) > 1:
        raise m.error(field, f"{', '.join(named)} could be the modules of "
                             + " or ".join(f"{kind} ({', '.join(reading)})" for kind, reading in readings.items())
                             + "; name another of the family's modules (false turns it off)")
    return next(iter(readings.values()))


def _optimizer_steps(micro_batches: int, job: dict) -> int:
    # m-LoRA counts save_step and early_stop_test_step in micro-batches (its steps); ours count
    # optimizer steps: micro-batches / accumulation, rounded up.
    accumulation = max(1, job["batch_size"] // max(1, job["micro_batch_size"]))
    return -(-micro_batches // accumulation)


def _count_rows(m: MloraFile, path: str, field: str) -> int:
    # 2024's warmup_ratio is a fraction of the job's optimizer steps, so of its rows.
    try:
        text = Path(path).read_text(encoding="utf-8")
        rows = json.loads(text) if path.endswith(".json") else [line for line in text.split("\n") if line.strip()]
    except (OSError, ValueError, RecursionError) as e:
        raise m.error(field, f"needs the rows of {path} to count steps: cannot read them ({type(e).__name__})") from None
    if not isinstance(rows, list):
        raise m.error(field, f"needs the rows of {path} to count steps: not a list of rows")
    return len(rows)


def _mlora_lora_list(raw: dict, m: MloraFile) -> dict:
    """m-LoRA's 2023 and 2024 JSON: globals and a "lora" list (2024 when an item has lora_alpha)."""
    raw = dict(raw)
    items = m.take(raw, "lora", "", list)
    if not items:
        raise m.error("lora", "expected a non-empty list of adapters")
    v2024 = any(isinstance(item, dict) and "lora_alpha" in item for item in items)
    cutoff_len = m.take(raw, "cutoff_len", "", int)
    if cutoff_len == -1:
        raise m.error("cutoff_len", "-1 (the model's own maximum length) is not supported; give a number of tokens")
    save_step = m.take(raw, "save_step", "", int)
    test_step = m.take(raw, "early_stop_test_step", "", int, None)
    strategy = m.take(raw, "train_strategy", "", str)
    if strategy not in MLORA_STRATEGIES:
        raise m.error("train_strategy", f"expected optim or none, got {strategy!r}")
    out = {"scheduler": {"strategy": MLORA_STRATEGIES[strategy],
                         "max_candidates": m.take(raw, "train_lora_candidate_num", "", int),
                         "max_concurrent": m.take(raw, "train_lora_simultaneously_num", "", int)}}
    # 2023's globals (aspen/dataset.py), later per adapter; the dispatcher's default groups by length.
    group_by_length = m.take(raw, "group_by_length", "", bool, not v2024)
    expand_side = "right" if m.take(raw, "expand_right", "", bool, True) else "left"
    device = m.take(raw, "device", "", str, None)
    if device is not None:
        out["device"] = device
    for key in ("base_model", "token_model"):
        if m.take(raw, key, "", str, None) is not None:
            m.ignore(key, "the base model is --base_model=DIR, a Hugging Face folder")
    if m.take(raw, "pad_token_id", "", int, None) is not None:
        m.ignore("pad_token_id", "padding is masked, its id changes nothing")
    for key in ("eval_lora_simultaneously_num", "eval_rollback_retrying_steps", "evaluate_result"):
        if key in raw:
            raw.pop(key)
            m.ignore(key, "read by m-LoRA's --evaluate mode only")
    m.leftovers(raw, "")

    out["jobs"] = []
    for i, item in enumerate(items):
        where = f"lora[{i}]"
        if not isinstance(item, dict):
            raise m.error(where, f"expected an object, got {item!r}")
        item = dict(item)
        for key in ("routing_strategy", "peft_type"):
            if key in item:
                raise m.error(f"{where}.{key}", "MixLoRA / LoRAMoE adapters are not supported")
        job = {"name": m.take(item, "name", where, str), "data": m.take(item, "data", where, str),
               "r": m.take(item, "r", where, int),
               "alpha": m.take(item, "lora_alpha" if v2024 else "alpha", where, float),
               "dropout": m.take(item, "lora_dropout" if v2024 else "dropout", where, float),
               "targets": _mlora_targets(m, m.take(item, "target_modules", where, (dict, list) if v2024 else dict),
                                         f"{where}.target_modules"),
               "lr": m.take(item, "lr", where, float), "batch_size": m.take(item, "batch_size", where, int),
               "epochs": m.take(item, "num_epochs", where, int),
               "cutoff_len": cutoff_len, "train_on_inputs": True, "max_grad_norm": None,
               "group_by_length": m.take(item, "group_by_length", where, bool, group_by_length)}
        # 2024's micro_batch_size defaults to batch_size (mlora/trainer.py); 2023 requires it.
        job["micro_batch_size"] = m.take(item, "micro_batch_size", where, int,
                                         job["batch_size"] if v2024 else MLORA_REQUIRED)
        job["optimizer"] = m.take(item, "optim", where, str, "adamw" if v2024 else MLORA_REQUIRED)
        if job["optimizer"] not in MLORA_OPTIMIZERS:
            raise m.error(f"{where}.optim", f"expected adamw or sgd (m-LoRA's two), got {job['optimizer']!r}")
        job["momentum"] = m.take(item, "momentum", where, float, 0.0)
        # 2023: torch's defaults (AdamW 0.01, SGD none); 2024: a field, 0.01 unless given, for both.
        default_decay = 0.01 if v2024 or job["optimizer"] == "adamw" else 0.0
        job["weight_decay"] = m.take(item, "weight_decay", where, float, default_decay) if v2024 else default_decay
        job["template"] = m.take(item, "prompt", where, str, "mlora" if v2024 else MLORA_REQUIRED)
        test_data = m.take(item, "test_data", where, str, None)
        if test_data:
            job["test_data"] = test_data
        if save_step > 0:
            job["save_every"] = _optimizer_steps(save_step, job)
        if test_step is not None and test_data:
            job["eval_every"] = _optimizer_steps(test_step, job)  # m-LoRA tests every so often; no stop rule in the file
        elif test_step is not None:
            m.ignore(f"early_stop_test_step for {where}", "the adapter has no test_data")
        if m.take(item, "test_batch_size", where, int, None) is not None:
            m.ignore(f"{where}.test_batch_size", "held-out rows go in micro-batches; no effect on training")
        side = m.take(item, "expand_side", where, str, expand_side)
        if side not in ("right", "left"):
            raise m.error(f"{where}.expand_side", f"expected right or left, got {side!r}")
        if side == "left":
            m.ignore(f"{where}.expand_side" if "expand_side" in items[i] else "expand_right",
                     "rows are packed or padded on the right; padding is masked either way")
        if not v2024:
            if m.take(item, "output", where, str, None) is not None:
                m.ignore(f"{where}.output", "adapters are written to out_dir/<name>/")
        else:
            _mlora_2024_fields(m, item, where, job)
        m.leftovers(item, where)
        out["jobs"].append(job)
    return out


def _mlora_2024_fields(m: MloraFile, item: dict, where: str, job: dict):
    """The 2024 list's adapter variants, LoRA+ and LR schedule (mlora/common/modelargs.py, mlora/trainer.py)."""
    job["use_rslora"] = m.take(item, "use_rslora", where, bool, False)
    job["use_dora"] = m.take(item, "use_dora", where, bool, False)
    init = m.take(item, "lora_init", where, str, "original")
    if init not in MLORA_INITS:
        raise m.error(f"{where}.lora_init", f"expected original or gaussian, got {init!r}")
    job["init"] = MLORA_INITS[init]
    ratio = m.take(item, "loraplus_lr_ratio", where, float, 1.0)
    if not ratio >= 1.0:  # m-LoRA asserts it; 1.0 is plain LoRA
        raise m.error(f"{where}.loraplus_lr_ratio", f"expected >= 1 (m-LoRA asserts it), got {ratio!r}")
    job["loraplus_lr_ratio"] = None if ratio == 1.0 else ratio
    schedule = m.take(item, "scheduler_type", where, str, "constant")
    if schedule not in MLORA_SCHEDULES:
        raise m.error(f"{where}.scheduler_type", f"expected one of {', '.join(MLORA_SCHEDULES)}, got {schedule!r}")
    job["lr_schedule"] = MLORA_SCHEDULES[schedule]
    warmup, warmup_field = m.take(item, "warmup_steps", where, int, 0), f"{where}.warmup_steps"
    ratio = m.take(item, "warmup_ratio", where, float, 0.0)
    if ratio:  # transformers' get_scheduler gets warmup_ratio x the job's optimizer steps
        rows = _count_rows(m, job["data"], f"{where}.warmup_ratio")
        warmup = round(ratio * -(-rows // max(1, job["batch_size"])) * job["epochs"])
        warmup_field = f"{where}.warmup_ratio"
    if warmup and schedule == "constant":
        m.ignore(warmup_field, "m-LoRA's constant schedule has no warmup; constant_with_warmup has")
        warmup = 0
    job["warmup_steps"] = warmup
    task = m.take(item, "task_name", where, str, "casual")
    if task != "casual":
        raise m.error(f"{where}.task_name", f"only casual (instruction data) is trained here, got {task!r}")
    if m.take(item, "val_set_size", where, float, None) is not None:
        raise m.error(f"{where}.val_set_size", "a random split of data is not reproduced; give test_data instead")
    if m.take(item, "evaluate_steps", where, int, None) is not None:
        m.ignore(f"{where}.evaluate_steps", "task metrics during training; no effect on training")


def _mlora_yaml(raw: dict, m: MloraFile) -> dict:
    """m-LoRA's 2025 YAML: a dispatcher, datasets and adapters by name, tasks that join them."""
    raw = dict(raw)
    dispatcher = dict(m.take(raw, "dispatcher", "", dict))
    name = m.take(dispatcher, "name", "dispatcher", str)
    if name not in MLORA_DISPATCHERS:
        raise m.error("dispatcher.name", f"expected one of {', '.join(MLORA_DISPATCHERS)}, got {name!r}")
    if MLORA_DISPATCHERS[name]:
        m.ignore("dispatcher.name", MLORA_DISPATCHERS[name])
    concurrency = m.take(dispatcher, "concurrency_num", "dispatcher", int)
    m.leftovers(dispatcher, "dispatcher")
    out = {"scheduler": {"strategy": "trivial", "max_candidates": concurrency, "max_concurrent": concurrency},
           "jobs": []}
    named = {}
    for kind in ("datasets", "adapters"):
        named[kind] = {}
        for i, obj in enumerate(m.take(raw, kind, "", list)):
            if not isinstance(obj, dict):
                raise m.error(f"{kind}[{i}]", f"expected an object, got {obj!r}")
            obj_name = m.take(dict(obj), "name", f"{kind}[{i}]", str)
            if obj_name in named[kind]:
                raise m.error(f"{kind}[{i}].name", f"{obj_name!r} is also {named[kind][obj_name][0]}'s name")
            named[kind][obj_name] = (f"{kind}[{i}]", obj)
    tasks = m.take(raw, "tasks", "", list)
    m.leftovers(raw, "")
    if not tasks:
        raise m.error("tasks", "expected a non-empty list of tasks")
    datasets, trained = {}, {}
    for i, task in enumerate(tasks):
        where = f"tasks[{i}]"
        if not isinstance(task, dict):
            raise m.error(where, f"expected an object, got {task!r}")
        task = dict(task)
        kind = m.take(task, "type", where, str)
        if kind not in MLORA_TASKS:
            raise m.error(f"{where}.type", f"{kind!r} tasks are not supported (train, dpo and cpo are)")
        objective = MLORA_TASKS[kind]
        adapter = m.take(task, "adapter", where, str)
        if adapter not in named["adapters"]:
            raise m.error(f"{where}.adapter", f"no adapter named {adapter!r}")
        if adapter in trained:
            raise m.error(f"{where}.adapter", f"{adapter!r} is trained by {trained[adapter]} too")
        trained[adapter] = where
        dataset = m.take(task, "dataset", where, str)
        if dataset not in named["datasets"]:
            raise m.error(f"{where}.dataset", f"no dataset named {dataset!r}")
        if dataset not in datasets:
            datasets[dataset] = _mlora_dataset(m, *named["datasets"][dataset])
        data, template, prompt_type = datasets[dataset]
        if prompt_type is not None and prompt_type != MLORA_PROMPT_TYPES[objective]:
            raise m.error(f"{where}.dataset", f"a {kind} task needs prompt_type {MLORA_PROMPT_TYPES[objective]}, "
                                              f"dataset {dataset!r} has {prompt_type}")
        job = {"name": adapter, "data": data, "template": template, "objective": objective,
               "batch_size": m.take(task, "batch_size", where, int),
               "micro_batch_size": m.take(task, "mini_batch_size", where, int),
               "epochs": m.take(task, "num_epochs", where, int), "cutoff_len": m.take(task, "cutoff_len", where, int),
               # a dpo/cpo job scores its answers only (the prompt's log-probs cancel in m-LoRA's too)
               "train_on_inputs": objective == "sft", "max_grad_norm": None}
        save_step = m.take(task, "save_step", where, int)
        if save_step > 0:
            job["save_every"] = _optimizer_steps(save_step, job)
        if m.take(task, "name", where, str, None) is not None:  # the first YAML's tasks had none
            m.ignore(f"{where}.name", "a job is named by its adapter")
        if objective != "sft":
            _mlora_preference_fields(m, task, where, job, named["adapters"])
        job.update(_mlora_adapter(m, *named["adapters"][adapter]))
        m.leftovers(task, where)
        out["jobs"].append(job)
    for kind, used in (("adapters", trained), ("datasets", datasets)):
        for obj_name, (where, _) in named[kind].items():
            if obj_name not in used:
                m.ignore(where, "no task uses it")
    return out


def _mlora_dataset(m: MloraFile, where: str, obj: dict) -> tuple[str, str, str | None]:
    """(data path, template path, prompt_type) of a 2025 dataset (mlora/config/dataset.py)."""
    obj = dict(obj)
    obj.pop("name")
    data, template = m.take(obj, "data", where, str), m.take(obj, "prompt", where, str)
    prompt_type = m.take(obj, "prompt_type", where, str, None)  # the first YAML (2024) had none
    preprocess = m.take(obj, "preprocess", where, str)
    if preprocess == "default":
        m.ignore(f"{where}.preprocess", "file order; rows are shuffled here by the run's seed")
    elif preprocess != "shuffle":
        raise m.error(f"{where}.preprocess", f"expected default or shuffle, got {preprocess!r}")
    m.leftovers(obj, where)
    return data, template, prompt_type


def _mlora_adapter(m: MloraFile, where: str, obj: dict) -> dict:
    """Our job fields from a 2025 adapter (mlora/config/adapter.py, optimizer.py, lr_scheduler.py)."""
    obj = dict(obj)
    obj.pop("name")
    kind = m.take(obj, "type", where, str)
    if kind not in MLORA_ADAPTERS:
        raise m.error(f"{where}.type", f"{kind!r} adapters are not supported (lora, loraplus and dora are)")
    job = {"r": m.take(obj, "r", where, int), "alpha": m.take(obj, "alpha", where, float),
           "dropout": m.take(obj, "dropout", where, float), **MLORA_ADAPTERS[kind],
           "targets": _mlora_targets(m, m.take(obj, "target_modules", where, dict), f"{where}.target_modules")}
    if kind == "loraplus":
        job["loraplus_lr_ratio"] = m.take(obj, "lr_ratio", where, float)
    if m.take(obj, "path", where, str, None) is not None:  # the first YAML's adapters had none
        m.ignore(f"{where}.path", "adapters are written to out_dir/<name>/")
    optimizer = m.take(obj, "optimizer", where, str, None)
    if optimizer is None:
        raise m.error(f"{where}.optimizer", "missing: m-LoRA trains no adapter without one")
    if optimizer not in MLORA_OPTIMIZERS:
        raise m.error(f"{where}.optimizer", f"expected adamw or sgd (m-LoRA's two), got {optimizer!r}")
    job.update(optimizer=optimizer, lr=m.take(obj, "lr", where, float),
               weight_decay=0.01 if optimizer == "adamw" else 0.0)  # torch's defaults: m-LoRA passes lr (and momentum) only
    if optimizer == "sgd":
        job["momentum"] = m.take(obj, "momentum", where, float)
    schedule = m.take(obj, "lrscheduler", where, str, "none")
    if schedule == "cosine":  # torch's CosineAnnealingLR, stepped with the optimizer
        job["lr_schedule"] = "cosine"
        m.take(obj, "t_max", where, int)
        m.ignore(f"{where}.t_max", "the cosine decays to 0 over the job's own optimizer steps")
        if m.take(obj, "eta_min", where, int) != 0:
            raise m.error(f"{where}.eta_min", "the cosine decays to 0 here; only eta_min 0 is supported")
    elif schedule != "none":
        raise m.error(f"{where}.lrscheduler", f"expected cosine (or none), got {schedule!r}")
    m.leftovers(obj, where)
    return job


def _mlora_preference_fields(m: MloraFile, task: dict, where: str, job: dict, adapters: dict):
    """A 2025 dpo or cpo task's loss (mlora/config/task.py; executor/task/dpo_task.py, cpo_task.py)."""
    loss_type = m.take(task, "loss_type", where, str)
    allowed = ("sigmoid", "ipo") if job["objective"] == "dpo" else ("sigmoid",)
    if loss_type not in allowed:
        raise m.error(f"{where}.loss_type", f"expected {' or '.join(allowed)}, got {loss_type!r}")
    job.update(loss_type=loss_type, beta=m.take(task, "beta", where, float))
    if job["objective"] == "dpo":
        job["label_smoothing"] = m.take(task, "label_smoothing", where, float)
        reference = m.take(task, "reference", where, str)
        if reference in adapters:  # any other name means the base model
            raise m.error(f"{where}.reference", f"the reference is the frozen base model here, not adapter {reference!r}")
    else:
        job.update(label_smoothing=0.0, cpo_alpha=1.0)  # m-LoRA's CPO: preference loss + the chosen answers' NLL
        if m.take(task, "label_smoothing", where, float, None) is not None:
            m.ignore(f"{where}.label_smoothing", "m-LoRA's CPO does not read it")


def from_mlora(raw: dict, file: str) -> tuple[dict, str | None]:
    """Translate an m-LoRA config (2023/2024 "lora" list or 2025 YAML) into ours: (config, the
    warning line naming every ignored field, or None). Paths stay as written: relative to the
    current folder, as when m-LoRA ran the file."""
    m = MloraFile(file)
    out = _mlora_lora_list(raw, m) if "lora" in raw else _mlora_yaml(raw, m)
    return out, m.warning()
