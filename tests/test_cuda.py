"""The same invariants on a CUDA device (skipped without one)."""
import pytest
import torch

import lora
from llama import Llama
import model as M
import train
from conftest import adapter, job, run_cfg, write_rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_logits_on_cuda_match_transformers(tiny_llama):
    path, hf = tiny_llama
    ours = M.load_model(path, dtype=torch.float32, device="cuda")
    assert ours.lm_head.weight.device.type == "cuda"
    idx = torch.randint(0, 384, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :5] = 0
    with torch.no_grad():
        expected = hf(idx, attention_mask=mask).logits
        got = ours(idx.cuda(), attention_mask=mask.cuda()).cpu()
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)


def test_bf16_mixed_batch_on_cuda(tiny_llama):
    path, _ = tiny_llama
    ours = M.load_model(path, dtype=torch.bfloat16, device="cuda")
    lora.add_adapters(ours, {"a": lora.LoRAConfig(r=4), "b": lora.LoRAConfig(r=8, targets=["up_proj"])})
    assert lora.adapter_parameters(ours, "a")[0].dtype == torch.float32  # adapters stay fp32
    idx = torch.randint(0, 384, (3, 16), device="cuda")
    with lora.route(ours, ["a", None, "b"]):
        mixed = ours(idx)
    for row, name in enumerate(["a", None, "b"]):
        with lora.route(ours, [name]):
            torch.testing.assert_close(mixed[row], ours(idx[row:row + 1])[0], atol=2e-2, rtol=2e-2)


def test_fused_job_equals_job_alone_on_cuda(tmp_path):
    from conftest import make_hf_model, save_hf
    from tokenizer_util import write_tokenizer_json
    vocab = write_tokenizer_json(tmp_path / "base")
    base = save_hf(make_hf_model(vocab_size=max(vocab, 384)), tmp_path / "base")
    target = job("target", write_rows(tmp_path / "t.json", 12, 0, "reverse"))
    other = job("other", write_rows(tmp_path / "o.json", 10, 1, "upper"), r=8, targets=list(Llama.LORA_TARGETS))
    for name, jobs in (("fused", [other, target]), ("alone", [target])):
        cfg = run_cfg(base, tmp_path / name, jobs, scheduler={"max_concurrent": 2})
        cfg.device = "cuda"
        train.train(cfg)
    fused, alone = adapter(tmp_path / "fused", "target"), adapter(tmp_path / "alone", "target")
    for key in fused:
        torch.testing.assert_close(fused[key], alone[key], atol=1e-4, rtol=1e-3)
