"""Which jobs' micro-batches share each training step. No model code here.

A job's plan is fixed by its own data and seed: per epoch a shuffled order (from an RNG
seeded by the run seed and the job's name, so neighbours never change it), cut into
optimizer steps of `batch_size` rows and those into micro-batches. The scheduler only
decides which jobs' next micro-batches are fused into one forward/backward pass, so a
job's result never depends on the strategy. Strategies (../shared/DESIGN.md):
  trivial      the first max_concurrent admitted jobs, FIFO
  optimal-fit  the max_concurrent admitted jobs whose next micro-batches have the most
               similar lengths (least padding; m-LoRA's MinPad)
"""
import math
import random
from collections import deque
from dataclasses import dataclass

STRATEGIES = ("trivial", "optimal-fit")


@dataclass
class MicroBatch:
    job: str
    indices: list[int]        # rows of the job's data set
    epoch: int
    step: int                 # the job's optimizer step this micro-batch belongs to (0-based)
    last_in_step: bool        # the job's optimizer steps after this micro-batch
    step_loss_tokens: int     # loss tokens of the whole optimizer step: the loss divides by it
    max_len: int              # longest row, for padding-aware strategies


class JobPlan:
    """One job's sequence of micro-batches over all its epochs, produced lazily."""

    def __init__(self, name: str, lengths: list[int], loss_tokens: list[int], batch_size: int,
                 micro_batch_size: int, epochs: int, seed: int, max_steps: int | None = None):
        if batch_size % micro_batch_size:
            raise ValueError(f"job {name!r}: batch_size {batch_size} is not a multiple of "
                             f"micro_batch_size {micro_batch_size}")
        self.name, self.lengths, self.loss_tokens = name, lengths, loss_tokens
        self.batch_size, self.micro_batch_size, self.epochs = batch_size, micro_batch_size, epochs
        self.seed = seed
        self.steps_per_epoch = math.ceil(len(lengths) / batch_size)
        self.total_steps = self.steps_per_epoch * epochs
        if max_steps is not None:
            self.total_steps = min(self.total_steps, max_steps)
        self.num_micro_batches = sum(1 for _ in self._micro_batches())
        self._iter = self._micro_batches()
        self._next = next(self._iter, None)

    def epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.lengths)))
        # A string seed is hashed with SHA-512 by `random`, stable across runs and machines.
        random.Random(f"{self.seed}/{self.name}/{epoch}").shuffle(order)
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
                    yield MicroBatch(self.name, rows, epoch, step, m + self.micro_batch_size >= len(batch),
                                     tokens, max(self.lengths[i] for i in rows))
                step += 1

    def peek(self) -> MicroBatch | None:
        return self._next

    def pop(self) -> MicroBatch:
        mb, self._next = self._next, next(self._iter, None)
        return mb

    @property
    def done(self) -> bool:
        return self._next is None


class Scheduler:
    """FIFO admission of up to max_candidates jobs; each step fuses up to max_concurrent."""

    def __init__(self, jobs: list[JobPlan], strategy: str = "trivial", max_candidates: int = 4,
                 max_concurrent: int = 2):
        if strategy not in STRATEGIES:
            raise ValueError(f"scheduler.strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
        if max_candidates < 1 or max_concurrent < 1:
            raise ValueError("scheduler: max_candidates and max_concurrent must be >= 1")
        self.strategy, self.max_candidates, self.max_concurrent = strategy, max_candidates, max_concurrent
        self.waiting: deque[JobPlan] = deque(jobs)
        self.candidates: list[JobPlan] = []
        self.finished: list[str] = []        # finished since the last pop_finished()

    @property
    def done(self) -> bool:
        return not self.waiting and not self.candidates

    def admit(self) -> list[str]:
        """Admit waiting jobs into free candidate slots; returns the names admitted."""
        admitted = []
        while self.waiting and len(self.candidates) < self.max_candidates:
            job = self.waiting.popleft()
            if job.done:  # nothing to train (e.g. max_steps=0): finishes at once
                self.finished.append(job.name)
                continue
            self.candidates.append(job)
            admitted.append(job.name)
        return admitted

    def next_step(self) -> list[MicroBatch]:
        """The micro-batches of the next fused step, one per chosen job."""
        chosen = self._choose()
        step = [job.pop() for job in chosen]
        for job in chosen:
            if job.done:
                self.candidates.remove(job)
                self.finished.append(job.name)
        return step

    def _choose(self) -> list[JobPlan]:
        k = self.max_concurrent
        if self.strategy == "trivial" or len(self.candidates) <= k:
            return self.candidates[:k]
        # optimal-fit: in order of next length, the window of k jobs that pads least.
        by_len = sorted(self.candidates, key=lambda j: j.peek().max_len)

        def padding(window):
            longest = max(j.peek().max_len for j in window)
            return sum(len(j.peek().indices) * longest - sum(j.lengths[i] for i in j.peek().indices)
                       for j in window)

        best = min(range(len(by_len) - k + 1), key=lambda s: padding(by_len[s:s + k]))
        window = by_len[best:best + k]
        return [j for j in self.candidates if j in window]  # admission order within the step

    def stop(self, name: str):
        """Stop a job early: it frees its slot for the next waiting job."""
        self.candidates = [j for j in self.candidates if j.name != name]
        self.finished.append(name)

    def pop_finished(self) -> list[str]:
        names, self.finished = self.finished, []
        return names
