"""A job's life in a run, around the fused steps of train.py: admitted (its held-out loss at
init), evaluated and stopped early (ASPEN), finished (the best adapter saved, its slot freed),
and, as a sweep trial, evaluated at its rungs, parked and promoted (sweep.py decides)."""
import math
import sys
import time
from pathlib import Path

import torch

import dist
import lora
import model as M
import peft_format
from config import JobConfig
from report import evaluate, evaluate_tasks
from state import Best, JobState, Run, add_job, job_state, load_job


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
    new = [name for name in names if name not in run.parked and jobs[name].task_metric]
    for name in new:
        add_job(run, name)
    prefetch_tasks(run, new)
    for name in names:
        admit(run, name)


def admit(run: Run, name: str):
    """Add the job (admit_all may have); its held-out loss (and task score) at init is the starting
    point. A sweep trial promoted past a rung comes back as it was parked."""
    if name in run.parked:
        s = load_job(run, name, run.parked.pop(name))
        run.log({"event": "admit", "job": name, "time": run.now(), "step": s.step})
        return
    s = run.jobs[name] if name in run.jobs else add_job(run, name)
    initial_rewards = None
    if s.test_set:
        s.initial_eval_loss, initial_rewards = evaluate(run.model, s.config, s.test_set, run.pad_id, run.device,
                                                        packed=run.cfg.packing, d=eval_ranks(run))
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
                                               packed=run.cfg.packing, d=eval_ranks(run))
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
                                               packed=run.cfg.packing, d=eval_ranks(run))
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
                         "peak_mem_mb": max(s.peak_mb, M.peak_memory(run.device)),
                         "stopped": s.stopped, "nonfinite": s.nonfinite, "best_step": None if best is None else best.step}
    if s.config.task_metric is not None:
        run.summary[name].update({"initial_eval_task": s.initial_eval_task, "eval_task": s.eval_task})
    # Its objective's metrics (none for SFT), of its last training step and held out.
    run.summary[name].update({f"final_{key}": value for key, value in (s.last_rewards or {}).items()})
    run.summary[name].update({f"eval_{key}": value for key, value in (s.eval_rewards or {}).items()})
    run.log({"event": "finish", "job": name, "time": run.now(), **run.summary[name]})


def eval_ranks(run: Run) -> "dist.Dist | None":
    """Who shares held-out evaluation: data parallel ranks split it, unless the base is sharded
    (then every rank must run every forward: each gathers the weights from all)."""
    return run.dist if run.rows_apart and not run.cfg.shard_base else None


def save_adapter(run: Run, name: str, folder: Path):
    """The job's adapter as a PEFT folder: written by rank 0; job parallel, the others send it there."""
    if run.writes:
        peft_format.save_peft(run.model, name, folder, run.cfg.base_model)
    elif run.outbox is not None:
        run.outbox.append(("peft", str(folder), *peft_format.peft_files(run.model, name, run.cfg.base_model)))


# ----------------------------------------------------------------------------- a sweep trial's rungs

def reach_rung(run: Run, s: JobState):
    """A sweep trial's optimizer step at one of its rungs (sweep.py): its held-out loss there is
    recorded; under halving it leaves the scheduler, and train_step parks it."""
    name = s.config.name
    rung = run.sweep.rung_at(name, s.step, s.tokens)
    if rung is None:
        return
    if eval_due(s):   # evaluate_and_stop just did
        loss, task = s.eval_loss, s.eval_task
    else:
        loss, _ = evaluate(run.model, s.config, s.test_set, run.pad_id, run.device, packed=run.cfg.packing,
                           d=eval_ranks(run))
        task = task_score(run, s)
    record = {"event": "rung", "job": name, "rung": rung, "step": s.step, "tokens": s.tokens, "fused_step": run.step + 1,
              "eval_loss": loss}
    if s.config.task_metric is not None:
        record["eval_task"] = task
    run.log(record)
    if run.sweep.arrive(name, rung, task if run.sweep.sweep.metric == "task" else loss):
        run.sched.stop(name)


def park(run: Run, name: str):
    """A trial waiting at a rung leaves the model (its slot is free): state kept on the CPU."""
    s = run.jobs.pop(name)
    run.parked[name] = {**job_state(run, s), "popped": run.plans[name].popped}
    lora.remove_adapter(run.model, name)
    run.log({"event": "park", "job": name, "step": s.step, "fused_step": run.step})


def settle_rungs(run: Run):
    """Decide each rung whose trials are all in (sweep.Sweep.decide): the best wait for a slot
    again, ahead of lower priorities; the others finish with their adapter of that rung."""
    if run.sweep is None:
        return
    verdicts = run.sweep.decide(set(run.summary))
    # The trials a decision stops finish with their adapter of that rung; with task metrics all
    # are loaded first, so that their final task scores are generated in one batch.
    jobs = {job.name: job for job in run.cfg.jobs}
    batched = any(jobs[name].task_metric for name, reason in verdicts if reason is not None)
    stopped = []
    for name, reason in verdicts:
        plan = run.plans[name]
        if reason is None:
            run.sched.requeue(plan)
            continue
        s = load_job(run, name, run.parked.pop(name))
        s.stopped = reason
        run.bar.total -= plan.remaining
        run.log({"event": "early_stop", "job": name, "step": s.step, "fused_step": run.step, "reason": reason,
                 "nonfinite": False})
        stopped.append(name)
        if not batched:
            finish(run, name)
    if batched:
        prefetch_tasks(run, stopped)
        for name in stopped:
            finish(run, name)
