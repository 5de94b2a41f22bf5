"""Measure the claims side by side: fused multi-LoRA training vs PEFT baselines.

    python bench.py --quick            # one workload, under 5 minutes on 2 CPU cores
    python bench.py                    # full: k in {1, 2, 4, 8} at 1x64 tokens, k=4 at 2x256 and 2 x alpaca lengths
    python bench.py --tiny --quick     # a tiny random model (RUN_SLOW=1 tests run this)
    python bench.py --scenario strategies   # the seed's batching-strategy table (Seq, trivial, optimal-fit, fast-fit)
    python bench.py --scenario memory       # 8 jobs: activation peak with/without checkpointing; vs 8 PEFT processes, both ways
    python bench.py --scenario ranks        # train.py on 1 process and on 2 ranks under torchrun (dist.py): scaling
    python bench.py --scenario eval --k 4   # 4 adapters on tasks/ through eval.py once vs lm-eval hf+peft per adapter

Systems, all on the same base, the same synthetic data and the same hyperparameters:
  ours           k jobs' micro-batches fused into one step (what train.py does each step),
                 packed end to end in one row without padding (--no-packing: padded rows)
  ours-seq       the same k jobs through our code, one after another
  peft-seq       transformers + PEFT, one job after another (the Alpaca-LoRA baseline), each
                 micro-batch padded to its longest row (an attention mask only where a row is padded)
  peft-seq-packed  the same, each micro-batch's rows end to end in one row, position_ids
                 restarting, no mask: transformers' own padding-free path (SDPA with the
                 block-diagonal mask it builds from position_ids)
  peft-parallel  k concurrent processes of transformers + PEFT, one job each (padded as peft-seq)
  peft-parallel-packed  the same, packed as peft-seq-packed
  base-only      forward + backward of our frozen base alone over the fused tokens (packed as
                 ours): the ceiling
  hf-base-only   transformers' frozen base over the same rows padded, no mask (on rows of one
                 length: the same batch as base-only, what our base must beat), the output layer
                 and loss on the labelled positions only (logits_to_keep), as ours: equal work
Every transformers model runs with use_cache=False, as a training script sets it.

Every system runs in fresh processes, so peak memory (CPU: the process's RSS high-water
mark; CUDA: max_memory_allocated) is its own. --in-process (for tests) runs the same workers
in this one process, one after another: the same work and output in seconds, but peak memory
and peft-parallel's concurrency are then not each system's own. Each job makes `--steps`
optimizer steps per repeat; the first repeat is warm-up and excluded; figures are the median
over the rest, with the min-max spread. Writes a markdown table (stdout), JSON (--out) and a
PNG chart.
"""
import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import model as M
import scheduler

# config.json fields for random-weight models of a real shape (runs without a checkpoint).
SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5,
                         rope_theta=100000.0, tie_word_embeddings=True),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=True),
}
SYSTEMS = ("ours", "ours-seq", "peft-seq", "peft-seq-packed", "peft-parallel", "peft-parallel-packed",
           "base-only", "hf-base-only", "ours-graphs",   # ours-graphs: the fused step at fixed shapes (graphs.py)
           "train-py")   # `python train.py --config` on text rows of about the same tokens, as a user runs it
DEFAULT_SYSTEMS = ("ours", "ours-seq", "peft-seq", "peft-seq-packed", "peft-parallel", "base-only", "hf-base-only")
DEFAULT_BASE = Path(__file__).resolve().parent / "checkpoints" / "smollm2-135m-instruct"


# ----------------------------------------------------------------------------- workload

def job_batches(args, job: int, vocab: int) -> list[tuple[list[list[int]], list[int]]]:
    """Job `job`'s micro-batches, one per optimizer step: (token rows, prompt length per row).

    Row lengths are fixed (--seq N) or drawn from an Alpaca-like distribution (--seq alpaca:
    prompt+response lengths of Alpaca under a 256-token cutoff are roughly lognormal around
    ~120 tokens). The first 40% of each row is prompt (no loss), as with train_on_inputs=False.
    """
    g = torch.Generator().manual_seed(1000 + job)
    steps = []
    for _ in range(args.steps):
        if args.seq == "alpaca":
            normal = torch.randn(args.rows, generator=g)
            lengths = (4.8 + 0.45 * normal).exp().clamp(24, 256).long().tolist()
        else:
            lengths = [int(args.seq)] * args.rows
        rows = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
        steps.append((rows, [int(n * 0.4) for n in lengths]))
    return steps


def make_examples(rows, prompt_lens):
    import data
    return [data.Example(ids, [-100] * p + ids[p:]) for ids, p in zip(rows, prompt_lens)]


# ----------------------------------------------------------------------------- memory

class GPUSampler:
    """Average GPU utilization while timing (CUDA only; needs pynvml through torch)."""

    def __init__(self, device: str):
        self.samples, self.on = [], device.startswith("cuda")

    def __enter__(self):
        if self.on:
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()
        return self

    def _run(self):
        while not self.stop.wait(0.05):
            try:
                self.samples.append(torch.cuda.utilization())
            except Exception:  # no pynvml: no utilization figure
                return

    def __exit__(self, *exc):
        if self.on:
            self.stop.set()
            self.thread.join()

    @property
    def mean(self):
        return statistics.mean(self.samples) if self.samples else None


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- workers

def ours_worker(args, jobs: list[int], fused: bool, base_only: bool = False, graphed: bool = False) -> dict:
    """Our model: fused (all jobs each step; graphed: replayed as CUDA graphs on GPUs), one
    after another, or the bare base. Each step is train.py's own: the run's forward_backward
    step, then each job's optimizer_step (clipping, the pre-step snapshot, the finite checks)."""
    import data
    import objectives
    import train
    device = M.resolve_device(args.device)
    net = M.load_model(args.base, dtype=args.dtype, device=device, quant=args.quant)
    net.checkpoint_blocks = args.checkpointing
    names = [f"job{j}" for j in jobs]
    work = {n: job_batches(args, j, net.config.vocab_size) for n, j in zip(names, jobs)}
    if not base_only:
        run = loop_run(args, net, names, work, device, graphed)
    else:  # backward through the frozen layers needs an input that requires grad
        net.model.embed_tokens.register_forward_hook(lambda m, i, out: out.requires_grad_(True))

    def step(group: list[str], s: int):
        if base_only:
            parts = [(n, make_examples(*work[n][s])) for n in group]
            batch = data.make_batch(parts, 0, args.packing).to(device)
            net.train()
            losses, _ = objectives.token_losses(net, batch)
            losses.sum().backward()
            return batch.num_tokens, batch.input_ids.numel()
        # train.py's loop: the fused step, each job's loss added to its step, its optimizer step.
        fused_run = run.steps.forward_backward(run, [micro_batch(run, n, s, args.rows) for n in group])
        run.steps.optimize(run, train.accumulate(run, fused_run))
        return fused_run.counts.sum(0).tolist()

    def one_repeat():
        real = padded = 0
        order = [names] if fused or base_only else [[n] for n in names]
        sync(device)
        t0 = time.perf_counter()
        for group in order:
            for s in range(args.steps):
                tokens, processed = step(group, s)
                real += tokens
                padded += processed
        sync(device)
        return real, padded, time.perf_counter() - t0

    return run_repeats(args, device, one_repeat)


def loop_run(args, net, names: list[str], work: dict, device: str, graphed: bool):
    """A jobs.Run holding the bench's jobs as train.py's loop holds them: each a JobState (its
    adapter, its optimizer as jobs.make_optimizer makes it, its dropout RNG, the job defaults:
    gradient clipping at 1.0), and the run's steps as train.py picks them (core_steps, add_layers:
    the fixed-shape step with graphed, non-finite isolation where adapters share matmuls)."""
    import config
    import jobs
    import lora
    import objectives
    import train
    targets = args.targets.split(",")
    job_configs = [config.JobConfig(name=n, data="-", r=args.r, alpha=2 * args.r, dropout=args.dropout,
                                    targets=targets, lr=1e-4) for n in names]
    cfg = config.RunConfig(base_model=args.base, jobs=job_configs, packing=args.packing, cuda_graphs=graphed,
                           device=device)
    lora.add_adapters(net, {job.name: job.lora_config() for job in job_configs})
    sets = {n: [e for rows, prompts in work[n] for e in make_examples(rows, prompts)] for n in names}
    run = jobs.Run(cfg, device, Path("-"), net, 0, None, {}, sets, {}, {}, metrics=None, start=time.time(), bar=None)
    for i, job in enumerate(job_configs):
        params = lora.adapter_parameters(net, job.name)
        run.jobs[job.name] = jobs.JobState(job, 10**9, sets[job.name], None, jobs.make_optimizer(params, job),
                                           torch.Generator().manual_seed(i), admitted_at=time.time(),
                                           loss_sum=torch.zeros((), device=device),
                                           reward_sums=torch.zeros(objectives.METRIC_SUMS, device=device))
    run.steps = train.core_steps()
    train.add_layers(run)
    return run


def micro_batch(run, name: str, s: int, rows: int):
    """Job `name`'s micro-batch of step s (the bench's `rows` rows of that step), a whole optimizer step."""
    from scheduler import MicroBatch
    indices = list(range(s * rows, (s + 1) * rows))
    examples = [run.train_sets[name][i] for i in indices]
    lengths = [len(e.input_ids) for e in examples]
    loss_tokens = sum(label != -100 for e in examples for label in e.labels[1:])
    return MicroBatch(name, indices, 0, s, True, loss_tokens, max(lengths), sum(lengths),
                      sum(n * n for n in lengths), len(lengths), len(indices))


def hf_inputs(rows: list[list[int]], prompt_lens: list[int], packed: bool, multiple_of: int = 1) -> dict:
    """transformers' inputs for these rows: padded (right, T rounded up to multiple_of, a mask
    only if a row is padded) or packed end to end in one row with restarting position_ids."""
    if packed:
        ids = torch.tensor([[t for r in rows for t in r]])
        labels = torch.tensor([[t if i >= p else -100 for r, p in zip(rows, prompt_lens) for i, t in enumerate(r)]])
        positions = torch.tensor([[i for r in rows for i in range(len(r))]])
        return dict(input_ids=ids, labels=labels, position_ids=positions)
    T = -(-max(map(len, rows)) // multiple_of) * multiple_of
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.full((len(rows), T), -100)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, (r, p) in enumerate(zip(rows, prompt_lens)):
        ids[i, :len(r)] = torch.tensor(r)
        labels[i, p:len(r)] = torch.tensor(r[p:])
        mask[i, :len(r)] = 1
    # A mask only where a row is padded: an all-ones mask sends transformers' attention
    # down its slower masked path, which a competent user would not do.
    return dict(input_ids=ids, labels=labels, attention_mask=mask if bool((mask == 0).any()) else None)


def peft_worker(args, jobs: list[int], barrier=None, packed: bool = False) -> dict:
    """transformers + PEFT: one job after another in this process (Alpaca-LoRA style)."""
    import gc
    import peft
    import transformers
    device = "cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    quant = None
    if args.quant:
        quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=args.quant,
                                                bnb_4bit_compute_dtype=dtype)
    current = {}

    def fresh(job):  # each job is its own training run: load the base, add a new LoRA adapter
        current.clear()
        gc.collect()
        hf = transformers.AutoModelForCausalLM.from_pretrained(args.base, dtype=dtype, quantization_config=quant,
                                                               device_map=device if quant else None)
        if not quant:
            hf.to(device)
        if args.checkpointing:   # transformers' own activation checkpointing, as a PEFT user turns it on
            if hasattr(hf, "activation_checkpointing_enable"):   # transformers >= 5.2x; before: gradient_checkpointing_enable
                hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            hf.enable_input_require_grads()
        targets = args.targets.split(",")
        pm = peft.get_peft_model(hf, peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=args.dropout,
                                                     target_modules=targets, task_type="CAUSAL_LM"))
        pm.train()
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4, fused=True)
        current.update(job=job, model=pm, opt=opt, work=job_batches(args, job, hf.config.vocab_size))

    def one_repeat():
        real = padded = 0
        seconds = 0.0
        for job in jobs:
            if current.get("job") != job:
                fresh(job)  # loading is not timed: only the training steps are
            pm, opt = current["model"], current["opt"]
            sync(device)
            t0 = time.perf_counter()
            for rows, prompt_lens in current["work"]:
                inputs = hf_inputs(rows, prompt_lens, packed)
                out = pm(**{k: v.to(device) for k, v in inputs.items() if v is not None}, use_cache=False)
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                real += sum(map(len, rows))
                padded += inputs["input_ids"].numel()
            sync(device)
            seconds += time.perf_counter() - t0
        return real, padded, seconds

    return run_repeats(args, device, one_repeat, barrier)


def hf_base_worker(args, jobs: list[int]) -> dict:
    """transformers' frozen base alone: forward + backward over the same fused rows as base-only,
    on equal work: the output layer and the loss on the labelled positions only, as ours computes
    them (transformers' logits_to_keep: the positions any row labels, each row's own masked)."""
    import transformers
    device = "cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    hf = transformers.AutoModelForCausalLM.from_pretrained(args.base, dtype=getattr(torch, args.dtype)).to(device)
    hf.requires_grad_(False)
    hf.train()
    # Backward through the frozen layers needs an input that requires grad (as base-only's).
    hf.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    work = [job_batches(args, j, hf.config.vocab_size) for j in jobs]

    def one_repeat():
        real = padded = 0
        sync(device)
        t0 = time.perf_counter()
        for s in range(args.steps):
            rows = [(r, p) for job in work for r, p in zip(*job[s])]
            # Padded as data.fuse pads; right padding needs no mask under causal attention.
            inputs = hf_inputs([r for r, _ in rows], [p for _, p in rows], packed=False, multiple_of=8)
            labels = inputs.pop("labels").to(device)
            labelled = (labels[:, 1:] != -100).any(0).nonzero().squeeze(1)   # positions t predicting t + 1
            logits = hf(**{k: v.to(device) for k, v in inputs.items() if v is not None}, use_cache=False,
                        logits_to_keep=labelled).logits                     # [B, kept, V]
            torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels[:, labelled + 1].flatten(),
                                              ignore_index=-100).backward()
            real += sum(len(r) for r, _ in rows)
            padded += inputs["input_ids"].numel()
        sync(device)
        return real, padded, time.perf_counter() - t0

    return run_repeats(args, device, one_repeat)


def run_repeats(args, device, one_repeat, barrier=None) -> dict:
    """Warm-up once, then --repeats timed repeats; one_repeat returns (tokens, padded, seconds)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    one_repeat()  # warm-up: allocator, kernels, lazy init
    times, sampler = [], GPUSampler(device)
    with sampler:
        for _ in range(args.repeats):
            if barrier is not None:
                barrier.wait()  # concurrent processes start each repeat together
            real, padded, seconds = one_repeat()
            times.append(seconds)
    return {"times": times, "tokens": real, "padded_tokens": padded, "peak_mb": scheduler.peak_memory(device),
            "gpu_util": sampler.mean}


def run_worker(kind: str, args, jobs: list[int], barrier=None) -> dict:
    """One worker: "peft" (transformers + PEFT) or one of our systems ("ours", "ours-seq", "base-only")."""
    scheduler.reset_peak_memory(M.resolve_device(args.device))
    if kind in ("peft", "peft-packed"):
        return peft_worker(args, jobs, barrier, packed=kind == "peft-packed")
    if kind == "hf-base-only":
        return hf_base_worker(args, jobs)
    return ours_worker(args, jobs, fused=kind in ("ours", "ours-graphs"), base_only=kind == "base-only",
                       graphed=kind == "ours-graphs")


def _child(kind: str, args, jobs, barrier, queue):
    if args.malloc == "keep":   # every system alike, as train.py's command line does for ours
        scheduler.keep_freed_memory()
    try:
        result = run_worker(kind, args, jobs, barrier)
    except Exception as e:  # report, don't hang the parent
        result = {"error": f"{type(e).__name__}: {e}"}
    queue.put(result)


def run_system(system: str, args, k: int) -> dict:
    """Run one system in fresh process(es); peft-parallel is k concurrent processes.
    With --in-process the same workers run here, one after another."""
    if system == "train-py":
        return train_py_system(args, k)
    parallel = system.startswith("peft-parallel")
    if parallel:
        threads = max(1, (os.cpu_count() or 1) // k) if not torch.cuda.is_available() else None
        child_args = argparse.Namespace(**{**vars(args), "threads": args.threads or threads})
        kind = "peft-packed" if system.endswith("-packed") else "peft"
        workers = [(kind, child_args, [j]) for j in range(k)]
    else:
        kind = {"peft-seq": "peft", "peft-seq-packed": "peft-packed"}.get(system, system)
        workers = [(kind, args, list(range(k)))]
    if args.in_process:  # args, not child_args: the thread count of this process stays as it is
        results = [run_worker(kind, args, jobs) for kind, _, jobs in workers]
    else:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        barrier = ctx.Barrier(k) if parallel else None
        procs = [ctx.Process(target=_child, args=(kind, a, jobs, barrier, queue)) for kind, a, jobs in workers]
        for p in procs:
            p.start()
        results = [queue.get() for _ in procs]
        for p in procs:
            p.join()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"{system}: {errors[0]}")
    # Concurrent processes: a repeat lasts as long as its slowest process; memory adds up.
    times = [max(ts) for ts in zip(*(r["times"] for r in results))]
    utils = [r["gpu_util"] for r in results if r["gpu_util"] is not None]
    return {"times": times, "tokens": sum(r["tokens"] for r in results),
            "padded_tokens": sum(r["padded_tokens"] for r in results),
            "peak_mb": sum(r["peak_mb"] for r in results), "gpu_util": statistics.mean(utils) if utils else None}


def train_py_system(args, k: int) -> dict:
    """`python train.py --config` as a user runs it, once for warm-up (page cache, imports) and then
    --repeats times, each a fresh process on a fresh out_dir: k jobs of --steps optimizer steps of
    --rows text rows (plain template, about --seq tokens each, 40% prompt), fused, packed or not
    as ours, no held-out data. A repeat's time is run.json's total_s (the first step to the
    results: steps, logging, the adapters saved), its tokens run.json's."""
    import subprocess
    import data
    folder = Path(tempfile.mkdtemp(prefix="bench-train-py-"))
    tokenizer = data.load_tokenizer(args.base)
    words = "the a of to and in is it you that he was for on are with as his they be at one have this".split()
    g = torch.Generator().manual_seed(7)

    def text(tokens: int) -> str:   # words until the tokenizer counts `tokens`
        out = []
        while len(tokenizer.encode(" ".join(out))) < tokens:
            out.append(words[int(torch.randint(len(words), (), generator=g))])
        return " ".join(out)
    seq = 128 if args.seq == "alpaca" else int(args.seq)
    targets = args.targets.split(",")
    jobs = []
    for j in range(k):
        rows = [{"instruction": text(int(seq * 0.4)), "output": text(seq - int(seq * 0.4) - 1)}
                for _ in range(args.rows * args.steps)]
        (folder / f"job{j}.json").write_text(json.dumps(rows))
        jobs.append({"name": f"job{j}", "data": str(folder / f"job{j}.json"), "template": "plain",
                     "cutoff_len": seq + 8, "r": args.r, "alpha": 2 * args.r, "dropout": args.dropout,
                     "targets": targets, "lr": 1e-4, "batch_size": args.rows, "micro_batch_size": args.rows,
                     "epochs": 1})
    cfg = {"base_model": str(args.base), "dtype": args.dtype, "device": args.device, "packing": args.packing,
           "activation_checkpointing": args.checkpointing, "show_examples": 0, "jobs": jobs,
           "scheduler": {"strategy": "trivial", "max_candidates": k, "max_concurrent": k}}
    times, tokens, padded, peak = [], 0, 0, 0.0
    for repeat in range(args.repeats + 1):
        cfg["out_dir"] = str(folder / f"out{repeat}")
        (folder / "cfg.json").write_text(json.dumps(cfg))
        subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "train.py"), "--config",
                        str(folder / "cfg.json")], check=True, capture_output=True, text=True)
        result = json.loads((folder / f"out{repeat}" / "run.json").read_text())
        if repeat:
            times.append(result["total_s"])
            tokens, padded, peak = result["tokens"], result["padded_tokens"], max(peak, result["peak_mem_mb"])
    return {"times": times, "tokens": tokens, "padded_tokens": padded, "peak_mb": peak, "gpu_util": None}


# ----------------------------------------------------------------------------- report

def record(system: str, args, k: int, raw: dict, device: str) -> dict:
    latency = statistics.median(raw["times"])
    return {"system": system, "k": k, "rows": args.rows, "seq": args.seq, "steps": args.steps, "r": args.r,
            "dtype": args.dtype, "quant": args.quant, "device": device, "tokens": raw["tokens"],
            "latency_s": latency, "latency_spread_s": [min(raw["times"]), max(raw["times"])],
            "repeats": len(raw["times"]),
            "tokens_per_s": raw["tokens"] / latency, "peak_mem_mb": raw["peak_mb"],
            "padding_fraction": 1 - raw["tokens"] / raw["padded_tokens"], "gpu_util": raw["gpu_util"]}


def ratios(records: list[dict]) -> list[dict]:
    """ours / each other system, in the same run and workload; memory of k jobs / 1 job."""
    out = []
    key = lambda r: (r["rows"], r["seq"], r["dtype"], r["quant"])
    for rec in records:
        if rec["system"] != "ours":
            continue
        same = {r["system"]: r for r in records if key(r) == key(rec) and r["k"] == rec["k"]}
        row = {"k": rec["k"], "rows": rec["rows"], "seq": rec["seq"], "dtype": rec["dtype"], "quant": rec["quant"]}
        for other in ("peft-seq", "peft-seq-packed", "peft-parallel", "peft-parallel-packed", "ours-seq", "base-only"):
            if other in same and "train-py" in same:   # python train.py itself against the same system
                row[f"train-py/{other}"] = same["train-py"]["tokens_per_s"] / same[other]["tokens_per_s"]
            if other in same:
                row[f"ours/{other}"] = rec["tokens_per_s"] / same[other]["tokens_per_s"]
            if other in same and "ours-graphs" in same:
                row[f"graphs/{other}"] = same["ours-graphs"]["tokens_per_s"] / same[other]["tokens_per_s"]
        if "ours-graphs" in same:
            row["graphs/ours"] = same["ours-graphs"]["tokens_per_s"] / rec["tokens_per_s"]
        if "train-py" in same:   # a whole `python train.py` run against bench's ours, its step
            row["train-py/ours"] = same["train-py"]["tokens_per_s"] / rec["tokens_per_s"]
        if "base-only" in same and "hf-base-only" in same:
            row["base/hf-base"] = same["base-only"]["tokens_per_s"] / same["hf-base-only"]["tokens_per_s"]
        one = [r for r in records if key(r) == key(rec) and r["system"] == "ours" and r["k"] == 1]
        if one:
            row["mem_k/mem_1"] = rec["peak_mem_mb"] / one[0]["peak_mem_mb"]
        out.append(row)
    return out


def print_tables(records, ratio_rows, title):
    print(f"\n{title}\n")
    print("| workload | system | k | tokens | latency s (min-max) | tokens/s | peak MiB | padding | GPU util |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in records:
        util = f"{r['gpu_util']:.0f}%" if r["gpu_util"] is not None else "-"
        print(f"| {r['rows']}x{r['seq']} {r['dtype']}{' ' + r['quant'] if r['quant'] else ''} | {r['system']} | {r['k']} "
              f"| {r['tokens']} | {r['latency_s']:.2f} ({r['latency_spread_s'][0]:.2f}-{r['latency_spread_s'][1]:.2f}) "
              f"| {r['tokens_per_s']:.0f} | {r['peak_mem_mb']:.0f} | {100 * r['padding_fraction']:.1f}% | {util} |")
    if ratio_rows:
        cols = [c for c in ("ours/peft-seq", "ours/peft-seq-packed", "ours/peft-parallel", "ours/peft-parallel-packed",
                            "ours/ours-seq", "ours/base-only", "base/hf-base", "mem_k/mem_1", "graphs/ours",
                            "graphs/peft-seq", "graphs/peft-seq-packed", "graphs/peft-parallel",
                            "graphs/peft-parallel-packed", "train-py/ours", "train-py/peft-seq", "train-py/peft-seq-packed",
                            "train-py/peft-parallel", "train-py/base-only")
                if any(c in r for r in ratio_rows)]
        print(f"\n| workload | k | {' | '.join(cols)} |")
        print("|---|---|" + "---|" * len(cols))
        for r in ratio_rows:
            cells = " | ".join(f"{r[c]:.2f}" if c in r else "-" for c in cols)
            print(f"| {r['rows']}x{r['seq']} {r['dtype']}{' ' + r['quant'] if r['quant'] else ''} | {r['k']} | {cells} |")


def plot(records, png: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    workloads = sorted({(r["rows"], r["seq"], r["dtype"], r["quant"] or "") for r in records}, key=str)
    for w in workloads:
        for system in SYSTEMS:
            pts = sorted((r["k"], r["tokens_per_s"], r["peak_mem_mb"]) for r in records
                         if r["system"] == system and (r["rows"], r["seq"], r["dtype"], r["quant"] or "") == w)
            if pts:
                label = f"{system} {w[0]}x{w[1]} {w[2]} {w[3]}".strip()
                ax1.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
                ax2.plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=label)
    ax1.set(xlabel="jobs k", ylabel="tokens/s", title="throughput")
    ax2.set(xlabel="jobs k", ylabel="peak MiB", title="peak memory")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def strategies_scenario(args) -> list[dict]:
    """The seed's batching-strategy experiment: four jobs whose data have different length
    distributions, the same hyperparameters, trained by train.py under Seq (one job at a
    time), trivial, optimal-fit and fast-fit. Reports the seed's table columns."""
    import random
    import train
    folder = Path(tempfile.mkdtemp(prefix="bench-strategies-"))
    rng = random.Random(0)
    words = "apple river stone cloud green quick house music light paper ocean tiger moon garden".split()
    spreads = {"short": (6, 3), "medium": (25, 8), "long": (60, 15), "mixed": (35, 30)}  # words: mean, sd
    jobs = []
    for name, (mean, sd) in spreads.items():
        rows = []
        for _ in range(args.scenario_rows):
            n = max(2, int(rng.gauss(mean, sd)))
            text = " ".join(rng.choice(words) for _ in range(n))
            rows.append({"instruction": "Repeat the words.", "input": text, "output": text})
        (folder / f"{name}.json").write_text(json.dumps(rows))
        jobs.append({"name": name, "data": str(folder / f"{name}.json"), "r": 8, "alpha": 16, "dropout": 0.05,
                     "targets": ["q_proj", "v_proj"], "lr": 3e-4, "batch_size": 8, "micro_batch_size": 4,
                     "epochs": 1, "cutoff_len": 256, "group_by_length": True})
    variants = {"Seq": {"strategy": "trivial", "max_candidates": 1, "max_concurrent": 1},
                "trivial": {"strategy": "trivial", "max_candidates": 4, "max_concurrent": 2},
                "optimal-fit": {"strategy": "optimal-fit", "max_candidates": 4, "max_concurrent": 2},
                "fast-fit": {"strategy": "fast-fit", "max_candidates": 4, "max_concurrent": 4,
                             "token_budget": args.token_budget}}
    device = "cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    results = []
    for variant, sched in variants.items():
        raw = {"base_model": args.base, "dtype": args.dtype, "device": args.device, "seed": 42,
               "out_dir": str(folder / variant), "scheduler": sched, "jobs": jobs}
        (folder / f"{variant}.json").write_text(json.dumps(raw))
        cfg = train.load_config(str(folder / f"{variant}.json"), [])
        with GPUSampler(device) as sampler:
            summary = train.train(cfg)
        run = json.loads((folder / variant / "run.json").read_text())
        results.append({"variant": variant, "job_latency_s": {n: s["finish_s"] for n, s in summary.items()},
                        "total_s": run["total_s"], "peak_mem_mb": run["peak_mem_mb"], "gpu_util": sampler.mean,
                        "tokens_per_s": run["tokens_per_s"], "padding": run["padding"], "steps": run["steps"]})
    names = list(spreads)
    print(f"\nbatching strategies: {args.base} on {device}, {args.dtype}; 4 jobs x {args.scenario_rows} rows, "
          f"1 epoch, batch 8, micro-batch 4, r=8 on q,v; fast-fit token budget {args.token_budget}\n")
    print(f"| strategy | {' | '.join(f'{n} job s' for n in names)} | total s | peak MiB | GPU util "
          f"| tokens/s | padding | steps |")
    print("|---|" + "---|" * (len(names) + 6))
    for r in results:
        util = f"{r['gpu_util']:.0f}%" if r["gpu_util"] is not None else "-"
        jobs_s = " | ".join(f"{r['job_latency_s'][n]:.1f}" for n in names)
        print(f"| {r['variant']} | {jobs_s} "
              f"| {r['total_s']:.1f} | {r['peak_mem_mb']:.0f} | {util} | {r['tokens_per_s']:.0f} "
              f"| {100 * r['padding']:.1f}% | {r['steps']} |")
    return results


def step_activation_peak(step) -> float:
    """Peak MiB of CPU tensors allocated during step() above what was allocated before it,
    from torch.profiler's memory accounting at operator boundaries (a tensor-level measure:
    no allocator caching or RSS noise; a temporary inside one operator is not seen)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    for event in sorted((e for e in prof.events() if e.cpu_parent is None), key=lambda e: e.time_range.start):
        live += event.cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


def memory_scenario(args) -> dict:
    """k jobs fused: the step's activation peak without and with activation checkpointing
    (one process, the same batch), then peak RSS of our fused run against k PEFT processes
    (each process its own, summed), like for like: both without checkpointing, both with it."""
    import lora
    import train
    k = int(args.k or 8)
    w = argparse.Namespace(**{**vars(args), "rows": args.rows or 1, "seq": args.seq or "256"})
    device = M.resolve_device(args.device)
    net = M.load_model(args.base, dtype=args.dtype, device=device)
    names = [f"job{j}" for j in range(k)]
    lora.add_adapters(net, {n: lora.LoRAConfig(r=args.r, alpha=2 * args.r, dropout=args.dropout,
                                               targets=args.targets.split(",")) for n in names})
    configs = [train.JobConfig(name=n, data="-") for n in names]
    examples = [make_examples(*job_batches(w, j, net.config.vocab_size)[0]) for j in range(k)]
    peaks = {}
    for checkpointing in (False, True, False, True):   # the second pair: the first warmed up
        net.checkpoint_blocks = checkpointing
        generators = {n: torch.Generator().manual_seed(i) for i, n in enumerate(names)}
        peaks[checkpointing] = step_activation_peak(lambda: train.fused_step(
            net, configs, examples, [1000] * k, generators, 0, device, args.packing))
        net.zero_grad(set_to_none=True)
    del net
    # Like for like: each side's peak RSS with checkpointing off, then on (ours one process, PEFT k).
    rss = {(system, on): run_system(system, argparse.Namespace(**{**vars(w), "checkpointing": on}), k)["peak_mb"]
           for on in (False, True) for system in ("ours", "peft-parallel")}
    result = {"k": k, "rows": w.rows, "seq": w.seq, "activation_peak_mb": peaks[False],
              "activation_peak_checkpointed_mb": peaks[True], "activation_cut": peaks[False] / peaks[True],
              **{f"{'ours' if s == 'ours' else 'peft_parallel'}_{'checkpointed' if on else 'plain'}_peak_rss_mb": mb
                 for (s, on), mb in rss.items()},
              "ours_over_peft_memory_plain": rss["ours", False] / rss["peft-parallel", False],
              "ours_over_peft_memory_checkpointed": rss["ours", True] / rss["peft-parallel", True]}
    print(f"\nmemory: {k} jobs x {w.rows}x{w.seq} tokens, r={args.r} on {args.targets}, {args.dtype}\n")
    print("| measure | value |\n|---|---|")
    print(f"| fused step's activation peak (tensors), no checkpointing | {peaks[False]:.0f} MiB |")
    print(f"| the same with activation checkpointing | {peaks[True]:.0f} MiB |")
    print(f"| checkpointing cuts the activation peak by | {result['activation_cut']:.2f}x |")
    for on in (False, True):
        how = "with activation checkpointing" if on else "without checkpointing"
        print(f"| ours fused, {how}, peak RSS | {rss['ours', on]:.0f} MiB |")
        print(f"| {k} PEFT processes, {how}, peak RSS summed | {rss['peft-parallel', on]:.0f} MiB |")
        print(f"| ours / PEFT processes, {how} | {rss['ours', on] / rss['peft-parallel', on]:.2f} |")
    return result


def ranks_scenario(args) -> list[dict]:
    """train.py on one process and on 2 ranks under torchrun (gloo on the CPU; NCCL with GPUs):
    the same config, four jobs of ragged rows, run as a user runs it (fresh processes, one after
    another, each alone). Tokens/s are run.json's (tokens through the forward / the training
    loop's seconds). Scaling efficiency: N ranks' tokens/s over N x one rank's at the same
    threads per rank; and against one process using every core, the machine's best single run."""
    import random
    import subprocess
    import sys
    folder = Path(tempfile.mkdtemp(prefix="bench-ranks-"))
    rng = random.Random(0)
    words = "apple river stone cloud green quick house music light paper ocean tiger moon garden".split()
    jobs = []
    for j in range(4):
        rows = []
        for _ in range(args.scenario_rows):
            text = " ".join(rng.choice(words) for _ in range(max(4, int(rng.gauss(40, 15)))))
            rows.append({"instruction": "Repeat the words.", "input": text, "output": text})
        (folder / f"job{j}.json").write_text(json.dumps(rows))
        jobs.append({"name": f"job{j}", "data": str(folder / f"job{j}.json"), "r": args.r, "alpha": 2 * args.r,
                     "dropout": args.dropout, "targets": args.targets.split(","), "lr": 3e-4, "batch_size": 8,
                     "micro_batch_size": 8, "epochs": 1, "cutoff_len": 256})
    gpus = torch.cuda.device_count() if args.device in ("auto", "cuda") else 0
    cores = os.cpu_count() or 1
    if gpus:   # one process per GPU
        variants = [(f"{n} GPU{'s' if n > 1 else ''}, {placement}", n, None, placement)
                    for n in (1, 2, 4) if n <= gpus for placement in (("data", "job") if n > 1 else ("data",))]
    else:
        variants = [(f"1 process, {cores} threads", 1, cores, "data"), ("1 process, 1 thread", 1, 1, "data")]
        variants += [(f"{n} ranks x 1 thread, {placement}", n, 1, placement)
                     for n in (2,) for placement in ("data", "job")]
    results = []
    for label, ranks, threads, placement in variants:
        out = folder / label.replace(" ", "_").replace(",", "")
        raw = {"base_model": args.base, "dtype": args.dtype, "device": args.device, "seed": 42, "out_dir": str(out),
               "checkpoint_every": 0, "scheduler": {"strategy": "trivial", "max_candidates": 4, "max_concurrent": 4,
                                                    "placement": placement}, "jobs": jobs}
        config = out.with_suffix(".json")
        config.write_text(json.dumps(raw))
        train_py = str(Path(__file__).resolve().parent / "train.py")
        command = ([sys.executable, train_py] if ranks == 1 else
                   [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", train_py])
        env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        t0 = time.time()
        done = subprocess.run(command + ["--config", str(config)], env=env, capture_output=True, text=True)
        wall = time.time() - t0
        if done.returncode != 0:
            raise RuntimeError(f"{label}: train.py exited {done.returncode}: {done.stderr[-2000:]}")
        run = json.loads((out / "run.json").read_text())
        results.append({"variant": label, "ranks": ranks, "threads_per_rank": threads, "placement": placement,
                        "tokens": run["tokens"], "train_s": run["total_s"], "wall_s": wall,
                        "tokens_per_s": run["tokens_per_s"], "peak_mem_mb": run["peak_mem_mb"]})
        print(f"  {label}: {run['tokens_per_s']:.0f} tokens/s ({run['total_s']:.1f} s training, {wall:.1f} s wall)",
              flush=True)
    single = next(r for r in results if r["ranks"] == 1 and r["threads_per_rank"] in (1, None))
    best_single = max((r for r in results if r["ranks"] == 1), key=lambda r: r["tokens_per_s"])
    for r in results:
        r["scaling_efficiency"] = r["tokens_per_s"] / (r["ranks"] * single["tokens_per_s"])
        r["vs_best_single_process"] = r["tokens_per_s"] / best_single["tokens_per_s"]
    print(f"\nranks: {args.base}, {args.dtype}, {'GPUs' if gpus else f'{cores} CPU cores'}; 4 jobs x "
          f"{args.scenario_rows} rows (ragged, ~40 words), 1 epoch, batch 8, r={args.r} on {args.targets}\n")
    print("| variant | tokens | training s | tokens/s | scaling efficiency | vs best single process | peak MiB (rank 0) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['tokens']} | {r['train_s']:.1f} | {r['tokens_per_s']:.0f} "
              f"| {r['scaling_efficiency']:.2f} | {r['vs_best_single_process']:.2f} | {r['peak_mem_mb']:.0f} |")
    return results


def eval_scenario(args) -> dict:
    """k adapters evaluated on the shipped lm-eval tasks (tasks/), end to end as a user runs it,
    model loads included: eval.py once for all of them (one fused pass) against lm-eval's own `hf`
    model with `peft=`, run once per adapter (each run loading the base again), at the same batch
    size. The adapters are random (B drawn, r = --r on --targets), saved as PEFT folders; every
    adapter's metrics must agree between the two, or the scenario fails."""
    import subprocess
    import lora
    import peft_format
    k, tasks = int(args.k or 4), args.eval_tasks
    folder = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    net = M.load_model(args.base, dtype="float32")
    configs = {f"adapter{i}": lora.LoRAConfig(r=args.r, alpha=2 * args.r, targets=args.targets.split(","))
               for i in range(k)}
    lora.add_adapters(net, configs)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora.lora_layers(net):
            for adapter in layer.adapters.values():
                adapter.lora_B.weight.copy_(torch.randn(adapter.lora_B.weight.shape, generator=g) * 0.02)
    adapters = [folder / name for name in configs]
    for name, path in zip(configs, adapters):
        peft_format.save_peft(net, name, path, base_model_path=args.base)
    del net
    include = str(Path(__file__).resolve().parent / "tasks")
    common = ["--tasks", tasks, "--include_path", include, "--batch_size", str(args.eval_batch_size)]
    limit = ["--limit", str(args.eval_limit)] if args.eval_limit else []
    threads = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}

    def timed(command: list[str]) -> float:
        t0 = time.perf_counter()
        subprocess.run(command, check=True, env=threads, stdout=subprocess.DEVNULL)
        return time.perf_counter() - t0

    ours_json = folder / "ours.json"
    ours_s = timed([sys.executable, str(Path(__file__).resolve().parent / "eval.py"), "--base", args.base, "--no_base",
                    "--dtype", "float32", "--device", "cpu", "--out", str(ours_json), *common, *limit,
                    *[x for a in adapters for x in ("--adapter", str(a))]])
    ours = json.loads(ours_json.read_text())
    lm_eval_s, agree = [], True
    for name, path in zip(configs, adapters):
        out = folder / f"lm-eval-{name}"
        lm_eval_s.append(timed([sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
                                f"pretrained={args.base},peft={path},dtype=float32", "--device", "cpu",
                                "--output_path", str(out), *common, *limit]))
        theirs = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
        for task, metrics in theirs.items():
            for key, value in metrics.items():
                if isinstance(value, float) and "stderr" not in key:
                    agree &= abs(ours[name]["results"][task][key] - value) < 1e-9
    result = {"adapters": k, "tasks": tasks, "batch_size": args.eval_batch_size, "limit": args.eval_limit,
              "ours_s": ours_s, "lm_eval_hf_peft_s": lm_eval_s, "ratio": sum(lm_eval_s) / ours_s,
              "metrics_equal": agree, "ours_results": {n: r["results"] for n, r in ours.items()}}
    print(f"{k} adapters on {tasks} (batch size {args.eval_batch_size}{f', limit {args.eval_limit}' if args.eval_limit else ''}): "
          f"eval.py once {ours_s:.1f} s; lm-eval hf+peft once per adapter {' + '.join(f'{t:.1f}' for t in lm_eval_s)} "
          f"= {sum(lm_eval_s):.1f} s; ratio {result['ratio']:.2f}x; every metric equal: {agree}")
    if not agree:
        raise SystemExit("eval scenario: the two disagree on a metric (see the JSON)")
    return result


def ensure_base(args) -> str:
    """A checkpoint folder for every system: --base, the demo's SmolLM2, or random weights."""
    if args.base:
        return args.base
    if not args.tiny and not args.shape and (DEFAULT_BASE / "config.json").exists():
        return str(DEFAULT_BASE)
    import transformers
    shape = "tiny" if args.tiny else (args.shape or "smollm2-135m")
    folder = Path(tempfile.gettempdir()) / f"bench-random-{shape}"
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPES[shape], max_position_embeddings=2048))
        hf.save_pretrained(folder)
    return str(folder)


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="checkpoint folder (default: the demo's SmolLM2, else random weights)")
    p.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape")
    p.add_argument("--tiny", action="store_true", help="a tiny random model (for tests)")
    p.add_argument("--quick", action="store_true", help="one workload (k=4): under 5 minutes on 2 CPU cores")
    p.add_argument("--k", default=None, help="comma list of job counts (default 1,2,4,8; quick: 4)")
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS), help=f"comma list of: {', '.join(SYSTEMS)}")
    p.add_argument("--rows", type=int, default=None, help="micro-batch rows per job")
    p.add_argument("--seq", default=None, help="tokens per row, or 'alpaca' for a length distribution")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per job per repeat")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the systems this many times, in turn (every other round in reverse order), each "
                        "time in fresh processes with --repeats repeats: drift of the machine's speed over "
                        "minutes then falls on every system alike")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quant", default=None, help="nf4 / fp4 base (QLoRA)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing in every system (ours; transformers' gradient checkpointing)")
    p.add_argument("--malloc", choices=["keep", "default"], default="keep",
                   help="keep: every worker process keeps freed memory (scheduler.keep_freed_memory, as train.py "
                        "does); default: glibc's own settings")
    p.add_argument("--no-packing", dest="packing", action="store_false",
                   help="our systems fuse padded rows instead of packing the examples end to end")
    p.add_argument("--in-process", action="store_true",
                   help="run every system in this process, one after another (tests: the same work in seconds; "
                        "memory and peft-parallel's speed are not comparable)")
    p.add_argument("--out", default="bench.json")
    p.add_argument("--eval-tasks", default="arc_tiny,boolq_tiny,qa_tiny", help="eval scenario: lm-eval tasks (tasks/)")
    p.add_argument("--eval-batch-size", type=int, default=8, help="eval scenario: both sides' batch size")
    p.add_argument("--eval-limit", type=int, default=None, help="eval scenario: documents a task")
    p.add_argument("--scenario", choices=["systems", "strategies", "memory", "ranks", "eval"], default="systems",
                   help="strategies: the seed's batching-strategy table (needs a base with a tokenizer)")
    p.add_argument("--scenario-rows", type=int, default=32, help="rows per job in the strategies scenario")
    p.add_argument("--token-budget", type=int, default=1024, help="fast-fit's rows x padded length per step")
    args = p.parse_args(argv)
    args.base = ensure_base(args)
    if args.scenario == "strategies":
        results = strategies_scenario(args)
        Path(args.out).write_text(json.dumps({"strategies": results}, indent=2) + "\n")
        return results, []
    if args.scenario == "ranks":
        results = ranks_scenario(args)
        Path(args.out).write_text(json.dumps({"ranks": results}, indent=2) + "\n")
        return results, []
    if args.scenario == "eval":
        result = eval_scenario(args)
        Path(args.out).write_text(json.dumps({"eval": result}, indent=2) + "\n")
        return result, []
    if args.scenario == "memory":
        result = memory_scenario(args)
        Path(args.out).write_text(json.dumps({"memory": result}, indent=2) + "\n")
        return result, []
    device = "cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    ks = [int(k) for k in args.k.split(",")] if args.k else ([2] if args.tiny else [4] if args.quick else None)
    if args.quick or args.rows or args.seq:
        workloads = [(args.rows or 1, args.seq or "64", ks or [1, 2, 4, 8])]
    else:  # the full run: the k sweep where per-step overhead dominates, then bigger and ragged rows
        workloads = [(1, "64", ks or [1, 2, 4, 8]), (2, "256", ks or [4]), (2, "alpaca", ks or [4])]
    systems = args.systems.split(",")
    records, t0 = [], time.time()
    for rows, seq, ks in workloads:
        w = argparse.Namespace(**{**vars(args), "rows": rows, "seq": seq})
        for k in ks:
            raws = {}
            for r in range(args.rounds):
                for system in systems if r % 2 == 0 else systems[::-1]:
                    raw = run_system(system, w, k)
                    print(f"  {system:<14} k={k} {rows}x{seq}: {record(system, w, k, raw, device)['tokens_per_s']:.0f} "
                          f"tokens/s, {raw['peak_mb']:.0f} MiB", flush=True)
                    if system in raws:   # the repeats of all rounds together; the highest memory peak
                        raw = {**raw, "times": raws[system]["times"] + raw["times"],
                               "peak_mb": max(raws[system]["peak_mb"], raw["peak_mb"])}
                    raws[system] = raw
            records += [record(system, w, k, raws[system], device) for system in systems]
    ratio_rows = ratios(records)
    title = (f"{args.base} on {device} ({torch.get_num_threads()} threads), {args.dtype}"
             f"{', ' + args.quant if args.quant else ''}; r={args.r} on {args.targets}; {args.steps} steps per job "
             f"per repeat, median of {args.repeats * args.rounds} repeats after a warm-up"
             f"{f' ({args.rounds} rounds of {args.repeats})' if args.rounds > 1 else ''}; {time.time() - t0:.0f}s in all"
             f"{'; ours with activation checkpointing' if args.checkpointing else ''}"
             f"{'; glibc malloc defaults' if args.malloc == 'default' else ''}"
             f"{'; ours packed (no padding)' if args.packing else '; ours on padded rows'}"
             f"{'; in-process: memory and peft-parallel not comparable' if args.in_process else ''}")
    print_tables(records, ratio_rows, title)
    Path(args.out).write_text(json.dumps({"title": title, "records": records, "ratios": ratio_rows}, indent=2) + "\n")
    plot(records, Path(args.out).with_suffix(".png"))
    return records, ratio_rows


if __name__ == "__main__":
    main()
