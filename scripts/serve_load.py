"""The service under load (issue 32, item 7), on localhost only, every request loop bounded in
count and time: serve.py in its own process (the trainer in a process of its own, its HTTP side
at --api_nice), one job training alone (max_concurrent 1), and this script as the clients: 20
submit a job each at the same moment (all must be queued, none lost or duplicated), then
`--rate` status requests a second in busy windows of `--steps` fused steps, each followed by an
idle window as long. The training step's time ("ms" of the metrics lines) is compared between
busy and idle windows, medians.

    python scripts/serve_load.py [--base DIR] [--steps 10] [--windows 3] [--clients 20] [--rate 50] [--api_nice 10]
"""
import argparse
import http.client
import os
import subprocess
import json
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import serve  # noqa: E402

WORDS = "apple river stone cloud green small quick house music light paper ocean".split()


def rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"instruction": "Reverse the words.", "input": " ".join(w := rng.sample(WORDS, 6)), "output": " ".join(w[::-1])}
            for _ in range(n)]


class Server:
    """serve.py in a process of its own on a free localhost port, and calls of its API."""

    def __init__(self, base: str, api_nice: int):
        self.out = Path(tempfile.mkdtemp(prefix="serve-load-")) / "out"
        sock = serve.bind("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        sock.close()
        self.token, self.url = "load-test-token", f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--base_model", base, "--out_dir", str(self.out),
                                         "--port", str(self.port), "--max_candidates", "1", "--max_concurrent", "1",
                                         "--dtype", "float32", "--device", "cpu", "--api_nice", str(api_nice)],
                                        env={**os.environ, "SERVE_TOKEN": self.token})
        deadline = time.time() + 120
        while not self.up():
            assert time.time() < deadline and self.process.poll() is None, "the server did not start"
            time.sleep(0.2)

    def up(self) -> bool:
        try:
            return self.call("GET", "/v1/health")[0] == 200
        except OSError:
            return False

    def call(self, method: str, path: str, body=None) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                         headers={"authorization": f"Bearer {self.token}", "content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def steps_after(self, since: int, count: int, deadline: float) -> list[float]:
        """The ms of `count` fused steps of the job `long` after fused step `since`."""
        while True:
            lines = [line for line in self.call("GET", f"/v1/jobs/long/metrics?since={since}")[1]["lines"] if "ms" in line]
            if len(lines) >= count:
                return [line["ms"] for line in lines[:count]]
            assert time.time() < deadline, "the training job stopped stepping"
            time.sleep(0.5)

    def stop(self):
        self.process.terminate()
        self.process.wait(60)


def job(name: str, n: int, seed: int, epochs: int) -> dict:
    return {"name": name, "data": rows(n, seed), "r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"],
            "lr": 1e-4, "batch_size": 4, "micro_batch_size": 4, "epochs": epochs, "template": "alpaca"}


def poll(server: Server, stop: threading.Event, statuses: list, rate: float, workers: int = 5):
    """One client asking for status at rate / workers a second, on one kept-alive connection (as a browser's)."""
    connection, n = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60), 0
    while not stop.is_set() and n < 100_000:
        t0 = time.perf_counter()
        connection.request("GET", "/v1/jobs" if n % 2 else "/v1/jobs/long", headers={"authorization": f"Bearer {server.token}"})
        response = connection.getresponse()
        response.read()
        statuses.append(response.status)
        n += 1
        time.sleep(max(0.0, workers / rate - (time.perf_counter() - t0)))
    connection.close()


def windows(server: Server, args, since: int, deadline: float) -> tuple[list, list, list, float]:
    """Busy and idle windows of args.steps fused steps in turn, so that a drift of the machine falls
    on both alike: (busy step ms, idle step ms, status codes, seconds busy)."""
    idle, busy, statuses, busy_s = [], [], [], 0.0
    for window in range(2 * args.windows):
        if window % 2 == 0:
            stop = threading.Event()
            pollers = [threading.Thread(target=poll, args=(server, stop, statuses, args.rate)) for _ in range(5)]
            t_busy = time.time()
            for t in pollers:
                t.start()
            busy += server.steps_after(since, args.steps, deadline)
            stop.set()
            for t in pollers:
                t.join(60)
            busy_s += time.time() - t_busy
        else:
            idle += server.steps_after(since, args.steps, deadline)
        since += args.steps
    return busy, idle, statuses, busy_s


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=str(Path(__file__).resolve().parent.parent / "checkpoints/smollm2-135m-instruct"))
    p.add_argument("--steps", type=int, default=10, help="fused steps in each window")
    p.add_argument("--windows", type=int, default=3, help="busy windows, each followed by an idle one")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--rate", type=float, default=50, help="status requests a second while busy")
    p.add_argument("--api_nice", type=int, default=10, help="serve.py's --api_nice")
    p.add_argument("--client_nice", type=int, default=0, help="this script's (the clients') niceness")
    args = p.parse_args()
    server = Server(args.base, args.api_nice)
    os.nice(args.client_nice)
    try:
        assert server.call("POST", "/v1/jobs", job("long", 8, 0, 1000))[0] == 201
        deadline = time.time() + 600
        warm = server.steps_after(0, 3, deadline)   # the first steps (allocator, lazy init) are not timed
        # The clients submit at once, at the start of the first busy window (its steps are timed).
        with ThreadPoolExecutor(args.clients) as pool:
            answers = list(pool.map(lambda i: server.call("POST", "/v1/jobs", job(f"client-{i:02d}", 8, i + 1, 1)),
                                    range(args.clients)))
        busy, idle, statuses, busy_s = windows(server, args, 3, deadline)
        listed = server.call("GET", "/v1/jobs")[1]["jobs"]
    finally:
        server.stop()
    names, states = [j["name"] for j in listed], {j["name"]: j["state"] for j in listed}
    clients = [f"client-{i:02d}" for i in range(args.clients)]
    print(f"warm-up steps (not timed): {', '.join(f'{m:.0f}' for m in warm)} ms")
    print(f"idle: {len(idle)} steps, median {statistics.median(idle):.1f} ms (min {min(idle):.1f}, max {max(idle):.1f})")
    print(f"busy: {len(busy)} steps, median {statistics.median(busy):.1f} ms (min {min(busy):.1f}, max {max(busy):.1f}); "
          f"{len(statuses)} status requests in {busy_s:.1f} s ({len(statuses) / busy_s:.1f}/s), "
          f"{sum(code != 200 for code in statuses)} not 200")
    print(f"{args.clients} submissions at once: all 201 {all(code == 201 for code, _ in answers)}; listed once each "
          f"{sorted(n for n in names if n in clients) == clients and len(names) == len(set(names))}; "
          f"states {sorted(set(states[c] for c in clients))}")
    print(f"busy / idle step time: {statistics.median(busy) / statistics.median(idle):.3f}")


if __name__ == "__main__":
    main()
