"""The step-level API's two measurements of issue 33, on localhost: serve.py in its own process
(--api_nice 0) and this script as 4 clients, each its own LoRA (the demo's 4 jobs' LoRA settings)
running `--steps` steps of SFT on its demo data set (a batch of `--rows` rows through the chat
template, forward_backward with cross_entropy, then optim_step), timed after `--warmup` steps:

  (a) the 4 clients at once (threads: the server fuses their calls that wait together),
  (b) the same 4 one after another (each alone on the server);
  throughput = tokens trained (each datum's tokens) per second; the ratio (a) / (b).

Which calls shared a forward_backward pass is read from the client side: calls answered by one
pass come back together (their answer times within --gap_ms), passes are hundreds of ms apart.
Then the server is stopped and the same 4 LoRAs' steps run in THIS process: one fused
stepapi.Engine.forward_backward and 4 optim_steps per step, against the time per step of (a)
(the time between the moments all 4 clients have finished a step, median): the API's overhead.
The in-process steps run from the main thread, then again from a thread of their own, as the
service's trainer thread runs them (on 2 CPU cores that alone cost ~25 %).

    python scripts/step_api_bench.py [--base DIR] [--steps 6] [--rows 4] [--warmup 1] [--dtype auto --device auto]
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data       # noqa: E402
import serve      # noqa: E402
import stepclient  # noqa: E402

DATASETS = ["french", "json", "signoff", "reverse"]   # the demo's jobs, in demo/config.json's order
LR = 1e-4


def lora_configs() -> list[dict]:
    """The demo's 4 jobs' LoRA settings (demo/config.json), each with its own seed."""
    jobs = {job["name"]: job for job in json.loads((ROOT / "demo" / "config.json").read_text())["jobs"]}
    return [{key: jobs[name][key] for key in ("r", "alpha", "dropout", "targets")} | {"seed": i}
            for i, name in enumerate(DATASETS)]


def client_batches(tokenizer, rows: int, steps: int) -> list[list[dict]]:
    """[client][step]: `rows` rows of the client's demo data set as datums: the chat template's
    tokens (data.load_job_data), targets shifted by one, weight 1 / (the batch's answer tokens)
    on answer tokens (a token-mean NLL, as training's), 0 on the prompt."""
    out = []
    for name in DATASETS:
        examples = data.load_job_data(ROOT / "demo" / f"{name}.json", tokenizer, "chat")
        steps_of_client = []
        for step in range(steps):
            batch = [examples[(step * rows + j) % len(examples)] for j in range(rows)]
            answer_tokens = sum(label != data.IGNORE_INDEX for ex in batch for label in ex.labels[1:])
            steps_of_client.append([{"tokens": ex.input_ids[:-1], "targets": ex.input_ids[1:],
                                     "weights": [float(label != data.IGNORE_INDEX) / answer_tokens for label in ex.labels[1:]]}
                                    for ex in batch])
        out.append(steps_of_client)
    return out


def tokens_of(batch: list[dict]) -> int:
    return sum(len(d["tokens"]) for d in batch)


def start_server(args, out: Path, token: str) -> tuple[subprocess.Popen, str]:
    """serve.py on a free port (as scripts/serve_load.py starts it); returns once /v1/health answers."""
    sock = serve.bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    server = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--base_model", args.base, "--out_dir", str(out),
                               "--port", str(port), "--dtype", args.dtype, "--device", args.device, "--api_nice", "0"],
                              env={**os.environ, "SERVE_TOKEN": token})
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(url + "/v1/health", timeout=5) as response:
                if response.status == 200:
                    return server, url
        except OSError:
            pass
        assert time.time() < deadline and server.poll() is None, "the server did not start"
        time.sleep(0.2)


def run_steps(lora, batches: list[list[dict]], answered: list[float]) -> list[float]:
    """A client's steps: forward_backward and optim_step queued together, then waited for; the
    time each forward_backward was answered appended to `answered`; returns each step's end time."""
    ends = []
    for batch in batches:
        fb = lora.forward_backward(batch, "cross_entropy")
        fb.add_done_callback(lambda _: answered.append(time.perf_counter()))
        lora.optim_step(lr=LR).result()
        fb.result()
        ends.append(time.perf_counter())
    return ends


def concurrent(loras, batches, first: int, steps: int) -> tuple[float, list[list[float]], list[float], float]:
    """(a): every client's steps [first, first + steps) at once, one thread each. Returns (start,
    [client][step] end times, the answer times of the forward_backward calls, wall seconds)."""
    ends, answered = [None] * len(loras), []

    def client(i: int):
        ends[i] = run_steps(loras[i], batches[i][first:first + steps], answered)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(loras))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return start, ends, answered, time.perf_counter() - start


def passes(answered: list[float], gap_s: float) -> list[int]:
    """How many calls each forward_backward pass answered, read from the answer times: a pass's
    calls come back within gap_s of each other."""
    sizes, last = [], None
    for t in sorted(answered):
        if last is None or t - last > gap_s:
            sizes.append(0)
        sizes[-1] += 1
        last = t
    return sizes


def step_times(start: float, ends: list[list[float]]) -> list[float]:
    """The time between the moments every client had finished step k - 1 and step k."""
    done = [max(client[k] for client in ends) for k in range(len(ends[0]))]
    return [b - a for a, b in zip([start] + done[:-1], done)]


def in_process(args, batches, first: int, steps: int) -> tuple[list[float], list[float]]:
    """The same 4 LoRAs' steps in this process, the base loaded as the service loads it
    (jobs.load_base) into a stepapi.Engine as the service's: per step ONE forward_backward of
    the 4 calls and the 4 optim_steps; `first` steps warm up. Returns the timed steps' seconds
    run from the main thread (as serve.py's trainer process runs them), then from a thread of
    their own (as an in-process service.Service's trainer thread does: on CPUs that alone was
    seen to cost ~20-30 %, torch's OpenMP threads; benchmarks.md)."""
    import jobs
    import model as M
    import stepapi
    from config import RunConfig
    device = M.resolve_device(args.device)
    cfg = RunConfig(base_model=args.base, dtype=args.dtype, device=device)
    engine = stepapi.Engine(jobs.load_base(cfg, device), data.load_tokenizer(args.base), device, cfg.seed, prefix="_lora-")
    ids = [engine.create_lora(config) for config in lora_configs()]
    main_thread = engine_steps(engine, ids, batches, first, steps, device)
    in_thread = []
    worker = threading.Thread(target=lambda: in_thread.extend(engine_steps(engine, ids, batches, first, steps, device)))
    worker.start()
    worker.join()
    return main_thread, in_thread


def engine_steps(engine, ids: list[str], batches, first: int, steps: int, device: str) -> list[float]:
    """Steps [0, first + steps) on the engine; the seconds of those from `first` on."""
    import torch
    import stepapi
    times = []
    for step in range(first + steps):
        calls = [stepapi.Call(lora_id, [stepapi.Datum(**d) for d in batches[c][step]]) for c, lora_id in enumerate(ids)]
        t0 = time.perf_counter()
        engine.forward_backward(calls)
        for lora_id in ids:
            engine.optim_step(lora_id, {"lr": LR})
        if device.startswith("cuda"):
            torch.cuda.synchronize()   # the optimizer steps' kernels done, as the next step would wait for them
        if step >= first:
            times.append(time.perf_counter() - t0)
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=str(ROOT / "checkpoints/smollm2-135m-instruct"))
    p.add_argument("--steps", type=int, default=6, help="timed steps of each client")
    p.add_argument("--rows", type=int, default=4, help="rows in each client's forward_backward")
    p.add_argument("--warmup", type=int, default=1, help="steps of the 4 at once before any timing")
    p.add_argument("--gap_ms", type=float, default=50, help="answers this close belong to one pass")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    first, last = args.warmup, args.warmup + args.steps
    batches = client_batches(data.load_tokenizer(args.base), args.rows, last)
    tokens = sum(tokens_of(b) for client in batches for b in client[first:])
    out, token = Path(tempfile.mkdtemp(prefix="step-api-bench-")) / "out", "bench-token"
    server, url = start_server(args, out, token)
    try:
        service = stepclient.ServiceClient(url, token)
        loras = [service.create_lora(**config) for config in lora_configs()]
        concurrent(loras, batches, 0, first)   # warm-up, not timed
        start, ends, answered, wall_a = concurrent(loras, batches, first, args.steps)
        fused = step_times(start, ends)
        alone, alone_answered, t0 = [], [], time.perf_counter()
        for lora, client in zip(loras, batches):   # (b): one after another
            alone.append(step_times(time.perf_counter(), [run_steps(lora, client[first:last], alone_answered)]))
        wall_b = time.perf_counter() - t0
    finally:
        server.send_signal(signal.SIGINT)   # as Ctrl-C: the server stops cleanly
        server.wait(120)
    local = in_process(args, batches, first, args.steps)
    report(args, tokens, wall_a, wall_b, fused, local, passes(answered, args.gap_ms / 1000),
           passes(alone_answered, args.gap_ms / 1000), alone)


def report(args, tokens, wall_a, wall_b, fused, local, passes_a, passes_b, alone):
    """The figures, one line each."""
    ms = lambda seconds: f"{1000 * seconds:.0f} ms"   # noqa: E731
    per_step_alone = [s for client in alone for s in client]
    import model as M
    device = M.resolve_device(args.device)
    dtype = str(M.resolve_dtype(args.dtype, device)).removeprefix("torch.")
    print(f"{args.base} ({dtype}, {device}); 4 LoRAs (the demo's 4 jobs' settings), {args.steps} timed steps "
          f"of {args.rows} rows each after {args.warmup} warm-up; {tokens} tokens trained in each of (a) and (b)")
    print(f"(a) 4 clients at once:        {wall_a:.2f} s, {tokens / wall_a:.0f} tokens/s; calls per forward_backward pass "
          f"(from answer times): {passes_a}")
    print(f"(b) one after another:        {wall_b:.2f} s, {tokens / wall_b:.0f} tokens/s; calls per pass: "
          f"{sorted(set(passes_b))} ({len(passes_b)} passes); a client's step alone: median {ms(statistics.median(per_step_alone))}")
    print(f"throughput (a) / (b): {wall_b / wall_a:.3f}")
    (local, local_thread), server = local, statistics.median(fused)
    here, thread = statistics.median(local), statistics.median(local_thread)
    print(f"a fused step of the 4 through the server (a): median {ms(server)} (steps: {', '.join(ms(s) for s in fused)})")
    print(f"the same in process (one Engine.forward_backward + 4 optim_steps), main thread: median {ms(here)} "
          f"(steps: {', '.join(ms(s) for s in local)})")
    print(f"the same in process from a thread of its own (as an in-process Service's trainer): median {ms(thread)} "
          f"(steps: {', '.join(ms(s) for s in local_thread)})")
    print(f"API overhead against the main thread: {1000 * (server - here):+.0f} ms a step ({100 * (server / here - 1):+.1f} %); "
          f"against the thread: {1000 * (server - thread):+.0f} ms ({100 * (server / thread - 1):+.1f} %)")


if __name__ == "__main__":
    main()
