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

This module is a layer on train.py: `start` opens the run on every rank (inputs checked by all,
out_dir claimed by rank 0), `add_ranks` puts its steps in the place of the loop's (more: one
agreement per turn; data: forward_backward on this rank's rows, gradients summed before the
optimizer steps, memory peaks the largest of any rank; job: waiting jobs assigned each turn).
"""
import contextlib
import datetime
import os
import re
from pathlib import Path

import torch
import torch.distributed as dist

import data
import lora
import model as M
import state
from config import ConfigError, JobConfig, RunConfig
from jobs import (Fused, Interrupted, Run, claim_and_lock, finished_summary, load_base, make_scheduler, open_run,
                  placement, read_inputs, step_rows)
from objectives import METRIC_SUMS, adapter_rows, fuse_rows, job_losses, job_parts, sequence_lengths
import peft_format

BUCKET_BYTES = 32 * 2**20    # gradients are summed in flat buckets of about this size


class RankLost(Exception):
    """A collective failed: another rank died, or stalled past the timeout."""


class Dist:
    """This process's place in the run and the collectives train.py uses."""

    def __init__(self, rank: int, world: int, local_rank: int, device: str, objects):
        self.rank, self.world, self.local_rank, self.device = rank, world, local_rank, device
        self.objects = objects    # a gloo group: Python objects travel through the CPU
        self.pending: list[str] = []   # job parallel: jobs no rank has taken yet (the same on every rank)
        self.free: list[int] = []      # job parallel: each rank's free slots, as last agreed

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

    def reduce_gradients(self, model: torch.nn.Module, names: list[str], settle: bool = False):
        """Data parallel: sum these jobs' adapter gradients over the ranks (reduce: a few flat
        buckets). Between reductions each rank accumulates its own part; rank 0 alone carries
        what was summed before. settle (a checkpoint mid-accumulation): rank 0 then holds the
        sums, the others none."""
        params = [p for name in names for p in lora.adapter_parameters(model, name)]
        for p in params:   # a rank with none of a job's rows has no gradient: it adds zeros
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.reduce([p.grad for p in params])
        if settle and not self.main:
            for p in params:
                p.grad = None

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
    if jobs_apart(run):   # candidate slots not yet given a job
        free[d.rank] = run.cfg.scheduler.max_candidates - len(run.sched.candidates) - len(run.sched.waiting)
    flags = [run.signal or 0, not run.sched.done or bool(d.pending), len(run.outbox or ())]
    agreed = [int(x) for x in d.max_(torch.tensor(flags + free, device=run.device)).tolist()]   # syncs the device
    run.signal = agreed[0] or None
    if agreed[2]:
        flush_outbox(run)
    d.free = agreed[3:]
    return bool(agreed[1])


def assign_waiting(run):
    """Job parallel: the next waiting jobs (admission order) go to the ranks with free slots, one
    at a time, in turn (the rank given fewest this turn first, then the lowest rank): a rank
    that comes free takes the next waiting job. Every rank computes the same from the same
    agreed counts."""
    free, load = list(run.dist.free), [0] * run.dist.world
    while run.dist.pending and any(free):
        rank = min((r for r in range(len(free)) if free[r]), key=lambda r: (load[r], r))
        name = run.dist.pending.pop(0)
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


# ----------------------------------------------------------------------------- the layer: a run on every rank

def rows_apart(run: Run) -> bool:
    """Data parallel under torchrun: each step's rows split over the ranks."""
    return placement(run) == "data"


def jobs_apart(run: Run) -> bool:
    """Job parallel under torchrun: each rank its own jobs."""
    return placement(run) == "job"


@contextlib.contextmanager
def leaving(d: Dist):
    """Leave the process group when train() ends: together when every rank got here alike (the
    run ended, all stopped at the same step or on the same agreed error), at once otherwise; not
    at all with a rank lost (gloo can abort in the teardown: train.py's exit skips it)."""
    try:
        yield
    except (Interrupted, ConfigError):
        d.close()
        raise
    except RankLost:
        raise
    except BaseException:
        d.close(together=False)
        raise
    d.close()


def start(cfg: RunConfig, overwrite: bool, d: Dist) -> tuple[Run | None, dict | None]:
    """train.start on every rank: all read and check the same inputs and go on, or all stop with
    the first error; rank 0 claims out_dir (and reads its checkpoint) for all; each loads the base
    (sharded with shard_base). Returns (run, the checkpoint or None), or (None, the finished run's summary)."""
    error = read = mode = saved = lock = None
    try:
        read = read_inputs(cfg)
        if d.world > 1 and cfg.sweep is not None and cfg.scheduler.placement == "job":
            raise ConfigError("sweep: its rungs compare trials across ranks; use scheduler.placement 'data' under torchrun")
        if d.main:
            mode, lock = claim_and_lock(cfg, overwrite)
            saved = state.read_checkpoint(Path(cfg.out_dir), read["inputs"]) if mode == "resume" else None
    except (ConfigError, data.DataError, M.CheckpointError, FileNotFoundError) as e:
        error = e
    message = d.agree(error)
    if message:
        raise ConfigError(message)
    mode, saved = d.broadcast((mode, saved))
    if mode == "finished":
        return None, d.broadcast(finished_summary(cfg) if d.main else None)
    apart = cfg.scheduler.placement == "job"
    check_checkpoint_ranks(cfg, saved, d)
    if apart:   # each rank's own scheduler, given jobs as it has room (assign_waiting)
        read["sched"] = make_scheduler(cfg, [])
    model = load_base(cfg, d.device)
    if cfg.shard_base:
        shard_base(model, d)
        if d.main:
            local = sum(getattr(p, "to_local", lambda p=p: p)().numel() for p in model.parameters())
            print(f"base sharded (FSDP2) over {d.world} ranks: {local:,} of "
                  f"{sum(p.numel() for p in model.parameters()):,} parameters on this rank")
    run = open_run(cfg, read, model, d.device, mode, saved is not None, writes=d.main,
                   about="\n" + d.describe(cfg.scheduler.placement))
    run.dist = d
    if lock is not None:
        run.lock = lock
    if apart:
        run.outbox, run.tag, run.bar.total = None if d.main else [], {"rank": d.rank}, None
        d.pending = [p.name for p in sorted(read["plans"], key=lambda p: -p.priority)]
    elif not cfg.shard_base:   # a sharded base: every rank runs every forward (each gathers the weights)
        run.eval_ranks = d
    return run, saved


def check_checkpoint_ranks(cfg: RunConfig, saved: dict | None, d: Dist):
    """A job parallel checkpoint resumes on as many ranks, job parallel; another only otherwise."""
    written_by = len(saved.get("ranks") or ()) if saved is not None else 0
    expected = d.world if cfg.scheduler.placement == "job" else 0
    if saved is not None and written_by != expected:
        raise ConfigError(f"{cfg.out_dir}/checkpoint: a job parallel run's, on {written_by} ranks; it resumes under "
                          f"torchrun on as many" if written_by else
                          f"{cfg.out_dir}/checkpoint: not a job parallel run's; resume it with scheduler.placement "
                          f"'data' or in one process")


def add_ranks(run: Run):
    """The loop's steps across ranks: one agreement per turn (agree_turn); data parallel: each
    step's rows split (forward_backward), the jobs' gradients summed before their optimizer
    steps, the memory peaks the largest of any rank; job parallel: waiting jobs assigned to free
    ranks each turn. At the end, rank 0 writes what every rank did."""
    steps = run.steps
    core_turn, core_optimize, core_results = steps.turn, steps.optimize, steps.results
    steps.more = agree_turn
    if run.cfg.scheduler.placement == "job":
        def turn(run: Run):
            assign_waiting(run)
            if not run.sched.done:   # a rank with no job waits for the others
                core_turn(run)
        steps.turn = turn
    else:
        def optimize(run: Run, ending: list) -> list:
            run.dist.reduce_gradients(run.model, [s.config.name for s in ending])
            return core_optimize(run, ending)
        steps.forward_backward, steps.optimize, steps.peaks = split_forward_backward, optimize, peaks

    def results(run: Run):
        if jobs_apart(run):   # every rank's finished jobs and totals, to rank 0
            gather_results(run)
        if run.writes:
            core_results(run)
        run.summary = run.dist.broadcast(run.summary)
    steps.results = results


def peaks(run: Run, between_mb: float, step_mb: float) -> tuple[float, float]:
    """Every rank's memory model learns the same peaks: the largest of any rank."""
    return tuple(run.dist.max_(torch.tensor([between_mb, step_mb], dtype=torch.float64, device=run.device)).tolist())


def split_forward_backward(run: Run, micro_batches: list, check_finite: bool = False) -> Fused:
    """Data parallel: train.forward_backward on this rank's part of the step's rows (split_step)."""
    step = step_rows(run, micro_batches)
    rows, share = split_step(step.jobs, step.rows, run.dist, sharded=run.cfg.shard_base)
    losses, rewards, counts, stepped = fused_step(run.model, step.jobs, rows, step.loss_tokens, step.generators,
                                                  run.pad_id, run.device, run.cfg.packing, check_finite,
                                                  step.step_rows, share, run.dist,
                                                  lora.concatenates(run.device, run.cfg.fuse_adapters), run.cfg.dropout_draw)
    return Fused(micro_batches, losses, rewards, counts, stepped)


def fused_step(model, jobs: list[JobConfig], examples: list[list], step_loss_tokens: list[int],
               generators: dict, pad_id: int, device, packed: bool, check_finite: bool, step_rows: list[int],
               share: dict, d: Dist, fuse: bool | None = None, dropout_draw: str = "auto"
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """train.fused_step on this rank's rows (a job may have none here): `share` routes their
    dropout as one process draws it (split_step); the losses, rewards and token counts are summed
    over the ranks before the finite check; backward stays this rank's part."""
    k, stand_ins = len(jobs), share["stand_ins"]
    model.train()
    if not any(examples) and not stand_ins:   # nothing here this step; the dropout streams still advance
        with lora.route(model, [], generators=generators, elsewhere=tuple(job.name for job in jobs), fuse=fuse,
                        dropout_draw=dropout_draw):
            pass
        stats = d.sum_(torch.zeros(k, 1 + METRIC_SUMS + 2, device=device))
        return stats[:, 0], stats[:, 1:1 + METRIC_SUMS], stats[:, 1 + METRIC_SUMS:].long().cpu(), False
    fused = fuse_rows(jobs, examples, pad_id, packed, device, stand_ins)
    batch = fused.batch
    with lora.route(model, batch.adapter_names, lengths=batch.lengths, generators=generators, packed=batch.packed,
                    dropout_tokens=share["dropout_tokens"], elsewhere=share["elsewhere"], fuse=fuse,
                    dropout_draw=dropout_draw):
        # With stand-ins, backward runs through the whole batch, stand-ins too (their part is zero).
        local, rewards = job_losses(model, jobs, fused, examples, step_loss_tokens, step_rows, whole_batch=bool(stand_ins))
        stats = d.sum_(torch.cat([local.detach()[:, None], rewards, fused.counts.to(device)], 1))   # syncs the device
        losses, rewards, counts = stats[:, 0], stats[:, 1:1 + METRIC_SUMS], stats[:, 1 + METRIC_SUMS:].long().cpu()
        if check_finite and not bool(losses.isfinite().all()):
            return losses, rewards, counts, False
        local.sum().backward()
    return losses, rewards, counts, True
