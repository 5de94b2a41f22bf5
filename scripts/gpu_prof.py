"""Where a fused step's time goes (made for a GPU, runs anywhere): step times of our two LoRA
paths (concatenated, per adapter), of the step at fixed shapes (graphs: a replayed CUDA graph
on a GPU; packed only) and of the base alone, packed or padded, and with --profile a
torch.profiler table of one step (kernel launches, top ops by host time).

    python scripts/gpu_prof.py --k 4,8 --profile        # SmolLM2-135M shape, random weights, bf16
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench
import data
import graphs
import lora
import model as M
import objectives
import train


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="smollm2-135m")
    p.add_argument("--k", default="4,8")
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--seq", default="256")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--modes", default="concat,per-adapter,graphs,base")
    p.add_argument("--packing", default="1,0")
    p.add_argument("--profile", action="store_true")
    a = p.parse_args()
    args = argparse.Namespace(shape=a.shape, tiny=False, base=None, rows=a.rows, seq=a.seq, steps=a.steps)
    base = bench.ensure_base(args)
    device = M.resolve_device("auto")
    cuda = torch.device(device).type == "cuda"
    sync = lambda: bench.sync(str(device))   # noqa: E731
    for k in [int(x) for x in a.k.split(",")]:
        for mode in a.modes.split(","):
            for packing in [x == "1" for x in a.packing.split(",") if x == "1" or mode != "graphs"]:
                fuse = {"concat": True, "per-adapter": False}.get(mode)   # else as suits the device
                net = M.load_model(base, dtype=a.dtype, device=device)
                names = [f"job{j}" for j in range(k)]
                work = {n: bench.job_batches(args, j, net.config.vocab_size) for j, n in enumerate(names)}
                if mode != "base":
                    lora.add_adapters(net, {n: lora.LoRAConfig(r=16, alpha=32, dropout=0.05,
                                                               targets=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                        "gate_proj", "up_proj", "down_proj"])
                                            for n in names})
                    opts = {n: torch.optim.AdamW(lora.adapter_parameters(net, n), lr=1e-4, fused=True) for n in names}
                    gens = {n: torch.Generator().manual_seed(i) for i, n in enumerate(names)}
                    cfgs = {n: train.JobConfig(name=n, data="-") for n in names}
                    captured = graphs.Graphs()
                else:
                    net.model.embed_tokens.register_forward_hook(lambda m, i, out: out.requires_grad_(True))

                def step(s):
                    parts = [(n, bench.make_examples(*work[n][s % a.steps])) for n in names]
                    if mode == "base":
                        batch = data.make_batch(parts, 0, packing).to(device)
                        net.train()
                        losses, _ = objectives.token_losses(net, batch)
                        losses.sum().backward()
                        return batch.num_tokens
                    step_args = ([cfgs[n] for n in names], [ex for _, ex in parts],
                                 [sum(len(e.labels) - e.labels.count(-100) for e in ex) for _, ex in parts], gens, 0, device)
                    if mode == "graphs":
                        _, _, counts, _, _ = captured.step(net, *step_args)
                    else:
                        _, _, counts, _, _ = train.fused_step(net, *step_args, packing, fuse=fuse)
                    for n in names:
                        opts[n].step()
                        opts[n].zero_grad(set_to_none=True)
                    return int(counts[:, 0].sum())

                for s in range(3):
                    step(s)
                times = []
                for s in range(a.steps):
                    sync()
                    t0 = time.perf_counter()
                    tokens = step(s)
                    sync()
                    times.append(time.perf_counter() - t0)
                med = statistics.median(times)
                print(f"k={k} {mode:<12} packed={int(packing)} step {med * 1e3:7.1f} ms "
                      f"(min {min(times) * 1e3:.1f}) {tokens / med:8.0f} tok/s", flush=True)
                if a.profile:
                    from torch.profiler import ProfilerActivity, profile
                    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
                    with profile(activities=acts) as prof:
                        step(0)
                        sync()
                    ev = prof.key_averages()
                    launches = sum(e.count for e in ev if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                                     "cudaLaunchKernelExC", "cuLaunchKernelEx",
                                                                     "cudaGraphLaunch"))
                    gpu = sum(getattr(e, "self_device_time_total", 0) for e in ev) / 1e3
                    print(f"    launches {launches}, GPU kernel time {gpu:.1f} ms")
                    print(ev.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40))
                net = None   # noqa: F841  (frees the model before the next one loads)
                torch.cuda.empty_cache() if cuda else None


if __name__ == "__main__":
    sys.exit(main())
