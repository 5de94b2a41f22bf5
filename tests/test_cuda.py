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


@pytest.mark.parametrize("fuse", ["auto", "never"])
def test_fused_job_equals_job_alone_on_cuda(tmp_path, fuse):
    """Both LoRA paths on a GPU: all adapters in shared matmuls (the default there), and
    LoRAUpdate per adapter (bool dropout masks, the base matmuls inside the node)."""
    from conftest import make_hf_model, save_hf
    from tokenizer_util import write_tokenizer_json
    vocab = write_tokenizer_json(tmp_path / "base")
    base = save_hf(make_hf_model(vocab_size=max(vocab, 384)), tmp_path / "base")
    target = job("target", write_rows(tmp_path / "t.json", 12, 0, "reverse"))
    other = job("other", write_rows(tmp_path / "o.json", 10, 1, "upper"), r=8, targets=list(Llama.LORA_TARGETS))
    for name, jobs in (("fused", [other, target]), ("alone", [target])):
        cfg = run_cfg(base, tmp_path / name, jobs, scheduler={"max_concurrent": 2}, fuse_adapters=fuse)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_step_equals_the_eager_step(base_dir, tmp_path, dtype):
    """graphs.py on a GPU: the step captured once, then replayed for other steps of the same
    bucket, gives each job's loss and gradients as train.fused_step does (packed, same seeds),
    step after step; fp32 (SDPA with the segment mask) and bf16 (the varlen flash kernel)."""
    import data
    import graphs
    ours = M.load_model(base_dir, dtype=dtype, device="cuda")
    jobs = [job("a", write_rows(tmp_path / "a.json", 12, 0, "reverse"), dropout=0.3, targets=list(Llama.LORA_TARGETS)),
            job("b", write_rows(tmp_path / "b.json", 12, 1, "upper"), r=2, dropout=0.0)]
    lora.add_adapters(ours, {j.name: lora.LoRAConfig(r=j.r, alpha=j.alpha, dropout=j.dropout, targets=j.targets)
                             for j in jobs})
    for i, j in enumerate(jobs):
        with torch.no_grad():
            for p in lora.adapter_parameters(ours, j.name, "lora_B"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).to(p.device) * 0.1)
    tok = data.load_tokenizer(base_dir)
    examples = [data.load_job_data(j.data, tok) for j in jobs]
    steps = [[rows[i:i + 2] for rows in examples] for i in range(0, 6, 2)] * 2   # the second three replay graphs
    results = {}
    for fixed in (False, True):
        gens = {j.name: torch.Generator().manual_seed(7) for j in jobs}
        cache, out = graphs.Graphs(), []
        for rows in steps:
            ours.zero_grad(set_to_none=True)
            if fixed:
                losses, _, _, _, ran = cache.step(ours, jobs, rows, [9, 9], gens, tok.pad_id, "cuda")
            else:
                losses, _, _, _, ran = train.fused_step(ours, jobs, rows, [9, 9], gens, tok.pad_id, "cuda", packed=True)
            assert ran
            out.append((losses.float().cpu(), [p.grad.float().cpu() for j in jobs for p in lora.adapter_parameters(ours, j.name)]))
        results[fixed] = out
        if fixed:
            assert len(cache.steps) <= 3 and all(s.graph is not None for s in cache.steps.values())
    tol = dict(atol=1e-4, rtol=1e-3) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    for (eager_losses, eager_grads), (fixed_losses, fixed_grads) in zip(results[False], results[True]):
        torch.testing.assert_close(fixed_losses, eager_losses, **tol)
        for a, b in zip(eager_grads, fixed_grads):
            torch.testing.assert_close(b, a, **tol)


def test_a_run_with_cuda_graphs_on_cuda(tmp_path, base_dir):
    """train.py with cuda_graphs on a GPU trains what it trains without them."""
    jobs = [job("a", write_rows(tmp_path / "a.json", 8, 0, "reverse"), targets=list(Llama.LORA_TARGETS), dropout=0.2),
            job("b", write_rows(tmp_path / "b.json", 6, 1, "upper"), micro_batch_size=1)]
    for graphed in (False, True):
        cfg = run_cfg(base_dir, tmp_path / f"g{graphed}", jobs, cuda_graphs=graphed)
        cfg.device = "cuda"
        train.train(cfg)
    for j in jobs:
        a, b = adapter(tmp_path / "gFalse", j.name), adapter(tmp_path / "gTrue", j.name)
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=1e-4, rtol=1e-3)
