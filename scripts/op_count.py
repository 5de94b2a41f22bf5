"""aten ops in one fused training step (torch.profiler), to compare two versions of the code
without timing noise: the same count means the same work. A tiny random model with 30 layers,
k jobs x 2 rows, LoRA r=16 on all 7 projections, dropout 0.05.

    python scripts/op_count.py [REPO] [--gpu-path]      # REPO: the checkout to import (default: this one)

--gpu-path runs the GPU's code path on the CPU (shared matmuls, dropout as bool masks).
"""
import argparse
import sys
from pathlib import Path

p = argparse.ArgumentParser()
p.add_argument("repo", nargs="?", default=str(Path(__file__).resolve().parent.parent))
p.add_argument("--gpu-path", action="store_true")
p.add_argument("--k", type=int, default=4)
p.add_argument("--seq", default="64")
a = p.parse_args()
sys.path.insert(0, a.repo)

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import bench  # noqa: E402
import lora  # noqa: E402
import model as M  # noqa: E402
import train  # noqa: E402

torch.set_num_threads(1)
path = dict(fuse=True, dropout_draw="masks") if a.gpu_path else {}   # the GPU's LoRA path, for fused_step
bench.SHAPES["tiny30"] = {**bench.SHAPES["tiny"], "num_hidden_layers": 30}
args = argparse.Namespace(shape="tiny30", tiny=False, base=None, rows=2, seq=a.seq, steps=2)
net = M.load_model(bench.ensure_base(args), dtype="float32", device="cpu")
names = [f"job{j}" for j in range(a.k)]
work = {n: bench.job_batches(args, j, net.config.vocab_size) for j, n in enumerate(names)}
lora.add_adapters(net, {n: lora.LoRAConfig(r=16, alpha=32, dropout=0.05, targets=list(net.LORA_TARGETS))
                        for n in names})
opts = {n: torch.optim.AdamW(lora.adapter_parameters(net, n), lr=1e-4, fused=True) for n in names}
gens = {n: torch.Generator().manual_seed(i) for i, n in enumerate(names)}
cfgs = {n: train.JobConfig(name=n, data="-") for n in names}


def step(s: int):
    parts = [bench.make_examples(*work[n][s]) for n in names]
    train.fused_step(net, [cfgs[n] for n in names], parts,
                     [sum(len(e.labels) - e.labels.count(-100) for e in ex) for ex in parts], gens, 0, "cpu", True, **path)
    for n in names:
        opts[n].step()
        opts[n].zero_grad(set_to_none=True)


step(0)
with profile(activities=[ProfilerActivity.CPU]) as prof:
    step(1)
counts = {e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")}
print(f"{a.repo}: {sum(counts.values())} aten ops in one fused step")
