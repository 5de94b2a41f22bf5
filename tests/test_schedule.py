"""train.get_lr against transformers' get_{constant,linear,cosine}_schedule_with_warmup at every
step, directly and as the loop logs it (the lr of each job's optimizer step k is their step k)."""
import json
import math

import pytest
import torch

import train
from conftest import job, run_cfg, write_rows

SCHEDULES = ("constant", "linear", "cosine")


def transformers_lrs(schedule: str, lr: float, warmup: int, total: int) -> list[float]:
    """The lr a transformers Trainer steps its optimizer with at steps 0 .. total-1 (optimizer.step,
    then scheduler.step)."""
    import transformers
    make = {"constant": lambda o: transformers.get_constant_schedule_with_warmup(o, warmup),
            "linear": lambda o: transformers.get_linear_schedule_with_warmup(o, warmup, total),
            "cosine": lambda o: transformers.get_cosine_schedule_with_warmup(o, warmup, total)}[schedule]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = make(optimizer)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("warmup, total", [(0, 1), (0, 10), (1, 10), (3, 10), (10, 10), (12, 10), (4, 5)])
def test_get_lr_is_transformers_schedule(schedule, warmup, total):
    config = train.JobConfig(name="j", data="x", lr=3e-4, lr_schedule=schedule, warmup_steps=warmup)
    ours = [train.get_lr(step, total, config) for step in range(total)]
    expected = transformers_lrs(schedule, 3e-4, warmup, total)
    assert all(math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-18) for a, b in zip(ours, expected)), (ours, expected)
    assert warmup == 0 or ours[0] == 0.0                 # the first step of a warmup: lr 0


def test_the_loop_steps_each_job_at_transformers_lr(tmp_path, base_dir):
    """One job per schedule, warmup 2, 6 optimizer steps each (12 rows, 4 per step, 2 epochs): the
    lr each metrics line gives a job's step k (logged as step k + 1) is transformers' at step k."""
    rows = write_rows(tmp_path / "t.json", 12, 0, "reverse")
    jobs = [job(name, rows, lr_schedule=name, warmup_steps=2, micro_batch_size=4) for name in SCHEDULES]
    train.train(run_cfg(base_dir, tmp_path / "out", jobs, scheduler={"max_concurrent": 3, "max_candidates": 3}))
    logged = {name: {} for name in SCHEDULES}
    for record in map(json.loads, (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()):
        for name, step in record.get("jobs", {}).items():
            logged[name][step["step"]] = step["lr"]
    for name in SCHEDULES:
        expected = transformers_lrs(name, 1e-2, 2, 6)
        assert sorted(logged[name]) == list(range(1, 7))
        assert [logged[name][k + 1] for k in range(6)] == pytest.approx(expected, rel=1e-12, abs=1e-18)
