"""Scheduler with mock jobs: admission, coverage, strategies. No model."""
import pytest

from scheduler import JobPlan, Scheduler


def plan(name, n, batch=4, micro=2, epochs=2, lengths=None, max_steps=None):
    lengths = lengths or [10 + (i * 7) % 13 for i in range(n)]
    return JobPlan(name, lengths, [x // 2 for x in lengths], batch, micro, epochs, seed=1, max_steps=max_steps)


def drain(sched):
    steps, admitted = [], []
    while not sched.done:
        admitted += sched.admit()
        steps.append(sched.next_step())
        sched.pop_finished()
    return steps, admitted


@pytest.mark.parametrize("strategy", ["trivial", "optimal-fit"])
def test_every_micro_batch_once_per_epoch(strategy):
    jobs = [plan("a", 10), plan("b", 7, batch=2, micro=1), plan("c", 5, micro=4, batch=4, epochs=3)]
    steps, admitted = drain(Scheduler(jobs, strategy, max_candidates=2, max_concurrent=2))
    assert admitted == ["a", "b", "c"]
    for job in jobs:
        mbs = [mb for step in steps for mb in step if mb.job == job.name]
        assert len(mbs) == job.num_micro_batches
        for epoch in range(job.epochs):
            rows = [i for mb in mbs if mb.epoch == epoch for i in mb.indices]
            assert sorted(rows) == list(range(len(job.lengths)))
            assert rows == job.epoch_order(epoch)  # the job's own order, whatever the strategy
        assert sum(mb.last_in_step for mb in mbs) == job.total_steps
    assert all(len(step) <= 2 and len({mb.job for mb in step}) == len(step) for step in steps)


def test_step_loss_tokens_cover_the_whole_batch():
    job = plan("a", 10, batch=4, micro=2, epochs=1)
    mbs = []
    while not job.done:
        mbs.append(job.pop())
    for step in range(job.total_steps):
        in_step = [mb for mb in mbs if mb.step == step]
        rows = [i for mb in in_step for i in mb.indices]
        assert all(mb.step_loss_tokens == sum(job.loss_tokens[i] for i in rows) for mb in in_step)
        assert [mb.last_in_step for mb in in_step] == [False] * (len(in_step) - 1) + [True]


def test_order_depends_on_seed_and_name_only():
    assert plan("a", 20).epoch_order(0) == plan("a", 20, batch=2, micro=1).epoch_order(0)
    assert plan("a", 20).epoch_order(0) != plan("b", 20).epoch_order(0)
    assert plan("a", 20).epoch_order(0) != plan("a", 20).epoch_order(1)


def test_fifo_admission_fills_freed_slots():
    jobs = [plan("a", 4, epochs=1), plan("b", 12, epochs=1), plan("c", 4, epochs=1)]
    sched = Scheduler(jobs, "trivial", max_candidates=2, max_concurrent=2)
    assert sched.admit() == ["a", "b"]
    while "a" not in sched.finished:
        sched.next_step()
    assert sched.pop_finished() == ["a"] and sched.admit() == ["c"]


def test_stop_frees_the_slot():
    sched = Scheduler([plan("a", 8), plan("b", 8)], max_candidates=1)
    assert sched.admit() == ["a"]
    sched.next_step()
    sched.stop("a")
    assert sched.pop_finished() == ["a"] and sched.admit() == ["b"]


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


def test_bad_settings_are_errors():
    with pytest.raises(ValueError, match="strategy 'fastest'"):
        Scheduler([], "fastest")
    with pytest.raises(ValueError, match="not a multiple of micro_batch_size"):
        plan("a", 4, batch=4, micro=3)
