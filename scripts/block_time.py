"""One decoder block of the demo's base, fwd+bwd, with k adapters routed as the fused step
routes them (ours) and without (base): milliseconds per block and tensor ops per block, at
k jobs x 2 rows x SEQ packed tokens. Comparing two SEQ values splits ours' extra time into a
part that grows with the tokens (arithmetic) and one that does not (per-op cost). Then the
RMSNorm of that block's width, fwd+bwd, through llama.RMSNormFunction and through autograd
over its plain ops.

    python scripts/block_time.py --seq 256,8
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench  # noqa: E402
import data  # noqa: E402
import llama  # noqa: E402
import lora  # noqa: E402
import model as M  # noqa: E402
import train  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def timed(fn, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of fn()."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def block_step(base: str, ours: bool, k: int, seq: int):
    """fwd+bwd of the second block on the inputs a real forward of the fused batch gives it."""
    net = M.load_model(base, dtype="float32", device="cpu")
    net.model.layers = net.model.layers[:2]
    names = [f"job{j}" for j in range(k)]
    if ours:
        lora.add_adapters(net, {n: lora.LoRAConfig(r=16, alpha=32, dropout=0.05, targets=TARGETS) for n in names})
    g = torch.Generator().manual_seed(0)
    parts = [(n if ours else None, [data.Example(row, [-100] * (seq * 2 // 5) + row[seq * 2 // 5:])
                                    for row in torch.randint(0, net.config.vocab_size, (2, seq), generator=g).tolist()])
             for n in names]
    batch = data.make_batch(parts, 0, True)
    generators = {n: torch.Generator().manual_seed(i) for i, n in enumerate(names)}
    block, captured = net.model.layers[1], {}
    hook = block.register_forward_pre_hook(lambda m, args: captured.update(args=args[1:]))   # returns None: args unchanged
    net.train()
    with lora.route(net, batch.adapter_names, lengths=batch.lengths, generators=generators, packed=batch.packed):
        net(batch.input_ids, head=False, segments=batch.segments)
    hook.remove()
    x = torch.randn(1, batch.num_tokens, net.config.hidden_size, requires_grad=True)
    grad = torch.randn_like(x)

    def step():
        with lora.route(net, batch.adapter_names, lengths=batch.lengths, generators=generators, packed=batch.packed):
            torch.autograd.backward(block(x, *captured["args"]), grad)
        x.grad = None
        net.zero_grad(set_to_none=True)
    return step


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base", default=str(bench.DEFAULT_BASE))
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--seq", default="256,8", help="tokens per row, comma-separated")
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args()
    M.keep_freed_memory()
    for seq in [int(s) for s in a.seq.split(",")]:
        for ours in (False, True):
            step = block_step(a.base, ours, a.k, seq)
            ms = timed(step, a.repeats)
            with OpCount() as ops:
                step()
            print(f"{'ours' if ours else 'base'} {a.k} x 2 x {seq}: {ms:.1f} ms per block fwd+bwd, {ops.count} tensor ops")
    width = json.loads((Path(a.base) / "config.json").read_text())["hidden_size"]
    norm = llama.RMSNorm(width, 1e-5).requires_grad_(False)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(1, a.k * 2 * 256, width, dtype=dtype, requires_grad=True)
        weight, grad = norm.weight.to(dtype), torch.randn_like(x)

        def plain():
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
            return weight * h.type_as(x)
        written = timed(lambda: torch.autograd.grad(llama.RMSNormFunction.apply(x, weight, 1e-5, False), x, grad), 60)
        autograd = timed(lambda: torch.autograd.grad(plain(), x, grad), 60)
        print(f"RMSNorm {tuple(x.shape)} {dtype}: autograd over its ops {autograd:.2f} ms, written out {written:.2f} ms fwd+bwd")


if __name__ == "__main__":
    main()
