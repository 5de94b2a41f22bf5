"""Sweeps (issue 15): trials are ordinary jobs; successive halving stops the trials that cannot
learn at the first rung and finds the full grid's winner with fewer tokens; a trial equals the
same job alone; decisions do not depend on scheduling; a killed sweep resumes to the same result."""
import contextlib
import dataclasses
import io
import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import config
import sweep
import train
from conftest import adapter, assert_same_adapter, make_hf_model, run_killed, save_hf, write_rows
from tokenizer_util import write_tokenizer_json

# Six trials whose lr (1e-30) cannot move their adapters, one slow learner and one fast one: the
# fast one is the best at every rung and at the end, by construction.
LRS = [1e-30, 2e-30, 3e-30, 4e-30, 5e-30, 6e-30, 3e-3, 3e-2]
NON_LEARNERS, SLOW, BEST = [f"lr-t{i:02d}" for i in range(6)], "lr-t06", "lr-t07"


def write_sweep(folder: Path, base: Path, out: str, policy: str, others: bool = False, **changes) -> tuple[str, Path]:
    """A sweep config file: the LRS grid on 12 optimizer steps (cosine schedule, dropout), rungs
    at steps 2 and 8 (eta 4), 4 jobs admitted at a time; `others`: an ordinary job beside it."""
    rows = write_rows(folder / "t.json", 16, 5, "reverse")
    test_rows = write_rows(folder / "test.json", 6, 7, "reverse")
    cfg = {"base_model": str(base), "dtype": "float32", "device": "cpu", "out_dir": str(folder / out),
           "scheduler": {"max_candidates": 4, "max_concurrent": 2},
           "jobs": [{"name": "count", "data": write_rows(folder / "c.json", 8, 2, "count"), "batch_size": 4,
                     "micro_batch_size": 2, "epochs": 2}] if others else [],
           "sweep": {"name": "lr", "policy": policy, "eta": 4, "rung_steps": 2, "space": {"lr": LRS},
                     "job": {"data": rows, "test_data": test_rows, "r": 4, "alpha": 8, "dropout": 0.1,
                             "targets": ["q_proj", "v_proj"], "batch_size": 4, "micro_batch_size": 2, "epochs": 3,
                             "lr_schedule": "cosine", "warmup_steps": 0}}}
    sweep_fields = {f.name for f in dataclasses.fields(config.SweepConfig)}
    for key, value in changes.items():
        (cfg["sweep"] if key in sweep_fields else cfg)[key] = value
    path = folder / f"{out}.json"
    path.write_text(json.dumps(cfg))
    return str(path), folder / out


def run(path: str, *overrides: str) -> tuple[int, str]:
    """train.main on a config; its exit code and what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = train.main(["--config", path, *overrides])
    return code, printed.getvalue()


def run_with_bar(path: str, *overrides: str) -> tuple[int, str, list[int], int]:
    """run(), and the progress bar's total at the start and after each rung's decision (every
    sweep.cut_bar), and the micro-batches it counted at the end."""
    totals, runs = [], []

    def recorded(run, *args):
        cut_bar(run, *args)
        totals.append(run.bar.total)
        runs.append(run)
    cut_bar = sweep.cut_bar
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sweep, "cut_bar", recorded)
        code, printed = run(path, *overrides)
    return code, printed, totals, runs[-1].bar.n


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """The same space run with halving (an ordinary job beside it) and as a full grid."""
    tmp = tmp_path_factory.mktemp("sweeps")
    vocab = write_tokenizer_json(tmp / "base")
    base = save_hf(make_hf_model(vocab_size=max(vocab, 384), tie_word_embeddings=True), tmp / "base")
    results = {"base": base, "folder": tmp}
    for policy in ("halving", "full"):
        path, out = write_sweep(tmp, base, policy, policy, others=policy == "halving")
        code, printed, bar_totals, bar_counted = run_with_bar(path)
        assert code == 0
        results[policy] = {"path": path, "out": out, "printed": printed, "bar": (bar_totals, bar_counted),
                           "report": json.loads((out / "sweep.json").read_text())}
    return results


def by_trial(report: dict) -> dict:
    return {row["trial"]: row for row in report["trials"]}


def test_halving_stops_the_non_learners_and_finds_the_full_grids_winner(sweeps):
    halving, full = sweeps["halving"]["report"], sweeps["full"]["report"]
    assert halving["rungs"] == full["rungs"] == [2, 8]
    # The full grid: every trial ran its 12 steps; the fast learner won, the non-learners did not move.
    assert all(row["steps"] == 12 and row["completed"] for row in full["trials"])
    assert full["best"]["trial"] == BEST and full["best"]["config"] == {"lr": 3e-2}
    initial = by_trial(full)[NON_LEARNERS[0]]["rungs"]["2"]
    assert all(abs(by_trial(full)[name]["final"] - initial) < 1e-4 for name in NON_LEARNERS)
    # Halving: the same winner; the non-learners stopped at the first rung, the slow one at the second.
    trials = by_trial(halving)
    assert halving["best"]["trial"] == BEST and halving["trials"][0]["trial"] == BEST
    assert trials[BEST]["completed"] and trials[BEST]["steps"] == 12
    for name in NON_LEARNERS:
        assert trials[name]["steps"] == 2 and list(trials[name]["rungs"]) == ["2"] and not trials[name]["completed"]
        assert trials[name]["stopped"].startswith("successive halving: held-out loss")
    assert trials[SLOW]["steps"] == 8 and list(trials[SLOW]["rungs"]) == ["2", "8"]
    assert [row["trial"] for row in halving["trials"]][:2] == [BEST, SLOW]
    # A trial's held-out loss at a rung does not depend on the sweep around it (halving, with an
    # ordinary job fused beside it, or the full grid).
    for name, row in trials.items():
        for step, loss in row["rungs"].items():
            assert abs(loss - by_trial(full)[name]["rungs"][step]) < 1e-4, (name, step)
    # Fewer tokens for the same winner: 6 x 2 + 8 + 12 of 8 x 12 optimizer steps, and exactly the
    # tokens each trial trains up to there, as the full grid counted them at that rung (README).
    assert full["tokens"] == full["planned_tokens"] == halving["planned_tokens"]
    at_rung = {(e["job"], e["step"]): e["tokens"] for e in map(json.loads, (sweeps["full"]["out"] / "metrics.jsonl")
                                                              .read_text().splitlines()) if e.get("event") == "rung"}
    expected = {name: at_rung[name, 2] for name in NON_LEARNERS} | {SLOW: at_rung[SLOW, 8], BEST: by_trial(full)[BEST]["tokens"]}
    assert {name: row["tokens"] for name, row in trials.items()} == expected
    assert halving["tokens"] == sum(expected.values()) and sum(row["steps"] for row in trials.values()) == 6 * 2 + 8 + 12
    ratio = full["tokens"] / halving["tokens"]
    print(f"\nhalving trained {halving['tokens']} tokens, the full grid {full['tokens']}: {ratio:.2f}x fewer")
    assert ratio > 2.5 and abs(halving["tokens_saved"] - (1 - 1 / ratio)) < 1e-9
    # Outputs: the table (best first), the best adapter like any job's, the command to train it alone.
    out, printed = sweeps["halving"]["out"], sweeps["halving"]["printed"]
    table = printed[printed.index("\nsweep lr (grid, halving, eta 4)"):].splitlines()
    assert table[3].split()[:2] == ["1", BEST] and f"{ratio:.2f}x fewer" in printed
    assert halving["best"]["command"] == f"python train.py --config {out / 'best.json'}"
    assert halving["best"]["command"] in printed
    assert (out / BEST / "adapter_model.safetensors").exists() and (out / "sweep.png").stat().st_size > 0
    assert json.loads((out / "summary.json").read_text())["count"]["steps"] == 4   # the ordinary job beside it
    assert "count" not in by_trial(halving)


def test_the_progress_bar_counts_what_halving_runs(sweeps):
    """The bar's total (micro-batches) at the start and after each rung is what the sweep runs in
    the end: halving's expected stops are left out from the start (the ETA is not the full grid's).
    Each trial's optimizer step is 2 micro-batches (batch 4, micro 2), as is the ordinary job's."""
    for policy in ("halving", "full"):
        (totals, counted), report = sweeps[policy]["bar"], sweeps[policy]["report"]
        summary = json.loads((sweeps[policy]["out"] / "summary.json").read_text())
        run_micro_batches = 2 * sum(job["steps"] for job in summary.values())
        assert counted == run_micro_batches and set(totals) == {run_micro_batches}, (policy, totals)
        assert len(totals) == (1 + len(report["rungs"]) if policy == "halving" else 1)   # the start, each decision
    assert sweeps["halving"]["bar"][1] == 2 * (6 * 2 + 8 + 12 + 4) and sweeps["full"]["bar"][1] == 2 * 8 * 12


def test_a_trial_equals_the_same_job_alone(sweeps, tmp_path):
    """The winner retrained from best.json alone, and a trial halving stopped at step 8 trained
    alone (its snapshot at step 8): each ends with the sweep's adapter."""
    out = sweeps["halving"]["out"]
    best = json.loads((out / "best.json").read_text())
    assert [job["name"] for job in best["jobs"]] == [BEST] and best["sweep"] is None
    assert run(str(out / "best.json"), f"--out_dir={tmp_path / 'best'}")[0] == 0
    assert_same_adapter(adapter(tmp_path / "best", BEST), adapter(out, BEST))
    resolved = json.loads((out / "config.json").read_text())
    slow = {**next(job for job in resolved["jobs"] if job["name"] == SLOW), "save_every": 8}
    (tmp_path / "slow.json").write_text(json.dumps({**best, "jobs": [slow], "out_dir": str(tmp_path / "slow")}))
    assert run(str(tmp_path / "slow.json"))[0] == 0
    assert_same_adapter(adapter(tmp_path / "slow" / "snapshots" / SLOW, "step-8"), adapter(out, SLOW))


def test_decisions_do_not_depend_on_scheduling(sweeps, tmp_path):
    """One trial at a time, none fused: the same rungs decided the same way, the same leaderboard."""
    path, out = write_sweep(tmp_path, sweeps["base"], "serial", "halving",
                            scheduler={"max_candidates": 1, "max_concurrent": 1})
    assert run(path)[0] == 0
    serial, fused = json.loads((out / "sweep.json").read_text()), sweeps["halving"]["report"]
    assert [r["trial"] for r in serial["trials"]] == [r["trial"] for r in fused["trials"]]
    for a, b in zip(serial["trials"], fused["trials"]):
        assert (a["steps"], a["tokens"], a["stopped"], list(a["rungs"])) == (b["steps"], b["tokens"], b["stopped"], list(b["rungs"]))
        assert all(abs(a["rungs"][step] - b["rungs"][step]) < 1e-4 for step in a["rungs"])
    for name in (BEST, SLOW, NON_LEARNERS[0]):
        assert_same_adapter(adapter(out, name), adapter(sweeps["halving"]["out"], name))


def test_random_search_is_seeded_and_overrides_are_typed(sweeps, tmp_path):
    path, _ = write_sweep(tmp_path, sweeps["base"], "random", "halving", search="random", trials=6, seed=3, space={
        "lr": {"log_uniform": [1e-4, 1e-1]}, "r": {"log_uniform": [2, 16]}, "dropout": [0.0, 0.1],
        "targets": [["q_proj"], ["q_proj", "v_proj", "down_proj"]], "use_rslora": [False, True]})
    expanded = [sweep.expand(train.load_config(path, [])) for _ in range(2)]
    trials = [job for job in expanded[0].jobs]
    assert [job.name for job in trials] == [f"lr-t{i:02d}" for i in range(6)] and expanded[0] == expanded[1]
    assert all(1e-4 <= job.lr <= 1e-1 and isinstance(job.r, int) and 2 <= job.r <= 16 and job.dropout in (0.0, 0.1)
               for job in trials)
    assert len({(job.lr, job.r) for job in trials}) == 6 and {job.alpha for job in trials} == {8}
    other_seed = sweep.expand(train.load_config(path, ["--sweep.seed=4"]))
    assert [job.lr for job in other_seed.jobs] != [job.lr for job in trials]
    # No sweep seed: the run's seed draws.
    assert sweep.expand(train.load_config(path, ["--sweep.seed=null"])) != sweep.expand(
        train.load_config(path, ["--sweep.seed=null", "--seed=7"]))
    cfg = train.load_config(path, ["--sweep.policy=full", "--sweep.job.lr_schedule=linear", "--sweep.trials=2",
                                   '--sweep.space={"r": [4, 8]}', "--sweep.search=grid", "--sweep.trials=null"])
    assert (cfg.sweep.policy, cfg.sweep.job.lr_schedule, cfg.sweep.job.name) == ("full", "linear", "lr")
    assert [(job.name, job.r) for job in sweep.expand(cfg).jobs] == [("lr-t00", 4), ("lr-t01", 8)]


def test_a_nonfinite_trial_or_one_with_nothing_to_train_does_not_block_a_rung(sweeps, tmp_path, capsys):
    """SGD at lr 1e20 without clipping blows up after its first step (it stops alone, flagged, exit
    3) and max_steps 0 trains nothing: neither holds up the rung; the learner goes on and wins."""
    path, out = write_sweep(tmp_path, sweeps["base"], "edge", "halving", eta=2, space={
        "lr": [3e-2, 1e20], "max_steps": [0, 6]})
    cfg = json.loads(Path(path).read_text())
    cfg["sweep"]["job"].update(optimizer="sgd", max_grad_norm=None, targets=None)   # as test_resume's blow-up
    Path(path).write_text(json.dumps(cfg))
    code, printed = run(path)
    assert code == 3 and "non-finite" in capsys.readouterr().err
    report = json.loads((out / "sweep.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in sweep.json"))
    assert [(r["trial"], r["steps"], r["completed"], r["nonfinite"]) for r in report["trials"]] == [
        ("lr-t01", 6, True, False), ("lr-t00", 0, False, False), ("lr-t02", 0, False, False), ("lr-t03", 1, False, True)]
    assert "nothing to train" in printed and "non-finite after step 1" in printed
    assert list(by_trial(report)["lr-t01"]["rungs"]) == ["2", "4"]


GOOD = {"name": "lr", "space": {"lr": [1e-3, 1e-2]},
        "job": {"data": "t.json", "test_data": "t.json", "batch_size": 4, "micro_batch_size": 2}}


@pytest.mark.parametrize("changes, message", [
    ({"policy": "hlaving"}, "sweep.policy: expected one of full, halving, got 'hlaving'"),
    ({"search": "bayes"}, "sweep.search: expected one of grid, random, got 'bayes'"),
    ({"eta": 1}, "sweep.eta: expected 2 <= eta <= 1000, got 1"),
    ({"eta": 2.5}, "sweep.eta: expected int, got 2.5"),
    ({"rung_steps": 0}, "sweep.rung_steps: expected 1 <= rung_steps"),
    ({"rung_tokens": 0}, "sweep.rung_tokens: expected null or 1 <= rung_tokens"),
    ({"search": "random"}, "sweep.trials: random search: expected 1 <= trials <= 10000, got None"),
    ({"trials": 4}, "sweep.trials: a grid runs every combination: expected null, got 4"),
    ({"name": "a/b"}, "sweep.name: expected a plain name"),
    ({"polcy": "full"}, "sweep.polcy: unknown key (did you mean 'policy'?)"),
    ({"space": {}}, "sweep.space: expected an object of job field -> values, got {}"),
    ({"space": {"lrr": [1e-3]}}, "sweep.space.lrr: not a job field a sweep can vary (name and test_data stay) (did you mean 'lr'?)"),
    ({"space": {"name": ["x"]}}, "sweep.space.name: not a job field a sweep can vary"),
    ({"space": {"lr": []}}, "sweep.space.lr: expected a non-empty list of at most 10000 values, got []"),
    ({"space": {"r": [4, "x"]}}, "sweep.space.r[1]: expected int, got 'x'"),
    ({"space": {"lr": [1e-3, 0]}}, "sweep.space.lr: expected a finite number > 0, got 0.0"),
    ({"space": {"lr_schedule": ["cosine", "cosin"]}}, "sweep.space.lr_schedule: expected one of constant, linear, cosine, got 'cosin'"),
    ({"space": {"micro_batch_size": [2, 3]}}, "sweep.space.micro_batch_size: expected a divisor of batch_size 4, got 3"),
    ({"space": {"batch_size": [2, 4], "micro_batch_size": [4]}},
     "trial lr-t00 (batch_size=2, micro_batch_size=4): sweep.space.micro_batch_size: expected a divisor of batch_size 2, got 4"),
    ({"space": {"lr": {"uniform": [0.1, 1]}}}, "sweep.space.lr: expected a list of values (a grid takes lists)"),
    ({"search": "random", "trials": 2, "space": {"lr": {"log_uniform": [1e-3, 1e-4]}}},
     "sweep.space.lr.log_uniform: expected [lo, hi], finite numbers, lo < hi and lo > 0, got [0.001, 0.0001]"),
    ({"search": "random", "trials": 2, "space": {"lr": {"normal": [0, 1]}}}, "sweep.space.lr: expected a list of values or"),
    ({"search": "random", "trials": 2, "space": {"targets": {"uniform": [0, 1]}}}, "sweep.space.targets: a range needs a number field"),
    ({"space": {"targets": [["q_proj", "qq_proj"]]}}, "sweep.space.targets (trial lr-t00): 'qq_proj' not in"),
    ({"job": {"data": "t.json"}}, "sweep.job.test_data: the sweep's metric is held-out loss: expected a file of held-out rows, got None"),
    ({"job": {**GOOD["job"], "name": "x"}}, "sweep.job.name: trials are named <sweep.name>-tNN; remove it"),
    ({"job": {**GOOD["job"], "lrr": 1}}, "sweep.job.lrr: unknown key (did you mean 'lr'?)"),
    ({"job": {**GOOD["job"], "r": 0}}, "sweep.job.r: expected 1 <= r <= 65536, got 0"),
    ({"job": None}, "sweep.job: expected an object, got None"),
    ({"jobs": [{"name": "lr-t01", "data": "t.json"}]}, "jobs[0].name: 'lr-t01' is the name of a trial of sweep 'lr'"),
    ({"--sweep.etaa=2": None}, "--sweep.etaa: unknown key (did you mean 'eta'?)"),
    ({"--sweep.job.name=x": None}, "--sweep.job.name: trials are named <sweep.name>-tNN"),
])
def test_bad_sweep_configs_are_one_line_errors(sweeps, tmp_path, capsys, changes, message):
    folder = sweeps["folder"]
    sweep_section = {**GOOD, **{k: v for k, v in changes.items() if k != "jobs" and not k.startswith("--")}}
    sweep_section["job"] = sweep_section["job"] and {k: str(folder / v) if k in ("data", "test_data") else v
                                                     for k, v in sweep_section["job"].items()}
    jobs = [{**job, "data": str(folder / job["data"])} for job in changes.get("jobs", [])]
    cfg = {"base_model": str(sweeps["base"]), "out_dir": str(tmp_path / "out"), "jobs": jobs, "sweep": sweep_section}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    overrides = [k for k in changes if k.startswith("--")]
    assert train.main(["--config", str(tmp_path / "cfg.json"), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_no_jobs_and_no_sweep_is_an_error(sweeps, tmp_path, capsys):
    for cfg, message in (({"jobs": []}, "jobs: expected a non-empty list of jobs"), ({}, "missing required key(s) jobs")):
        (tmp_path / "cfg.json").write_text(json.dumps({"base_model": str(sweeps["base"]), **cfg}))
        assert train.main(["--config", str(tmp_path / "cfg.json")]) == 2
        assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- kill and resume

KILL_POINTS = {
    "while trials wait at the first rung": dict(target="sweep.park", n=5, before=True),
    "after a rung's decision, before a promoted trial is back": dict(
        target="sweep.readmit", n=1, before=True),
}


@pytest.mark.parametrize("point", KILL_POINTS)
def test_killed_sweep_resumes_to_the_same_result(sweeps, tmp_path, point):
    """SIGKILL mid-sweep, with trials parked (their state only in the run checkpoint), then the
    same command: every adapter bitwise equal to the uninterrupted sweep's, the same leaderboard."""
    path, out = write_sweep(tmp_path, sweeps["base"], "killed", "halving", others=True, checkpoint_every=1)
    assert run_killed(path, KILL_POINTS[point]) == -signal.SIGKILL
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    assert state["parked"], "the kill came when no trial was parked"
    code, _, bar_totals, bar_counted = run_with_bar(path)
    assert code == 0 and bar_totals[-1] == bar_counted == sweeps["halving"]["bar"][1]   # the bar resumed too
    reference = sweeps["halving"]
    expected, got = reference["report"], json.loads((out / "sweep.json").read_text())
    assert got["trials"] == expected["trials"] and got["tokens"] == expected["tokens"]
    for name in ["count", *by_trial(expected)]:
        for key, tensor in load_file(reference["out"] / name / "adapter_model.safetensors").items():
            assert torch.equal(tensor, load_file(out / name / "adapter_model.safetensors")[key]), f"{name} {key}"
    assert not (out / "checkpoint").exists() and (out / "run.json").exists()


def test_expand_keeps_a_resolved_config(sweeps):
    """out_dir/config.json holds the trials already: expanding it again changes nothing."""
    cfg = train.load_config(sweeps["halving"]["path"], [])
    expanded = sweep.expand(cfg)
    assert sweep.expand(expanded) == expanded and len(expanded.jobs) == 1 + len(LRS)
    assert dataclasses.asdict(expanded) == json.loads((sweeps["halving"]["out"] / "config.json").read_text())


def test_rungs_by_tokens(sweeps, tmp_path):
    """rung_tokens: rung k at the first optimizer step where a trial has trained rung_tokens x eta^k
    tokens; the non-learners still stop at the first rung and the best trial wins."""
    path, out = write_sweep(tmp_path, sweeps["base"], "bytokens", "halving", rung_tokens=300)
    code, printed, bar_totals, bar_counted = run_with_bar(path)
    assert set(bar_totals) == {bar_counted}   # rungs by tokens: the bar's total from the start too
    report = json.loads((out / "sweep.json").read_text())
    assert report["rung_unit"] == "tokens" and len(report["rungs"]) >= 2
    assert report["rungs"] == [300 * 4**k for k in range(len(report["rungs"]))]
    assert code == 0 and f"rungs at tokens {', '.join(map(str, report['rungs']))}" in printed
    assert max(report["rungs"]) < max(row["planned_tokens"] for row in report["trials"])
    rows = by_trial(report)
    assert report["best"]["trial"] == BEST and all(rows[name]["rungs"].keys() == {"300"} for name in NON_LEARNERS)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rung_events = [e for e in events if e.get("event") == "rung"]
    per_step = max(e["tokens"] for e in rung_events) // max(e["step"] for e in rung_events) * 3   # a generous step
    for e in rung_events:
        threshold = report["rungs"][e["rung"]]
        assert threshold <= e["tokens"] < threshold + per_step, e
