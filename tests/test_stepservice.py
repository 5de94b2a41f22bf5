"""The step-level API through the service (issue 33): stepclient.py against a real server (uvicorn
on a free port, the Service in this process so that its engine can be watched). Clients of
different LoRAs whose calls wait together are answered by ONE fused forward_backward (and ONE
batched generation), each with what its LoRA gets alone: the oracle is stepapi.Engine on a
fresh copy of the base, each call by itself. A bad call fails alone, in one line."""
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
import torch   # noqa: E402
from safetensors.torch import load_file   # noqa: E402

import data           # noqa: E402
import model as M     # noqa: E402
import serve          # noqa: E402
import service        # noqa: E402
import stepapi        # noqa: E402
import stepclient     # noqa: E402
from conftest import count_fused, run_cfg, serving  # noqa: E402

TOKEN = "step-token"
CLOSE = dict(atol=1e-5, rtol=1e-4)   # fused against alone: the same rows in other batch shapes
LORAS = [dict(r=4, alpha=8, targets=["q_proj", "v_proj"], seed=1), dict(r=8, alpha=8, targets=["o_proj", "down_proj"], seed=2),
         dict(r=2, alpha=4, variant="dora", seed=3)]


@pytest.fixture(scope="module")
def base(served_base) -> Path:
    return served_base


@pytest.fixture(scope="module")
def server(base, tmp_path_factory):
    """A service, and a record of the engine's fused calls: how many calls each forward_backward
    and sample took."""
    out = tmp_path_factory.mktemp("serve") / "out"
    svc = service.Service(run_cfg(base, out, []), api_linger=0.0)
    sizes = count_fused(svc.engine)
    with serving(serve.guard(serve.make_app(svc), TOKEN, 1 << 20)) as url:
        yield stepclient.ServiceClient(url, TOKEN), svc, sizes, out
    svc.close()


def together(svc, n: int):
    """The trainer's next take of step calls waits until n are there (as calls that arrive within
    --api_linger do; here whatever the machine's load), then it takes them as it would."""
    real = svc.take_step_calls

    def take():
        deadline = time.time() + 60
        while len(svc.step_inbox) < n:
            assert time.time() < deadline, svc.step_inbox
            time.sleep(0.01)
        del svc.take_step_calls   # the method again
        return real()
    svc.take_step_calls = take


def oracle(base) -> stepapi.Engine:
    """The engine alone on a fresh base, its ids as the service's."""
    return stepapi.Engine(M.load_model(base, dtype=torch.float32), data.load_tokenizer(base), "cpu", seed=42, prefix="_lora-")


def batch(seed: int, rl: bool = False) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for length in (7, 12):
        tokens = [rng.randrange(3, 300) for _ in range(length + 1)]
        d = {"tokens": tokens[:-1], "targets": tokens[1:], "weights": [rng.choice([0.5, 1.0]) for _ in range(length)]}
        if rl:
            d |= {"logprobs": [rng.uniform(-7, -4) for _ in range(length)], "advantages": [rng.uniform(-1, 1) for _ in range(length)]}
        out.append(d)
    return out


def test_clients_calls_fuse_and_each_gets_what_it_gets_alone(server, base):
    client, svc, sizes, out = server
    loras = [client.create_lora(**config) for config in LORAS]   # in order: the ids (and so the inits) of the oracle's
    losses = ["cross_entropy", "importance_sampling", "ppo"]
    sizes["forward_backward"].clear()
    together(svc, 3)
    with ThreadPoolExecutor(3) as pool:   # three clients at once
        answers = list(pool.map(lambda i: loras[i].forward_backward(batch(i, rl=i > 0), losses[i]).result(), range(3)))
        steps = list(pool.map(lambda i: loras[i].optim_step(lr=1e-2 * (i + 1)).result(), range(3)))
    assert sizes["forward_backward"] == [3], sizes   # ONE fused pass for the three clients
    assert steps == [{"step": 1}] * 3
    for i, lora in enumerate(loras):
        lora.save(f"fused-{i}").result()
    engine = oracle(base)
    for i, config in enumerate(LORAS):
        lora_id = engine.create_lora(config)
        assert lora_id == loras[i].lora_id
        (alone,) = engine.forward_backward([stepapi.Call(lora_id, [stepapi.Datum(**d) for d in batch(i, rl=i > 0)], losses[i])])
        assert answers[i]["loss"] == pytest.approx(alone.loss, rel=1e-5)
        for got, want in zip(answers[i]["logprobs"], alone.logprobs):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), **CLOSE)
        engine.optim_step(lora_id, {"lr": 1e-2 * (i + 1)})
        engine.save(lora_id, out / "alone" / str(i))
        fused, solo = load_file(out / "_api" / f"fused-{i}" / "adapter_model.safetensors"), load_file(out / "alone" / str(i) / "adapter_model.safetensors")
        assert fused.keys() == solo.keys()
        for key in fused:
            torch.testing.assert_close(fused[key], solo[key], **CLOSE)


def test_samples_of_several_clients_are_one_generation_each_as_alone(server, base):
    client, svc, sizes, out = server
    lora = client.create_lora(r=4, alpha=8, seed=7)
    lora.forward_backward(batch(5)).result()
    lora.optim_step(lr=0.05).result()   # the LoRA now differs from the base
    sizes["sample"].clear()
    prompt = [5, 17, 42, 9]
    together(svc, 2)
    futures = [lora.sample(prompt, n=3, temperature=1.0, max_tokens=6, seed=11),
               client.sample_base(prompt, n=2, temperature=0.8, top_p=0.9, max_tokens=5, seed=3)]
    fused = [f.result() for f in futures]
    assert sizes["sample"] == [2], sizes
    again = lora.sample(prompt, n=3, temperature=1.0, max_tokens=6, seed=11).result()   # alone now
    assert again == fused[0] and len(fused[0]["completions"]) == 3 and len(fused[1]["completions"]) == 2
    # The sampling-time log-probs are forward_backward's: an unchanged LoRA's importance ratio is 1.
    completion = fused[0]["completions"][0]
    tokens = prompt + completion["tokens"]
    n = len(completion["tokens"])
    datum = {"tokens": tokens[:-1], "targets": tokens[1:], "weights": [0.0] * (len(prompt) - 1) + [1.0] * n,
             "logprobs": [0.0] * (len(prompt) - 1) + completion["logprobs"], "advantages": [0.0] * (len(prompt) - 1) + [1.0] * n}
    scored = lora.forward_backward([datum], "importance_sampling").result()
    torch.testing.assert_close(torch.tensor(scored["logprobs"][0][-n:]), torch.tensor(completion["logprobs"]), **CLOSE)
    assert scored["loss"] == pytest.approx(-n, rel=1e-4)   # -sum(ratio * advantage), every ratio 1
    lora.delete().result()


def test_a_bad_call_fails_alone_in_one_line(server):
    client, svc, sizes, out = server
    good, other = client.create_lora(r=2, seed=4), client.create_lora(r=2, seed=5)
    sizes["forward_backward"].clear()
    bad_batch = batch(1)
    bad_batch[0]["targets"][0] = 10**6   # past the vocabulary
    together(svc, 2)
    futures = [good.forward_backward(batch(2)), other.forward_backward(bad_batch), good.forward_backward(batch(3))]
    first = futures[0].result()
    with pytest.raises(stepclient.StepError, match=r"^request: data\[0\].targets: token ids must be integers in \[0, 384\)$") as refused:
        futures[1].result()
    assert refused.value.status == 422 and "\n" not in str(refused.value)
    assert first["loss"] > 0 and futures[2].result()["loss"] > 0
    assert sizes["forward_backward"][0] == 2   # the good and the bad together; the bad one refused before the pass
    for call, status, line in [
            (lambda: client.post("/v1/loras/_lora-9999/optim_step", {}), 404, "request: no LoRA '_lora-9999'"),
            (lambda: client.post(f"/v1/loras/{good.lora_id}/train", {}), 404, f"request: POST /v1/loras/{good.lora_id}/train: not found"),
            (lambda: client.post(f"/v1/loras/{good.lora_id}/forward_backward", {"data": [{"tokens": [1]}]}), 422,
             "request: data[0]: targets: expected the fields"),
            (lambda: client.post(f"/v1/loras/{good.lora_id}/save", {"name": "../escape"}), 422, "request: name: expected"),
            (lambda: client.post("/v1/loras/load", {"name": "never-saved"}), 404, "request: no saved LoRA 'never-saved'"),
            (lambda: client.post("/v1/loras/load", {"job": "nobody"}), 404, "request: no job named 'nobody'"),
            (lambda: client.post("/v1/loras/load", {"name": "a", "job": "b"}), 422, "request: load: expected either"),
            (lambda: client.post("/v1/loras", {"r": 0}), 422, "request: create_lora: r=0"),
            (lambda: client.post(f"/v1/loras/{good.lora_id}/optim_step", {"momentum": 1}), 422, "request: momentum: unknown key")]:
        with pytest.raises(stepclient.StepError) as e:
            call()
        assert e.value.status == status and str(e.value).startswith(line), (status, str(e.value))
    assert not (out / "escape").exists() and svc.healthy()


def test_save_load_continues_and_downloads(server, base, tmp_path):
    client, svc, sizes, out = server
    lora = client.create_lora(r=4, seed=9)
    for seed in (1, 2):
        lora.forward_backward(batch(seed))
        lora.optim_step(lr=0.02)
    lora.save("half").result()
    resumed = client.load("half")
    for seed in (3, 4):   # the same two steps on both: the same weights (the optimizer state came along)
        for one in (lora, resumed):
            one.forward_backward(batch(seed))
            one.optim_step(lr=0.02)
    lora.save("straight").result()
    resumed.save("resumed").result()
    a, b = (load_file(out / "_api" / n / "adapter_model.safetensors") for n in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    archive = client.download_saved("resumed", tmp_path / "resumed.tar.gz")
    import tarfile
    with tarfile.open(archive) as tar:
        assert {"resumed/adapter_config.json", "resumed/adapter_model.safetensors", f"resumed/{stepapi.ENGINE_FILE}"} <= set(tar.getnames())
