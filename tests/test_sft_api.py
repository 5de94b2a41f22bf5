"""examples/sft_api.py: a job trained through the step-level API (a real server in this process,
driven by stepclient) gives the adapter train.py gives it: the same init, rows in the same order,
loss normalisation, gradient accumulation, lr schedule, AdamW settings and clipping."""
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
import torch   # noqa: E402
from safetensors.torch import load_file   # noqa: E402

import serve          # noqa: E402
import service        # noqa: E402
import stepclient     # noqa: E402
import train          # noqa: E402
from conftest import adapter, job, run_cfg, serving, write_rows  # noqa: E402

TOKEN = "sft-token"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sft_api.py"


def load_example():
    spec = importlib.util.spec_from_file_location("sft_api", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def base(served_base) -> Path:
    return served_base


@pytest.fixture(scope="module")
def server(base, tmp_path_factory):
    """A service on a free port (uvicorn in a thread), and a client of it."""
    out = tmp_path_factory.mktemp("serve") / "out"
    svc = service.Service(run_cfg(base, out, []), api_linger=0.0)
    with serving(serve.guard(serve.make_app(svc), TOKEN, 1 << 20)) as url:
        yield stepclient.ServiceClient(url, TOKEN), out
    svc.close()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_sft_through_the_api_gives_train_pys_adapter(server, base, tmp_path, dropout):
    """3 optimizer steps of 2 micro-batches each, a cosine schedule after 1 warmup step (step 0
    at lr 0), clipping that bites (max_grad_norm 0.05), weight decay. Not bitwise: the API's loss
    is sum(nll * (1 / N)) where train.py's is sum(nll) / N, its forward scores every position
    (the prompt's at weight 0) where train.py's scores the labelled ones, and train.py's AdamW is
    torch's fused kernel, the engine's the foreach one: float reassociation, which Adam's
    m / sqrt(v) enlarges where a gradient is near 0 (1e-7 to 3e-6 seen); a wrong lr, normaliser or
    init differs by ~1e-3 and more. With dropout the masks are train.py's too: init_as gives the
    LoRA the job's dropout stream, and alone on the server its rows lay out as in train.py's batch."""
    client, out = server
    rows = write_rows(tmp_path / "rows.json", 12, 3, "reverse")
    sft = job("sft", rows, dropout=dropout, batch_size=4, micro_batch_size=2, epochs=1, lr=2e-2,
              lr_schedule="cosine", warmup_steps=1, max_grad_norm=0.05, weight_decay=0.1)
    cfg = run_cfg(base, tmp_path / "train", [sft], seed=7)
    train.train(cfg)
    lora = load_example().train_job(client, cfg, "sft")
    lora.save(f"sft-{dropout}").result()
    ours, theirs = load_file(out / "_api" / f"sft-{dropout}" / "adapter_model.safetensors"), adapter(tmp_path / "train", "sft")
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=1e-4)
    assert max(v.abs().max() for k, v in theirs.items() if "lora_B" in k) > 1e-3   # it trained


def test_init_as_gives_train_pys_initial_weights(server, base):
    """create_lora's init_as: the adapter starts as train.py's job of that name (lora.adapter_seed
    depends on the name), and not as it would under its own id."""
    client, out = server
    fields = dict(r=4, alpha=8, targets=["q_proj", "v_proj"], seed=7)
    client.create_lora(**fields, init_as="sft").save("init-as").result()
    client.create_lora(**fields).save("own-id").result()
    import lora as L
    import model as M
    import peft_format
    model = M.load_model(base, dtype=torch.float32)
    L.add_adapters(model, {"sft": L.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"])}, seed=7)
    peft_format.save_peft(model, "sft", out / "want")
    want = load_file(out / "want" / "adapter_model.safetensors")
    got, own = (load_file(out / "_api" / name / "adapter_model.safetensors") for name in ("init-as", "own-id"))
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not all(torch.equal(own[k], want[k]) for k in want)
    with pytest.raises(stepclient.StepError, match="init_as"):
        client.create_lora(init_as="")
