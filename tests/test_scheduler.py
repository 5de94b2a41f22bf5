"""Scheduler with mock jobs (admission, coverage, strategies, budgets, the memory model), then
through train() on a tiny checkpoint: strategy invariance, early stopping, the memory budget."""
import json
import random

import pytest

import data
import lora
import model as M
import peft_format
import report
import train
from scheduler import JobPlan, MemoryModel, Scheduler
from conftest import adapter, assert_same_adapter, job, run_cfg, write_rows

STRATEGY_KW = {"trivial": {}, "optimal-fit": {}, "fast-fit": {"token_budget": 120}}


def plan(name, n, batch=4, micro=2, epochs=2, lengths=None, max_steps=None, **kw):
    lengths = lengths or [10 + (i * 7) % 13 for i in range(n)]
    return JobPlan(name, lengths, [x // 2 for x in lengths], batch, micro, epochs, seed=1, max_steps=max_steps, **kw)


def mixed_jobs():
    rng = random.Random(0)
    return [plan("a", 10), plan("b", 7, batch=2, micro=1, priority=1),
            plan("c", 5, micro=4, batch=4, epochs=3, lengths=[rng.randint(5, 40) for _ in range(5)]),
            plan("d", 9, lengths=[rng.randint(5, 30) for _ in range(9)], group_by_length=True)]


def drain(sched):
    steps, admitted = [], []
    while not sched.done:
        admitted += sched.admit()
        steps.append(sched.next_step())
        sched.pop_finished()
    return steps, admitted


@pytest.mark.parametrize("strategy", list(STRATEGY_KW))
def test_every_micro_batch_once_per_epoch(strategy):
    jobs = mixed_jobs()
    steps, admitted = drain(Scheduler(jobs, strategy, max_candidates=3, max_concurrent=2, **STRATEGY_KW[strategy]))
    assert admitted == ["b", "a", "c", "d"]  # priority first, FIFO within
    for job_plan in jobs:
        mbs = [mb for step in steps for mb in step if mb.job == job_plan.name]
        assert len(mbs) == job_plan.num_micro_batches
        for epoch in range(job_plan.epochs):
            rows = [i for mb in mbs if mb.epoch == epoch for i in mb.indices]
            assert sorted(rows) == list(range(len(job_plan.lengths)))
            assert rows == job_plan.epoch_order(epoch)  # the job's own order, whatever the strategy
        assert sum(mb.last_in_step for mb in mbs) == job_plan.total_steps
    assert all(1 <= len(step) <= 2 and len({mb.job for mb in step}) == len(step) for step in steps)


def test_step_loss_tokens_cover_the_whole_batch():
    job_plan = plan("a", 10, batch=4, micro=2, epochs=1)
    mbs = []
    while not job_plan.done:
        mbs.append(job_plan.pop())
    for step in range(job_plan.total_steps):
        in_step = [mb for mb in mbs if mb.step == step]
        rows = [i for mb in in_step for i in mb.indices]
        assert all(mb.step_loss_tokens == sum(job_plan.loss_tokens[i] for i in rows) for mb in in_step)
        assert [mb.last_in_step for mb in in_step] == [False] * (len(in_step) - 1) + [True]


def test_order_depends_on_seed_and_name_only():
    assert plan("a", 20).epoch_order(0) == plan("a", 20, batch=2, micro=1).epoch_order(0)
    assert plan("a", 20).epoch_order(0) != plan("b", 20).epoch_order(0)
    assert plan("a", 20).epoch_order(0) != plan("a", 20).epoch_order(1)


def test_group_by_length_groups_rows_and_still_shuffles():
    rng = random.Random(1)
    lengths = [rng.randint(5, 200) for _ in range(64)]
    grouped, plain = plan("a", 64, 8, 4, lengths=lengths, group_by_length=True), plan("a", 64, 8, 4, lengths=lengths)

    def padding(p):
        mbs = [p.pop() for _ in range(p.num_micro_batches)]
        return sum(len(mb.indices) * mb.max_len - mb.tokens for mb in mbs)
    assert padding(grouped) < padding(plain) / 4
    orders = [plan("a", 64, 8, 4, lengths=lengths, group_by_length=True).epoch_order(e) for e in (0, 1)]
    assert orders[0] != orders[1] and sorted(orders[0]) == list(range(64))
    # Steps are not in length order: the batch order is shuffled.
    step_max = [max(lengths[i] for i in orders[0][s:s + 8]) for s in range(0, 64, 8)]
    assert step_max != sorted(step_max, reverse=True) and step_max != sorted(step_max)


def test_admission_by_priority_fills_freed_slots():
    jobs = [plan("a", 4, epochs=1), plan("b", 12, epochs=1, priority=2), plan("c", 4, epochs=1),
            plan("d", 4, epochs=1, priority=1)]
    sched = Scheduler(jobs, "trivial", max_candidates=2, max_concurrent=2)
    assert sched.admit() == ["b", "d"]
    while "d" not in sched.finished:
        sched.next_step()
    assert sched.pop_finished() == ["d"] and sched.admit() == ["a"]
    while "a" not in sched.finished:
        sched.next_step()
    assert sched.pop_finished() == ["a"] and sched.admit() == ["c"]


def test_stop_frees_the_slot():
    a, b = plan("a", 8), plan("b", 8)
    sched = Scheduler([a, b], max_candidates=1)
    assert sched.admit() == ["a"]
    sched.next_step()
    assert sched.stop("a") and not sched.stop("a")  # a second stop is a no-op
    assert sched.pop_finished() == ["a"] and sched.admit() == ["b"]
    steps, _ = drain(sched)
    assert {mb.job for step in steps for mb in step} == {"b"} and a.remaining == a.num_micro_batches - 1


def test_a_running_scheduler_takes_new_jobs_and_withdraws_waiting_ones():
    """serve.py's seams: a job added while others run waits behind its priority (requeue) and joins
    the next step with room; a waiting job withdrawn never runs and finishes nothing."""
    sched = Scheduler([plan("a", 8)], max_candidates=2, max_concurrent=2)
    assert sched.admit() == ["a"] and [mb.job for mb in sched.next_step()] == ["a"]
    for new in (plan("b", 8), plan("c", 8), plan("d", 8, priority=1)):
        sched.requeue(new)
    assert [p.name for p in sched.waiting] == ["d", "b", "c"]
    assert sched.withdraw("b") and not sched.withdraw("b") and not sched.withdraw("a")   # a runs: stop() is its way
    assert sched.admit() == ["d"] and [mb.job for mb in sched.next_step()] == ["d", "a"]   # priority first
    steps, admitted = drain(sched)
    assert admitted == ["c"] and "b" not in {mb.job for step in steps for mb in step} and "b" not in sched.finished


def test_optimal_fit_groups_similar_lengths():
    short1, short2 = plan("s1", 4, lengths=[10] * 4), plan("s2", 4, lengths=[12] * 4)
    long1 = plan("l1", 4, lengths=[100] * 4)
    sched = Scheduler([short1, long1, short2], "optimal-fit", max_candidates=3, max_concurrent=2)
    sched.admit()
    assert {mb.job for mb in sched.next_step()} == {"s1", "s2"}
    trivial = Scheduler([plan("s1", 4, lengths=[10] * 4), plan("l1", 4, lengths=[100] * 4),
                         plan("s2", 4, lengths=[12] * 4)], "trivial", max_candidates=3, max_concurrent=2)
    trivial.admit()
    assert {mb.job for mb in trivial.next_step()} == {"s1", "l1"}


def test_fast_fit_packs_longest_first_up_to_the_budget():
    jobs = [plan("s1", 4, lengths=[20] * 4), plan("l1", 4, lengths=[100] * 4), plan("s2", 4, lengths=[24] * 4),
            plan("m1", 4, lengths=[60] * 4)]
    # Budget 400 padded tokens: l1 (2 x 100) first, then m1 (4 x 100 = 400); s1, s2 no longer fit.
    sched = Scheduler(jobs, "fast-fit", max_candidates=4, max_concurrent=4, token_budget=400)
    sched.admit()
    assert [mb.job for mb in sched.next_step()] == ["l1", "m1"]
    sched = Scheduler([plan(j.name, 4, lengths=j.lengths) for j in jobs], "fast-fit", max_candidates=4,
                      max_concurrent=4, token_budget=10_000)
    sched.admit()
    assert len(sched.next_step()) == 4  # concurrency follows the budget
    with pytest.raises(ValueError, match="set scheduler.token_budget or scheduler.memory_budget_gb"):
        Scheduler(jobs, "fast-fit")


def processed(step, packed, multiple=8):
    """A step's processed tokens counted by hand: its real tokens packed, else rows x padded length."""
    if packed:
        return sum(mb.tokens for mb in step)
    rows = sum(len(mb.indices) for mb in step)
    return rows * -(-max(mb.max_len for mb in step) // multiple) * multiple


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("strategy", list(STRATEGY_KW))
def test_token_budget_is_never_exceeded(strategy, packed, capsys):
    rng = random.Random(2)
    jobs = [plan(n, 12, lengths=[rng.randint(5, 60) for _ in range(12)], group_by_length=g)
            for n, g in zip("abcd", (True, False, True, False))]
    jobs.append(plan("huge", 4, lengths=[200] * 4))  # 2 x 200 > 300: alone, with a warning
    sched = Scheduler(jobs, strategy, max_candidates=5, max_concurrent=3, token_budget=300, pad_multiple=8,
                      packed=packed)
    steps, _ = drain(sched)
    for step in steps:
        assert processed(step, packed) <= 300 or len(step) == 1
        assert sched.padding(step) == processed(step, packed) - sum(mb.tokens for mb in step)
    assert sum(len(step) > 1 for step in steps) > 5
    assert capsys.readouterr().out.count("over the scheduler's budget") == 1
    if packed:
        assert all(sched.padding(step) == 0 for step in steps)


def true_peak(tokens, squares):
    return 1e9 + 3e5 * tokens + 200 * squares


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("strategy", ["trivial", "optimal-fit", "fast-fit"])
def test_memory_budget_is_never_exceeded(strategy, packed):
    """The model learns a synthetic peak b0 + b1*tokens + b2*squares online; no step ever goes over."""
    rng = random.Random(3)
    jobs = [plan(n, 40, lengths=[rng.randint(8, 250) for _ in range(40)], group_by_length=True, epochs=1)
            for n in "abcd"]
    lengths = {j.name: j.lengths for j in jobs}
    budget = 1.6e9 if not packed else 1.35e9
    sched = Scheduler(jobs, strategy, max_candidates=4, max_concurrent=4, memory_budget=budget, pad_multiple=8,
                      packed=packed)
    fused = 0
    while not sched.done:
        sched.admit()
        step = sched.next_step()
        if packed:   # the features by hand: real tokens, and the sum of each row's length squared
            features = (sum(mb.tokens for mb in step),
                        sum(lengths[mb.job][i] ** 2 for mb in step for i in mb.indices))
        else:
            rows, length = sum(len(mb.indices) for mb in step), processed(step, False) // sum(len(mb.indices) for mb in step)
            features = (rows * length, rows * length ** 2)
        assert sched.features(step) == features
        assert true_peak(*features) <= budget or len(step) == 1
        fused += len(step) > 1
        sched.memory.observe(*features, true_peak(*features))
        sched.pop_finished()
    assert fused > 10
    b0, b1, b2 = sched.memory.coefficients
    assert b0 == pytest.approx(1e9, rel=1e-3) and b1 == pytest.approx(3e5, rel=1e-2)
    assert b2 == pytest.approx(200, rel=1e-2)


def test_memory_model_is_conservative_before_its_fit():
    model = MemoryModel()
    assert model.predict(400, 40000) == float("inf")
    model.observe(400, 40000, true_peak(400, 40000))
    for rows, length in [(1, 10), (4, 100), (8, 100), (4, 300), (16, 50)]:
        assert model.predict(rows * length, rows * length ** 2) >= true_peak(rows * length, rows * length ** 2)
    assert model.coefficients is None


def test_bad_settings_are_errors():
    with pytest.raises(ValueError, match="strategy 'fastest'"):
        Scheduler([], "fastest")
    with pytest.raises(ValueError, match="not a multiple of micro_batch_size"):
        plan("a", 4, batch=4, micro=3)


# ----------------------------------------------------------------------------- through train()

NAMES = ("rev", "other", "count")


def three_jobs(d):
    return [job("rev", write_rows(d / "r.json", 12, 0, "reverse"), group_by_length=True),
            job("other", write_rows(d / "o.json", 10, 1, "reverse"), r=8, micro_batch_size=4, optimizer="sgd"),
            job("count", write_rows(d / "c.json", 8, 2, "count"), lr_schedule="cosine", priority=1)]


def step_jobs(out):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [sorted(r["jobs"]) for r in lines if "step" in r and "event" not in r]


def test_each_strategy_gives_every_job_the_same_adapter(tmp_path, base_dir):
    runs, mixes = {}, {}
    for strategy, kw in [("trivial", {}), ("optimal-fit", {}), ("fast-fit", {"token_budget": 1000})]:
        out = tmp_path / strategy
        train.train(run_cfg(base_dir, out, three_jobs(tmp_path),
                            scheduler={"strategy": strategy, "max_candidates": 3, "max_concurrent": 2, **kw}))
        runs[strategy] = {name: adapter(out, name) for name in NAMES}
        mixes[strategy] = step_jobs(out)
        run = json.loads((out / "run.json").read_text())
        assert 0 <= run["padding"] < 1 and run["peak_mem_mb"] > 0 and run["tokens"] > 0
    # The strategies really share steps differently...
    assert mixes["trivial"] != mixes["optimal-fit"] != mixes["fast-fit"] != mixes["trivial"]
    # ...and every job ends with the same adapter regardless.
    for strategy in ("optimal-fit", "fast-fit"):
        for name in NAMES:
            assert_same_adapter(runs[strategy][name], runs["trivial"][name])


def test_early_stop_keeps_the_best_adapter_and_frees_the_slot(tmp_path, base_dir):
    rows = write_rows(tmp_path / "t.json", 16, 5, "reverse")
    test_rows = write_rows(tmp_path / "e.json", 4, 6, "reverse")
    out = tmp_path / "out"
    jobs = [job("stall", rows, test_data=test_rows, optimizer="sgd", lr=1e-30, epochs=4, eval_every=1, early_stop=2),
            job("wild", rows, test_data=test_rows, lr=0.5, epochs=4, eval_every=1, early_stop=3, dropout=0.0,
                diverge_factor=1.05),
            job("next", rows, max_steps=2)]
    summary = train.train(run_cfg(base_dir, out, jobs, scheduler={"max_candidates": 2}))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = [(r["event"], r["job"]) for r in lines if r.get("event") in ("admit", "finish", "early_stop")]
    # lr=1e-30 never improves (B moves by ~1e-30: no change in fp32) on the initial held-out loss: stopped after 2 evals, and "next" takes its slot.
    assert events[:2] == [("admit", "stall"), ("admit", "wild")]
    assert events.index(("early_stop", "stall")) < events.index(("finish", "stall")) < events.index(("admit", "next"))
    assert summary["stall"]["steps"] == 2 and summary["stall"]["stopped"].startswith("no better held-out loss")
    # lr=0.5 overshoots: held-out loss rises past 1.05x its best, and the job stops as diverged.
    assert summary["wild"]["stopped"].startswith("diverged") and summary["wild"]["steps"] < 16
    assert summary["wild"]["best_step"] < summary["wild"]["steps"]
    assert summary["next"]["steps"] == 2
    # The saved adapter is the best one seen: its held-out loss is the lowest logged eval.
    evals = [r["eval_loss"] for r in lines if r.get("event") == "eval" and r["job"] == "wild"]
    best = min(evals + [summary["wild"]["initial_eval_loss"]])
    assert summary["wild"]["eval_loss"] == pytest.approx(best)
    tok = data.load_tokenizer(base_dir)
    net = M.load_model(base_dir)
    peft_format.load_peft(net, out / "wild")
    held_out = data.load_job_data(test_rows, tok)
    assert report.evaluate(net, jobs[1], held_out, tok.pad_id, "cpu")[0] == pytest.approx(best, rel=1e-5)


def test_early_stop_needs_held_out_data(tmp_path, base_dir):
    cfg = run_cfg(base_dir, tmp_path / "o", [job("a", write_rows(tmp_path / "t.json", 4, 0, "count"), early_stop=2)])
    with pytest.raises(train.ConfigError, match="early_stop: needs test_data and eval_every"):
        train.train(cfg)


def test_memory_budget_caps_steps_and_logs_prediction_error(tmp_path, base_dir, capsys):
    jobs = three_jobs(tmp_path)
    # A budget below any step: every step runs one micro-batch alone (and says so once).
    train.train(run_cfg(base_dir, tmp_path / "tight", jobs, scheduler={"max_concurrent": 3, "memory_budget_gb": 1e-6}))
    assert all(len(names) == 1 for names in step_jobs(tmp_path / "tight"))
    assert capsys.readouterr().out.count("over the scheduler's budget") == 1
    train.train(run_cfg(base_dir, tmp_path / "free", jobs, scheduler={"max_concurrent": 3, "memory_budget_gb": 1e3}))
    steps = [json.loads(line) for line in (tmp_path / "free" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "step" in r and "event" not in r]
    assert any(len(r["jobs"]) == 3 for r in steps)
    assert steps[0]["pred_peak_mb"] is None and all(r["mem_pred_error"] is not None for r in steps[1:])
    assert all(0 <= r["padding"] < 1 for r in steps)


def test_fast_fit_without_a_budget_is_a_config_error(tmp_path, base_dir, capsys):
    cfg = {"base_model": str(base_dir), "out_dir": str(tmp_path / "o"), "scheduler": {"strategy": "fast-fit"},
           "jobs": [{"name": "a", "data": write_rows(tmp_path / "t.json", 4, 7, "count")}]}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert train.main(["--config", str(tmp_path / "cfg.json")]) == 2
    assert "set scheduler.token_budget or scheduler.memory_budget_gb" in capsys.readouterr().err
    assert train.main(["--config", str(tmp_path / "cfg.json"), "--scheduler.token_budget=512",
                       "--jobs.a.max_steps=1", "--jobs.a.group_by_length=true"]) == 0


def test_plan_counts_its_micro_batches_without_enumerating_them():
    """JobPlan counts micro-batches arithmetically (a plan of 10^5 epochs once took minutes to
    set up); the count equals the micro-batches it then yields, for ragged last steps too."""
    for n, batch, micro, epochs, max_steps in [(10, 4, 2, 3, None), (10, 4, 4, 2, 5), (7, 8, 2, 1, None),
                                              (16, 4, 1, 2, 3), (5, 5, 5, 4, 0), (9, 6, 3, 3, 4)]:
        plan = JobPlan("j", [8] * n, [4] * n, batch, micro, epochs, seed=0, max_steps=max_steps)
        yielded = 0
        while not plan.done:
            plan.pop()
            yielded += 1
        assert plan.num_micro_batches == yielded, (n, batch, micro, epochs, max_steps)
    # 1000 rows in steps of 16: 62 full steps of 4 micro-batches and one of 8 rows (2) per epoch.
    assert JobPlan("j", [8] * 1000, [4] * 1000, 16, 4, 100_000, seed=0).num_micro_batches == 250 * 100_000
