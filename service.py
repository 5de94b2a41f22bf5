"""The fine-tuning service, a layer over train.py's loop (serve.py puts the HTTP API in front of
it, remote.py runs it in a process of its own; nothing here knows HTTP).

One thread owns the model and the Run and turns train.py's loop (service_loop.py). Jobs submitted
while it trains join the next step that has room (the scheduler's admission); between turns it
applies new jobs, cancellations, and every generation request that arrived meanwhile, in one
batched multi-adapter generation. Request threads never touch the model: a submission is checked
as train.py checks a config's job (submission.py), its inputs are written into out_dir, it is
registered and handed over; job states are read from what the trainer publishes under the lock.

The step-level API's LoRAs (stepapi.Engine, issue 33) live on the same base, apart from the jobs:
their calls are answered between turns, those of different LoRAs that wait together in one fused
pass. They are the clients' state, not the run's: the run checkpoint does not hold them (a client
saves its LoRA, and loads it again after a restart).

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
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import files
import jobs
import state
from config import SAFE_NAME, ConfigError, RunConfig, check_inputs, read_job, remove_partial_writes, validate_run
import stepapi
from service_loop import Ask, StepCall, Trainer, history_lines, live_state, open_run
from submission import (RequestError, check_submissions, generation_request, generation_rows, one_line,
                        step_arguments, store_inputs)

SERVICE_DIR = "_service"
STATES = ("waiting", "training", "finished", "stopped", "failed")
ENDED = ("finished", "stopped", "failed")


def archive(folder: Path, name: str) -> bytes:
    """A folder's files as a .tar.gz, under <name>/ (links left out)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for file in sorted(folder.iterdir()):
            if file.is_file() and not file.is_symlink():
                tar.add(file, arcname=f"{name}/{file.name}")
    return buffer.getvalue()


def finite_json(value):
    """value with every non-finite float as None: JSON has no inf or NaN (a diverged loss)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    return value


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


def checked_settings(cfg: RunConfig, allow_dirs) -> tuple[RunConfig, list[Path], dict]:
    """The service's run options checked as train.py checks a run's, and the base folder; the
    allowed folders resolved; the settings a service's out_dir is bound to."""
    validate_run(cfg, "serve.py")
    check_inputs(dataclasses.replace(cfg, jobs=[]), "serve.py")   # the base folder
    jobs.check_base(cfg)
    folders = []
    for folder in allow_dirs:
        if not Path(folder).is_dir():
            raise ConfigError(f"serve.py: --allow_dir: not a folder: {folder!r}")
        folders.append(Path(os.path.realpath(folder)))
    # Absolute: the registry names each job's stored inputs, read again from any working directory.
    cfg = dataclasses.replace(cfg, out_dir=os.path.abspath(cfg.out_dir))
    settings = {"base_model": os.path.realpath(cfg.base_model), "seed": cfg.seed, "dtype": cfg.dtype, "quant": cfg.quant}
    return cfg, folders, settings


def take_out_dir(out_dir: Path, settings: dict) -> tuple:
    """out_dir claimed (claim_out_dir, before anything is written), locked for this service, its
    half-written files of a killed one removed: (the lock, its registry or None)."""
    claim_out_dir(out_dir, settings)
    try:
        lock = files.lock_dir(out_dir)
    except files.InUse as e:
        raise ConfigError(f"out_dir {e}") from None
    registry = claim_out_dir(out_dir, settings)   # as it is now that no other service writes it
    home = out_dir / SERVICE_DIR
    (home / "data").mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)   # the submitted rows and the token are the owner's alone
    remove_partial_writes(out_dir)
    for partial in (home / "data").glob(".*.tmp-*"):
        files.remove(partial)
    return lock, registry


class Service(Trainer):
    """The job registry over one out_dir and what request threads call; the trainer thread's
    steps are Trainer's (service_loop.py). See the module's docstring."""

    def __init__(self, cfg: RunConfig, allow_dirs: list[str] = (), trainer: bool = True, api_linger: float = 0.005):
        """trainer=False: no trainer thread; the caller turns the loop (turn(), tests). api_linger:
        seconds the trainer waits, once step-level API calls are there, for more to fuse with them."""
        self.cfg, self.allow_dirs, self.settings = checked_settings(cfg, allow_dirs)
        self.out_dir = Path(self.cfg.out_dir)
        self.home = self.out_dir / SERVICE_DIR
        self.dir_lock, registry = take_out_dir(self.out_dir, self.settings)
        self.records: dict[str, dict] = registry["jobs"] if registry else {}
        self.lock = threading.Condition()   # guards everything below that request threads read or write
        self.inbox: list[tuple] = []        # (job, its read_inputs) submitted, not yet in the scheduler
        self.cancels: list[str] = []
        self.asks: queue.Queue[Ask] = queue.Queue()
        self.step_inbox: list[StepCall] = []   # the step-level API's calls (stepapi.Engine's), not yet answered
        self.api_linger = api_linger
        self.reserved: set[str] = set()     # names of submissions being stored (lower case)
        self.live: dict[str, dict] = {}     # a job's state while it trains, as last published
        self.history: dict[str, list[dict]] = {}   # each job's step and evaluation lines
        self.published_step = 0
        self.closing = False
        self.loop_ended = False             # the trainer's loop returned (or failed)
        self.notify = lambda: None          # called after each change that readers see (remote.py's push)
        self.events = 1 + max((e[1] for r in self.records.values() for e in (r.get("queued"), r.get("cancelled")) if e),
                              default=0)   # the next event's number: replay orders a turn's events by it
        self.run = open_run(self.cfg, self.dir_lock, self.fail)
        # The step-level API's LoRAs on the same base (ids no job name can take: "_lora-0001").
        self.engine = stepapi.Engine(self.run.model, self.run.tokenizer, self.run.device, cfg.seed, prefix="_lora-")
        self.replay: list[tuple] = resume(self)   # (turn, event, "queue" or "cancel", job name, what it needs)
        self.thread = threading.Thread(target=self.loop, name="trainer", daemon=True)
        if trainer:
            self.thread.start()

    def save_registry(self):
        files.atomic_write(self.home / "jobs.json", json.dumps(finite_json(
            {"version": 1, "settings": self.settings, "jobs": self.records}), indent=1) + "\n")

    # ------------------------------------------------------------------------- what request threads call

    def submit(self, body) -> dict:
        """A job's fields, or {"jobs": [fields, ...]}: each checked (check_submission), its inputs
        stored in out_dir, registered and handed to the trainer, several together (queued at the
        same turn, as a config's jobs start); nothing is written unless all of it passes. Returns
        its state, or {"jobs": [their states]}."""
        with tempfile.TemporaryDirectory(prefix="serve-") as staging:
            many, checked = check_submissions(body, self.cfg, self.allow_dirs, Path(staging))
            names = [job.name.lower() for job, *_ in checked]
            with self.lock:
                for job, *_ in checked:
                    self.check_new_name(job.name)
                self.reserved.update(names)
            try:
                stored = [store_inputs(job, staged, self.home / "data") for job, _, _, staged in checked]
            except BaseException:
                with self.lock:
                    self.reserved.difference_update(names)
                for job, *_ in checked:   # the ones stored before the error
                    files.remove(self.home / "data" / job.name)
                raise
        with self.lock:
            self.reserved.difference_update(names)
            for job, (_, read, sources, staged) in zip(stored, checked):
                self.register(job, read, sources, staged)
            self.save_registry()
            self.lock.notify_all()
            views = [self.view(job.name) for job in stored]
        self.notify()
        return {"jobs": views} if many else views[0]

    def register(self, job, read: dict, sources: dict[str, str], staged: dict[str, str]):
        """A stored job into the registry and the inbox (under the lock): the digests of its read_inputs
        are those of its stored copies."""
        moved = {staged[name]: getattr(job, name) for name in staged}
        read = {**read, "inputs": {moved.get(path, path): digest for path, digest in read["inputs"].items()}}
        self.records[job.name] = {"name": job.name, "state": "waiting", "submitted": time.time(), "started": None,
                                  "ended": None, "reason": None, "error": None, "inputs": sources,
                                  "config": dataclasses.asdict(job), "summary": None}
        self.live[job.name] = {"step": 0, "total_steps": read["plans"][0].total_steps}
        self.inbox.append((job, read))

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
        return archive(self.adapter_folder(name), name)

    def saved_archive(self, name: str) -> bytes:
        """A LoRA the step-level API saved as `name` (out_dir/_api/NAME: PEFT's folder and the
        engine's state), as a .tar.gz."""
        folder = self.out_dir / "_api" / name
        if SAFE_NAME.fullmatch(name) is None or not (folder / "adapter_config.json").is_file():
            raise RequestError(404, f"request: no saved LoRA {name!r}")
        return archive(folder, name)

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
        rows, texts = generation_rows(self.run.tokenizer, prompts, adapters, templates)
        ask = Ask(rows, max_new_tokens)
        self.asks.put(ask)
        with self.lock:
            self.lock.notify_all()
        self.wait_for(ask.done)
        if ask.error is not None:
            raise RequestError(500, f"request: {ask.error}")
        decode = self.run.tokenizer.decode
        return {"outputs": [{"prompt": text, "adapter": name, "text": decode(ids, skip_special=True), "tokens": len(ids)}
                            for text, (_, name), ids in zip(texts, rows, ask.outputs)]}

    def step_api(self, kind: str, lora_id: str | None, body) -> dict:
        """One call of the step-level API (submission.STEP_FIELDS: create, load, forward_backward,
        optim_step, sample, save, delete), answered between turns with the calls of other LoRAs
        that wait at the same moment: forward_backward calls in one fused pass, samples in one
        generation (service_loop.answer_steps). Its refusal: a RequestError of one line."""
        args = step_arguments(kind, lora_id, body)
        if kind == "load":   # the folder: a LoRA saved here (its optimizer state too), or an ended job's adapter
            source, name = args
            args = self.adapter_folder(name) if source == "job" else self.out_dir / "_api" / name
            if not (args / "adapter_config.json").is_file():
                raise RequestError(404, f"request: no saved LoRA {name!r}")
        call = StepCall(kind, lora_id, args)
        with self.lock:
            self.step_inbox.append(call)
            self.lock.notify_all()
        self.wait_for(call.done)
        if call.error is not None:
            raise RequestError(*call.error)
        return call.result

    def wait_for(self, done: threading.Event):
        """Until the trainer answered (done), or a 503 if it stopped before."""
        while not done.wait(1.0):
            if not self.healthy():
                raise RequestError(503, "request: the trainer has stopped")

    def healthy(self) -> bool:
        return not self.loop_ended

    def stop_trainer(self):
        """Ask the trainer to stop after its turn (its loop then checkpoints the run)."""
        with self.lock:
            self.closing = True
            self.lock.notify_all()

    def close(self):
        """Stop the trainer after its turn, checkpoint the run (loop), release out_dir."""
        self.stop_trainer()
        if self.thread.is_alive():
            self.thread.join()
        self.run.metrics.close()
        self.dir_lock.close()

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
