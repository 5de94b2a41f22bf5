"""Side-by-side measurements of fused multi-LoRA training.

    python bench.py [--base DIR | --shape smollm2-135m] [--jobs 4] [--rows 2] [--seq 128]

Systems, each on the same tokens in one run:
  ours       k jobs' micro-batches fused into one step: forward, per-job loss, one
             backward, k optimizer steps (what train.py does each step)
  base-only  forward + backward of the frozen base alone, no LoRA: the ceiling

Prints a markdown table and writes all records as JSON (--out).
"""
import argparse
import json
import statistics
import time

import torch

import data
import lora
import model as M
import train

# Random-weight shapes for runs without a checkpoint (config.json fields of the real models).
SHAPES = {
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True),
    "tiny": dict(model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=256,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True),
}


def random_model(shape: str, dtype: torch.dtype, device: str):
    torch.manual_seed(0)
    with torch.device(device):
        net = M.build_model(SHAPES[shape])
    for name, p in net.named_parameters():
        with torch.no_grad():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn_like(p) * 0.02)
    net.tie_weights()
    return net.to(dtype).requires_grad_(False)


def synthetic_batch(jobs: list[str], rows: int, seq: int, vocab: int, seed: int = 0) -> data.Batch:
    """Alpaca-like rows: the first ~40% is prompt (no loss), the rest response."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for name in jobs:
        examples = []
        for _ in range(rows):
            ids = torch.randint(0, vocab, (seq,), generator=g).tolist()
            prompt = int(seq * 0.4)
            examples.append(data.Example(ids, [-100] * prompt + ids[prompt:]))
        parts.append((name, examples))
    return data.fuse(parts, pad_id=0)


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(step, device: str, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="a Hugging Face checkpoint folder (default: random weights of --shape)")
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    p.add_argument("--jobs", type=int, default=4, help="k adapters fused per step")
    p.add_argument("--rows", type=int, default=1, help="micro-batch rows per job")
    p.add_argument("--seq", type=int, default=128, help="tokens per row")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--targets", default=",".join(lora.LLAMA_TARGETS))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="auto")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="bench.json")
    args = p.parse_args()
    device, dtype = M.resolve_device(args.device), getattr(torch, args.dtype)
    net = (M.load_model(args.base, dtype=dtype, device=device) if args.base
           else random_model(args.shape, dtype, device))
    names = [f"job{i}" for i in range(args.jobs)]
    batch = synthetic_batch(names, args.rows, args.seq, net.config.vocab_size).to(device)
    tokens = batch.num_tokens
    lengths = batch.lengths.tolist()

    def base_only():
        # Backward through the frozen layers needs something that requires grad: the
        # embeddings' output, exactly the activation gradients LoRA training also pays for.
        embed = net.model.embed_tokens
        hook = embed.register_forward_hook(lambda m, i, out: out.requires_grad_(True))
        try:
            losses, _ = train.token_losses(net, batch)
            losses.mean().backward()
        finally:
            hook.remove()

    targets = args.targets.split(",")
    lora.add_adapters(net, {n: lora.LoRAConfig(r=args.r, alpha=2 * args.r, dropout=0.05, targets=targets)
                            for n in names})
    optimizers = {n: torch.optim.AdamW(lora.adapter_parameters(net, n), lr=1e-4) for n in names}
    generators = {n: torch.Generator(device=device).manual_seed(i) for i, n in enumerate(names)}
    job_of_row = torch.tensor([i for i, n in enumerate(names) for _ in range(args.rows)], device=device)

    def ours():
        net.train()
        with lora.route(net, batch.adapter_names, lengths=lengths, generators=generators):
            losses, rows = train.token_losses(net, batch)
        sums = torch.zeros(len(names), device=device).index_add(0, job_of_row[rows], losses)
        sums.sum().backward()
        for n in names:
            optimizers[n].step()
            optimizers[n].zero_grad(set_to_none=True)

    records = []
    for system, step in (("base-only", base_only), ("ours", ours)):
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times = time_steps(step, device, args.warmup, args.repeats)
        med = statistics.median(times)
        records.append({"system": system, "jobs": args.jobs, "rows": args.rows, "seq": args.seq,
                        "r": args.r, "dtype": args.dtype, "device": device, "tokens": tokens,
                        "median_s": med, "spread_s": [min(times), max(times)], "tokens_per_s": tokens / med,
                        "peak_mem_mb": train.peak_memory_mb(device)})
    base_tps = records[0]["tokens_per_s"]
    for r in records:
        r["vs_base_only"] = r["tokens_per_s"] / base_tps
    model_name = args.base or f"random {args.shape}"
    print(f"\n{model_name}, {device}, {args.dtype}: {args.jobs} jobs x {args.rows} rows x {args.seq} tokens, "
          f"r={args.r} on {','.join(targets)}; median of {args.repeats} after {args.warmup} warm-up\n")
    print("| system | tokens | step s (min-max) | tokens/s | vs base-only | peak MiB |")
    print("|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['system']} | {r['tokens']} | {r['median_s']:.3f} ({r['spread_s'][0]:.3f}-{r['spread_s'][1]:.3f}) "
              f"| {r['tokens_per_s']:.0f} | {r['vs_base_only']:.3f} | {r['peak_mem_mb']:.0f} |")
    with open(args.out, "w") as f:
        json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()
