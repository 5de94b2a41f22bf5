"""More than one process: train.py under torchrun, through torch.distributed (nothing home-made).

    torchrun --nproc_per_node=2 train.py --config C      # gloo on CPUs, NCCL on GPUs

torchrun starts the processes (ranks) and sets RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous address; `setup` joins them. Every rank reads the same config and data and makes
the same scheduler decisions (they are a pure function of the data, the seed and values every
rank agrees on); rank 0 alone writes out_dir. Two placements (scheduler.placement):

- data: every rank holds the base; each fused step's rows are split across the ranks
  (`split_rows`, balanced by tokens), each job's gradients summed over the ranks (`reduce`, in a
  few flat buckets) when its accumulation ends; the optimizer steps are then the same everywhere.
- job: each rank trains its own jobs (a rank with a free slot takes the next waiting job:
  `assign_waiting`) and sends rank 0 what it writes.

A collective that fails (a rank died: gloo says "connection reset"; or one stalled past the
timeout) raises RankLost: one line, and the run resumes from its last checkpoint.
"""
import datetime
import os
import re

import torch
import torch.distributed as dist

import lora
from config import JobConfig
from objectives import adapter_rows, job_parts, sequence_lengths
import peft_format

BUCKET_BYTES = 32 * 2**20    # gradients are summed in flat buckets of about this size


class RankLost(Exception):
    """A collective failed: another rank died, or stalled past the timeout."""


class Dist:
    """This process's place in the run and the collectives train.py uses."""

    def __init__(self, rank: int, world: int, local_rank: int, device: str, objects):
        self.rank, self.world, self.local_rank, self.device = rank, world, local_rank, device
        self.objects = objects    # a gloo group: Python objects travel through the CPU

    @property
    def main(self) -> bool:
        return self.rank == 0

    def call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, ValueError, dist.DistError) as e:
            text = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip())   # gloo's "[.../pair.cc:537] Read error ..."
            first = text.splitlines()[0].split(". ")[0] if text else type(e).__name__
            raise RankLost(f"rank {self.rank}: {what} failed, another rank died or stalled ({first[:160]}); "
                           f"the same torchrun command resumes from the last checkpoint") from None

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place; returns it. (A CPU tensor between GPU ranks
        goes through the gloo group.)"""
        group = self.objects if tensor.device.type == "cpu" and self.device.startswith("cuda") else None
        self.call("all_reduce", dist.all_reduce, tensor, group=group)
        return tensor

    def max_(self, tensor: torch.Tensor) -> torch.Tensor:
        self.call("all_reduce", dist.all_reduce, tensor, op=dist.ReduceOp.MAX)
        return tensor

    def reduce(self, tensors: list[torch.Tensor]):
        """Sum each tensor over the ranks in place, through flat buckets of ~BUCKET_BYTES (a few
        collectives per step, not one per tensor). Tensors of one dtype and device."""
        bucket, size = [], 0
        for t in tensors + [None]:
            if t is not None:
                bucket.append(t)
                size += t.numel() * t.element_size()
            if bucket and (t is None or size >= BUCKET_BYTES):
                flat = self.sum_(torch.cat([b.reshape(-1) for b in bucket]))
                for b, part in zip(bucket, flat.split([b.numel() for b in bucket])):
                    b.copy_(part.view_as(b))
                bucket, size = [], 0

    def broadcast(self, obj):
        """Rank 0's `obj`, on every rank."""
        box = [obj if self.main else None]
        self.call("broadcast", dist.broadcast_object_list, box, src=0, group=self.objects)
        return box[0]

    def all_gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        out = [None] * self.world
        self.call("all_gather", dist.all_gather_object, out, obj, group=self.objects)
        return out

    def gather(self, obj) -> list | None:
        """Every rank's `obj` in rank order, on rank 0 (None elsewhere)."""
        out = [None] * self.world if self.main else None
        self.call("gather", dist.gather_object, obj, out, dst=0, group=self.objects)
        return out

    def agree(self, error: Exception | None) -> str | None:
        """Validation: every rank checked the same inputs. The first failing rank's error (None
        if none failed), on every rank, so that all stop and none waits at a collective."""
        errors = self.all_gather(None if error is None else str(error))
        failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
        if not failed:
            return None
        rank, message = failed[0]
        return message if rank == 0 else f"rank {rank}: {message}"

    def describe(self, placement: str) -> str:
        how = ("each step's rows split over the ranks, gradients summed" if placement == "data"
               else "each rank trains its own jobs")
        return f"torchrun: {self.world} ranks ({'nccl' if self.device.startswith('cuda') else 'gloo'}), placement {placement}: {how}"

    def close(self, together: bool = True):
        """Leave the process group. together (every rank got here alike: the run ended, or all
        stopped on an agreed signal): a barrier first, so that no rank tears its connections down
        while another still reads from them (seen: gloo's threads then abort the process, 2 runs
        in 14). Not after an error: the others may be waiting in another collective."""
        if dist.is_initialized():
            if together:
                self.call("barrier", dist.barrier, group=self.objects)
            dist.destroy_process_group()


def first_rank() -> bool:
    """Whether this process is rank 0 of torchrun's ranks, or the only process (before setup too)."""
    return int(os.environ.get("RANK", "0")) == 0 or int(os.environ.get("WORLD_SIZE", "1")) <= 1


def setup(device: str, timeout_s: float) -> Dist | None:
    """Join the ranks torchrun started (None when it started one process, or none ran).
    device "auto" (or "cuda") becomes this rank's GPU, cuda:LOCAL_RANK, with NCCL; CPUs use gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device in ("auto", "cuda"):
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    timeout = datetime.timedelta(seconds=timeout_s)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=torch.device(device))
    else:
        dist.init_process_group("gloo", timeout=timeout)
    objects = dist.new_group(backend="gloo", timeout=timeout) if device.startswith("cuda") else dist.group.WORLD
    return Dist(rank, world, local_rank, device, objects)


def split_rows(costs: list[int], world: int) -> list[range]:
    """Cut rows (in order) into `world` contiguous ranges of about equal total cost (tokens):
    each cut at the row boundary nearest to its share. Ranges may be empty."""
    prefix = [0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    cuts = [0]
    for k in range(1, world):
        target = prefix[-1] * k / world
        cut = min(range(cuts[-1], len(costs) + 1), key=lambda i: (abs(prefix[i] - target), i))
        cuts.append(cut)
    cuts.append(len(costs))
    return [range(a, b) for a, b in zip(cuts, cuts[1:])]


# ----------------------------------------------------------------------------- train.py's steps across ranks
# (`run` is state.Run, `states` state.JobState: this file does not import state.py, which imports it)

def reduce_gradients(run, states: list, settle: bool = False):
    """Data parallel: sum these jobs' gradients over the ranks (dist.reduce: a few flat buckets).
    Between reductions each rank accumulates its own part; rank 0 alone carries what was summed
    before. settle (a checkpoint mid-accumulation): rank 0 then holds the sums, the others none."""
    params = [p for s in states for p in lora.adapter_parameters(run.model, s.config.name)]
    for p in params:   # a rank with none of a job's rows has no gradient: it adds zeros
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    run.dist.reduce([p.grad for p in params])
    if settle and not run.dist.main:
        for p in params:
            p.grad = None


def split_step(jobs: list[JobConfig], examples: list[list], d, sharded: bool = False) -> tuple[list[list], dict]:
    """Data parallel: this rank's part of a fused step. The step's rows, all jobs in order, are
    cut into one contiguous range per rank of about equal tokens (dist.split_rows); returns each
    job's rows here and lora.route's dropout sharing: for each job here, its adapter's real
    tokens in the whole step and which of them are here (so its masks are one process's), and
    the jobs with nothing here (their dropout streams advance all the same; with a sharded base
    they get a stand-in row instead, fused_step)."""
    costs = [sum(sequence_lengths(job, row)) for job, rows in zip(jobs, examples) for row in rows]
    mine = split_rows(costs, d.world)[d.rank]
    local, dropout_tokens, elsewhere, first = [], {}, [], 0
    for job, rows in zip(jobs, examples):
        a, b = min(max(mine.start - first, 0), len(rows)), min(max(mine.stop - first, 0), len(rows))
        first += len(rows)
        local.append(rows[a:b])
        if a == b:
            if sharded:   # its stand-in row's mask: any one token's
                dropout_tokens[job.name] = (1, torch.zeros(1, dtype=torch.long))
            elsewhere.append(job.name)
            continue
        (_, sequences), *_ = job_parts(job, rows)   # the adapter's sequences in the whole step
        here, offset = [], 0
        for example, row in zip(sequences, adapter_rows(job, len(rows))):
            if a <= row < b:
                here.append(torch.arange(offset, offset + len(example.input_ids)))
            offset += len(example.input_ids)
        dropout_tokens[job.name] = (offset, torch.cat(here))
    return local, {"dropout_tokens": dropout_tokens, "elsewhere": () if sharded else tuple(elsewhere),
                   "stand_ins": tuple(elsewhere) if sharded else ()}


def shard_base(model: torch.nn.Module, d: "Dist"):
    """FSDP2 (torch's fully_shard): each block's frozen weights, and the embeddings and output
    layer, split over the ranks; each forward and backward gathers a block's weights just for
    its turn. Every LoRA target is a MultiLoRALinear first (lora.wrap_targets), so that adapters
    added later sit beside the sharded weights as ordinary tensors, replicated on every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    lora.wrap_targets(model, model.LORA_TARGETS)
    mesh = init_device_mesh("cuda" if d.device.startswith("cuda") else "cpu", (d.world,))
    blocks = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def flush_outbox(run):
    """Job parallel: every rank's metrics lines and adapters to rank 0, which writes them (rank order)."""
    sent = run.dist.gather(run.outbox or [])
    if run.outbox is not None:
        run.outbox.clear()
    for items in sent or []:
        for kind, *item in items:
            if kind == "log":
                run.log(item[0])
            else:
                peft_format.write_peft(*item)


def agree_turn(run) -> bool:
    """Under torchrun, after each turn: every rank learns whether any rank received a signal
    (all then stop at this step), whether any has work left, whether any has lines or adapters
    for rank 0 (flush_outbox), and (job parallel) how many free slots each has. One small
    collective. Returns whether the run goes on."""
    d = run.dist
    free = [0] * d.world
    if run.jobs_apart:   # candidate slots not yet given a job
        free[d.rank] = run.cfg.scheduler.max_candidates - len(run.sched.candidates) - len(run.sched.waiting)
    flags = [run.signal or 0, not run.sched.done or bool(run.pending), len(run.outbox or ())]
    agreed = [int(x) for x in d.max_(torch.tensor(flags + free, device=run.device)).tolist()]   # syncs the device
    run.signal = agreed[0] or None
    if agreed[2]:
        flush_outbox(run)
    run.free = agreed[3:]
    return bool(agreed[1])


def assign_waiting(run):
    """Job parallel: the next waiting jobs (admission order) go to the ranks with free slots, one
    at a time, in turn (the rank given fewest this turn first, then the lowest rank): a rank
    that comes free takes the next waiting job. Every rank computes the same from the same
    agreed counts."""
    free, load = list(run.free), [0] * run.dist.world
    while run.pending and any(free):
        rank = min((r for r in range(len(free)) if free[r]), key=lambda r: (load[r], r))
        name = run.pending.pop(0)
        free[rank] -= 1
        load[rank] += 1
        if rank == run.dist.rank:
            run.sched.waiting.append(run.plans[name])
        run.log({"event": "assign", "job": name, "to_rank": rank, "fused_step": run.step})
        if run.writes:
            run.bar.write(f"rank {rank} takes job {name}")


def gather_results(run):
    """Job parallel: rank 0's summary gets every rank's jobs (in config order) and its totals the
    sums (tokens), the largest (peak memory, fused steps) and all memory-model errors."""
    totals = run.dist.gather((run.summary, run.step, run.tokens, run.padded_tokens, run.peak_mb,
                              run.prediction_errors))
    if totals is None:
        return
    summary = {name: job for ranks in totals for name, job in ranks[0].items()}
    run.summary = {job.name: summary[job.name] for job in run.cfg.jobs if job.name in summary}
    run.step = max(t[1] for t in totals)
    run.tokens, run.padded_tokens = sum(t[2] for t in totals), sum(t[3] for t in totals)
    run.peak_mb = max(t[4] for t in totals)
    run.prediction_errors = [e for t in totals for e in t[5]]
