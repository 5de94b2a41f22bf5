"""The output layer and next-token loss, fwd+bwd, three ways: fast.chunked_token_losses
(chunks of LOSS_CHUNK_ELEMENTS logits but at least LOSS_CHUNK_MIN_ROWS rows, no [N, V] logits
kept), the same with chunks of LOSS_CHUNK_ELEMENTS logits however few rows (the rule before
the minimum), and F.cross_entropy over all the logits at once. At three vocabularies, SmolLM2's
49k, Llama 3's 128k and Qwen2's 152k, each with its model's hidden size (random weights,
fp32; the all-at-once logits alone are tokens x V x 4 bytes). Each way runs in a fresh
process (alternating, `--rounds` times) that reports the median time of `--repeats` calls
after one warm-up and its peak RSS above what it held before the first call (ru_maxrss:
temporaries inside an op count too).

    python scripts/loss_time.py --tokens 2048
"""
import argparse
import resource
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import model as M  # noqa: E402
import scheduler  # noqa: E402
import fast  # noqa: E402
from block_time import timed  # noqa: E402  (scripts/, the running script's folder, is on sys.path)

SHAPES = {   # name: (hidden size, vocabulary), as in the models' config.json
    "smollm2-135m": (576, 49152),
    "llama-3.2-1b": (2048, 128256),
    "qwen2.5-0.5b": (896, 151936),
}


def measure(shape: str, way: str, tokens: int, repeats: int):
    """In this process: the median seconds of one fwd+bwd and the peak MiB it added."""
    C, V = SHAPES[shape]
    scheduler.keep_freed_memory()   # as train.py runs
    min_rows = 1 if way == "chunked-elements-only" else fast.LOSS_CHUNK_MIN_ROWS
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(V, C, generator=g).mul_(C ** -0.5)   # in place: no second copy in the baseline peak
    hidden = torch.randn(tokens, C, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (tokens,), generator=g)

    def step():
        if way.startswith("chunked"):
            losses = fast.chunked_token_losses(hidden, weight, targets, min_rows=min_rows)
        else:
            losses = F.cross_entropy(hidden @ weight.t(), targets, reduction="none")
        losses.sum().backward()
        hidden.grad = None

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = timed(step, repeats, warmup=1) / 1e3
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    print(f"{seconds:.3f} {peak:.0f}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--one", nargs=2, metavar=("SHAPE", "WAY"), help=argparse.SUPPRESS)   # a child
    a = p.parse_args()
    if a.one:
        return measure(*a.one, a.tokens, a.repeats)
    print(f"{a.tokens} tokens, fp32, fwd+bwd of the output layer and loss, {torch.get_num_threads()} threads")
    print("| model shape | C x V | way | rows a chunk | seconds (rounds) | peak MiB added (rounds) |")
    print("|---|---|---|---|---|---|")
    for shape, (C, V) in SHAPES.items():
        results = {"chunked": [], "chunked-elements-only": [], "all-at-once": []}
        for _ in range(a.rounds):
            for way in results:
                out = subprocess.run([sys.executable, __file__, "--one", shape, way,
                                      "--tokens", str(a.tokens), "--repeats", str(a.repeats)],
                                     capture_output=True, text=True, check=True).stdout.split()
                results[way].append((float(out[0]), float(out[1])))
        for way, runs in results.items():
            seconds = ", ".join(f"{s:.2f}" for s, _ in runs)
            peaks = ", ".join(f"{m:.0f}" for _, m in runs)
            rows = {"chunked": max(fast.LOSS_CHUNK_MIN_ROWS, fast.LOSS_CHUNK_ELEMENTS // V),
                    "chunked-elements-only": fast.LOSS_CHUNK_ELEMENTS // V}.get(way, a.tokens)
            print(f"| {shape} | {C} x {V} | {way} | {min(rows, a.tokens)} | {seconds} | {peaks} |")


if __name__ == "__main__":
    main()
