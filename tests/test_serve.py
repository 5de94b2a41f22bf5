"""The fine-tuning service (serve.py over service.py): a job submitted while another trains joins
its fused steps and ends with the adapter train.py trains; cancel, metrics, batched generation,
a failing job alone; who may call it and what it refuses, each in one line, writing nothing; the
client's commands against a real server."""
import dataclasses
import io
import json
import os
import re
import queue
import signal
import stat
import subprocess
import sys
import tarfile
import threading
import time
import http.client
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from fastapi.testclient import TestClient   # noqa: E402
from safetensors.torch import load_file     # noqa: E402

import files          # noqa: E402
import generate       # noqa: E402
import model as M     # noqa: E402
import peft_format    # noqa: E402
import remote         # noqa: E402
import serve          # noqa: E402
import service        # noqa: E402
import service_loop   # noqa: E402
import stepapi        # noqa: E402
import stepclient     # noqa: E402
import train          # noqa: E402
from config import ConfigError   # noqa: E402
from conftest import adapter, assert_same_adapter, job, run_cfg, write_rows  # noqa: E402

TOKEN = "test-token"
ROOT = Path(__file__).resolve().parent.parent
MAX_BODY = 256 * 1024


@pytest.fixture(scope="module")
def base(served_base) -> Path:
    return served_base


def start(base: Path, out: Path, allow=(), **scheduler) -> tuple[service.Service, TestClient]:
    svc = service.Service(run_cfg(base, out, [], scheduler=scheduler), [str(a) for a in allow])
    client = TestClient(serve.guard(serve.make_app(svc), TOKEN, MAX_BODY), headers={"authorization": f"Bearer {TOKEN}"})
    return svc, client


def fields(name: str, data, **kw) -> dict:
    """conftest.job's fields as a submission: data (and test_data) the rows themselves or a path."""
    config = dataclasses.asdict(job(name, "-", **kw))
    return {**config, "data": data, **({"test_data": kw["test_data"]} if "test_data" in kw else {})}


def rows_of(path) -> list[dict]:
    text = Path(path).read_text()
    return json.loads(text) if str(path).endswith(".json") else [json.loads(line) for line in text.splitlines()]


def wait(client: TestClient, name: str, until, timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    while True:
        view = client.get(f"/v1/jobs/{name}").json()
        if until(view):
            return view
        assert time.time() < deadline, view
        time.sleep(0.02)


def files_under(folder: Path) -> dict[str, tuple]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """One service: `long` trains; `b` (rows uploaded) and `c` (a file in the allowed folder) join it
    and finish, fused with it (max_concurrent 3); then `long` is cancelled."""
    d = tmp_path_factory.mktemp("served")
    allowed = d / "allowed"
    allowed.mkdir()
    files = SimpleNamespace(long=write_rows(d / "long.json", 8, 0, "reverse"), b=write_rows(d / "b.json", 12, 1, "upper"),
                            b_test=write_rows(d / "b_test.json", 4, 2, "upper"), c=write_rows(allowed / "c.jsonl", 6, 3, "count"))
    svc, client = start(base, d / "out", [allowed], max_candidates=3, max_concurrent=3)
    assert client.post("/v1/jobs", json=fields("long", rows_of(files.long), epochs=1000, max_steps=1000)).status_code == 201
    wait(client, "long", lambda v: v["step"] >= 2)
    b = client.post("/v1/jobs", json=fields("b", rows_of(files.b), test_data=rows_of(files.b_test), eval_every=1))
    c = client.post("/v1/jobs", json=fields("c", files.c, lr_schedule="cosine", warmup_steps=1))
    assert (b.status_code, c.status_code) == (201, 201), (b.json(), c.json())
    for name in ("b", "c"):
        wait(client, name, lambda v: v["state"] in service.ENDED)
    assert client.post("/v1/jobs/long/cancel").status_code == 202
    wait(client, "long", lambda v: v["state"] in service.ENDED)
    yield SimpleNamespace(svc=svc, client=client, dir=d, out=d / "out", allowed=allowed, files=files)
    svc.close()


# ----------------------------------------------------------------------------- training through the service

def test_an_uploaded_job_trains_to_finished_and_its_archive_loads(trained, base, tmp_path):
    view = trained.client.get("/v1/jobs/b").json()
    assert view["state"] == "finished" and view["step"] == view["total_steps"] == 6, view   # 12 rows / 4 x 2 epochs
    assert view["eval_loss"] < view["initial_eval_loss"] and view["tokens_per_s"] > 0
    assert view["config"]["data"] == "uploaded (12 rows)" and view["config"]["lr"] == 1e-2
    response = trained.client.get("/v1/jobs/b/adapter")
    assert response.status_code == 200 and response.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        assert sorted(tar.getnames()) == ["b/adapter_config.json", "b/adapter_model.safetensors", "b/training.json"]
        tar.extractall(tmp_path, filter="data")
    fresh = M.load_model(base)
    assert peft_format.load_peft(fresh, tmp_path / "b") == "b"
    assert_same_adapter(peft_format.adapter_state(fresh, "b"), load_file(trained.out / "b" / "adapter_model.safetensors"))
    assert max(v.abs().max() for k, v in adapter(trained.out, "b").items() if "lora_B" in k) > 1e-3   # it trained


def test_a_job_submitted_while_another_trains_joins_its_fused_steps(trained):
    lines = {name: [line for line in trained.client.get(f"/v1/jobs/{name}/metrics").json()["lines"] if "loss" in line]
             for name in ("long", "b", "c")}
    assert lines["long"][0]["jobs"] == ["long"]          # alone before the others arrived
    assert lines["b"][0]["fused_step"] > lines["long"][0]["fused_step"]
    assert lines["b"] and all(set(line["jobs"]) >= {"b", "long"} for line in lines["b"])   # every step of b's
    assert trained.client.get("/v1/jobs/long").json()["state"] == "stopped"


def test_served_adapters_equal_the_ones_train_py_trains(trained):
    """Fused with `long` and with each other in the service, or trained by train.py from a config
    of the same jobs and data: the same adapters (same seed; tests/test_train.py's fused = alone)."""
    f = trained.files
    train.train(run_cfg(trained.svc.cfg.base_model, trained.dir / "train_py", [
        job("b", f.b, test_data=f.b_test, eval_every=1), job("c", f.c, lr_schedule="cosine", warmup_steps=1)]))
    for name in ("b", "c"):
        assert_same_adapter(adapter(trained.out, name), adapter(trained.dir / "train_py", name))


def test_jobs_submitted_together_train_as_train_py_trains_them(base, tmp_path):
    """A config's jobs in one submission ({"jobs": [...]}, what `serve.py submit CONFIG` sends):
    queued at the same turn, as train.py starts them, into an idle service: the same adapters,
    bitwise, and the same losses at every fused step. A batch with one bad job writes nothing."""
    paths = {"b": write_rows(tmp_path / "b.json", 12, 0, "reverse"), "c": write_rows(tmp_path / "c.json", 8, 1, "upper")}
    configs = [job("b", paths["b"], eval_every=2, test_data=write_rows(tmp_path / "t.json", 3, 2, "reverse")),
               job("c", paths["c"], r=8, lr_schedule="cosine", warmup_steps=1, epochs=1)]
    bodies = [{**dataclasses.asdict(j), **{k: rows_of(getattr(j, k)) for k in ("data", "test_data") if getattr(j, k)}}
              for j in configs]
    svc, client = start(base, tmp_path / "out", max_candidates=2, max_concurrent=2)
    try:
        bad = client.post("/v1/jobs", json={"jobs": [bodies[0], {**bodies[1], "lr": -1}]})
        assert bad.status_code == 422 and bad.json()["error"].startswith("request: jobs[1]: job.lr"), bad.json()
        twice = client.post("/v1/jobs", json={"jobs": [bodies[0], bodies[0]]})
        assert twice.json() == {"error": "request: jobs: the name 'b' twice"}
        assert list((tmp_path / "out" / "_service" / "data").iterdir()) == [] and client.get("/v1/jobs").json()["jobs"] == []
        answer = client.post("/v1/jobs", json={"jobs": bodies})
        assert answer.status_code == 201 and [v["name"] for v in answer.json()["jobs"]] == ["b", "c"]
        for name in ("b", "c"):
            assert wait(client, name, lambda v: v["state"] in service.ENDED)["state"] == "finished"
    finally:
        svc.close()
    train.train(run_cfg(base, tmp_path / "train_py", configs, scheduler=dict(max_candidates=2, max_concurrent=2)))
    assert_same_outputs(tmp_path / "out", tmp_path / "train_py", ["b", "c"])


def test_a_trained_job_goes_on_through_the_step_api(trained, base):
    """load {"job": JOB}: an ended job's adapter as a step-API LoRA (e.g. RL after SFT), scoring
    as the same folder loaded into an engine of its own; a name that is not one, in one line."""
    loaded = trained.client.post("/v1/loras/load", json={"job": "b"})
    assert loaded.status_code == 201, loaded.json()
    datum = {"tokens": [5, 17, 42, 9, 11], "targets": [17, 42, 9, 11, 3]}
    scored = trained.client.post(f"/v1/loras/{loaded.json()['lora_id']}/forward_backward", json={"data": [datum]}).json()
    engine = stepapi.Engine(M.load_model(base), None, "cpu", seed=42, prefix="_lora-")   # the service's: the same dropout stream
    alone = engine.forward_backward([stepapi.Call(engine.load(trained.out / "b"), [stepapi.Datum(**datum)])])[0]
    torch.testing.assert_close(torch.tensor(scored["logprobs"][0]), torch.tensor(alone.logprobs[0]), atol=1e-5, rtol=1e-4)
    refused = trained.client.post("/v1/loras/load", json={"job": "../b"})
    assert refused.status_code == 422 and refused.json()["error"].startswith("request: job: expected letters")


def test_metrics_since_a_fused_step(trained):
    everything = trained.client.get("/v1/jobs/b/metrics").json()
    steps = sorted({line["fused_step"] for line in everything["lines"]})
    assert len(steps) >= 6 and everything["fused_steps"] >= steps[-1]
    assert any(line.get("event") == "eval" for line in everything["lines"])
    middle = steps[len(steps) // 2]
    later = trained.client.get(f"/v1/jobs/b/metrics?since={middle}").json()["lines"]
    assert later == [line for line in everything["lines"] if line["fused_step"] > middle] and later
    assert trained.client.get(f"/v1/jobs/b/metrics?since={steps[-1]}").json()["lines"] == []
    response = trained.client.get("/v1/jobs/b/metrics?since=x")
    assert response.status_code == 422 and response.json() == {"error": "request: since: expected a fused step (an integer), got 'x'"}
    assert trained.client.get("/v1/jobs/nobody/metrics").status_code == 404


def test_generation_requests_that_arrive_together_share_one_batch(trained, base, monkeypatch):
    """Two requests, b and c's adapters and the base, arrive while the trainer is held: ONE
    generate.generate call answers both, each row as the adapter alone answers it."""
    calls, real = [], generate.generate
    monkeypatch.setattr(generate, "generate", lambda model, prompts, adapters, **kw: calls.append(list(adapters))
                        or real(model, prompts, adapters, **kw))
    requests = [{"prompts": ["Shout: apple river"], "adapters": ["b", "c"], "max_new_tokens": 6},
                {"prompts": ["Count the words."], "adapters": ["b", None], "max_new_tokens": 4}]
    answers = [None, None]

    def ask(i):
        answers[i] = TestClient(trained.client.app, headers={"authorization": f"Bearer {TOKEN}"}).post(
            "/v1/generate", json=requests[i])
    class Together(queue.Queue):   # the trainer sees no request until both wait
        def empty(self):
            return self.qsize() < 2
    monkeypatch.setattr(trained.svc, "asks", Together())
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [a.status_code for a in answers] == [200, 200], [a.json() for a in answers]
    assert len(calls) == 1 and sorted(calls[0], key=str) == [None, "b", "b", "c"]   # the two in either order
    # Each row as its adapter answers it alone, loaded from its folder on a fresh base.
    fresh, tokenizer = M.load_model(base), trained.svc.run.tokenizer
    for name in ("b", "c"):
        peft_format.load_peft(fresh, trained.out / name, name)
    for request, answer in zip(requests, answers):
        for out in answer.json()["outputs"]:
            template = "alpaca" if out["adapter"] else "plain"
            ids = real(fresh, [generate.encode_prompt(tokenizer, out["prompt"], template)], [out["adapter"]],
                       max_new_tokens=request["max_new_tokens"], stop_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id,
                       vocab_size=tokenizer.vocab_size)[0]
            assert out["text"] == tokenizer.decode(ids, skip_special=True) and out["tokens"] == len(ids)
    refused = trained.client.post("/v1/generate", json={"prompts": ["hi"], "adapters": ["nobody"]})
    assert refused.status_code == 404 and refused.json() == {"error": "request: no job named 'nobody'"}


def test_cancel_keeps_the_best_adapter_and_frees_the_slot(base, tmp_path):
    """One slot: `c` waits behind `long`. A waiting job cancelled leaves the queue (no adapter);
    `long` cancelled saves its best adapter (early stopping's) and `c` takes its slot."""
    svc, client = start(base, tmp_path / "out", max_candidates=1)
    try:
        rows, test_rows = rows_of(write_rows(tmp_path / "l.json", 8, 0, "reverse")), rows_of(write_rows(tmp_path / "t.json", 3, 1, "reverse"))
        long = fields("long", rows, test_data=test_rows, eval_every=1, early_stop=1000, diverge_factor=100.0,
                      save_every=1, lr=3e-3, epochs=1000, max_steps=1000)
        for body in (long, fields("c", rows[:4], epochs=1), fields("w", rows[:4], epochs=1)):
            assert client.post("/v1/jobs", json=body).status_code == 201
        wait(client, "long", lambda v: v["step"] >= 3)
        assert [client.get(f"/v1/jobs/{n}").json()["state"] for n in ("c", "w")] == ["waiting", "waiting"]
        assert client.post("/v1/jobs/w/cancel").status_code == 202
        w = wait(client, "w", lambda v: v["state"] in service.ENDED)
        assert (w["state"], w["reason"]) == ("stopped", "cancelled")
        assert client.get("/v1/jobs/w/adapter").json() == {"error": "request: job 'w' is stopped: it has no adapter"}
        assert client.get("/v1/jobs/c").json()["state"] == "waiting"
        assert client.post("/v1/jobs/long/cancel").status_code == 202
        view = wait(client, "long", lambda v: v["state"] in service.ENDED)
        assert (view["state"], view["reason"]) == ("stopped", "cancelled") and 3 <= view["step"] < 1000
        best = view["summary"]["best_step"]
        assert best is not None and best >= 1
        assert_same_adapter(adapter(tmp_path / "out", "long"), adapter(tmp_path / "out" / "snapshots" / "long", f"step-{best}"))
        assert wait(client, "c", lambda v: v["state"] in service.ENDED)["state"] == "finished"
        lines = client.get("/v1/jobs/c/metrics").json()["lines"]
        assert lines and all(line["jobs"] == ["c"] for line in lines)
        again = client.post("/v1/jobs/long/cancel")
        assert again.status_code == 409 and again.json() == {"error": "request: job 'long' is stopped already: nothing to cancel"}
        assert client.post("/v1/jobs/nobody/cancel").status_code == 404
    finally:
        svc.close()


def test_a_failing_job_fails_alone_and_the_registry_outlives_the_service(base, tmp_path, monkeypatch):
    """`bad` fails where its adapter is saved: its error in its state, `good` trains on. The
    registry is what a service started again on out_dir shows; other settings are refused."""
    real_finish = service_loop.finish

    def finish(run, name):
        if name == "bad":
            raise OSError("No space left on device")
        real_finish(run, name)
    monkeypatch.setattr(service_loop, "finish", finish)
    out = tmp_path / "out"
    svc, client = start(base, out)
    rows = rows_of(write_rows(tmp_path / "r.json", 8, 0, "reverse"))
    try:
        for name, steps in (("bad", 2), ("good", 4)):
            assert client.post("/v1/jobs", json=fields(name, rows, epochs=1, max_steps=steps)).status_code == 201
        bad = wait(client, "bad", lambda v: v["state"] in service.ENDED)
        good = wait(client, "good", lambda v: v["state"] in service.ENDED)
        assert (bad["state"], bad["error"]) == ("failed", "finish: No space left on device")
        assert (good["state"], good["step"]) == ("finished", 2) and not (out / "bad").exists()
        assert svc.healthy() and client.get("/v1/health").json() == {"status": "ok"}
        assert client.post("/v1/jobs", json=fields("long", rows, epochs=1000, max_steps=1000)).status_code == 201
        wait(client, "long", lambda v: v["step"] >= 1)
    finally:
        svc.close()   # `long` stops where it is
    registry = json.loads((out / "_service" / "jobs.json").read_text())
    assert {name: r["state"] for name, r in registry["jobs"].items()} == {"bad": "failed", "good": "finished", "long": "training"}
    stopped_at = registry["jobs"]["long"]
    again, client = start(base, out)
    try:   # the ended jobs as they were; `long` goes on from the checkpoint close() wrote
        assert [(v["name"], v["state"]) for v in client.get("/v1/jobs").json()["jobs"][:2]] == [("bad", "failed"), ("good", "finished")]
        assert client.get("/v1/jobs/good/adapter").status_code == 200
        view = client.get("/v1/jobs/long").json()
        assert view["state"] == "training" and view["step"] >= 1, view
        assert view["restarts"] == 1 and view["config"]["data"] == "uploaded (8 rows)" and stopped_at["queued"][0] >= 1
        client.post("/v1/jobs/long/cancel")
        wait(client, "long", lambda v: v["state"] == "stopped")
    finally:
        again.close()
    with pytest.raises(ConfigError, match=r"holds a service of another seed \(42 there, 1 here\)"):
        service.Service(dataclasses.replace(run_cfg(base, out, []), seed=1))
    train.train(run_cfg(base, tmp_path / "train_py", [job("a", write_rows(tmp_path / "a.json", 4, 0, "count"), max_steps=1)]))
    with pytest.raises(ConfigError, match="not empty and holds no service"):   # its line, from the trainer process
        remote.start(run_cfg(base, tmp_path / "train_py", []))


def drive(base: Path, out: Path, script: dict, from_turn: int = 0, kill_at: int | None = None) -> service.Service:
    """A service with no trainer thread, turned here: before turn t, script[t]'s actions (("submit",
    fields) or ("cancel", name)) through the API; until every job ended, or dropped before turn
    kill_at as kill -9 leaves it (no close, no checkpoint of its own). from_turn: a service started
    again, whose earlier actions the first one took."""
    svc = service.Service(run_cfg(base, out, [], checkpoint_every=3, scheduler=dict(max_candidates=3, max_concurrent=3)),
                          trainer=False)
    client = TestClient(serve.make_app(svc))
    applied = {t for t in script if t < from_turn}
    while svc.run.ticks != kill_at:
        if (t := svc.run.ticks) in script and t not in applied:
            applied.add(t)
            for action, what in script[t]:
                response = client.post("/v1/jobs", json=what) if action == "submit" else client.post(f"/v1/jobs/{what}/cancel")
                assert response.status_code in (201, 202), response.json()
        if svc.run.sched.done and not (svc.inbox or svc.cancels or svc.replay) and applied == set(script):
            return svc
        svc.turn()
    svc.run.metrics.close()   # dropped: nothing more written, out_dir free for the next one
    svc.dir_lock.close()


def losses(out: Path) -> list:
    """Each fused step's jobs and their losses, from metrics.jsonl."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(line["step"], {n: j["loss"] for n, j in line["jobs"].items()}) for line in lines if "jobs" in line and "event" not in line]


def assert_same_outputs(out: Path, reference: Path, names):
    for name in names:
        assert (out / name / "adapter_model.safetensors").read_bytes() == (reference / name / "adapter_model.safetensors").read_bytes(), name
        assert json.loads((out / name / "adapter_config.json").read_text()) == json.loads((reference / name / "adapter_config.json").read_text())
    assert losses(out) == losses(reference) and len(losses(reference)) >= 6


def test_a_killed_service_resumes_every_job_bitwise(base, tmp_path):
    """Jobs queued at different turns, one finished and one cancelled between the run checkpoint
    and the kill: a service dropped mid-run and started again on out_dir restores the checkpoint
    and replays the registry's later events at their turns. Every adapter bitwise, and every
    loss, as the service that never stopped."""
    rows = rows_of(write_rows(tmp_path / "r.json", 12, 0, "reverse"))
    script = {0: [("submit", fields("a", rows, epochs=3))], 1: [("submit", fields("b", rows[:8], epochs=3))],
              3: [("submit", fields("s", rows[:4], epochs=1))], 4: [("submit", fields("c", rows[4:], epochs=1)),
              ("cancel", "b")], 7: [("submit", fields("d", rows[:6], epochs=1))]}
    never_stopped = drive(base, tmp_path / "ref", script)
    drive(base, tmp_path / "out", script, kill_at=5)
    registry = json.loads((tmp_path / "out" / "_service" / "jobs.json").read_text())["jobs"]
    assert registry["s"]["state"] == "finished" and registry["b"]["state"] == "stopped"   # after the checkpoint of step 3
    assert torch.load(tmp_path / "out" / "checkpoint" / "state.pt", weights_only=True)["step"] == 3
    resumed = drive(base, tmp_path / "out", script, from_turn=5)
    assert {n: r["state"] for n, r in resumed.records.items()} == {n: r["state"] for n, r in never_stopped.records.items()} \
        == {"a": "finished", "b": "stopped", "s": "finished", "c": "finished", "d": "finished"}
    assert_same_outputs(tmp_path / "out", tmp_path / "ref", "absdc")
    assert [line["loss"] for line in resumed.history["a"] if "loss" in line] == \
        [line["loss"] for line in never_stopped.history["a"] if "loss" in line]   # the page's curves, rebuilt
    for svc in (never_stopped, resumed):
        svc.close()


def test_kill_9_of_serve_py_and_a_restart(base, tmp_path):
    """The real server (serve.py: HTTP in one process, the trainer in another), killed with
    SIGKILL while two jobs train, after a run checkpoint; started again on out_dir, it finishes
    them. Oracle: the service that never stopped, given the same jobs at the turns the registry
    says the trainer queued them: the same adapters, bitwise, and the same losses."""
    rows = rows_of(write_rows(tmp_path / "r.json", 12, 0, "reverse"))
    bodies = {"a": fields("a", rows, epochs=12), "b": fields("b", rows[:8], epochs=12)}   # long: killed mid-run
    # One intra-op thread, as this process runs the oracle (conftest.one_thread): the same arithmetic.
    out, env = tmp_path / "out", {**os.environ, serve.TOKEN_ENV: TOKEN, "OMP_NUM_THREADS": "1"}

    def server() -> tuple[subprocess.Popen, str]:
        sock = serve.bind("127.0.0.1", 0)
        port = sock.getsockname()[1]
        sock.close()
        process = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--base_model", str(base), "--out_dir", str(out),
                                    "--port", str(port), "--checkpoint_every", "3", "--max_candidates", "3",
                                    "--max_concurrent", "3", "--dtype", "float32", "--device", "cpu"], env=env)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while not ok(url, "/v1/health"):
            assert time.time() < deadline and process.poll() is None
            time.sleep(0.1)
        return process, url

    process, url = server()
    for body in bodies.values():
        assert call(url, "POST", "/v1/jobs", body)[0] == 201
    deadline = time.time() + 120
    while call(url, "GET", "/v1/jobs/a")[1]["step"] < 3:
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    deadline = time.time() + 30
    while files.lock_holder(out) is not None:   # the trainer process follows its front (PR_SET_PDEATHSIG)
        assert time.time() < deadline
        time.sleep(0.05)
    assert (out / "checkpoint" / "state.pt").exists()
    process, url = server()
    try:
        assert call(url, "GET", "/v1/jobs/a")[1]["step"] >= 1   # restored from the checkpoint, not from step 0
        deadline = time.time() + 120
        while any(call(url, "GET", f"/v1/jobs/{n}")[1]["state"] not in service.ENDED for n in bodies):
            assert time.time() < deadline
            time.sleep(0.1)
        views = {n: call(url, "GET", f"/v1/jobs/{n}")[1] for n in bodies}
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0
    assert all(v["state"] == "finished" and v["restarts"] == 1 for v in views.values()), views
    registry = json.loads((out / "_service" / "jobs.json").read_text())["jobs"]
    script = {}
    for name, body in bodies.items():
        script.setdefault(registry[name]["queued"][0], []).append(("submit", body))
    drive(base, tmp_path / "ref", script).close()
    assert_same_outputs(out, tmp_path / "ref", bodies)


def ok(url: str, path: str) -> bool:
    try:
        return call(url, "GET", path)[0] == 200
    except OSError:
        return False


def call(url: str, method: str, path: str, body=None) -> tuple[int, dict]:
    request = urllib.request.Request(url + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                     headers={"authorization": f"Bearer {TOKEN}", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# ----------------------------------------------------------------------------- what the service refuses

def refusals(t) -> list[tuple]:
    """(what, method, path, request keywords, status, the line's start) against the `trained` service."""
    d, allowed = t.dir, t.allowed
    outside = write_rows(d / "outside.jsonl", 4, 9, "count")
    if not (allowed / "link.jsonl").exists():
        (allowed / "link.jsonl").symlink_to(outside)
    rows = rows_of(t.files.b)
    wrong = {"authorization": "Bearer wrong-token"}
    return [
        ("no token", "GET", "/v1/jobs", {"headers": {"authorization": ""}}, 401, "request: missing or wrong bearer token"),
        ("a wrong token", "POST", "/v1/jobs", {"headers": wrong, "json": fields("x", rows)}, 401, "request: missing or wrong"),
        ("a wrong token, adapter", "GET", "/v1/jobs/b/adapter", {"headers": wrong}, 401, "request: missing or wrong"),
        ("../ in a name", "POST", "/v1/jobs", {"json": fields("../x", rows)}, 422, "request: job.name: expected a plain folder name"),
        ("a relative path out", "POST", "/v1/jobs", {"json": fields("x", os.path.relpath(outside))}, 403,
         f"request: job.data: {os.path.relpath(outside)!r} is outside the folders"),
        ("../ out of the folder", "POST", "/v1/jobs", {"json": fields("x", f"{allowed}/../outside.jsonl")}, 403,
         "request: job.data: "),
        ("an absolute path out", "POST", "/v1/jobs", {"json": fields("x", rows, test_data=outside)}, 403,
         f"request: job.test_data: {outside!r} is outside the folders this server reads (--allow_dir)"),
        ("a link out", "POST", "/v1/jobs", {"json": fields("x", str(allowed / "link.jsonl"))}, 403, "request: job.data: "),
        ("a template out", "POST", "/v1/jobs", {"json": {**fields("x", rows), "template": outside}}, 403, "request: job.template: "),
        ("a name taken", "POST", "/v1/jobs", {"json": fields("B", rows)}, 409, "request: job.name: a job named 'b' exists (finished)"),
        ("a large body", "POST", "/v1/jobs", {"content": b"[" + b"1," * MAX_BODY + b"1]"}, 413, "request: body over"),
        ("a large body, chunked", "POST", "/v1/jobs", {"content": iter([b"[" + b"1," * 1000] * (MAX_BODY // 1000))}, 413,
         "request: body over"),
        ("not JSON", "POST", "/v1/jobs", {"content": b'{"name": '}, 400, "request: the body is not JSON"),
        ("not an object", "POST", "/v1/jobs", {"json": [1]}, 400, "request: expected a JSON object of job fields, got list"),
        ("no such path", "GET", "/v1/nothing", {}, 404, "request: GET /v1/nothing: not found"),
        ("no such job", "GET", "/v1/jobs/..", {}, 404, ""),
    ]


def test_refused_requests_are_one_line_and_write_nothing(trained):
    before = files_under(trained.out)
    cases = refusals(trained)
    for what, method, path, kwargs, status, start_of in cases:
        response = trained.client.request(method, path, **kwargs)
        assert response.status_code == status, (what, response.text)
        body = response.json()
        assert list(body) == ["error"] and "\n" not in body["error"] and body["error"].startswith(start_of), (what, body)
    assert trained.client.get("/v1/health", headers={"authorization": ""}).json() == {"status": "ok"}
    assert files_under(trained.out) == before
    assert [v["name"] for v in trained.client.get("/v1/jobs").json()["jobs"]] == ["long", "b", "c"]


@pytest.mark.parametrize("change, row", [
    ({"lr": 0}, None),
    ({"micro_batch_size": 3}, None),
    ({"dat": "x.jsonl"}, None),
    ({"targets": ["q_proj", "zz_proj"]}, None),
    ({"cutoff_len": 100000}, None),
    ({}, {"instruction": "no output"}),
    ({"objective": "dpo", "train_on_inputs": True}, None),
])
def test_an_invalid_job_is_refused_with_the_line_train_py_prints(trained, tmp_path, capsys, change, row):
    """The same checks as train.py's (config.read_job, jobs.read_inputs) and the same line, its
    source `request` and the job `job` where train.py names its config file and jobs[0]."""
    rows = rows_of(trained.files.b)[:3] + ([row] if row else [])
    data_file = tmp_path / "rows.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if change.get("objective") == "dpo":
        rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 4
        data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    submitted = {**fields("x", rows), **change}
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"base_model": str(trained.svc.cfg.base_model), "out_dir": str(tmp_path / "o"),
                                  "jobs": [{**submitted, "data": str(data_file)}]}))
    before = files_under(trained.out)
    response = trained.client.post("/v1/jobs", json=submitted)
    assert train.main(["--config", str(config)]) == 2
    printed = capsys.readouterr().err.strip().splitlines()[-1]
    expected = printed.removeprefix("error: ").replace(f"{config}: ", "").replace(str(data_file), "job.data")
    assert response.status_code == 422 and response.json() == {"error": "request: " + expected.replace("jobs[0].", "job.")}
    assert files_under(trained.out) == before and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- the token and the client

def test_the_token_file_is_its_owners_alone(tmp_path, monkeypatch):
    monkeypatch.delenv(serve.TOKEN_ENV, raising=False)
    token = serve.server_token(str(tmp_path))
    file = tmp_path / serve.TOKEN_FILE
    assert stat.S_IMODE(file.stat().st_mode) == 0o600 and len(token) >= 40
    assert serve.server_token(str(tmp_path)) == token == serve.client_token(str(tmp_path))
    monkeypatch.setenv(serve.TOKEN_ENV, "from-env")
    assert serve.server_token(str(tmp_path)) == serve.client_token(str(tmp_path)) == "from-env"
    monkeypatch.delenv(serve.TOKEN_ENV)
    file.chmod(0o644)
    with pytest.raises(serve.ServeError, match="others may read it"):
        serve.server_token(str(tmp_path))


@pytest.mark.parametrize("missing", ["fastapi", "uvicorn"])
def test_a_missing_optional_dependency_is_one_line(base, tmp_path, monkeypatch, capsys, missing):
    monkeypatch.setitem(sys.modules, missing, None)   # import raises ImportError, as when not installed
    assert serve.main(["--base_model", str(base), "--out_dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"error: serve.py needs {missing}: pip install fastapi uvicorn\n"
    assert not (tmp_path / "out").exists()


def test_the_client_commands_against_a_real_server(base, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(serve.TOKEN_ENV, raising=False)
    out = tmp_path / "out"
    svc = remote.start(run_cfg(base, out, []))   # as serve.py runs it: the trainer in a process of its own
    server = serve.uvicorn_server(serve.guard(serve.make_app(svc), serve.server_token(str(out)), MAX_BODY))
    sock = serve.bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.start()
    capsys.readouterr()   # the base's loading line

    def client(*argv) -> tuple[int, dict | str]:
        status = serve.main([argv[0], "--url", f"http://127.0.0.1:{port}", "--out_dir", str(out), *argv[1:]])
        printed = capsys.readouterr()
        return status, json.loads(printed.out) if status == 0 else printed.err.strip()
    try:
        deadline = time.time() + 30
        while not server.started:
            assert time.time() < deadline
            time.sleep(0.01)
        job_file = tmp_path / "job.json"
        job_file.write_text(json.dumps({**fields("j", "-"), "epochs": 1}))
        status, view = client("submit", str(job_file), "--data", write_rows(tmp_path / "rows.jsonl", 8, 0, "reverse"))
        assert status == 0 and view["state"] == "waiting" and view["config"]["data"] == "uploaded (8 rows)"
        deadline = time.time() + 60
        while client("status", "j")[1]["state"] != "finished":
            assert time.time() < deadline
        status, listed = client("status")
        assert [v["name"] for v in listed["jobs"]] == ["j"]
        status, metrics = client("status", "j", "--since", "0")
        assert status == 0 and len([line for line in metrics["lines"] if "loss" in line]) == 4
        status, saved = client("download", "j", "--to", str(tmp_path / "j.tar.gz"))
        with tarfile.open(tmp_path / "j.tar.gz") as tar:
            assert "j/adapter_model.safetensors" in tar.getnames()
        status, answer = client("generate", "--adapter", "j", "--base", "--prompt", "hello", "--max-new-tokens", "3")
        assert status == 0 and [o["adapter"] for o in answer["outputs"]] == ["j", None]
        assert all(0 < o["tokens"] <= 3 for o in answer["outputs"])
        assert client("cancel", "j") == (2, "error: request: job 'j' is finished already: nothing to cancel")
        monkeypatch.setenv(serve.TOKEN_ENV, "wrong")
        assert client("status") == (2, "error: request: missing or wrong bearer token (Authorization: Bearer TOKEN)")
        monkeypatch.delenv(serve.TOKEN_ENV)
        # A chunked body (no Content-Length) over the limit, to the real server.
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("POST", "/v1/jobs", body=iter([b"x" * 65536] * (MAX_BODY // 65536 + 1)),
                           headers={"authorization": f"Bearer {serve.client_token(str(out))}"}, encode_chunked=True)
        response = connection.getresponse()
        assert response.status == 413 and json.loads(response.read())["error"].startswith("request: body over")
        assert client("status", "j")[0] == 0   # still serving
        # A config's jobs, their data files uploaded by the client, queued together.
        config = tmp_path / "config.json"
        config.write_text(json.dumps({"base_model": "ignored: the server's", "jobs": [
            {**fields(n, write_rows(tmp_path / f"{n}.json", 4, i, "count")), "max_steps": 1} for i, n in enumerate(("k", "l"))]}))
        status, answer = client("submit", str(config))
        assert status == 0 and [(v["name"], v["config"]["data"]) for v in answer["jobs"]] == \
            [("k", "uploaded (4 rows)"), ("l", "uploaded (4 rows)")]
        assert client("submit", str(config), "--data", str(tmp_path / "k.json")) == \
            (2, f"error: {config}: a config's jobs upload their own files (no --data or --test_data)")
        # The step-level API through the trainer process (tests/test_stepservice.py: in depth).
        steps = stepclient.ServiceClient(f"http://127.0.0.1:{port}", out_dir=str(out))
        lora = steps.create_lora(r=2, seed=1)
        fb = lora.forward_backward([{"tokens": [5, 6, 7], "targets": [6, 7, 8]}])
        assert lora.optim_step(lr=0.01).result() == {"step": 1} and len(fb.result()["logprobs"][0]) == 3
        assert len(lora.sample([5, 6], n=2, max_tokens=3, seed=0).result()["completions"]) == 2
    finally:
        server.should_exit = True
        thread.join(30)
        svc.close()


def test_the_page_is_self_contained_and_calls_only_the_api(trained):
    """GET / (no token: it holds no data) is one HTML page that fetches nothing from elsewhere; each
    API call its script makes answers with the token, as the page reads it."""
    response = trained.client.get("/", headers={"authorization": ""})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in response.headers["content-security-policy"]
    page = response.text
    assert not re.search(r"<link|<img|<iframe|\bsrc=|@import|url\(", page)
    assert set(re.findall(r"https?://[^\s\"'`)]+", page)) == {"http://www.w3.org/2000/svg"}   # a namespace, not fetched
    calls = re.findall(r'api\("(GET|POST)", [`"](/v1/[^`"?]*)', page)
    assert sorted({path for _, path in calls}) == ["/v1/jobs", "/v1/jobs/${encodeURIComponent(job.name)}/cancel",
                                                   "/v1/jobs/${encodeURIComponent(job.name)}/metrics"]
    jobs = trained.client.get("/v1/jobs").json()["jobs"]
    assert {"name", "state", "reason", "error", "step", "total_steps", "loss", "eval_loss", "tokens_per_s"} <= set(jobs[1])
    lines = trained.client.get("/v1/jobs/b/metrics?since=0").json()["lines"]
    assert all({"fused_step", "loss"} <= set(line) for line in lines if "loss" in line) and lines
    assert trained.client.post("/v1/jobs/b/cancel").status_code == 409   # the button shows for waiting and training jobs only
