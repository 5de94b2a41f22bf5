"""The service's trainer in a process of its own (serve.py runs it so), so that the HTTP side's
Python (parsing, routing, JSON: 50 status requests a second) never waits on, or holds, the
trainer's GIL.

serve.py's process (the front) starts it (start) and talks to it through one pipe. A call that
acts (submit, cancel, generate, adapter_archive) goes to the trainer process, where a few threads
run it on its service.Service and send the answer back. Reads (list_jobs, job, metrics) never
cross: after every change the trainer process pushes what readers see (every job's view, the new
metrics lines), and the front answers from that copy. The answer to a submission or a
cancellation comes after the push of its change, so a client reads what it just did.

The trainer process ends with the front: when the pipe closes, and on Linux at once when the
front is killed (PR_SET_PDEATHSIG), so that kill -9 of serve.py takes both and a restart on
out_dir resumes every job (service.resume). It ignores Ctrl-C (the terminal sends it to both):
the front's close() stops it after its turn, with a run checkpoint.
"""
import ctypes
import itertools
import multiprocessing
import os
import signal
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from tqdm import tqdm

from config import ConfigError
from service import RequestError, metrics_since

CALLS = ("submit", "cancel", "generate", "adapter_archive", "saved_archive", "step_api")   # what the front asks the trainer process
PR_SET_PDEATHSIG = 1


# ----------------------------------------------------------------------------- the trainer process

def trainer_main(cfg, allow_dirs: list[str], conn, parent: int, api_linger: float):
    """The trainer process: the Service, the calls the front sends, a push after every change."""
    die_with(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the front's to handle
    import scheduler
    from model import CheckpointError
    from service import Service
    scheduler.keep_freed_memory()   # as train.py's main: freed memory stays for the next step
    tqdm.set_lock(threading.RLock())   # not tqdm's default, a named semaphore that a kill -9 would leave behind
    try:
        svc = Service(cfg, allow_dirs, trainer=False, api_linger=api_linger)
    except (ConfigError, CheckpointError, ValueError, OSError) as e:
        conn.send(("failed", str(e)))
        return
    send_lock, sent = threading.Lock(), {}

    def send(message):
        with send_lock:
            conn.send(message)

    def push():
        with send_lock:   # one push at a time: `sent` counts what the front has
            conn.send(("snapshot", snapshot(svc, sent)))

    def answer(call_id: int, method: str, args: tuple):
        try:
            if method not in CALLS:
                raise RequestError(500, f"internal error: no call {method!r}")
            send(("answer", call_id, None, getattr(svc, method)(*args)))
        except RequestError as e:
            send(("answer", call_id, (e.status, str(e)), None))
        except Exception as e:   # noqa: BLE001 - the front answers 500 with it
            send(("answer", call_id, (500, f"internal error: {type(e).__name__}: {' '.join(str(e).split())}"), None))

    def serve_calls():
        with ThreadPoolExecutor(8, thread_name_prefix="call") as pool:
            while True:
                try:
                    message = conn.recv()
                except (EOFError, OSError):   # the front is gone without close(): as after kill -9
                    os._exit(1)
                if message[0] == "close":
                    return svc.stop_trainer()
                _, call_id, method, args = message
                pool.submit(answer, call_id, method, args)

    svc.notify = push
    push()
    send(("ready",))
    threading.Thread(target=serve_calls, name="calls", daemon=True).start()
    # The loop in the main thread: torch's OpenMP threads run a step about 20% slower from any
    # other thread of a process whose main thread has run parallel work (model loading); benchmarks.md.
    svc.loop()
    svc.close()
    send(("closed",))


def die_with(parent: int):
    """This process is killed when the front ends (Linux: PR_SET_PDEATHSIG); if it already has, exit."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):   # not Linux: the closed pipe ends it instead
        pass
    if os.getppid() != parent:
        os._exit(1)


def snapshot(svc, sent: dict[str, int]) -> dict:
    """What readers see now: every job's view, the metrics lines not pushed yet, the fused step."""
    with svc.lock:
        history = {}
        for name, lines in svc.history.items():
            if len(lines) > sent.get(name, 0):
                history[name], sent[name] = lines[sent.get(name, 0):], len(lines)
        return {"jobs": {name: svc.view(name) for name in svc.records}, "history": history,
                "fused_steps": svc.published_step, "healthy": svc.healthy()}


# ----------------------------------------------------------------------------- the front's handle

class Remote:
    """A service.Service in the trainer process, with its interface (what serve.make_app calls)."""

    def __init__(self, process, conn):
        self.process, self.conn = process, conn
        self.lock = threading.Lock()          # guards the copy below and the calls waiting
        self.jobs: dict[str, dict] = {}
        self.history: dict[str, list[dict]] = {}
        self.fused_steps, self.trainer_alive = 0, True
        self.waiting: dict[int, Future] = {}
        self.ids = itertools.count()
        self.send_lock = threading.Lock()
        self.closed = Future()
        self.reader = threading.Thread(target=self.read, name="remote-reader", daemon=True)
        self.reader.start()

    def read(self):
        """The trainer process's pushes and answers, in the order it sent them."""
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                break
            if message[0] == "snapshot":
                self.take(message[1])
            elif message[0] == "answer":
                _, call_id, error, value = message
                with self.lock:
                    future = self.waiting.pop(call_id)
                if error:
                    future.set_exception(RequestError(*error))
                else:
                    future.set_result(value)
            elif message[0] == "closed":
                self.closed.set_result(None)
        with self.lock:   # it is gone: no answer will come
            self.trainer_alive = False
            for future in self.waiting.values():
                future.set_exception(RequestError(503, "request: the trainer has stopped"))
            self.waiting.clear()

    def take(self, snap: dict):
        with self.lock:
            self.jobs = snap["jobs"]
            for name, lines in snap["history"].items():
                self.history.setdefault(name, []).extend(lines)
            self.fused_steps, self.trainer_alive = snap["fused_steps"], snap["healthy"]

    def call(self, method: str, *args):
        """One call in the trainer process; its RequestError raised here."""
        future = Future()
        with self.lock:
            if not self.trainer_alive:
                raise RequestError(503, "request: the trainer has stopped")
            call_id = next(self.ids)
            self.waiting[call_id] = future
        with self.send_lock:
            self.conn.send(("call", call_id, method, args))
        return future.result()

    def submit(self, body) -> dict:
        return self.call("submit", body)

    def cancel(self, name: str) -> dict:
        return self.call("cancel", name)

    def generate(self, body) -> dict:
        return self.call("generate", body)

    def adapter_archive(self, name: str) -> bytes:
        return self.call("adapter_archive", name)

    def saved_archive(self, name: str) -> bytes:
        return self.call("saved_archive", name)

    def step_api(self, kind: str, lora_id: str | None, body) -> dict:
        return self.call("step_api", kind, lora_id, body)

    def view(self, name: str) -> dict:
        if name not in self.jobs:
            raise RequestError(404, f"request: no job named {name!r}")
        return self.jobs[name]

    def list_jobs(self) -> list[dict]:
        with self.lock:
            return list(self.jobs.values())

    def job(self, name: str) -> dict:
        with self.lock:
            return self.view(name)

    def metrics(self, name: str, since: int = 0, limit: int = 10_000) -> dict:
        with self.lock:
            self.view(name)
            return metrics_since(name, self.history.get(name, []), since, limit, self.fused_steps)

    def healthy(self) -> bool:
        return self.trainer_alive and self.process.is_alive()

    def close(self, timeout: float = 600):
        """Stop the trainer after its turn (a run checkpoint), and its process."""
        if self.process.is_alive():
            try:
                with self.send_lock:
                    self.conn.send(("close",))
                self.closed.result(timeout)
            except Exception:   # noqa: BLE001 - it is gone, or does not answer: it ends with the pipe
                pass
        self.process.join(timeout)
        self.conn.close()


def start(cfg, allow_dirs: list[str] = (), api_linger: float = 0.005) -> Remote:
    """The trainer process started (the base loaded, out_dir resumed); a ConfigError with its
    one line when the Service refuses to start."""
    context = multiprocessing.get_context("spawn")   # a fresh interpreter: no lock or thread of this one
    ours, theirs = context.Pipe()
    process = context.Process(target=trainer_main, args=(cfg, list(allow_dirs), theirs, os.getpid(), api_linger),
                              name="serve-trainer")
    process.start()
    theirs.close()
    try:
        first = ours.recv()
        while first[0] == "snapshot":
            snap, first = first[1], ours.recv()
    except EOFError:
        process.join()
        raise ConfigError(f"serve.py: the trainer process ended at its start (exit status {process.exitcode})") from None
    if first[0] == "failed":
        process.join()
        raise ConfigError(first[1])
    remote = Remote(process, ours)
    remote.take(snap)
    return remote
