"""Our frozen base against transformers' on EVERY position, through the public API: logits on
all positions (model(input_ids), no output mask, no chunked loss), cross-entropy on all of them,
backward through the frozen layers (the input embeddings require grad, as bench.py's base-only).
One process, the two interleaved round by round (so drift of the machine falls on both alike),
the same rows (--rows x --seq random tokens, one length: no padding, no mask). Prints each round's
seconds and the median ratio (tokens/s ours / transformers').

    python scripts/base_all_positions.py [--base DIR] [--rows 8] [--seq 256] [--rounds 5]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import model as M  # noqa: E402
import scheduler  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=str(Path(__file__).resolve().parent.parent / "checkpoints/smollm2-135m-instruct"))
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()
    import transformers
    scheduler.keep_freed_memory()   # as train.py and bench.py's workers
    ours = M.load_model(args.base, dtype=args.dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(args.base, dtype=getattr(torch, args.dtype))
    for net, embed in ((ours, ours.model.embed_tokens), (hf, hf.get_input_embeddings())):
        net.requires_grad_(False)
        net.train()
        embed.register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    ids = torch.randint(0, ours.config.vocab_size, (args.rows, args.seq), generator=torch.Generator().manual_seed(0))

    def ours_step():
        logits = ours(ids)                                                   # [B, T, V]
        F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()

    def hf_step():
        logits = hf(input_ids=ids, use_cache=False).logits                   # [B, T, V]
        F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()

    with torch.no_grad():   # the same function first
        torch.testing.assert_close(ours(ids[:1]), hf(input_ids=ids[:1]).logits, atol=1e-3, rtol=1e-3)
    steps = {"ours": ours_step, "transformers": hf_step}
    for step in steps.values():
        step()   # warm-up
    times = {name: [] for name in steps}
    for r in range(args.rounds):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
        print(f"round {r}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()), flush=True)
    ratio = statistics.median(times["transformers"]) / statistics.median(times["ours"])
    print(f"{args.base}, {args.dtype}, {args.rows} x {args.seq} tokens, logits and loss on every position, "
          f"{torch.get_num_threads()} threads: ours {statistics.median(times['ours']):.2f} s, transformers "
          f"{statistics.median(times['transformers']):.2f} s a step (median of {args.rounds}); ours / transformers "
          f"tokens/s {ratio:.2f}")


if __name__ == "__main__":
    main()
