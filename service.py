"""The fine-tuning service's trainer, a layer over train.py's loop (serve.py puts the HTTP API in
front of it; nothing here knows HTTP).

One thread owns the model and the Run and turns train.py's loop (train_step, with failures
isolated per job: isolate_failures). Jobs submitted while it trains join the next step that has
room (the scheduler's admission); between turns it applies new jobs, cancellations, and every
generation request that arrived meanwhile, in one batched multi-adapter generation. Request
threads never touch the model: a submission is checked as train.py checks a config's job
(config.read_job, jobs.read_inputs), its inputs are written into out_dir, it is registered and
handed over; job states are read from what the trainer publishes under the lock.

out_dir holds the run's files (each ended job's adapter folder, metrics.jsonl, the run checkpoint
of state.py every `checkpoint_every` fused steps and at close) and _service/, a name no job can
take (config.SAFE_NAME starts with a letter or digit): jobs.json, the job registry, written
atomically at every change of state; data/<job>/, each job's inputs as it was submitted;
serve.py's token file. The registry also notes the loop turn at which the trainer queued each job
and applied each cancellation, before that turn trains: a service killed at any moment and started
again restores the checkpoint and replays the later of those at the same turns (resume), so every
job trains on bitwise as it would have, as a resumed train.py run does.
"""
import dataclasses
import io
import json
import math
import os
import queue
import shutil
import tarfile
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

import data
import files
import generate
import jobs
import lora
import model as M
import peft_format
import state
import train
from config import (ConfigError, RunConfig, check_inputs, check_path, read_job, remove_partial_writes,
                    validate_run)
from jobs import Fused, Run, finish, stop_early
from objectives import METRIC_SUMS
from templates import NAMED_TEMPLATES

SERVICE_DIR = "_service"
INPUT_FIELDS = ("data", "test_data", "template")   # the job fields that name a file
STATES = ("waiting", "training", "finished", "stopped", "failed")
ENDED = ("finished", "stopped", "failed")
MAX_NEW_TOKENS = 1024       # a generation request's max_new_tokens
MAX_GENERATE_ROWS = 256     # prompts x adapters of one request
MAX_PROMPT_TOKENS = 4096


class RequestError(Exception):
    """A request the service refuses: an HTTP status and one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class ServedRun(Run):
    """The service's Run: every line it logs is also kept for the trainer to publish (job states, metrics)."""
    logged: list[dict] = field(default_factory=list)

    def log(self, record: dict):
        super().log(record)
        self.logged.append(record)


@dataclass
class Ask:
    """One generation request, answered by the trainer between turns."""
    rows: list[tuple[list[int], str | None]]   # (prompt ids, adapter or None: the bare base)
    max_new_tokens: int
    done: threading.Event = field(default_factory=threading.Event)
    outputs: list[list[int]] | None = None     # new token ids of each row
    error: str | None = None


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if not isinstance(error, (ValueError, OSError)) else text


# ----------------------------------------------------------------------------- a submission checked, before out_dir is touched

def allowed_file(value: str, allow_dirs: list[Path], label: str) -> Path:
    """The file a job field names, every link resolved, if it lies inside an allowed folder (a
    relative path resolves against the server's working directory, as train.py's)."""
    check_path(value, "request", label)   # no NUL byte, not too long: one line
    real = Path(os.path.realpath(value))
    if not allow_dirs:
        raise RequestError(403, f"request: {label}: this server reads no folder (no --allow_dir): send the rows "
                                f"in the request instead")
    if not any(real.is_relative_to(folder) for folder in allow_dirs):
        raise RequestError(403, f"request: {label}: {value!r} is outside the folders this server reads (--allow_dir)")
    if not real.is_file():
        raise RequestError(422, f"request: {label}: file not found: {value!r} (in an allowed folder)")
    return real


def copy_file(source: Path, target: Path):
    # O_NOFOLLOW: the checked path's last part cannot have become a link since it was resolved.
    with os.fdopen(os.open(source, os.O_RDONLY | os.O_NOFOLLOW), "rb") as f, open(target, "wb") as out:
        shutil.copyfileobj(f, out)


def stage_inputs(body: dict, allow_dirs: list[Path], staging: Path) -> tuple[dict, dict[str, str], dict[str, str]]:
    """The submitted job's object with its inputs put in `staging` (a temporary folder outside
    out_dir): rows given in the request (a list for data or test_data) written one per line, so
    that line N is row N; a file path copied, once allowed_file allows it. Returns the object
    pointing at the copies, {field: where it came from}, and {field: its staged path}."""
    raw, sources, staged = dict(body), {}, {}
    for name in INPUT_FIELDS:
        value = raw.get(name)
        if isinstance(value, list) and name != "template":
            file = staging / f"{name}.jsonl"
            file.write_text("".join(json.dumps(row) + "\n" for row in value))
            sources[name] = f"uploaded ({len(value)} rows)"
        elif isinstance(value, str) and value.strip() and not (name == "template" and value in NAMED_TEMPLATES):
            real = allowed_file(value, allow_dirs, f"job.{name}")
            file = staging / f"{name}{real.suffix}"
            copy_file(real, file)
            sources[name] = value
        else:   # null, a named template, or a value read_job refuses in one line
            continue
        raw[name] = staged[name] = str(file)
    return raw, sources, staged


def relabel(message: str, staged: dict[str, str]) -> str:
    """A config.py or data.py message about the staged copies, naming the request's fields (job.data,
    not a temporary file; job.targets, not read_inputs' one-job run's jobs[0].targets)."""
    for name, path in staged.items():
        message = message.replace(path, f"job.{name}")
    return message.replace("jobs[0].", "job.")


def check_submission(body, cfg: RunConfig, allow_dirs: list[Path], staging: Path) -> tuple:
    """A submitted job checked as train.py checks a config's job (config.read_job, then
    jobs.read_inputs: the base's targets, every row), its inputs staged outside out_dir: (the job,
    its read_inputs, {field: where it came from}, {field: its staged copy})."""
    if not isinstance(body, dict):
        raise RequestError(400, f"request: expected a JSON object of job fields, got {type(body).__name__}")
    raw, sources, staged = stage_inputs(body, allow_dirs, staging)
    try:
        job = read_job(raw, "request")
    except ConfigError as e:
        raise RequestError(422, relabel(str(e), staged)) from None
    try:
        read = jobs.read_inputs(dataclasses.replace(cfg, jobs=[job]))
    except (ValueError, OSError) as e:   # ConfigError, data.DataError, a checkpoint's error
        raise RequestError(422, f"request: {relabel(one_line(e), staged)}") from None
    return job, read, sources, staged


def store_inputs(job, staged: dict[str, str], folder: Path):
    """The staged inputs into folder/<job>/, the folder put there in one step (never half written);
    the job, reading them from there."""
    target = folder / job.name
    tmp = folder / f".{job.name}.tmp-{os.getpid()}"
    files.remove(tmp)
    tmp.mkdir()
    for path in staged.values():
        files.atomic_write(tmp / Path(path).name, write=lambda to, source=path: shutil.copyfile(source, to))
    files.replace_dir(tmp, target)
    return dataclasses.replace(job, **{name: str(target / Path(path).name) for name, path in staged.items()})


def generation_request(body) -> tuple[list[str], list[str | None], int, str | None]:
    """A generation request's prompts, adapters (job names; None: the bare base), max_new_tokens
    and template (a named one, or None: each adapter's own), checked."""
    if not isinstance(body, dict):
        raise RequestError(400, f"request: expected a JSON object, got {type(body).__name__}")
    unknown = sorted(body.keys() - {"prompts", "adapters", "max_new_tokens", "template"})
    if unknown:
        raise RequestError(422, f"request: {unknown[0]}: unknown key (expected prompts, adapters, max_new_tokens, template)")
    prompts, adapters = body.get("prompts"), body.get("adapters", [None])
    max_new_tokens, template = body.get("max_new_tokens", 64), body.get("template")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise RequestError(422, f"request: prompts: expected a non-empty list of non-empty strings, got {prompts!r:.80}")
    if not isinstance(adapters, list) or not adapters or not all(a is None or isinstance(a, str) for a in adapters):
        raise RequestError(422, f"request: adapters: expected a non-empty list of job names (null: the base), "
                                f"got {adapters!r:.80}")
    if len(prompts) * len(adapters) > MAX_GENERATE_ROWS:
        raise RequestError(422, f"request: {len(prompts)} prompts x {len(adapters)} adapters: at most "
                                f"{MAX_GENERATE_ROWS} rows")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise RequestError(422, f"request: max_new_tokens: expected 1 to {MAX_NEW_TOKENS}, got {max_new_tokens!r}")
    if template is not None and template not in NAMED_TEMPLATES:
        raise RequestError(422, f"request: template: expected one of {', '.join(NAMED_TEMPLATES)}, got {template!r:.80}")
    return prompts, adapters, max_new_tokens, template

def finite_json(value):
    """value with every non-finite float as None: JSON has no inf or NaN (a diverged loss)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    return value


def live_state(s: jobs.JobState) -> dict:
    """What a job's state shows while it trains: where it stands, its last loss, its held-out metrics."""
    held_out = {f"eval_{key}": value for key, value in (s.eval_rewards or {}).items()}
    if s.config.task_metric:
        held_out.update(initial_eval_task=s.initial_eval_task, eval_task=s.eval_task)
    return {"step": s.step, "total_steps": s.total_steps, "loss": s.last_loss, "lr": s.lr,
            "initial_eval_loss": s.initial_eval_loss, "eval_loss": s.eval_loss, **held_out, "tokens": s.tokens,
            "tokens_per_s": s.tokens / max(time.time() - s.admitted_at, 1e-9)}


def ended_state(summary: dict) -> dict:
    """The same fields from an ended job's summary (jobs.finish's)."""
    return {"step": summary.get("steps", 0), "loss": summary.get("final_loss"), "tokens": summary.get("tokens", 0),
            "tokens_per_s": summary.get("tokens_per_s"),
            **{key: value for key, value in summary.items() if key.startswith(("eval_", "initial_eval_"))}}


# ----------------------------------------------------------------------------- the service

def claim_out_dir(out_dir: Path, settings: dict) -> dict | None:
    """out_dir's registry if it holds a service of these settings; None if it is missing or empty;
    else a ConfigError (it holds something else)."""
    registry_file = out_dir / SERVICE_DIR / "jobs.json"
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out_dir {out_dir}: exists and is not a folder")
    if not registry_file.exists():
        if out_dir.exists() and any(p.name != SERVICE_DIR for p in out_dir.iterdir()):
            raise ConfigError(f"out_dir {out_dir}: not empty and holds no service (no {SERVICE_DIR}/jobs.json); "
                              "choose another out_dir")
        return None
    try:
        registry = json.loads(registry_file.read_text())
        theirs, records = registry["settings"], registry["jobs"]
        if not isinstance(theirs, dict) or not isinstance(records, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{registry_file}: unreadable; choose another out_dir") from None
    for key, value in settings.items():
        if theirs.get(key) != value:
            raise ConfigError(f"out_dir {out_dir} holds a service of another {key} ({theirs.get(key)!r} "
                              f"there, {value!r} here); choose another out_dir")
    return registry


def open_run(cfg: RunConfig, dir_lock, fail) -> ServedRun:
    """The base loaded and a Run with no job yet: train.py's steps with its layers (add_layers: the
    run checkpoint every cfg.checkpoint_every fused steps among them), failures isolated per job
    (fail(name, error)); metrics.jsonl appended to (a torn last line cut off)."""
    from tqdm import tqdm
    cfg = dataclasses.replace(cfg, jobs=[])   # its own list
    tokenizer = data.load_tokenizer(cfg.base_model)
    device = M.resolve_device(cfg.device)
    model = jobs.load_base(cfg, device)
    metrics_file = Path(cfg.out_dir) / "metrics.jsonl"
    if metrics_file.exists():
        text = metrics_file.read_bytes()
        if text and not text.endswith(b"\n"):
            os.truncate(metrics_file, text.rfind(b"\n") + 1)
    run = ServedRun(cfg, device, Path(cfg.out_dir), model, tokenizer.pad_id, jobs.make_scheduler(cfg, []), {}, {}, {},
                    {}, metrics=open(metrics_file, "a+b"), start=time.time(), bar=tqdm(total=0, disable=True),
                    tokenizer=tokenizer, lock=dir_lock)
    run.steps = train.core_steps()
    train.add_layers(run)
    isolate_failures(run, fail)
    return run


class Service:
    """The trainer thread and the job registry over one out_dir (see the module's docstring)."""

    def __init__(self, cfg: RunConfig, allow_dirs: list[str] = (), trainer: bool = True):
        """trainer=False: no trainer thread; the caller turns the loop (turn(), tests)."""
        validate_run(cfg, "serve.py")
        check_inputs(dataclasses.replace(cfg, jobs=[]), "serve.py")   # the base folder
        jobs.check_base(cfg)
        self.allow_dirs = []
        for folder in allow_dirs:
            if not Path(folder).is_dir():
                raise ConfigError(f"serve.py: --allow_dir: not a folder: {folder!r}")
            self.allow_dirs.append(Path(os.path.realpath(folder)))
        # Absolute: the registry names each job's stored inputs, read again from any working directory.
        self.cfg = cfg = dataclasses.replace(cfg, out_dir=os.path.abspath(cfg.out_dir))
        self.out_dir = Path(cfg.out_dir)
        self.home = self.out_dir / SERVICE_DIR
        self.settings = {"base_model": os.path.realpath(cfg.base_model), "seed": cfg.seed, "dtype": cfg.dtype,
                         "quant": cfg.quant}
        claim_out_dir(self.out_dir, self.settings)
        try:
            self.dir_lock = files.lock_dir(self.out_dir)
        except files.InUse as e:
            raise ConfigError(f"out_dir {e}") from None
        registry = claim_out_dir(self.out_dir, self.settings)   # as it is now that no other service writes it
        self.records: dict[str, dict] = registry["jobs"] if registry else {}
        (self.home / "data").mkdir(parents=True, exist_ok=True)
        os.chmod(self.home, 0o700)   # the submitted rows and the token are the owner's alone
        remove_partial_writes(self.out_dir)
        for partial in (self.home / "data").glob(".*.tmp-*"):
            files.remove(partial)
        self.lock = threading.Condition()   # guards everything below that request threads read or write
        self.inbox: list[tuple] = []        # (job, its read_inputs) submitted, not yet in the scheduler
        self.cancels: list[str] = []
        self.asks: queue.Queue[Ask] = queue.Queue()
        self.reserved: set[str] = set()     # names of submissions being stored (lower case)
        self.live: dict[str, dict] = {}     # a job's state while it trains, as last published
        self.history: dict[str, list[dict]] = {}   # each job's step and evaluation lines
        self.published_step = 0
        self.closing = False
        self.notify = lambda: None          # called after each change that readers see (remote.py's push)
        self.events = 1 + max((e[1] for r in self.records.values() for e in (r.get("queued"), r.get("cancelled")) if e),
                              default=0)   # the next event's number: replay orders a turn's events by it
        self.run = open_run(cfg, self.dir_lock, self.fail)
        self.replay: list[tuple] = resume(self)   # (turn, event, "queue" or "cancel", job name, what it needs)
        self.thread = threading.Thread(target=self.loop, name="trainer", daemon=True)
        if trainer:
            self.thread.start()

    def save_registry(self):
        files.atomic_write(self.home / "jobs.json", json.dumps(finite_json(
            {"version": 1, "settings": self.settings, "jobs": self.records}), indent=1) + "\n")

    # ------------------------------------------------------------------------- what request threads call

    def submit(self, body) -> dict:
        """A job checked (check_submission), its inputs stored in out_dir, registered and handed to
        the trainer; nothing is written unless all of it passes. Returns its state."""
        with tempfile.TemporaryDirectory(prefix="serve-") as staging:
            job, read, sources, staged = check_submission(body, self.cfg, self.allow_dirs, Path(staging))
            with self.lock:
                self.check_new_name(job.name)
                self.reserved.add(job.name.lower())
            try:
                stored = store_inputs(job, staged, self.home / "data")
            except BaseException:
                with self.lock:
                    self.reserved.discard(job.name.lower())
                raise
        moved = {staged[name]: getattr(stored, name) for name in staged}   # the digests, of the stored copies
        job, read = stored, {**read, "inputs": {moved.get(path, path): digest for path, digest in read["inputs"].items()}}
        with self.lock:
            self.reserved.discard(job.name.lower())
            self.records[job.name] = {"name": job.name, "state": "waiting", "submitted": time.time(), "started": None,
                                      "ended": None, "reason": None, "error": None, "inputs": sources,
                                      "config": dataclasses.asdict(job), "summary": None}
            self.live[job.name] = {"step": 0, "total_steps": read["plans"][0].total_steps}
            self.save_registry()
            self.inbox.append((job, read))
            self.lock.notify_all()
            view = self.view(job.name)
        self.notify()
        return view

    def check_new_name(self, name: str):
        taken = next((n for n in self.records if n.lower() == name.lower()), None)
        if taken is not None or name.lower() in self.reserved:
            state = self.records[taken]["state"] if taken else "being submitted"
            raise RequestError(409, f"request: job.name: a job named {taken or name!r} exists ({state}); choose another name")

    def record(self, name: str) -> dict:
        if name not in self.records:
            raise RequestError(404, f"request: no job named {name!r}")
        return self.records[name]

    def view(self, name: str) -> dict:
        """A job's state as the API shows it (under the lock): its registry record, its inputs as
        submitted (not the service's copies), where it stands."""
        record = self.record(name)
        config = {**record["config"], **record["inputs"]}
        view = {key: value for key, value in record.items() if key not in ("config", "inputs")}
        view.update(config=config, **self.live.get(name, {}))
        if record["summary"] is not None:
            view.update(ended_state(record["summary"]))
        return finite_json(view)

    def list_jobs(self) -> list[dict]:
        with self.lock:
            return [self.view(name) for name in self.records]

    def job(self, name: str) -> dict:
        with self.lock:
            return self.view(name)

    def metrics(self, name: str, since: int = 0, limit: int = 10_000) -> dict:
        """The job's step lines (loss, lr, the jobs fused with it) and evaluation lines of the fused
        steps after `since`; a turn's lines appear together, so the last fused_step seen is the next since."""
        with self.lock:
            self.record(name)
            return metrics_since(name, self.history.get(name, []), since, limit, self.published_step)

    def cancel(self, name: str) -> dict:
        """Ask the trainer to stop the job at the next turn: it finishes as a stopped job (its best
        adapter saved, its slot freed); a waiting one just leaves the queue."""
        with self.lock:
            state = self.record(name)["state"]
            if state in ENDED:
                raise RequestError(409, f"request: job {name!r} is {state} already: nothing to cancel")
            if name not in self.cancels:
                self.cancels.append(name)
                self.records[name]["cancel_asked"] = True   # a restart applies it if the trainer did not
                self.save_registry()
            self.lock.notify_all()
            view = self.view(name)
        self.notify()
        return view

    def adapter_folder(self, name: str) -> Path:
        """The ended job's adapter folder (PEFT's format); a 409 when it has none."""
        with self.lock:
            state = self.record(name)["state"]
        folder = self.out_dir / name
        if state not in ("finished", "stopped") or not (folder / "adapter_config.json").is_file():
            why = "no trained adapter yet" if state in ("waiting", "training") else "no adapter"
            raise RequestError(409, f"request: job {name!r} is {state}: it has {why}")
        return folder

    def adapter_archive(self, name: str) -> bytes:
        """The job's adapter folder as a .tar.gz (its files under <name>/)."""
        folder = self.adapter_folder(name)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for file in sorted(folder.iterdir()):
                if file.is_file() and not file.is_symlink():
                    tar.add(file, arcname=f"{name}/{file.name}")
        return buffer.getvalue()

    def generate(self, body) -> dict:
        """Greedy answers of each prompt by each adapter (an ended job's, or null: the bare base),
        from the next batched generation between steps. Each adapter reads a prompt through its
        job's template (the base: plain), unless `template` names one."""
        prompts, adapters, max_new_tokens, template = generation_request(body)
        templates = {None: template or "plain"}
        for name in dict.fromkeys(a for a in adapters if a is not None):
            self.adapter_folder(name)
            with self.lock:
                templates[name] = template or self.records[name]["config"]["template"]
        rows, texts = [], []
        for text in prompts:
            for name in adapters:
                try:
                    ids = generate.encode_prompt(self.run.tokenizer, text, templates[name])
                except ValueError as e:   # data.DataError: a template that cannot read it
                    raise RequestError(422, f"request: template of {name or 'the base'}: {one_line(e)}") from None
                if len(ids) > MAX_PROMPT_TOKENS:
                    raise RequestError(422, f"request: prompts: {len(ids)} tokens, at most {MAX_PROMPT_TOKENS}")
                rows.append((ids, name))
                texts.append(text)
        ask = Ask(rows, max_new_tokens)
        self.asks.put(ask)
        with self.lock:
            self.lock.notify_all()
        while not ask.done.wait(1.0):
            if not self.thread.is_alive():
                raise RequestError(503, "request: the trainer has stopped")
        if ask.error is not None:
            raise RequestError(500, f"request: {ask.error}")
        decode = self.run.tokenizer.decode
        return {"outputs": [{"prompt": text, "adapter": name, "text": decode(ids, skip_special=True), "tokens": len(ids)}
                            for text, (_, name), ids in zip(texts, rows, ask.outputs)]}

    def healthy(self) -> bool:
        return self.thread.is_alive()

    def close(self):
        """Stop the trainer after its turn, checkpoint the run (loop), release out_dir."""
        with self.lock:
            self.closing = True
            self.lock.notify_all()
        if self.thread.is_alive():
            self.thread.join()
        self.run.metrics.close()
        self.dir_lock.close()

    # ------------------------------------------------------------------------- the trainer thread

    def loop(self):
        """Turns while there is work, until close; then a run checkpoint, from which a service
        started again on out_dir goes on."""
        while self.wait_for_work():
            self.turn()
        if not self.run.sched.done:
            state.save_checkpoint(self.run)

    def wait_for_work(self) -> bool:
        with self.lock:
            while not (self.closing or self.inbox or self.cancels or self.replay or not self.asks.empty()
                       or not self.run.sched.done):
                self.lock.wait()
            return not self.closing

    def turn(self):
        """Apply the jobs and cancellations due (due_events); answer the generation requests; one
        turn of the loop (train_step); publish. An error outside the isolated steps fails the jobs
        in training."""
        run = self.run
        arrivals, cancels = self.due_events()
        asks = []
        while True:
            try:
                asks.append(self.asks.get_nowait())
            except queue.Empty:
                break
        for job, read in arrivals:
            try:
                self.add(job, read)
            except Exception as e:   # noqa: BLE001 - it fails alone
                with self.lock:
                    self.records[job.name].update(state="failed", ended=time.time(), error=f"queueing: {one_line(e)}")
                    self.save_registry()
        try:
            for name in cancels:
                self.stop(name)
            if asks:
                answer(run, asks, self.out_dir)
            if not run.sched.done:
                run.steps.turn(run)
                run.ticks += 1
                run.steps.after_turn(run)
        except Exception as e:   # noqa: BLE001 - the service goes on; these jobs cannot
            traceback.print_exc()
            for name in [*run.jobs, *(plan.name for plan in run.sched.candidates + run.sched.waiting)]:
                try:
                    self.fail(name, f"the trainer failed: {one_line(e)}")
                except Exception:   # noqa: BLE001 - it is failed in the registry at least
                    run.log({"event": "fail", "job": name, "time": run.now(), "error": one_line(e)})
        self.publish()

    def due_events(self) -> tuple[list[tuple], list[str]]:
        """The jobs to queue and the cancellations to apply before this turn: the replay's that are
        due (resume), else, once it is done, the ones that came. New ones are noted in the registry
        with this turn, written before the turn trains (what a resumed service replays)."""
        run = self.run
        with self.lock:
            if self.replay:
                turn = run.ticks if not run.sched.done else self.replay[0][0]   # no turn comes before it
                due = [event for event in self.replay if event[0] <= turn]
                self.replay = self.replay[len(due):]
                return ([job_read for *_, kind, _, job_read in due if kind == "queue"],
                        [name for *_, kind, name, _ in due if kind == "cancel"])
            arrivals, self.inbox = self.inbox, []
            cancels, self.cancels = self.cancels, []
            for kind, names in (("queued", [job.name for job, _ in arrivals]), ("cancelled", cancels)):
                for name in names:
                    self.records[name][kind] = [run.ticks, self.events]
                    self.events += 1
            if arrivals or cancels:
                self.save_registry()
            return arrivals, cancels

    def add(self, job, read: dict):
        """A submitted job into the running scheduler: it waits for a free slot like any job."""
        run, name = self.run, job.name
        (plan,) = read["plans"]
        run.cfg.jobs.append(job)
        run.inputs.update(read["inputs"])   # what the run checkpoint checks on resume
        run.plans[name], run.train_sets[name] = plan, read["train_sets"][name]
        for sets, key in ((run.test_sets, "test_sets"), (run.task_sets, "task_sets")):
            if name in read[key]:
                sets[name] = read[key][name]
        run.sched.requeue(plan)
        run.bar.total += plan.num_micro_batches

    def stop(self, name: str):
        """A cancellation: an admitted job stops and finishes now (its best adapter saved, its slot
        freed); a waiting one leaves the queue."""
        run = self.run
        if name in run.jobs:
            stop_early(run, run.jobs[name], "cancelled")
            run.steps.finish(run)
        elif run.sched.withdraw(name):
            run.bar.total -= run.plans[name].remaining
            run.log({"event": "cancel", "job": name, "time": run.now()})

    def fail(self, name: str, error: str):
        """The job out of the run, alone: off the scheduler, its adapter dropped, the error logged."""
        run = self.run
        if name not in run.plans or any(r.get("event") == "fail" and r.get("job") == name for r in run.logged):
            return
        if not run.sched.stop(name):
            run.sched.withdraw(name)
        if name in run.sched.finished:
            run.sched.finished.remove(name)
        run.bar.total -= run.plans[name].remaining
        run.jobs.pop(name, None)
        if name in lora.adapter_names(run.model):
            lora.remove_adapter(run.model, name)
        print(f"job {name!r} failed: {error}")
        run.log({"event": "fail", "job": name, "time": run.now(), "error": error})

    def publish(self):
        """What the turn logged, for request threads: states from the events (admit, finish, cancel,
        fail; the registry written when one changed), step and evaluation lines into each job's
        history, where each training job stands. An ended job's data leaves the Run."""
        run = self.run
        logged, run.logged = run.logged, []
        ended, now = [], time.time()
        with self.lock:
            for record in logged:
                event, name = record.get("event"), record.get("job")
                for job_name, line in history_lines(record):
                    self.history.setdefault(job_name, []).append(line)
                if event == "admit":
                    self.records[name].update(state="training", started=now)
                elif event in ("finish", "cancel", "fail"):
                    summary = run.summary.get(name)
                    state = {"fail": "failed", "cancel": "stopped"}.get(event, "stopped" if summary and summary["stopped"]
                                                                         else "finished")
                    reason = "cancelled" if event == "cancel" else summary and summary["stopped"]
                    self.records[name].update(state=state, ended=now, summary=summary, reason=reason,
                                              error=record.get("error"))
                    ended.append(name)
            for name, s in run.jobs.items():
                self.live[name] = live_state(s)
            self.published_step = run.step
            if any(record.get("event") in ("admit", "finish", "cancel", "fail") for record in logged):
                self.save_registry()
        for name in ended:
            run.cfg.jobs = [job for job in run.cfg.jobs if job.name != name]
            for table in (run.plans, run.train_sets, run.test_sets, run.task_sets):
                table.pop(name, None)
        self.notify()


# ----------------------------------------------------------------------------- a service started again

def resume(svc: Service) -> list[tuple]:
    """Back to where the last service on out_dir stopped: its run checkpoint restored (restore_run).
    Returns the registry's events from that turn on, in order, to replay at their turns: (turn,
    event, "queue", job, (its config, read_inputs)) or (turn, event, "cancel", job, None). Jobs the
    trainer never queued, and cancellations it never applied, go to the inbox: they follow the replay."""
    records = svc.records
    saved = read_service_checkpoint(svc)
    ticks = saved["ticks"] if saved else 0
    held = saved["scheduler"]["waiting"] + saved["scheduler"]["candidates"] if saved else []
    replay, restored = [], []
    for name, record in records.items():
        queued, cancelled = record.get("queued"), record.get("cancelled")
        again = name in held or (queued and queued[0] >= ticks)
        if again or (not queued and record["state"] not in ENDED):
            try:
                job_read = stored_job(svc, record)
            except (ValueError, OSError) as e:
                if name in held:
                    raise ConfigError(f"{svc.home / 'jobs.json'}: {name}: the run checkpoint's job cannot be read "
                                      f"again ({one_line(e)}); choose another out_dir") from None
                record.update(state="failed", ended=time.time(), error=f"restart: {one_line(e)}")
                continue
            record.update(state="waiting", started=None, ended=None, summary=None, reason=None, error=None,
                          restarts=record.get("restarts", 0) + 1)
            svc.live[name] = {"step": 0, "total_steps": job_read[1]["plans"][0].total_steps}
            if name in held:
                restored.append(job_read)
            elif queued:
                replay.append((*queued, "queue", name, job_read))
            else:
                svc.inbox.append(job_read)
        elif record["state"] not in ENDED:   # it ended after the checkpoint, before the registry said so
            ended_in(record, saved)
        if cancelled and cancelled[0] >= ticks:
            replay.append((*cancelled, "cancel", name, None))
        elif record.get("cancel_asked") and not cancelled and record["state"] not in ENDED:
            svc.cancels.append(name)
    if saved:
        restore_run(svc, saved, restored)
    svc.save_registry()
    return sorted(replay, key=lambda event: event[:2])


def read_service_checkpoint(svc: Service) -> dict | None:
    """out_dir's run checkpoint, if any, its inputs (the stored copies of every registered job) unchanged."""
    if not (svc.out_dir / "checkpoint" / "state.pt").exists():
        return None
    known = []
    for record in svc.records.values():
        try:
            known.append(read_job(record["config"], "jobs.json"))
        except ConfigError:
            pass
    return state.read_checkpoint(svc.out_dir, jobs.input_digests(dataclasses.replace(svc.cfg, jobs=known)))


def stored_job(svc: Service, record: dict) -> tuple:
    """A registered job and its read_inputs, read again from its stored inputs."""
    job = read_job(record["config"], f"{svc.home / 'jobs.json'}")
    return job, jobs.read_inputs(dataclasses.replace(svc.cfg, jobs=[job]))


def ended_in(record: dict, saved: dict | None):
    """A job the checkpoint holds as ended (in its summary) or failed (gone without one)."""
    summary = (saved or {}).get("summary", {}).get(record["name"])
    if summary is None:
        record.update(state="failed", ended=time.time(), error="restart: it failed before the service stopped")
    else:
        record.update(state="stopped" if summary["stopped"] else "finished", ended=time.time(), summary=summary,
                      reason=summary["stopped"] or None)


def restore_run(svc: Service, saved: dict, restored: list[tuple]):
    """The checkpoint's jobs into the Run (in the order they came), the Run put back as the
    checkpoint left it (state.restore: scheduler, adapters, optimizers, RNG, metrics.jsonl cut
    back), and what the page shows rebuilt from metrics.jsonl."""
    run = svc.run
    for job, read in restored:
        svc.add(job, read)
    state.restore(run, saved)
    run.metrics.seek(0)
    for line in run.metrics.read().splitlines():
        for name, entry in history_lines(json.loads(line)):
            svc.history.setdefault(name, []).append(entry)
    for name, s in run.jobs.items():   # admitted
        svc.live[name] = live_state(s)
        svc.records[name]["state"] = "training"
    svc.published_step = run.step


def metrics_since(name: str, history: list[dict], since: int, limit: int, fused_steps: int) -> dict:
    """The metrics answer: a job's history lines after fused step `since` (at most `limit`)."""
    lines = [line for line in history if line["fused_step"] > since][:limit]
    return finite_json({"job": name, "since": since, "lines": lines, "fused_steps": fused_steps})


def history_lines(record: dict) -> list[tuple[str, dict]]:
    """(job, line) of its metrics from a line the run logged: a step line (report.log_step) gives
    each job of the step its loss and lr and the jobs it was fused with; an evaluation, its job's."""
    if record.get("event") is None and "jobs" in record:
        return [(name, {"fused_step": record["step"], **line, "jobs": sorted(record["jobs"]),
                        "tokens_per_s": record["tokens_per_s"], "ms": record["ms"]}) for name, line in record["jobs"].items()]
    if record.get("event") == "eval":
        return [(record["job"], {key: value for key, value in record.items() if key != "job"})]
    return []


def answer(run: Run, asks: list[Ask], out_dir: Path):
    """Every pending generation request in ONE generate.generate call: the ended jobs' adapters
    loaded from their folders beside the ones training, each row routed to its own."""
    tokenizer = run.tokenizer
    names = sorted({name for ask in asks for _, name in ask.rows if name is not None})
    loaded = []
    try:
        for name in names:
            try:
                peft_format.load_peft(run.model, out_dir / name, name)
                loaded.append(name)
            except Exception as e:   # noqa: BLE001 - the requests that name it fail, the others are answered
                for ask in asks:
                    if any(n == name for _, n in ask.rows):
                        ask.error = f"adapter {name!r}: {one_line(e)}"
        ready = [ask for ask in asks if ask.error is None]
        if ready:
            outputs = generate.generate(run.model, [ids for ask in ready for ids, _ in ask.rows],
                                        [name for ask in ready for _, name in ask.rows],
                                        max_new_tokens=max(ask.max_new_tokens for ask in ready),
                                        stop_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id,
                                        vocab_size=tokenizer.vocab_size)
            for ask in ready:   # greedy: a shorter request's tokens are the first of the longest
                ask.outputs = [ids[:ask.max_new_tokens] for ids in outputs[:len(ask.rows)]]
                outputs = outputs[len(ask.rows):]
    except Exception as e:   # noqa: BLE001
        for ask in asks:
            if ask.outputs is None and ask.error is None:
                ask.error = f"generation failed: {one_line(e)}"
    finally:
        for name in loaded:
            lora.remove_adapter(run.model, name)
        for ask in asks:
            ask.done.set()


def isolate_failures(run: Run, fail):
    """A layer on the loop's steps: a job whose admission, evaluation or finish raises fails alone
    (fail(name, error): off the scheduler, its adapter dropped); a fused step that raises fails the
    jobs whose rows it held (its error cannot be told apart), and the others train on."""
    steps = run.steps
    admit, forward_backward, evaluate = steps.admit, steps.forward_backward, steps.evaluate
    failing: list[tuple[str, str]] = []

    def admit_each(run: Run, names: list[str]):
        for name in names:
            try:
                admit(run, [name])
            except Exception as e:   # noqa: BLE001
                fail(name, f"admission: {one_line(e)}")

    def forward_backward_or_fail(run: Run, micro_batches: list, check_finite: bool = False) -> Fused:
        try:
            return forward_backward(run, micro_batches, check_finite)
        except Exception as e:   # noqa: BLE001
            for mb in micro_batches:
                fail(mb.job, f"fused step {run.step + 1}: {one_line(e)}")
            return Fused([], torch.zeros(0), torch.zeros(0, METRIC_SUMS), torch.zeros(0, 2, dtype=torch.long), False)

    def evaluate_each(run: Run, stepped: list):
        for s in stepped:
            try:
                evaluate(run, [s])
            except Exception as e:   # noqa: BLE001 - it fails after this turn's log line, which reads it
                run.sched.stop(s.config.name)
                failing.append((s.config.name, f"evaluation: {one_line(e)}"))

    def finish_each(run: Run):
        for name in run.sched.pop_finished():
            if any(name == n for n, _ in failing):
                continue
            try:
                finish(run, name)
            except Exception as e:   # noqa: BLE001
                fail(name, f"finish: {one_line(e)}")
        run.task_scores = {}
        for name, error in failing:
            fail(name, error)
        failing.clear()

    steps.admit, steps.forward_backward, steps.evaluate, steps.finish = (admit_each, forward_backward_or_fail,
                                                                         evaluate_each, finish_each)
