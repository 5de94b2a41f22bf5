"""examples/rl_api.py against a real server (uvicorn on a free port, the Service in this process
so that its engine can be watched) on a tiny random model: four clients at once, each its own
LoRA, learn a reward the random model can learn in a few iterations, and the server fuses their
calls (more than one call in a forward_backward pass, and in a generation)."""
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
import torch          # noqa: E402
import serve          # noqa: E402
import service        # noqa: E402
import stepclient     # noqa: E402
from conftest import count_fused, make_hf_model, run_cfg, save_hf, serving   # noqa: E402
from tokenizer_util import write_tokenizer_json   # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import rl_api         # noqa: E402

TOKEN = "rl-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A service on a tiny random base, with a record of how many calls each of the engine's
    forward_backward passes and generations took; and the tokenizer's vocabulary size."""
    folder = tmp_path_factory.mktemp("base")
    vocab = write_tokenizer_json(folder)
    hf = make_hf_model(vocab_size=max(vocab, 384), tie_word_embeddings=True)
    with torch.no_grad():   # larger logits (3x): room for a LoRA to move the next token's distribution in a few steps
        hf.get_input_embeddings().weight.mul_(3)
    base = save_hf(hf, folder)
    svc = service.Service(run_cfg(base, tmp_path_factory.mktemp("serve") / "out", []), api_linger=0.02)
    sizes = count_fused(svc.engine)
    with serving(serve.guard(serve.make_app(svc), TOKEN, 1 << 20)) as url:
        yield stepclient.ServiceClient(url, TOKEN), sizes, vocab
    svc.close()


def low_half(vocab: int):
    """The reward: the fraction of a completion's tokens in the lower half of the vocabulary."""
    return lambda completion: sum(t < vocab // 2 for t in completion["tokens"]) / len(completion["tokens"])


def test_four_clients_learn_their_reward_and_their_calls_fuse(server):
    client, sizes, vocab = server
    prompts = [[5 + 7 * i + j for j in range(6)] for i in range(4)]
    tasks = [rl_api.Task(f"low-{i}", prompts, low_half(vocab)) for i in range(4)]
    sizes["forward_backward"].clear()
    sizes["sample"].clear()
    curves = rl_api.run_clients(client, tasks, iterations=12, batch=2, n=4, max_tokens=8, seed=0,   # seeds 1, 2: ~0.6 -> ~0.95 too
                                lora_config={"r": 4, "alpha": 8, "targets": ["o_proj", "down_proj"]},
                                adam={"lr": 2e-2}, log=lambda line: None)
    assert all(len(curve) == 12 for curve in curves)
    first = sum(sum(c[:3]) for c in curves) / 12   # the mean reward of the 4 clients' first 3 iterations
    last = sum(sum(c[-3:]) for c in curves) / 12
    assert last > first + 0.15, (first, last, curves)
    assert max(sizes["forward_backward"]) > 1 and max(sizes["sample"]) > 1, sizes
