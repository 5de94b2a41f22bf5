"""The fused step at fixed shapes, replayed as a CUDA graph (the run option cuda_graphs).

On a GPU the fused step is bound by the host: thousands of kernel launches, each with its Python
and dispatch around it, for far less GPU work (benchmarks.md, "Issue 11 on a GPU": an H200 at
ab4e102 on 2026-11-29, before this file; not re-run since). A CUDA graph
replays all the kernels of a step in one launch, but only the kernels it recorded, on the
memory it recorded: nothing in the step may depend on a host value that changes from step to
step. So this step computes what train.fused_step computes for SFT jobs, differently:
- the jobs' examples are packed in one row padded to a bucket of tokens (`bucket`); the
  padding is one more segment, routed to no adapter and given no loss;
- attention, positions and routing read device tensors (llama.PackedRow, TokenRouting):
  every adapter goes through the concatenated path's shared matmuls, its rows picked by
  per-token coefficients, dropout drawn by lora_update.keep_mask from per-token seeds (the
  masks the eager step draws on a GPU);
- the loss covers every position, each weighted by 1 / its job's step loss tokens (0 where
  unlabelled), so one weighted sum is every job's job_loss at once;
- the gradients are the graph's outputs (autograd.grad), added to the adapters' .grad after
  the replay, only when every job's loss is finite.
One graph per (adapters, bucket, segments); the MAX_GRAPHS last used are kept. Off a GPU the
same step runs eagerly (tests/test_graphs.py: equal to fused_step, and free of host reads).
What it takes (`fits`): SFT jobs, plain LoRA on a float base, a llama-family model, packed rows;
not with data parallel ranks. `fixed_shape` puts it in the place of train.py's forward_backward step.
"""
import math
from collections import OrderedDict
from contextlib import contextmanager
from typing import NamedTuple

import torch

import data
import llama
import lora
from jobs import Fused, Run, step_rows
from lora_update import drop_threshold
from fast import chunked_token_losses
from objectives import METRIC_SUMS, objective_of

MAX_GRAPHS = 8          # graphs kept (each holds its own memory pool: about one step's activations)
MIN_BUCKET = 64


def bucket(n: int) -> int:
    """n tokens rounded up to one of 8 sizes per power of two (at most 12.5% more), >= MIN_BUCKET:
    few distinct shapes, so few graphs to capture."""
    if n <= MIN_BUCKET:
        return MIN_BUCKET
    step = 2 ** (n.bit_length() - 4)
    return -(-n // step) * step


class StepInputs(NamedTuple):
    """Everything a step reads that changes from step to step: the graph's input buffers."""
    input_ids: torch.Tensor     # [1, N] long
    positions: torch.Tensor     # [1, N] long, restarting at each segment
    segment: torch.Tensor       # [N] long
    starts: torch.Tensor        # [E+1] int32: where each segment starts, then N
    targets: torch.Tensor       # [N] long: the next token (0 where there is no loss)
    weights: torch.Tensor       # [N] float32: 1 / the job's step loss tokens, 0 without a loss
    adapter: torch.Tensor       # [N] long: the token's job (k: the padding)
    seed: torch.Tensor          # [N] long: its job's dropout seed this step
    index: torch.Tensor         # [N] long: its number among its job's tokens
    threshold: torch.Tensor     # [N] int16: its job's drop threshold (-2^15: none)


class TokenRouting(NamedTuple):
    """A packed row's routing as device tensors, one entry per token (route_tokens; this module
    replays a step with it as a CUDA graph): its adapter's number in `names` (len(names): none),
    its adapter's dropout seed for this step and its number among that adapter's tokens (what
    keep_mask draws from), and its drop threshold (lora_update.drop_threshold; -2^15 keeps all)."""
    names: tuple[str, ...]
    adapter: torch.Tensor            # [N] long
    seed: torch.Tensor               # [N] long
    index: torch.Tensor              # [N] long
    threshold: torch.Tensor          # [N] int16


@contextmanager
def route_tokens(model: torch.nn.Module, tokens: TokenRouting, cache: dict):
    """Route each token of one packed row as `tokens` says (TokenRouting: device tensors, fixed
    shapes). `cache` keeps the coefficient tables from one step to the next
    (a captured step must find them built)."""
    routing = lora.Routing([], cache=cache, packed=True, tokens=tokens, concatenated=True, dropout_draw="masks")
    with lora.routed([layer for _, layer in lora.lora_layers(model)], routing):
        yield


def step_inputs(dropouts: list[float], examples: list[list[data.Example]], step_loss_tokens: list[int],
                seeds: list[int | None], pad_id: int) -> StepInputs:
    """The step's inputs on the CPU: job i's examples end to end (data.pack's row), its
    adapter's dropout p and seed (None: no dropout now), then the padding up to
    bucket(tokens + 1) as one more segment, of no job."""
    packed = data.pack([(None, rows) for rows in examples])
    pad = bucket(packed.num_tokens + 1) - packed.num_tokens
    lengths = packed.lengths.tolist() + [pad]
    tokens = torch.tensor([sum(len(e.input_ids) for e in rows) for rows in examples] + [pad])   # per job, then padding

    def per_token(values, dtype=None) -> torch.Tensor:   # one value per job and one for the padding
        return torch.tensor(values, dtype=dtype).repeat_interleave(tokens)
    input_ids = torch.nn.functional.pad(packed.input_ids, (0, pad), value=pad_id)     # [1, N]
    labels = torch.nn.functional.pad(packed.labels[0], (0, pad), value=data.IGNORE_INDEX)
    targets = torch.cat([labels[1:], labels.new_tensor([data.IGNORE_INDEX])])     # position t predicts token t + 1
    labelled = targets != data.IGNORE_INDEX
    segment = torch.arange(len(lengths)).repeat_interleave(torch.tensor(lengths))
    job_starts = torch.nn.functional.pad(tokens.cumsum(0), (1, 0))[:-1]
    return StepInputs(
        input_ids, llama.positions(input_ids, None, 0, tuple(lengths)), segment,
        torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32),
        targets.where(labelled, 0),
        per_token([1 / max(n, 1) for n in step_loss_tokens] + [0.0], torch.float32) * labelled,
        per_token(range(len(tokens))),
        per_token([s or 0 for s in seeds] + [0]),
        torch.arange(len(segment)) - job_starts.repeat_interleave(tokens),
        per_token([drop_threshold(p if s is not None else 0.0) for p, s in zip(dropouts, seeds)]
                  + [drop_threshold(0.0)], torch.int16))


def step_gradients(model, inputs: StepInputs, names: tuple[str, ...], params: list, longest: int, cache: dict):
    """Each job's loss [k] and the gradients of `params` (its adapters') from the inputs alone.
    Backward runs inside the routing: activation checkpointing recomputes blocks in it."""
    row = llama.PackedRow(inputs.positions, inputs.segment, inputs.starts, longest)
    with route_tokens(model, TokenRouting(names, inputs.adapter, inputs.seed, inputs.index,
                                                    inputs.threshold), cache):
        hidden = model(inputs.input_ids, head=False, segments=row)[0]                   # [N, C]
        nll = chunked_token_losses(hidden, model.get_submodule(model.OUTPUT_LAYER).weight, inputs.targets)
        weighted = nll * inputs.weights
        per_job = weighted.new_zeros(len(names) + 1).index_add_(0, inputs.adapter, weighted.detach())
        return per_job[:len(names)], torch.autograd.grad(weighted.sum(), params)


class Step:
    """One captured step: its input buffers, its graph (on CUDA) and what the graph leaves:
    each job's loss and every adapter parameter's gradient for this step."""

    def __init__(self, model, names: tuple[str, ...], params: list, N: int, segments: int, device):
        self.model, self.names, self.params = model, names, params
        self.longest, self.cache, self.graph, self.outputs = N, {}, None, None
        shapes = StepInputs([1, N], [1, N], [N], [segments + 1], [N], [N], [N], [N], [N], [N])
        dtypes = StepInputs(*[torch.long] * 3, torch.int32, torch.long, torch.float32, *[torch.long] * 3, torch.int16)
        self.inputs = StepInputs(*[torch.zeros(s, dtype=d, device=device) for s, d in zip(shapes, dtypes)])

    def compute(self):
        return step_gradients(self.model, self.inputs, self.names, self.params, self.longest, self.cache)

    def run(self, inputs: StepInputs):
        """This step's (losses [k], gradients) for these inputs: copied into the buffers, then
        the graph replayed (captured the first time, after a warm-up run), or run eagerly off a GPU."""
        for buffer, value in zip(self.inputs, inputs):
            buffer.copy_(value, non_blocking=True)
        if self.inputs.input_ids.device.type != "cuda":
            return self.compute()
        if self.graph is None:
            # The warm-up builds what capture cannot (the coefficient tables: host copies; cuBLAS
            # workspaces), on a side stream as torch.cuda.graphs asks.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.compute()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = self.compute()
        self.graph.replay()
        return self.outputs


class Graphs:
    """The steps captured so far, by (adapters, bucket, segments); `step` is train.fused_step's
    counterpart for the jobs that `fits` admits."""

    def __init__(self):
        self.steps: OrderedDict = OrderedDict()

    @staticmethod
    def fits(model, jobs: list, examples: list[list], packed: bool) -> bool:
        """Whether this step can run at fixed shapes: token-mean (SFT) jobs, each with rows, plain LoRA
        on a float base of a family with FIXED_SHAPE_STEP, packed (fixed_shape is not used with
        data parallel ranks)."""
        if not packed or not model.FIXED_SHAPE_STEP:
            return False
        if any(not objective_of(job).token_mean or not rows for job, rows in zip(jobs, examples)):
            return False
        names = {job.name for job in jobs}
        return all(layer.quantized is None and not any(layer.adapters[n].is_variant for n in names & set(layer.adapters))
                   for _, layer in lora.lora_layers(model))

    def step(self, model, jobs: list, examples: list[list], step_loss_tokens: list[int],
             generators: dict[str, torch.Generator], pad_id: int, device):
        """As train.fused_step (packed, SFT): (losses [k], metric sums [k, METRIC_SUMS], tokens [k, 2],
        None, whether the gradients were added). Each job's dropout seed is drawn from its
        stream as lora.route draws it; the gradients are added only when every loss is finite."""
        model.train()
        names = tuple(job.name for job in jobs)
        configs = lora.adapter_configs([layer for _, layer in lora.lora_layers(model)])
        seeds = [lora.draw_seed(model, configs[name], generators.get(name)) for name in names]
        inputs = step_inputs([configs[name].dropout for name in names], examples, step_loss_tokens, seeds, pad_id)
        key = (names, inputs.input_ids.size(1), len(inputs.starts) - 1)
        step = self.steps.pop(key, None)
        params = [p for name in names for p in lora.adapter_parameters(model, name)]
        if step is None or list(map(id, step.params)) != list(map(id, params)):   # new adapters of old names
            step = Step(model, names, params, key[1], key[2], device)
        self.steps[key] = step
        while len(self.steps) > MAX_GRAPHS:
            self.steps.popitem(last=False)
        losses, grads = step.run(inputs)
        tokens = [sum(len(e.input_ids) for e in rows) for rows in examples]
        padding = key[1] - sum(tokens)   # the bucket's padding, counted as the first job's processed tokens
        counts = torch.tensor([[n, n + (padding if i == 0 else 0)] for i, n in enumerate(tokens)])
        rewards = torch.zeros(len(jobs), METRIC_SUMS, device=device)
        if not all(math.isfinite(loss) for loss in losses.tolist()):   # syncs the device
            return losses.clone(), rewards, counts, None, False
        # The graph's outputs are overwritten by its next replay: added (or copied) out now.
        adding = [(p.grad, g) for p, g in zip(params, grads) if p.grad is not None]
        if adding:
            torch._foreach_add_([a for a, _ in adding], [g for _, g in adding])
        fresh = [(p, g) for p, g in zip(params, grads) if p.grad is None]
        for (p, _), copy in zip(fresh, torch._foreach_mul([g for _, g in fresh], 1.0) if fresh else []):
            p.grad = copy
        return losses.clone(), rewards, counts, None, True


def fixed_shape(forward_backward):
    """train.py's forward_backward step at fixed shapes (a CUDA graph on GPUs) where the step fits, else as it was."""
    graphs = Graphs()

    def step(run: Run, micro_batches: list, check_finite: bool = False) -> Fused:
        rows = step_rows(run, micro_batches)
        if not graphs.fits(run.model, rows.jobs, rows.rows, run.cfg.packing):
            return forward_backward(run, micro_batches, check_finite)
        losses, rewards, counts, _, stepped = graphs.step(run.model, rows.jobs, rows.rows, rows.loss_tokens,
                                                          rows.generators, run.pad_id, run.device)
        return Fused(micro_batches, losses, rewards, counts, stepped)
    return step
