"""Resume, a layer on train.py's loop: the run checkpoint and the signals that ask for one.

save_checkpoint writes the whole run into out_dir/checkpoint/state.pt (every `checkpoint_every`
fused steps, and after the step in which SIGINT or SIGTERM arrived: checkpoint_turn, the loop's
after_turn step); read_checkpoint and restore put it back, so that the same command goes on
exactly where it stopped.
"""
import contextlib
import dataclasses
import json
import signal
import sys
import threading
import time
from pathlib import Path

import torch

import files
import lora
from config import ConfigError
from jobs import Best, Interrupted, JobState, Run, add_job, placement  # noqa: F401


COUNTERS = ("step", "lr", "last_loss", "last_rewards", "tokens", "padded_tokens", "peak_mb", "initial_eval_loss",
            "eval_loss", "eval_rewards", "initial_eval_task", "eval_task", "evals_since_best", "stopped",
            "nonfinite")



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
    if placement(run) == "data":   # rank 0 holds the summed gradients
        run.dist.reduce_gradients(run.model, list(run.jobs), settle=True)
    # Admission order, as the adapters sit in the layers.
    jobs = {name: job_state(run, s) for name, s in run.jobs.items()}
    own = {"elapsed_s": run.now(), "step": run.step, "ticks": run.ticks,
           "pending": run.dist.pending if placement(run) == "job" else [], "tokens": run.tokens,
           "padded_tokens": run.padded_tokens, "peak_mb": run.peak_mb, "prediction_errors": run.prediction_errors,
           "summary": run.summary, "bar": [run.bar.n, run.bar.total], "scheduler": run.sched.state_dict(),
           "jobs": jobs, "torch_rng": torch.get_rng_state(),
           "sweep": None if run.sweep is None else run.sweep.state_dict(),
           "parked": {} if run.sweep is None else run.sweep.held}
    ranks = run.dist.gather(None if run.writes else own) if placement(run) == "job" else None   # job parallel: each rank's own
    if not run.writes:
        return
    state = {"version": 1, "config": dataclasses.asdict(run.cfg), "inputs": run.inputs,
             "metrics_bytes": run.metrics.tell(), **own, "ranks": ranks}
    folder = run.out_dir / "checkpoint"
    folder.mkdir(exist_ok=True)
    t0 = time.time()
    files.atomic_write(folder / "state.pt", write=lambda p: torch.save(state, p))
    run.checkpoint_step = run.step
    run.log({"event": "checkpoint", "fused_step": run.step, "ms": 1000 * (time.time() - t0),
             "bytes": (folder / "state.pt").stat().st_size})


def restore(run: Run, state: dict):
    """Put a run back as save_checkpoint left it (read_checkpoint checked its inputs)."""
    metrics_bytes = state["metrics_bytes"]
    if placement(run) == "job" and not run.writes:   # job parallel: this rank's own part
        state = state["ranks"][run.dist.rank]
    run.start = time.time() - state["elapsed_s"]
    run.ticks, run.checkpoint_step = state.get("ticks", 0), state["step"]
    if placement(run) == "job":
        run.dist.pending = state.get("pending", [])
    run.step, run.tokens, run.padded_tokens = state["step"], state["tokens"], state["padded_tokens"]
    run.peak_mb, run.prediction_errors, run.summary = state["peak_mb"], state["prediction_errors"], state["summary"]
    run.bar.n, run.bar.total = state["bar"]
    run.bar.refresh()
    if placement(run) == "job":   # this rank's scheduler holds the jobs it was given
        run.sched.waiting = [run.plans[name] for name in state["scheduler"]["waiting"] + state["scheduler"]["candidates"]]
    run.sched.load_state_dict(state["scheduler"])
    for name, saved in state["jobs"].items():
        s = load_job(run, name, saved)
        if not run.writes:   # data parallel: rank 0 carries the gradients summed so far
            s.optimizer.zero_grad(set_to_none=True)
    if run.sweep is not None:
        run.sweep.load_state_dict(state["sweep"])
        run.sweep.held = state["parked"]
        for name, saved in run.sweep.held.items():   # a plan the scheduler does not hold (a promoted one it does)
            if name not in state["scheduler"]["popped"]:
                for _ in range(saved["popped"]):
                    run.plans[name].pop()
    torch.set_rng_state(state["torch_rng"])
    if run.metrics is not None:
        cut_metrics(run.metrics, metrics_bytes)
    if run.writes:   # below the progress bar, not inside its line
        run.bar.write(f"resumed {run.out_dir} at fused step {run.step} ({len(run.summary)} jobs finished, "
                      f"{len(run.jobs)} admitted)")



def cut_metrics(metrics, offset: int):
    """metrics.jsonl back to the checkpoint's `offset`: the lines after it are written again. A
    line before it that does not parse (torn by a kill, or by a second run before out_dir was
    locked) goes too, with one warning, so the run's own reading of it at the end never fails."""
    metrics.seek(0)
    lines = metrics.read(offset).splitlines(keepends=True)
    kept = [line for line in lines if line.endswith(b"\n") and parses(line)]
    if len(kept) < len(lines):
        print(f"warning: {metrics.name}: {len(lines) - len(kept)} torn line(s) before the checkpoint dropped",
              file=sys.stderr)
    metrics.seek(0)
    metrics.truncate()
    metrics.write(b"".join(kept))
    metrics.flush()


def parses(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


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
    except KeyboardInterrupt:   # a second Ctrl-C: stopped at once, mid-step
        last = run.checkpoint_step
        raise Interrupted(signal.SIGINT, f"SIGINT again during fused step {run.step + 1}: stopped at once, that step "
                          f"not checkpointed; the same command " + (f"resumes from the checkpoint of fused step {last}"
                          if last is not None else "starts the run over (no checkpoint was written yet)")) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def checkpoint_turn(run: Run):
    """The loop's after_turn step: a checkpoint every `checkpoint_every` turns, and after the
    turn in which a signal arrived, then stop (the same command resumes)."""
    due = run.cfg.checkpoint_every and (run.ticks if placement(run) == "job" else run.step) % run.cfg.checkpoint_every == 0
    if run.signal is not None or due:
        save_checkpoint(run)
    if run.signal is not None:
        run.bar.close()
        raise Interrupted(run.signal, f"{signal.Signals(run.signal).name}: checkpoint of fused step "
                                      f"{run.step} in {run.out_dir}/checkpoint; the same command resumes")
