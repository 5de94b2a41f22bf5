"""Hyperparameter sweeps in one fused run: a config's `sweep` section becomes trial jobs, and
successive halving stops the worse trials at rungs so that their slots go to waiting ones.

    "sweep": {"name": "lr", "job": {"data": "train.json", "test_data": "test.json", "r": 8},
              "space": {"lr": [1e-4, 3e-4, 1e-3], "r": [4, 8]},
              "policy": "halving", "eta": 3, "rung_steps": 2}

Trials (expand): a grid runs every combination of the space's lists, in order (the last field
varies fastest); random search draws `trials` points from an RNG seeded by the sweep's seed and
name (a list: one of its values; {"uniform"/"log_uniform": [lo, hi]}: a number, 3 significant
digits, rounded for an int field). Trial i is the base job with point i's values, named
<name>-t<i>: an ordinary job, so its data order, init and dropout come from the run seed and its
name, and it trains as it would alone (fusing, admission, resume, outputs unchanged).

Policy "halving": synchronous successive halving (Jamieson & Talwalkar 2016, "Non-stochastic best
arm identification"; the synchronous variant of ASHA, Li et al. 2020, section 3). Rung k is at
rung_steps x eta^k optimizer steps of a trial. A trial reaching a rung is evaluated there
(held-out loss on its test_data, lower is better; or with metric "task" the task score of its
task_metric, higher is better, its held-out prompts generated in one batch with every other
trial evaluating at that step) and parked: train.py takes its adapter,
optimizer and RNG to the CPU and frees its slot (the scheduler's stop) for a waiting trial. When
every trial still in the race has reached the rung or ended (its schedule done, stopped early,
non-finite), the best max(1, n // eta) of the n parked there (ties: trial order) are queued again
and go on exactly where they were; the others finish there, with their adapter of that rung. A
decision reads the trials' own held-out losses only, never which trial ran first or beside what.
Policy "full": every trial runs its whole schedule; the held-out loss is still recorded at each
rung, so the two policies' leaderboards compare.

Outputs (report): out_dir/sweep.json (the leaderboard), a table, sweep.png (held-out loss against
a trial's steps), and out_dir/best.json: the best trial alone, under its own name, so
`python train.py --config out_dir/best.json` trains it again to the same adapter.
"""
import dataclasses
import itertools
import json
import math
import random
from pathlib import Path

import files
import lora
from config import ConfigError, RunConfig, SweepConfig, field_label, sweep_space, trial_names, validate_job  # noqa: F401
from jobs import JobState, Run, eval_due, evaluate_and_stop, finish, prefetch_tasks, stop_early, task_score
from report import evaluate
from scheduler import JobPlan
from state import job_state, load_job

# ----------------------------------------------------------------------------- trials


def points(sweep: SweepConfig, run_seed: int, where: str = "config") -> list[dict]:
    """Each trial's values of the space's fields: the grid in order, or seeded random draws."""
    space = sweep_space(sweep, where)
    if sweep.search == "grid":
        return [dict(zip(space, values)) for values in itertools.product(*space.values())]
    # A string seed is hashed with SHA-512 by `random`: the same draws on every machine and run.
    rng = random.Random(f"{run_seed if sweep.seed is None else sweep.seed}/{sweep.name}/sweep")
    return [{name: draw(rng, values) for name, values in space.items()} for _ in range(sweep.trials)]


def draw(rng: random.Random, values: list | tuple):
    """One value: a list's element, or a number from a (kind, lo, hi) range (int bounds: an int)."""
    if isinstance(values, list):
        return values[rng.randrange(len(values))]
    kind, lo, hi = values
    x = rng.uniform(lo, hi) if kind == "uniform" else math.exp(rng.uniform(math.log(lo), math.log(hi)))
    return min(max(round(x), lo), hi) if isinstance(lo, int) else float(f"{x:.3g}")


def expand(cfg: RunConfig, where: str = "config") -> RunConfig:
    """The run with the sweep's trials appended to its jobs (config.validate checked the sweep's
    fields; here each trial's combination of values). A config that already holds the trials
    (out_dir/config.json, resolved) is returned as it is."""
    if cfg.sweep is None:
        return cfg
    trials = []
    for name, point in zip(trial_names(cfg.sweep), points(cfg.sweep, cfg.seed, where)):
        job = dataclasses.replace(cfg.sweep.job, name=name, **point)
        validate_job(job, f"{where}: trial {name} ({values_text(point)})", "sweep.space")
        if cfg.sweep.metric == "task" and job.task_metric is None:
            raise ConfigError(f"{where}: trial {name} ({values_text(point)}): sweep.metric: task needs the "
                              f"trial's task_metric, got None")
        trials.append(job)
    by_name = {trial.name.lower(): trial for trial in trials}
    jobs = []
    for i, job in enumerate(cfg.jobs):
        trial = by_name.get(job.name.lower())
        if trial is None:
            jobs.append(job)
        elif job != trial:
            raise ConfigError(f"{where}: jobs[{i}].name: {job.name!r} is the name of a trial of sweep "
                              f"{cfg.sweep.name!r}; rename the job or the sweep")
    return dataclasses.replace(cfg, jobs=jobs + trials)


def values_text(point: dict) -> str:
    return ", ".join(f"{name}={value_text(value)}" for name, value in point.items())


def value_text(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "-" if value is None else str(value)


def planned_tokens(plan: JobPlan) -> int:
    """Tokens the job's whole schedule puts through the forward: what a trial costs when it runs to the end."""
    per_row = [sum(sequences) for sequences in plan.sequences]
    full_epochs, extra_steps = divmod(plan.total_steps, plan.steps_per_epoch)
    rest = plan.epoch_order(full_epochs)[:extra_steps * plan.batch_size] if extra_steps else []
    return full_epochs * sum(per_row) + sum(per_row[i] for i in rest)


def rung_step(plan: JobPlan, unit: str, mark: int) -> int:
    """The optimizer steps a trial has taken when it reaches a rung at `mark` steps or tokens (by
    its plan's rows, as rung_at counts them), or its total_steps when its schedule ends first."""
    if unit == "steps":
        return min(mark, plan.total_steps)
    per_row = [sum(sequences) for sequences in plan.sequences]
    epochs = (mark - 1) // max(sum(per_row), 1)   # whole epochs before the one where it is reached
    step, tokens = epochs * plan.steps_per_epoch, epochs * sum(per_row)
    order = plan.epoch_order(epochs) if step < plan.total_steps else []
    for start in range(0, len(order), plan.batch_size):
        tokens, step = tokens + sum(per_row[i] for i in order[start:start + plan.batch_size]), step + 1
        if tokens >= mark or step == plan.total_steps:
            return step
    return plan.total_steps


def rank_loss(loss: float | None) -> float:
    """A held-out loss for ranking: lower is better, a missing or non-finite one last."""
    return loss if loss is not None and math.isfinite(loss) else math.inf


METRIC_NAMES = {"loss": "held-out loss", "task": "task score"}


def finite_or_none(loss: float | None) -> float | None:
    """sweep.json stays strict JSON: a non-finite loss is null."""
    return loss if loss is not None and math.isfinite(loss) else None


# ----------------------------------------------------------------------------- rungs and decisions

class Sweep:
    """Where a sweep stands: each trial's held-out loss at each rung it reached, the rung open for
    decision, the trials still in the race and those parked at it. The state (state_dict) goes
    into the run checkpoint; the rest follows from the config and the plans."""

    def __init__(self, cfg: RunConfig, plans: dict[str, JobPlan]):
        self.sweep = cfg.sweep
        self.metric = cfg.sweep.metric                   # loss (lower is better) | task (higher is better)
        self.names = trial_names(cfg.sweep)
        self.index = {name: i for i, name in enumerate(self.names)}
        jobs = {job.name: job for job in cfg.jobs}
        self.points = {name: {field: getattr(jobs[name], field) for field in cfg.sweep.space} for name in self.names}
        self.total_steps = {name: plans[name].total_steps for name in self.names}
        self.planned_tokens = {name: planned_tokens(plans[name]) for name in self.names}
        # Rung k: a trial's optimizer steps, or (rung_tokens) the tokens it has trained.
        self.unit = "steps" if cfg.sweep.rung_tokens is None else "tokens"
        ends = self.total_steps if self.unit == "steps" else self.planned_tokens
        self.rungs, mark = [], cfg.sweep.rung_steps if self.unit == "steps" else cfg.sweep.rung_tokens
        while mark < max(ends.values()):
            self.rungs.append(mark)
            mark *= cfg.sweep.eta
        # The metric's value (held-out loss, or task score) at rung 0, 1, ...; "losses" as it was first named.
        self.losses: dict[str, list[float]] = {name: [] for name in self.names}
        self.open = 0                                    # the rung halving decides next
        # Trials promoted into the open rung (one with nothing to train, max_steps 0, never races).
        self.racing = [name for name in self.names if self.total_steps[name] > 0]
        self.parked: list[str] = []                      # trials waiting at the open rung
        self.stopped: dict[str, int] = {}                # trial -> the rung where halving stopped it
        self.cut = 0                                     # micro-batches taken off the progress bar: expected_cut

    def describe(self) -> str:
        policy = f"successive halving, eta {self.sweep.eta}" if self.sweep.policy == "halving" else "full runs"
        return (f"sweep {self.sweep.name}: {len(self.names)} trials ({self.sweep.search} over "
                f"{', '.join(self.sweep.space)}), {policy}; rungs at {self.unit} {', '.join(map(str, self.rungs)) or 'none'}")

    def rank(self, value: float | None) -> float:
        """The metric's value for ranking, lower is better: a loss, or minus a task score; missing last."""
        return rank_loss(value if self.metric == "loss" or value is None else -value)

    def rung_at(self, name: str, step: int, tokens: int = 0) -> int | None:
        """The rung a trial is at after its optimizer step `step`, having trained `tokens`, if any
        (a rung at its last step is its end). By tokens: the first step at or past the rung's."""
        if name not in self.losses or step >= self.total_steps[name]:
            return None
        k = len(self.losses[name])
        if k >= len(self.rungs):
            return None
        return k if (self.rungs[k] == step if self.unit == "steps" else tokens >= self.rungs[k]) else None

    def arrive(self, name: str, rung: int, value: float) -> bool:
        """Record a trial's metric at a rung; True when it waits there (halving) for the decision."""
        self.losses[name].append(value)
        if self.sweep.policy != "halving":
            return False
        assert rung == self.open, f"trial {name} at rung {rung} while rung {self.open} is open"
        self.parked.append(name)
        return True

    def waits(self, name: str) -> bool:
        return name in self.parked

    def decide(self, ended: set[str]) -> list[tuple[str, str | None]]:
        """Decide each rung every racing trial has reached or ended before (`ended`: trials that
        finished): (trial, None) goes on, (trial, reason) stops there; best first."""
        verdicts = []
        while self.sweep.policy == "halving" and self.open < len(self.rungs):
            if any(name not in ended and name not in self.parked for name in self.racing):
                break
            k = self.open
            ranked = sorted(self.parked, key=lambda name: (self.rank(self.losses[name][k]), self.index[name]))
            keep = max(1, len(ranked) // self.sweep.eta) if ranked else 0
            verdicts += [(name, None) for name in ranked[:keep]]
            for name in ranked[keep:]:
                self.stopped[name] = k
                verdicts.append((name, f"successive halving: {METRIC_NAMES[self.metric]} {self.losses[name][k]:.4g} at rung {k} "
                                       f"({self.rungs[k]} {self.unit}) not among the best {keep} of {len(ranked)}"))
            self.racing, self.parked, self.open = ranked[:keep], [], k + 1
        return verdicts

    def expected_cut(self, plans: dict[str, JobPlan]) -> int:
        """Micro-batches of the racing trials' schedules that halving is expected not to run: at each
        rung still open, all but the best max(1, n // eta) of the n trials there stop. Which ones is
        not known yet, so each trial's rest counts by the share of trials that stop there (exact when
        their plans are alike, as over lr). The progress bar's total leaves them out (settle_rungs)."""
        if self.sweep.policy != "halving":
            return 0
        cut, going, share = 0.0, len(self.racing), 1.0   # trials still going, and their share of the racing
        for k in range(self.open, len(self.rungs)):
            at = {name: rung_step(plans[name], self.unit, self.rungs[k]) for name in self.racing}
            there = [name for name in self.racing if at[name] < plans[name].total_steps]   # the others end first
            n = min(going, len(there))
            if n == 0:
                break
            keep = max(1, n // self.sweep.eta)
            rest = sum(plans[name].num_micro_batches - plans[name].micro_batches_in(at[name]) for name in there)
            cut += share * (n - keep) / n * rest
            going, share = keep, share * keep / n
        return round(cut)

    def state_dict(self) -> dict:
        return {"losses": self.losses, "open": self.open, "racing": self.racing, "parked": self.parked,
                "stopped": self.stopped, "cut": self.cut}

    def load_state_dict(self, state: dict):
        self.losses, self.open = {name: list(losses) for name, losses in state["losses"].items()}, state["open"]
        self.racing, self.parked, self.stopped = list(state["racing"]), list(state["parked"]), dict(state["stopped"])
        self.cut = state.get("cut", 0)   # a checkpoint from before: its bar counted every trial's whole schedule

    def leaderboard(self, summary: dict[str, dict]) -> list[dict]:
        """Every trial, best first: those that ran their whole schedule by final held-out loss,
        then those halving stopped (the later the rung, the higher) and those with nothing to
        train, then non-finite ones."""
        assert not self.parked, f"trials still parked at rung {self.open}: {', '.join(self.parked)}"
        rows = []
        for name in self.names:
            s = summary.get(name, {})   # a trial with nothing to train (max_steps=0) has no summary
            rungs = {str(self.rungs[k]): finite_or_none(loss) for k, loss in enumerate(self.losses[name])}
            rows.append({"trial": name, "config": self.points[name], "steps": s.get("steps", 0),
                         "tokens": s.get("tokens", 0), "planned_tokens": self.planned_tokens[name], "rungs": rungs,
                         "final": finite_or_none(s.get("eval_loss" if self.metric == "loss" else "eval_task")),
                         "completed": bool(s) and name not in self.stopped and not s.get("nonfinite"),
                         "stopped": s.get("stopped"), "nonfinite": bool(s.get("nonfinite"))})
        rows.sort(key=lambda r: (r["nonfinite"], not r["completed"], -len(r["rungs"]), self.rank(r["final"]),
                                 self.index[r["trial"]]))
        return [{"rank": i + 1, **row} for i, row in enumerate(rows)]


# ----------------------------------------------------------------------------- outputs

def write_report(sweep: Sweep, cfg: RunConfig, summary: dict[str, dict]) -> dict:
    """out_dir/sweep.json (the leaderboard), out_dir/best.json (the best trial alone) and sweep.png."""
    out = Path(cfg.out_dir)
    board = sweep.leaderboard(summary)
    best = board[0]["trial"]
    folder = out if out.name else out.resolve()   # "." has no name to extend
    alone = {**dataclasses.asdict(cfg), "out_dir": str(folder.with_name(f"{folder.name}-{best}")), "sweep": None,
             "jobs": [dataclasses.asdict(next(job for job in cfg.jobs if job.name == best))]}
    files.atomic_write(out / "best.json", json.dumps(alone, indent=2) + "\n")
    tokens, planned = sum(r["tokens"] for r in board), sum(r["planned_tokens"] for r in board)
    report = {"name": sweep.sweep.name, "search": sweep.sweep.search, "policy": sweep.sweep.policy,
              "eta": sweep.sweep.eta, "rungs": sweep.rungs, "rung_unit": sweep.unit, "space": list(sweep.sweep.space),
              "metric": ("held-out loss on the trial's test_data (lower is better)" if sweep.metric == "loss" else
                         "task score on the trial's test_data (its task_metric; higher is better)"),
              "tokens": tokens, "planned_tokens": planned,   # trained, and what every trial's whole schedule takes
              "tokens_saved": 1 - tokens / max(planned, 1),
              "best": {"trial": best, "config": board[0]["config"], "final": board[0]["final"],
                       "adapter": str(out / best), "config_file": str(out / "best.json"),
                       "command": f"python train.py --config {out / 'best.json'}"},
              "trials": board}
    files.atomic_write(out / "sweep.json", json.dumps(report, indent=2) + "\n")
    plot(sweep, summary, out / "sweep.png")
    return report


def table(report: dict) -> str:
    """The leaderboard as text, best first, with the token count and the command for the best."""
    fields, rungs = report["space"], report["rungs"]
    width = max(12, *(len(r["trial"]) + 1 for r in report["trials"]))
    head = (f"{'rank':>4} {'trial':<{width}}" + "".join(f" {name[:10]:>10}" for name in fields) + f" {'steps':>6}"
            f" {'tokens':>8}" + "".join(f" {f'@{step}':>8}" for step in rungs) + f" {'final':>8}  stopped")
    number = lambda value: "-" if value is None else f"{value:.4f}"
    lines = [f"\nsweep {report['name']} ({report['search']}, {report['policy']}"
             f"{', eta ' + str(report['eta']) if report['policy'] == 'halving' else ''}): "
             f"{report['metric']} at each rung (@step) and at the end", head]
    for r in report["trials"]:
        values = "".join(f" {value_text(r['config'][name])[:10]:>10}" for name in fields)
        losses = "".join(f" {number(r['rungs'].get(str(step))):>8}" for step in rungs)
        lines.append(f"{r['rank']:>4} {r['trial']:<{width}}{values} {r['steps']:>6} {r['tokens']:>8}{losses}"
                     f" {number(r['final']):>8}  {stopped_text(r)}")
    best = report["best"]
    lines += [f"tokens trained {report['tokens']} of the {report['planned_tokens']} that every trial's whole schedule "
              f"takes ({report['planned_tokens'] / max(report['tokens'], 1):.2f}x fewer)",
              f"best: {best['trial']} ({values_text(best['config'])}), adapter in {best['adapter']}/; "
              f"alone: {best['command']}"]
    return "\n".join(lines)


def stopped_text(row: dict) -> str:
    """Why a trial ended where it did, in a few words ("-": it ran its whole schedule)."""
    if row["nonfinite"]:
        return f"non-finite after step {row['steps']}"
    if row["stopped"] is not None and row["stopped"].startswith("successive halving"):
        return f"halving at step {row['steps']}"
    if row["stopped"] is not None:
        return row["stopped"]
    return "nothing to train" if not row["completed"] else "-"


def plot(sweep: Sweep, summary: dict[str, dict], png: Path):
    """Held-out loss against a trial's optimizer steps: at init, at each rung it reached, at its end."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in sweep.names:
        s = summary.get(name, {})
        key = "eval_loss" if sweep.metric == "loss" else "eval_task"
        points = [(0, s.get(f"initial_{key}"))] + list(zip(sweep.rungs, sweep.losses[name]))
        end = s.get("steps") if sweep.unit == "steps" else s.get("tokens")
        points = [(step, loss) for step, loss in points + [(end, s.get(key))]
                  if loss is not None and math.isfinite(loss)]
        if points:
            ax.plot(*zip(*points), "o-" if name not in sweep.stopped else "x--", label=name)
    for step in sweep.rungs:
        ax.axvline(step, color="gray", alpha=0.3)
    ax.set_xlabel(f"trial's {'optimizer steps' if sweep.unit == 'steps' else 'tokens trained'} (gray: rungs)")
    ax.set_ylabel(METRIC_NAMES[sweep.metric])
    ax.set_title(f"sweep {sweep.sweep.name}: {sweep.sweep.policy}")
    if len(sweep.names) <= 16:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    files.atomic_write(png, write=lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


# ----------------------------------------------------------------------------- a sweep trial's rungs

def reach_rung(run: Run, s: JobState):
    """A sweep trial's optimizer step at one of its rungs (sweep.py): its held-out loss there is
    recorded; under halving it leaves the scheduler, and finish_trials parks it."""
    name = s.config.name
    rung = run.sweep.rung_at(name, s.step, s.tokens)
    if rung is None:
        return
    if eval_due(s):   # evaluate_and_stop just did
        loss, task = s.eval_loss, s.eval_task
    else:
        loss, _ = evaluate(run.model, s.config, s.test_set, run.pad_id, run.device, packed=run.cfg.packing,
                           d=run.eval_ranks)
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
    run.sweep.held[name] = {**job_state(run, s), "popped": run.plans[name].popped}
    lora.remove_adapter(run.model, name)
    run.log({"event": "park", "job": name, "step": s.step, "fused_step": run.step})


def settle_rungs(run: Run):
    """Decide each rung whose trials are all in (sweep.Sweep.decide): the best wait for a slot
    again, ahead of lower priorities; the others finish with their adapter of that rung."""
    verdicts = run.sweep.decide(set(run.summary))
    if verdicts:   # the bar's total: the expected stops of the rungs decided, now the real ones
        actual = sum(run.plans[name].remaining for name, reason in verdicts if reason is not None)
        expected = run.sweep.expected_cut(run.plans)
        cut_bar(run, actual + expected - run.sweep.cut, expected)
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
        s = load_job(run, name, run.sweep.held.pop(name))
        s.stopped = reason
        run.log({"event": "early_stop", "job": name, "step": s.step, "fused_step": run.step, "reason": reason,
                 "nonfinite": False})
        stopped.append(name)
        if not batched:
            finish(run, name)
    if batched:
        prefetch_tasks(run, stopped)
        for name in stopped:
            finish(run, name)


# ----------------------------------------------------------------------------- the layer on train.py's steps

def cut_bar(run: Run, micro_batches: int, expected: int):
    """The progress bar's total less `micro_batches`; `expected` of those are the stops expected at
    the rungs still open (Sweep.cut). Job parallel ranks keep no total."""
    if run.bar.total is not None:
        run.bar.total -= micro_batches
        run.bar.refresh()
    run.sweep.cut = expected


def add_rungs(run: Run):
    """A sweep's rungs on the loop's steps: its trials evaluated at their rungs (evaluate_trials),
    parked there and promoted (admit_trials, finish_trials), its report at the end (results). The
    progress bar counts what halving is expected to run, not every trial's whole schedule."""
    run.sweep = Sweep(run.cfg, run.plans)
    run.sweep.held = {}   # parked trials' job_state(), on the CPU (in the run checkpoint as "parked")
    expected = run.sweep.expected_cut(run.plans)
    cut_bar(run, expected, expected)
    if run.writes:
        print(run.sweep.describe())
    steps, core_admit, core_results = run.steps, run.steps.admit, run.steps.results
    steps.evaluate = evaluate_trials

    def admit_trials(run: Run, names: list[str]):
        """A trial promoted past a rung comes back as it was parked; the others are admitted."""
        back = [name for name in names if name in run.sweep.held]
        for name in back:
            readmit(run, name)
        core_admit(run, [name for name in names if name not in back])

    def results(run: Run):
        report = write_report(run.sweep, run.cfg, run.summary) if run.writes else None
        core_results(run)
        if report is not None:
            print(table(report))
    steps.admit, steps.finish, steps.results = admit_trials, finish_trials, results


def readmit(run: Run, name: str):
    """A trial promoted past a rung, back as it was parked."""
    s = load_job(run, name, run.sweep.held.pop(name))
    run.log({"event": "admit", "job": name, "time": run.now(), "step": s.step})


def evaluate_trials(run: Run, stepped: list[JobState]):
    """train.evaluate_jobs, and each trial at a rung evaluated there (reach_rung); the task
    scores of all evaluating now in one batch."""
    prefetch_tasks(run, [s.config.name for s in stepped
                         if eval_due(s) or run.sweep.rung_at(s.config.name, s.step, s.tokens) is not None])
    for s in stepped:
        reason = evaluate_and_stop(run, s)
        if reason:
            stop_early(run, s, reason)
        else:
            reach_rung(run, s)


def finish_trials(run: Run):
    """train.finish_jobs; but trials waiting at a rung are parked, and rungs whose trials are all in are decided."""
    finished = run.sched.pop_finished()
    prefetch_tasks(run, [name for name in finished if not run.sweep.waits(name)])
    for name in finished:
        if run.sweep.waits(name) and name in run.jobs:
            park(run, name)
        else:
            finish(run, name)
    run.task_scores = {}
    settle_rungs(run)
