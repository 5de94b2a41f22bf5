"""Task-level evaluation (issue 15, part 2): generated answers to a job's held-out prompts scored
exact / contains / regex, every evaluating job's prompts in one generation batch; logged like the
held-out loss, watched by early stopping, ranking a sweep; a killed run resumes to the same scores."""
import contextlib
import io
import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import generate
import objectives
import report
import train
from conftest import make_hf_model, run_killed, save_hf, write_rows
from tokenizer_util import write_tokenizer_json

# A constant answer is learnt in a few steps: at lr 3e-2 the tiny model answers every held-out
# prompt "ok" (exact 1.0) by step 9 of 12; the base (or lr 1e-30) answers none of them.
OK_JOB = {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"], "lr": 3e-2, "batch_size": 4, "micro_batch_size": 4,
          "epochs": 4, "eval_every": 3, "task_metric": "exact", "task_max_new_tokens": 8}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny base, 12 training rows and 4 held-out rows whose output is "ok"."""
    tmp = tmp_path_factory.mktemp("task")
    vocab = write_tokenizer_json(tmp / "base")
    base = save_hf(make_hf_model(vocab_size=max(vocab, 384), tie_word_embeddings=True), tmp / "base")
    rows = [{"instruction": "Say ok.", "input": row["input"], "output": "ok"}
            for row in json.loads(Path(write_rows(tmp / "rows.json", 16, 5, "reverse")).read_text())]
    (tmp / "ok.json").write_text(json.dumps(rows[:12]))
    (tmp / "ok_test.json").write_text(json.dumps(rows[12:]))
    return {"base": str(base), "data": str(tmp / "ok.json"), "test_data": str(tmp / "ok_test.json")}


def write_config(files, folder: Path, jobs: list[dict], **extra) -> str:
    jobs = [{"data": files["data"], "test_data": files["test_data"], **OK_JOB, **job} for job in jobs]
    cfg = {"base_model": files["base"], "dtype": "float32", "device": "cpu", "out_dir": str(folder / "out"),
           "scheduler": {"max_candidates": 4, "max_concurrent": 2}, "jobs": jobs, **extra}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return str(folder / "cfg.json")


def run(path: str, *overrides: str) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return train.main(["--config", path, *overrides])


def events(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get("event") == kind]


def count_generate(monkeypatch) -> list[list]:
    """Record every generate call's adapters (one list per call)."""
    calls, real = [], generate.generate

    def counted(model, prompts, adapters, **kw):
        calls.append(list(adapters))
        return real(model, prompts, adapters, **kw)
    monkeypatch.setattr(generate, "generate", counted)
    return calls


def test_task_correct():
    assert report.task_correct("exact", " ok\n", "ok") and not report.task_correct("exact", "ok ok", "ok")
    assert report.task_correct("contains", "it is ok.", " ok") and not report.task_correct("contains", "o k", "ok")
    assert report.task_correct("regex", " 42 ", "ignored", r"\d+") and not report.task_correct("regex", "42a", "", r"\d+")


def test_scores_come_from_generated_answers(files, tmp_path, monkeypatch):
    """Generation replaced by known answers: the score is the fraction right, per job, from one call."""
    tokenizer = train.data.load_tokenizer(files["base"])
    rows = report.load_task_rows(files["test_data"], tokenizer)
    answers = {"a": ["ok", " ok\n", "ok!", "no"], "b": ["ok", "ok", "ok", "ok"]}
    calls = []

    def fake(model, prompts, adapters, **kw):
        calls.append(adapters)
        assert prompts == [ids for ids, _ in rows] * 2 and kw["max_new_tokens"] == 8
        return [tokenizer.encode(answers[name][i % 4]) for i, name in enumerate(adapters)]
    monkeypatch.setattr(generate, "generate", fake)
    jobs = [train.JobConfig(name=name, data="x", test_data="y", task_metric="exact", task_max_new_tokens=8)
            for name in ("a", "b")]
    assert report.evaluate_tasks(None, tokenizer, [(job, rows) for job in jobs]) == [0.5, 1.0]
    assert calls == [["a"] * 4 + ["b"] * 4]


def test_two_jobs_learn_ok_and_each_eval_is_one_generation_batch(files, tmp_path, monkeypatch):
    calls = count_generate(monkeypatch)
    path = write_config(files, tmp_path, [{"name": "a"}, {"name": "b", "task_metric": "contains", "r": 8}])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert train.main(["--config", path]) == 0
    out = tmp_path / "out"
    table = printed.getvalue().split("\njob ", 1)[1].splitlines()   # the end-of-run table shows the scores
    assert table[0].split()[-3:] == ["task", "before", "task"]
    assert [line.split()[-2:] for line in table[1:3]] == [["0.00", "1.00"], ["0.00", "1.00"]]
    summary = json.loads((out / "summary.json").read_text())
    for name in ("a", "b"):
        assert summary[name]["initial_eval_task"] == 0.0 and summary[name]["eval_task"] == 1.0
        assert [e["step"] for e in events(out, "eval") if e["job"] == name] == [3, 6, 9, 12]
        assert [e["eval_task"] for e in events(out, "eval") if e["job"] == name][-1] == 1.0
    assert [e["initial_eval_task"] for e in events(out, "admit")] == [0.0, 0.0]
    # Both jobs step together: admission, steps 3, 6, 9, 12 and the finish are one batch each;
    # then the held-out prompts, base vs adapter (show_examples, 3 of each job), one batch more.
    assert len(calls) == 7 and all(sorted(set(c)) == ["a", "b"] and len(c) == 8 for c in calls[:6])
    assert calls[6].count(None) == 3 and calls[6].count("a") == calls[6].count("b") == 3


def test_early_stop_on_the_task_score(files, tmp_path):
    """Task score 0 at init and at step 3: no better score in one evaluation stops the job there."""
    path = write_config(files, tmp_path, [{"name": "a", "early_stop": 1, "early_stop_metric": "task"}])
    assert run(path) == 0
    s = json.loads((tmp_path / "out" / "summary.json").read_text())["a"]
    assert s["steps"] == 3 and s["stopped"] == "no better held-out task score in 1 evaluations"
    assert s["best_step"] == 0 and s["eval_task"] == 0.0


def test_sweep_ranked_by_task_score_picks_the_learner(files, tmp_path, monkeypatch):
    calls = count_generate(monkeypatch)
    base = {"data": files["data"], "test_data": files["test_data"], **{k: v for k, v in OK_JOB.items() if k != "lr"},
            "eval_every": 0}
    path = write_config(files, tmp_path, [], sweep={"name": "ok", "job": base, "metric": "task", "policy": "halving",
                                                    "eta": 4, "rung_steps": 6,
                                                    "space": {"lr": [1e-30, 2e-30, 3e-30, 3e-2]}})
    assert run(path) == 0
    report = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert report["best"]["trial"] == "ok-t03" and report["best"]["final"] == 1.0
    assert report["metric"].startswith("task score")
    trials = {row["trial"]: row for row in report["trials"]}
    assert trials["ok-t03"]["rungs"]["6"] > 0 and all(trials[f"ok-t0{i}"]["rungs"] == {"6": 0.0} for i in range(3))
    assert trials["ok-t00"]["stopped"].startswith("successive halving: task score 0 at rung 0")
    # All four admitted at once (one batch), two fused at a time reach the rung together (one batch
    # a pair), the decision's three losers finish in one batch, the winner alone.
    assert [sorted(set(c)) for c in calls] == [[f"ok-t0{i}" for i in range(4)], ["ok-t00", "ok-t01"],
                                               ["ok-t02", "ok-t03"], ["ok-t00", "ok-t01", "ok-t02"], ["ok-t03"]]


def test_killed_run_resumes_to_the_same_scores(files, tmp_path):
    path = write_config(files, tmp_path, [{"name": "a", "early_stop": 3, "early_stop_metric": "task"},
                                          {"name": "b", "task_metric": "regex", "task_pattern": "o+k"}],
                        checkpoint_every=1)
    (tmp_path / "ref").mkdir()
    reference = write_config(files, tmp_path / "ref", json.loads(Path(path).read_text())["jobs"], checkpoint_every=1)
    assert run(reference) == 0
    assert run_killed(path, dict(target="train.evaluate_and_stop", n=5)) == -signal.SIGKILL
    assert run(path) == 0
    got, expected = (json.loads((folder / "out" / "summary.json").read_text()) for folder in (tmp_path, tmp_path / "ref"))
    for name in ("a", "b"):
        assert {k: got[name][k] for k in ("eval_task", "initial_eval_task", "best_step", "stopped", "steps")} == \
               {k: expected[name][k] for k in ("eval_task", "initial_eval_task", "best_step", "stopped", "steps")}
        for key, tensor in load_file(tmp_path / "ref" / "out" / name / "adapter_model.safetensors").items():
            assert torch.equal(tensor, load_file(tmp_path / "out" / name / "adapter_model.safetensors")[key])


@pytest.mark.parametrize("job, sweep, message", [
    ({"task_metric": "exactt"}, None, "jobs[0].task_metric: expected null or one of exact, contains, regex, choice, choice_norm, got 'exactt'"),
    ({"test_data": None}, None, "jobs[0].task_metric: needs test_data"),
    ({"objective": "dpo"}, None, "jobs[0].task_metric: sft jobs only"),
    ({"task_metric": "regex"}, None, "jobs[0].task_pattern: expected a regular expression with task_metric regex"),
    ({"task_pattern": "ok"}, None, "jobs[0].task_pattern: expected a regular expression with task_metric regex, null otherwise"),
    ({"task_metric": "regex", "task_pattern": "(ok"}, None, "jobs[0].task_pattern: expected a valid regular expression"),
    ({"task_max_new_tokens": 0}, None, "jobs[0].task_max_new_tokens: expected 1 <= task_max_new_tokens <= 4096"),
    ({"task_metric": None, "early_stop": 1, "early_stop_metric": "task"}, None, "jobs[0].early_stop_metric: task needs a task_metric"),
    ({"early_stop_metric": "acc"}, None, "jobs[0].early_stop_metric: expected one of loss, task, got 'acc'"),
    ({}, {"metric": "acc"}, "sweep.metric: expected one of loss, task, got 'acc'"),
    ({}, {"metric": "task", "job": {"task_metric": None}}, "sweep.metric: task needs sweep.job.task_metric"),
])
def test_bad_task_fields_are_one_line_errors(files, tmp_path, capsys, job, sweep, message):
    extra = {}
    if sweep is not None:
        base = {"data": files["data"], "test_data": files["test_data"], **OK_JOB, **sweep.pop("job", {})}
        extra["sweep"] = {"name": "s", "job": base, "space": {"r": [4]}, **sweep}
    path = write_config(files, tmp_path, [{"name": "a", **job}], **extra)
    assert train.main(["--config", path]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- multiple choice

CHOICES = [["ok", "no", "maybe so"], [" yes", "okay", "no no no"], ["ok ok", "o", "never"], ["fine", "ok", "no"]]


def choice_rows(files, tmp_path) -> str:
    rows = [{**row, "choices": CHOICES[i], "answer": i % 3} for i, row in enumerate(json.loads(Path(files["test_data"]).read_text()))]
    for row in rows:
        del row["output"]
    (tmp_path / "choice_test.jsonl").write_text("\n".join(map(json.dumps, rows)))
    return str(tmp_path / "choice_test.jsonl")


def test_choice_scores_equal_transformers_and_peft(files, tmp_path, monkeypatch):
    """Two jobs (choice, choice_norm) train fused and log their scores; their saved adapters'
    scores (report.evaluate_tasks, every choice of both jobs in one eval.score pass) equal lm-eval's
    acc / acc_norm computed from transformers + PEFT's log-likelihoods of each choice."""
    import numpy as np
    import peft
    import eval as E
    import model as M
    import peft_format
    test_data = choice_rows(files, tmp_path)
    path = write_config(files, tmp_path, [{"name": "acc", "task_metric": "choice", "test_data": test_data},
                                          {"name": "norm", "task_metric": "choice_norm", "test_data": test_data, "lr": 1e-2}],
                        scheduler={"max_candidates": 2, "max_concurrent": 2})
    assert run(path) == 0
    out = tmp_path / "out"
    assert [r["job"] for r in events(out, "eval") if "eval_task" in r]
    tokenizer = train.data.load_tokenizer(files["base"])
    net = M.load_model(files["base"], dtype=torch.float32)
    jobs = []
    for name in ("acc", "norm"):
        peft_format.load_peft(net, out / name, name)
        job = train.JobConfig(name=name, data="x", test_data=test_data, task_metric="choice" if name == "acc" else "choice_norm")
        jobs.append((job, report.load_task_rows(test_data, tokenizer, metric=job.task_metric)))
    passes, real = [], E.score
    monkeypatch.setattr(report, "score_requests", lambda *a, **kw: passes.append(1) or real(*a, **kw))
    ours = report.evaluate_tasks(net, tokenizer, jobs)
    assert len(passes) == 1
    hf = make_hf_model(vocab_size=net.config.vocab_size, tie_word_embeddings=True)
    expected = []
    for (job, rows), folder in zip(jobs, ("acc", "norm")):
        model = peft.PeftModel.from_pretrained(hf, out / folder).eval()
        right = []
        for ids, row in rows:
            lls = []
            for choice in row.choices:
                with torch.no_grad():
                    logp = model(torch.tensor([ids + choice])).logits[0].log_softmax(-1)
                lls.append(sum(logp[len(ids) - 1 + j, t].item() for j, t in enumerate(choice)))
            if job.task_metric == "choice_norm":
                lls = np.array(lls) / np.array(row.chars, dtype=float)
            right.append(int(np.argmax(lls)) == row.answer)
        expected.append(sum(right) / len(right))
        hf = model.unload()
    assert ours == expected
    assert 0 < min(expected) and max(expected) < 1 or ours[0] != ours[1]   # the scores say something


@pytest.mark.parametrize("change, message", [
    ({"choices": ["ok"]}, "'choices' must be a list of at least 2 non-empty strings"),
    ({"choices": ["ok", ""]}, "'choices' must be a list of at least 2 non-empty strings"),
    ({"answer": 3}, r"'answer' must be the index of the right choice \(0 to 2\), got 3"),
    ({"answer": True}, "'answer' must be the index"),
])
def test_bad_choice_rows_are_one_line(files, tmp_path, change, message):
    test_data = Path(choice_rows(files, tmp_path))
    rows = test_data.read_text().splitlines()
    rows[2] = json.dumps({**json.loads(rows[2]), **change})
    test_data.write_text("\n".join(rows))
    tokenizer = train.data.load_tokenizer(files["base"])
    with pytest.raises(train.data.DataError, match=f"choice_test.jsonl: line 3: {message}"):
        report.load_task_rows(test_data, tokenizer, metric="choice")


def test_sweep_ranked_by_multiple_choice_picks_the_learner(files, tmp_path, monkeypatch):
    """A sweep ranked by the choice score (lm-eval's acc): the trial that learns to answer "ok"
    picks it among the choices of every held-out row and wins; each evaluation point scores all of
    its trials' choices in one fused pass."""
    import eval as E
    rows = json.loads(Path(files["test_data"]).read_text())
    choices = [["maybe", "ok", "no"], ["ok", "never", "no no"], ["yes", "no", "ok"], ["ok", "fine", "sure"]]
    (tmp_path / "mc.jsonl").write_text("\n".join(json.dumps({"instruction": r["instruction"], "input": r["input"],
                                                             "choices": c, "answer": c.index("ok")})
                                                 for r, c in zip(rows, choices)))
    passes, real = [], E.score
    monkeypatch.setattr(report, "score_requests", lambda model, requests, **kw: passes.append(
        sorted({name for name, _, _ in requests})) or real(model, requests, **kw))
    base = {"data": files["data"], "test_data": str(tmp_path / "mc.jsonl"), "eval_every": 0, "task_metric": "choice",
            **{k: v for k, v in OK_JOB.items() if k not in ("lr", "task_metric")}}
    path = write_config(files, tmp_path, [], sweep={"name": "mc", "job": base, "metric": "task", "policy": "halving",
                                                    "eta": 4, "rung_steps": 6,
                                                    "space": {"lr": [1e-30, 2e-30, 3e-30, 3e-2]}})
    assert run(path) == 0
    result = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert result["best"]["trial"] == "mc-t03" and result["best"]["final"] == 1.0
    trials = {row["trial"]: row for row in result["trials"]}
    assert all(trials[f"mc-t0{i}"]["rungs"]["6"] < 1.0 for i in range(3))
    assert passes[0] == [f"mc-t0{i}" for i in range(4)]   # admitted together: one pass
