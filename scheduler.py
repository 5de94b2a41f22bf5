"""Which jobs' micro-batches share each training step, and how much memory a step takes (the
memory model, and the measured peaks it learns from: peak_memory). No model code here.

A job's plan is fixed by its own data and seed: per epoch a shuffled order (from an RNG
seeded by the run seed and the job's name, so neighbours never change it), cut into
optimizer steps of `batch_size` rows and those into micro-batches. A row is the unit that is
never split: one sequence (SFT) or several that travel together (a preference pair: its
chosen and rejected answers, for DPO twice, the second time for the reference); every
length, token and padding count below counts all of a row's sequences. The scheduler only
decides which jobs' next micro-batches are fused into one forward/backward pass, so a
job's result never depends on the strategy. Strategies:
  trivial      the first max_concurrent candidates (priority, then admission order)
  optimal-fit  the max_concurrent candidates whose next micro-batches have the most
               similar lengths (least padding; m-LoRA's MinPad)
  fast-fit     the candidates' next micro-batches, longest first, first-fit into a budget
               of processed tokens and/or predicted memory; how many jobs share a step
               varies (still at most max_concurrent)
Every strategy keeps a step under the budgets when they are set; a single micro-batch that
is over budget on its own still runs, alone.

A step is measured in processed tokens: padded (rows x padded length) or, with `packed`
(data.pack: every example end to end, no padding), its real tokens. Packed, no choice pads,
so optimal-fit's windows are all equal and it takes the first that fits, in order of length.
"""
import ctypes
import math
import platform
import random
import resource
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import torch

STRATEGIES = ("trivial", "optimal-fit", "fast-fit")


@dataclass
class MicroBatch:
    job: str
    indices: list[int]        # rows of the job's data set
    epoch: int
    step: int                 # the job's optimizer step this micro-batch belongs to (0-based)
    last_in_step: bool        # the job's optimizer steps after this micro-batch
    step_loss_tokens: int     # loss tokens of the whole optimizer step: the loss divides by it
    max_len: int              # longest sequence, for padding-aware strategies
    tokens: int               # real tokens of its sequences (padding excluded)
    squares: int              # sum of its sequences' squared lengths (attention's work when packed)
    sequences: int            # sequences it puts in the fused batch (its rows in the padded layout)
    step_rows: int            # rows (pairs) of the whole optimizer step: a preference loss divides by it


def round_up(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


class JobPlan:
    """One job's sequence of micro-batches over all its epochs, produced lazily."""

    def __init__(self, name: str, lengths: list[int] | list[tuple[int, ...]], loss_tokens: list[int],
                 batch_size: int, micro_batch_size: int, epochs: int, seed: int, max_steps: int | None = None, *,
                 group_by_length: bool = False, priority: int = 0):
        if batch_size % micro_batch_size:
            raise ValueError(f"job {name!r}: batch_size {batch_size} is not a multiple of "
                             f"micro_batch_size {micro_batch_size}")
        self.name, self.lengths, self.loss_tokens = name, lengths, loss_tokens
        # Each row's sequence lengths: an int is one sequence, a tuple the sequences of one row.
        self.sequences = [(n,) if isinstance(n, int) else tuple(n) for n in lengths]
        self.batch_size, self.micro_batch_size, self.epochs = batch_size, micro_batch_size, epochs
        self.seed, self.group_by_length, self.priority = seed, group_by_length, priority
        self.steps_per_epoch = math.ceil(len(lengths) / batch_size)
        self.total_steps = self.steps_per_epoch * epochs
        if max_steps is not None:
            self.total_steps = min(self.total_steps, max_steps)
        # Counted, not enumerated: a plan of a billion micro-batches must not take minutes to set up.
        full, rest = divmod(len(lengths), batch_size)
        self.per_step = [batch_size // micro_batch_size] * full + ([math.ceil(rest / micro_batch_size)] if rest else [])
        self.num_micro_batches = self.micro_batches_in(self.total_steps)
        self.popped = 0
        self.admission = -1       # the scheduler's admission counter, for FIFO order among candidates
        self._iter = self._micro_batches()
        self._next = next(self._iter, None)

    def micro_batches_in(self, steps: int) -> int:
        """Micro-batches of the first `steps` optimizer steps (an epoch's last step may be short)."""
        whole_epochs, extra_steps = divmod(steps, len(self.per_step))
        return whole_epochs * sum(self.per_step) + sum(self.per_step[:extra_steps])

    def epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.lengths)))
        # A string seed is hashed with SHA-512 by `random`, stable across runs and machines.
        rng = random.Random(f"{self.seed}/{self.name}/{epoch}")
        rng.shuffle(order)
        if self.group_by_length:
            # Sort the shuffled rows by length (stable: equal lengths keep their random order),
            # cut them into optimizer steps and shuffle the steps: every micro-batch holds rows
            # of similar length, yet the steps still come in a fresh random order each epoch.
            order.sort(key=lambda i: -max(self.sequences[i]))
            steps = [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]
            rng.shuffle(steps)
            order = [i for step in steps for i in step]
        return order

    def _micro_batches(self):
        step = 0
        for epoch in range(self.epochs):
            order = self.epoch_order(epoch)
            for start in range(0, len(order), self.batch_size):
                if step == self.total_steps:
                    return
                batch = order[start:start + self.batch_size]
                tokens = sum(self.loss_tokens[i] for i in batch)
                for m in range(0, len(batch), self.micro_batch_size):
                    rows = batch[m:m + self.micro_batch_size]
                    sequences = [n for i in rows for n in self.sequences[i]]
                    yield MicroBatch(self.name, rows, epoch, step, m + self.micro_batch_size >= len(batch),
                                     tokens, max(sequences), sum(sequences), sum(n * n for n in sequences),
                                     len(sequences), len(batch))
                step += 1

    def peek(self) -> MicroBatch | None:
        return self._next

    def pop(self) -> MicroBatch:
        mb, self._next = self._next, next(self._iter, None)
        self.popped += 1
        return mb

    @property
    def done(self) -> bool:
        return self._next is None

    @property
    def remaining(self) -> int:
        """Micro-batches not yet scheduled."""
        return self.num_micro_batches - self.popped


class MemoryModel:
    """Peak memory of a fused step ~ b0 + b1*U + b2*Q, U its processed tokens and Q the sum of
    its sequences' squared lengths (padded: U = B*L, Q = B*L^2 for B rows of padded length L;
    packed: U = the real tokens, Q = the sum of each example's length squared).

    b0 is what stays (weights, adapters, optimizer states), b1 the activations that grow with
    tokens, b2 attention scores where they are materialised. Fitted online by least squares
    over the last `window` measured steps, with every coefficient kept >= 0 and the largest
    under-prediction seen added as a margin. Until `min_points` steps of at least three
    shapes are measured it answers with a bound that holds for any such model with
    non-negative coefficients: a measured peak scaled by how much larger U and Q are.
    """

    def __init__(self, window: int = 64, min_points: int = 8):
        self.window, self.min_points = window, min_points
        self.points: list[tuple[float, float, float]] = []   # (U, Q, peak bytes)
        self.coefficients: tuple[float, float, float] | None = None
        self.margin = 0.0

    def observe(self, tokens: float, squares: float, peak: float):
        """Add one measured step (peak in bytes) and refit."""
        self.points = (self.points + [(float(tokens), float(squares), float(peak))])[-self.window:]
        if len(self.points) < self.min_points or len({p[0] for p in self.points}) < 3:
            self.coefficients = None
            return
        data = np.array(self.points)
        X = np.column_stack([np.ones(len(data)), data[:, 0], data[:, 1]])
        y = data[:, 2]
        scale = X.max(axis=0)  # columns span 1 .. 1e6+: scale them for a well-conditioned solve
        best = None
        # Non-negative least squares for three unknowns: the best fit among the feature
        # subsets whose unconstrained solution is non-negative.
        for size in (1, 2, 3):
            for subset in combinations(range(3), size):
                cols = list(subset)
                beta, *_ = np.linalg.lstsq(X[:, cols] / scale[cols], y, rcond=None)
                if (beta < 0).any():
                    continue
                full = np.zeros(3)
                full[cols] = beta / scale[cols]
                error = float(((X @ full - y) ** 2).sum())
                if best is None or error < best[0]:
                    best = (error, full)
        if best is None:
            self.coefficients = None
            return
        self.coefficients = tuple(float(b) for b in best[1])
        self.margin = max(0.0, float((y - X @ best[1]).max()))

    def predict(self, tokens: float, squares: float) -> float:
        """Predicted peak bytes of a step of these features (see the class); inf before any data."""
        u, v = float(tokens), float(squares)
        if self.coefficients is not None:
            b0, b1, b2 = self.coefficients
            return b0 + b1 * u + b2 * v + self.margin
        if not self.points:
            return math.inf
        return min(peak * max(1.0, u / pu, v / pv) for pu, pv, peak in self.points)


class Scheduler:
    """Admits up to max_candidates jobs (higher priority first, FIFO within a priority);
    each step fuses the next micro-batches of up to max_concurrent of them, one per job."""

    def __init__(self, jobs: list[JobPlan], strategy: str = "trivial", max_candidates: int = 4,
                 max_concurrent: int = 2, *, token_budget: int | None = None,
                 memory_budget: float | None = None, pad_multiple: int = 1, packed: bool = False):
        if strategy not in STRATEGIES:
            raise ValueError(f"scheduler.strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
        if max_candidates < 1 or max_concurrent < 1:
            raise ValueError("scheduler: max_candidates and max_concurrent must be >= 1")
        if strategy == "fast-fit" and token_budget is None and memory_budget is None:
            raise ValueError("scheduler.strategy 'fast-fit' packs steps up to a budget: "
                             "set scheduler.token_budget or scheduler.memory_budget_gb")
        self.strategy, self.max_candidates, self.max_concurrent = strategy, max_candidates, max_concurrent
        self.token_budget = token_budget      # processed tokens per step (padding included)
        self.memory_budget = memory_budget    # predicted peak bytes per step
        self.pad_multiple = pad_multiple      # a padded batch's length is rounded up to this
        self.packed = packed                  # steps are packed (no padding), else padded rows
        self.memory = MemoryModel()
        self.waiting: list[JobPlan] = sorted(jobs, key=lambda j: -j.priority)  # stable: FIFO within
        self.candidates: list[JobPlan] = []   # kept in (priority, admission) order
        self.finished: list[str] = []         # finished or stopped since the last pop_finished()
        self.predicted_peak: float | None = None         # the memory model's bytes for it
        self._admitted = 0
        self._warned = False

    @property
    def done(self) -> bool:
        return not self.waiting and not self.candidates

    def admit(self) -> list[str]:
        """Admit waiting jobs into free candidate slots; returns the names admitted."""
        admitted = []
        while self.waiting and len(self.candidates) < self.max_candidates:
            job = self.waiting.pop(0)
            if job.done:  # nothing to train (e.g. max_steps=0): finishes at once
                self.finished.append(job.name)
                continue
            job.admission = self._admitted
            self._admitted += 1
            self.candidates.append(job)
            admitted.append(job.name)
        self.candidates.sort(key=lambda j: (-j.priority, j.admission))
        return admitted

    def next_step(self) -> list[MicroBatch]:
        """The micro-batches of the next fused step, one per chosen job ([] with no candidates)."""
        if not self.candidates:
            return []
        chosen = self._choose()
        step = [job.pop() for job in chosen]
        predicted = self.memory.predict(*self.features(step))
        self.predicted_peak = predicted if math.isfinite(predicted) else None
        for job in chosen:
            if job.done:
                self.candidates.remove(job)
                self.finished.append(job.name)
        return step

    def features(self, micro_batches: list[MicroBatch]) -> tuple[int, int]:
        """(processed tokens, sum of squared sequence lengths) of these micro-batches fused:
        the memory model's features; the token budget counts the first."""
        if self.packed:
            return sum(mb.tokens for mb in micro_batches), sum(mb.squares for mb in micro_batches)
        rows = sum(mb.sequences for mb in micro_batches)
        length = round_up(max(mb.max_len for mb in micro_batches), self.pad_multiple)
        return rows * length, rows * length * length

    def padding(self, micro_batches: list[MicroBatch]) -> int:
        return self.features(micro_batches)[0] - sum(mb.tokens for mb in micro_batches)

    def fits(self, micro_batches: list[MicroBatch]) -> bool:
        """Within the token budget and the memory budget (as the memory model predicts)."""
        tokens, squares = self.features(micro_batches)
        if self.token_budget is not None and tokens > self.token_budget:
            return False
        return self.memory_budget is None or self.memory.predict(tokens, squares) <= self.memory_budget

    def _choose(self) -> list[JobPlan]:
        k = self.max_concurrent
        if self.strategy == "optimal-fit":
            chosen = self._least_padding(k)
        elif self.strategy == "fast-fit":
            by_len = sorted(self.candidates, key=lambda j: -j.peek().max_len)  # stable: priority order
            chosen = self._first_fit(by_len, k)
        else:
            chosen = self._first_fit(self.candidates, k)
        tokens, squares = self.features([chosen[0].peek()])
        # Over budget on its own: more tokens than the budget, or a predicted peak above it (a
        # memory model with no measurements yet predicts inf, which is not a reason to warn).
        over = (self.token_budget is not None and tokens > self.token_budget
                or self.memory_budget is not None and math.inf > self.memory.predict(tokens, squares) > self.memory_budget)
        if over and not self._warned:
            print(f"warning: a micro-batch of job {chosen[0].name!r} ({tokens} tokens) is over "
                  f"the scheduler's budget on its own; it runs alone (warned once)")
            self._warned = True
        return [j for j in self.candidates if j in chosen]  # priority/admission order within the step

    def _first_fit(self, order: list[JobPlan], k: int) -> list[JobPlan]:
        """The first job always runs; each following one joins if the step still fits."""
        chosen = order[:1]
        for job in order[1:]:
            if len(chosen) == k:
                break
            if self.fits([j.peek() for j in chosen + [job]]):
                chosen.append(job)
        return chosen

    def _least_padding(self, k: int) -> list[JobPlan]:
        """In order of next length, the window of k jobs that pads least and fits the budget
        (fewer jobs when no window of k fits)."""
        by_len = sorted(self.candidates, key=lambda j: j.peek().max_len)
        for size in range(min(k, len(by_len)), 1, -1):
            windows = [by_len[s:s + size] for s in range(len(by_len) - size + 1)]
            windows = [w for w in windows if self.fits([j.peek() for j in w])]
            if windows:
                return min(windows, key=lambda w: self.padding([j.peek() for j in w]))
        return self.candidates[:1]

    def requeue(self, job: JobPlan):
        """Put a job among the waiting: a stopped one back (a sweep trial promoted past a rung: it
        goes on where it was), or one submitted to a running scheduler (serve.py); ahead of lower
        priorities, behind its own, as admission orders them."""
        at = next((i for i, p in enumerate(self.waiting) if p.priority < job.priority), len(self.waiting))
        self.waiting.insert(at, job)

    def stop(self, name: str) -> bool:
        """Stop a job early: it frees its slot for the next waiting job. False if not running."""
        job = next((j for j in self.candidates if j.name == name), None)
        if job is None:
            return False
        self.candidates.remove(job)
        self.finished.append(name)
        return True

    def withdraw(self, name: str) -> bool:
        """Take a waiting job out before it is admitted (serve.py's cancel). False if not waiting."""
        job = next((j for j in self.waiting if j.name == name), None)
        if job is None:
            return False
        self.waiting.remove(job)
        return True

    def pop_finished(self) -> list[str]:
        names, self.finished = self.finished, []
        return names

    def state_dict(self) -> dict:
        """Where the run stands (with pop_finished() empty): enough, with the same plans, to go on exactly."""
        plans = self.waiting + self.candidates
        return {"waiting": [j.name for j in self.waiting], "candidates": [j.name for j in self.candidates],
                "popped": {j.name: j.popped for j in plans}, "admission": {j.name: j.admission for j in plans},
                "admitted": self._admitted, "warned": self._warned,
                "memory": {"points": self.memory.points, "coefficients": self.memory.coefficients,
                           "margin": self.memory.margin}}

    def load_state_dict(self, state: dict):
        """Back to a state_dict() of a scheduler built from the same plans (fresh, nothing popped)."""
        plans = {j.name: j for j in self.waiting + self.candidates}
        self.waiting = [plans[n] for n in state["waiting"]]
        self.candidates = [plans[n] for n in state["candidates"]]
        for name, popped in state["popped"].items():
            for _ in range(popped):   # the plan is a pure function of the job's data and seed
                plans[name].pop()
            plans[name].admission = state["admission"][name]
        self.finished = []
        self._admitted, self._warned = state["admitted"], state["warned"]
        self.memory.points = [tuple(p) for p in state["memory"]["points"]]
        self.memory.coefficients = state["memory"]["coefficients"]
        self.memory.margin = state["memory"]["margin"]


# ----------------------------------------------------------------------------- measured memory

def reset_peak_memory(device: str) -> float:
    """Start a new peak-memory window; returns the memory in use now (MiB)."""
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:  # Linux: "5" resets the peak resident set size (VmHWM) to the current one
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then peak_memory reports the process's lifetime peak
    return _proc_status("VmRSS") or 0.0


def peak_memory(device: str) -> float:
    """Peak memory (MiB) since reset_peak_memory: CUDA max_memory_allocated, CPU peak RSS."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _proc_status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def keep_freed_memory() -> bool:
    """Process-wide, on Linux with glibc: memory freed by tensors stays in the process for the
    next ones (mallopt: allocations under 32 MiB from the heap, which is never trimmed), so the
    next step does not page-fault fresh pages in. train.py's command line and bench.py's worker
    processes set it (tests/test_model.py checks that freed pages are reused; benchmarks.md has
    what is known of its effect on speed). Returns whether it was set."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3                     # <malloc.h>
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)) & bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def _proc_status(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        return None
