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


@pytest.mark.parametrize("fuse", ["cuda", "never"])
def test_fused_job_equals_job_alone_on_cuda(tmp_path, monkeypatch, fuse):
    """Both LoRA paths on a GPU: all adapters in shared matmuls (the default there), and
    LoRAUpdate per adapter (bool dropout masks, the base matmuls inside the node)."""
    monkeypatch.setattr(lora, "FUSE_ADAPTERS", fuse)
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


@pytest.mark.parametrize("window", [None, 5])
def test_packed_attention_on_cuda_equals_segment_by_segment(window):
    """bf16 on CUDA takes torch's varlen flash kernel (llama.attend_segments); it must equal
    SDPA run on each segment alone, with and without a sliding window, forward and backward."""
    from llama import Segments, attend, causal_mask
    g = torch.Generator().manual_seed(0)
    lengths, nh, nkv, hd = [7, 1, 19, 13], 4, 2, 16
    q, k, v = (torch.randn(1, n, sum(lengths), hd, generator=g).to("cuda", torch.bfloat16).requires_grad_(True)
               for n in (nh, nkv, nkv))
    packed = attend(q, k, v, Segments(tuple(lengths), window), gqa=True)
    packed.float().square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    alone = torch.cat([attend(qs, ks, vs, causal_mask(n, 0, None, window, "cuda"), gqa=True)
                       for qs, ks, vs, n in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2), lengths)], 2)
    alone.float().square().sum().backward()
    torch.testing.assert_close(packed, alone, atol=2e-2, rtol=2e-2)
    for grad, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(grad, t.grad, atol=5e-2, rtol=5e-2)
