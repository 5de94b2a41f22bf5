"""The service's trainer thread: train.py's loop turned while jobs arrive (service.Service's half
that touches the model; Service holds the registry, the lock and the queues it reads).

Each turn applies the jobs and cancellations due (noted in the registry with the turn, before the
turn trains: what a restarted service replays), answers the generation requests that came
meanwhile in one batched generation, runs one turn of the loop (train_step, failures isolated per
job: isolate_failures), and publishes what it logged for request threads.
"""
import dataclasses
import os
import queue
import time
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

import data
import generate
import jobs
import lora
import model as M
import peft_format
import state
import train
from config import RunConfig
from jobs import Fused, Run, finish, stop_early
from objectives import METRIC_SUMS
from submission import one_line


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


@dataclass
class StepCall:
    """One call of the step-level API (submission.STEP_FIELDS), answered by the trainer between turns."""
    kind: str
    lora_id: str | None
    args: object                               # submission.step_arguments'
    done: threading.Event = field(default_factory=threading.Event)
    result: dict | None = None
    error: tuple[int, str] | None = None       # (HTTP status, one line)


def live_state(s: jobs.JobState) -> dict:
    """What a job's state shows while it trains: where it stands, its last loss, its held-out metrics."""
    held_out = {f"eval_{key}": value for key, value in (s.eval_rewards or {}).items()}
    if s.config.task_metric:
        held_out.update(initial_eval_task=s.initial_eval_task, eval_task=s.eval_task)
    return {"step": s.step, "total_steps": s.total_steps, "loss": s.last_loss, "lr": s.lr,
            "initial_eval_loss": s.initial_eval_loss, "eval_loss": s.eval_loss, **held_out, "tokens": s.tokens,
            "tokens_per_s": s.tokens / max(time.time() - s.admitted_at, 1e-9)}


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


class Trainer:
    """The trainer thread's steps, a part of service.Service (which sets up what they read: run,
    lock, records, inbox, cancels, asks, replay, live, history, events)."""

    def loop(self):
        """Turns while there is work, until close; then a run checkpoint, from which a service
        started again on out_dir goes on."""
        try:
            while self.wait_for_work():
                self.turn()
            if not self.run.sched.done:
                state.save_checkpoint(self.run)
        finally:
            self.loop_ended = True

    def wait_for_work(self) -> bool:
        with self.lock:
            while not (self.closing or self.inbox or self.cancels or self.replay or self.step_inbox or not self.asks.empty()
                       or not self.run.sched.done):
                self.lock.wait()
            return not self.closing

    def turn(self):
        """Apply the jobs and cancellations due (due_events); answer the generation requests; one
        turn of the loop (train_step); publish. An error outside the isolated steps fails the jobs
        in training."""
        run = self.run
        arrivals, cancels = self.due_events()
        calls = self.take_step_calls()
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
            if calls:
                answer_steps(self.engine, calls, self.out_dir / "_api")
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

    def take_step_calls(self) -> list[StepCall]:
        """The step-level API's calls waiting now (after api_linger, for the calls of clients in
        step with each other to arrive together), at most one of each LoRA: a LoRA's calls run in
        the order they came, the later ones at the next turns."""
        with self.lock:
            if not self.step_inbox:
                return []
            deadline = time.monotonic() + self.api_linger
            while (left := deadline - time.monotonic()) > 0:   # the whole window (each arrival notifies)
                self.lock.wait(left)
            calls, later, seen = [], [], set()
            for call in self.step_inbox:
                (later if call.lora_id is not None and call.lora_id in seen else calls).append(call)
                seen.add(call.lora_id)
            self.step_inbox = later
            return calls

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


def answer_steps(engine, calls: list[StepCall], saved: Path):
    """The step-level API's calls of this turn: LoRAs created and loaded, then every forward_backward
    in ONE fused pass and every sample in ONE batched generation (stepapi.Engine: each as if alone),
    then optimizer steps, saves (as saved/NAME) and deletions. A call that fails fails alone."""
    def run_each(kind: str, act):
        for call in (c for c in calls if c.kind == kind and c.error is None):
            try:
                call.result = act(call)
            except ValueError as e:
                call.error = (422, f"request: {one_line(e)}")

    def fused(kind: str, method, wrap):
        group = [c for c in calls if c.kind == kind and c.error is None]
        for call, result in zip(group, method([c.args for c in group]) if group else []):
            if isinstance(result, Exception):
                call.error = (422, f"request: {one_line(result)}")
            else:
                call.result = wrap(result)
    def save(call: StepCall) -> dict:
        engine.save(call.lora_id, saved / call.args)
        return {"name": call.args}

    def delete(call: StepCall) -> dict:
        engine.remove_lora(call.lora_id)
        return {"deleted": call.lora_id}
    for call in calls:
        if call.lora_id is not None and call.lora_id not in engine.loras:
            call.error = (404, f"request: no LoRA {call.lora_id!r} (create one: POST /v1/loras)")
    try:
        run_each("create", lambda c: {"lora_id": engine.create_lora(c.args)})
        run_each("load", lambda c: {"lora_id": engine.load(c.args)})
        fused("forward_backward", engine.forward_backward, lambda r: {"logprobs": r.logprobs, "loss": r.loss})
        fused("sample", engine.sample, lambda r: {"completions": [dataclasses.asdict(c) for c in r.completions]})
        run_each("optim_step", lambda c: engine.optim_step(c.lora_id, c.args))
        run_each("save", save)
        run_each("delete", delete)
    except Exception as e:   # noqa: BLE001 - a failure of the fused pass itself: its calls fail
        for call in calls:
            if call.result is None and call.error is None:
                call.error = (500, f"request: the step failed: {one_line(e)}")
    finally:
        for call in calls:
            call.done.set()


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
