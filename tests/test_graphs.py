"""graphs.py, the fused step at fixed shapes (replayed as a CUDA graph on GPUs): it computes what
train.fused_step computes, and what a graph would record of it reads nothing from the host
that changes from step to step. Its capture and replay: tests/test_cuda.py."""
import pytest
import torch

import data
import graphs
import lora
import model as M
import train
from conftest import Recorder, adapter, assert_same_adapter, job, randomize_B, run_cfg, write_rows
from llama import Llama
from test_preference import write_pairs

GPU_PATH = dict(fuse=True, dropout_draw="masks")   # fused_step as on a GPU: shared matmuls, keep_mask


@pytest.fixture
def setup(base_dir, tmp_path):
    """A tiny llama with three adapters (dropout on two, q/k/v and gate/up shared inputs) and
    their jobs' examples; the eager step is run on the GPU's path (GPU_PATH)."""
    jobs = [job("a", write_rows(tmp_path / "a.json", 8, 0, "reverse"), r=4, alpha=8, dropout=0.3,
                targets=list(Llama.LORA_TARGETS)),
            job("b", write_rows(tmp_path / "b.json", 8, 1, "upper"), r=2, alpha=8, dropout=0.0, targets=["q_proj", "v_proj"]),
            job("c", write_rows(tmp_path / "c.json", 8, 2, "count"), r=3, alpha=3, dropout=0.1,
                targets=["k_proj", "up_proj", "down_proj"])]
    ours = M.load_model(base_dir)
    lora.add_adapters(ours, {j.name: lora.LoRAConfig(r=j.r, alpha=j.alpha, dropout=j.dropout, targets=j.targets)
                             for j in jobs})
    for i, j in enumerate(jobs):
        randomize_B(ours, j.name, seed=i)
    tok = data.load_tokenizer(base_dir)
    examples = [data.load_job_data(j.data, tok) for j in jobs]
    return ours, jobs, examples, tok.pad_id


def tokens(examples) -> int:
    return sum(len(e.input_ids) for e in examples)


def grads_of(model, names):
    grads = {n: [p.grad.clone() for p in lora.adapter_parameters(model, n)] for n in names}
    model.zero_grad(set_to_none=True)
    return grads


def test_bucket_sizes():
    assert [graphs.bucket(n) for n in (1, 64, 65, 100, 128, 129, 1000, 1024, 1025, 4719)] == \
        [64, 64, 72, 104, 128, 144, 1024, 1024, 1152, 5120]
    assert all(n <= graphs.bucket(n) <= n * 1.125 for n in range(65, 5000))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fixed_shape_step_equals_fused_step(setup, checkpointing):
    """Two steps (the second accumulating into the first's gradients): each job's loss and
    every adapter gradient as train.fused_step gives them packed, the dropout masks included
    (the same seeds from the same streams, the same keep_mask draws); also with activation
    checkpointing (blocks recomputed in backward, inside the routing)."""
    ours, jobs, examples, pad_id = setup
    ours.checkpoint_blocks = checkpointing
    names = [j.name for j in jobs]
    steps = [([rows[0:2] for rows in examples], [9, 7, 8]), ([rows[2:5] for rows in examples], [11, 13, 6])]
    results = []
    for fixed in (False, True):
        gens = {n: torch.Generator().manual_seed(i) for i, n in enumerate(names)}
        ours.zero_grad(set_to_none=True)
        cache = graphs.Graphs()
        losses = []
        for rows, loss_tokens in steps:
            if fixed:
                out = cache.step(ours, jobs, rows, loss_tokens, gens, pad_id, "cpu")
            else:
                out = train.fused_step(ours, jobs, rows, loss_tokens, gens, pad_id, "cpu", packed=True, **GPU_PATH)
            assert out[4]   # backward ran
            losses.append(out[0].detach().clone())
            tokens = out[2][:, 0].tolist()
            assert tokens == [sum(len(e.input_ids) for e in r) for r in rows]
        results.append((losses, grads_of(ours, names), [g.initial_seed() for g in gens.values()],
                        [int(torch.randint(2**62, (), generator=g)) for g in gens.values()]))
    (eager_losses, eager_grads, _, eager_next), (fixed_losses, fixed_grads, _, fixed_next) = results
    for a, b in zip(eager_losses, fixed_losses):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    for n in names:
        for a, b in zip(eager_grads[n], fixed_grads[n]):
            assert a.abs().max() > 0
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    assert eager_next == fixed_next   # the dropout streams advanced alike


def test_dropout_changes_the_fixed_shape_step(setup):
    """The masks are applied: with the streams seeded otherwise, job a's gradient changes."""
    ours, jobs, examples, pad_id = setup
    rows = [r[:2] for r in examples]
    grads = []
    for seed in (0, 1):
        gens = {j.name: torch.Generator().manual_seed(seed) for j in jobs}
        graphs.Graphs().step(ours, jobs, rows, [5, 5, 5], gens, pad_id, "cpu")
        grads.append(grads_of(ours, ["a", "b"]))
    assert not torch.allclose(grads[0]["a"][0], grads[1]["a"][0])
    torch.testing.assert_close(grads[0]["b"][0], grads[1]["b"][0])   # b has no dropout


def test_fixed_shape_step_is_the_same_ops_whatever_the_data(setup):
    """What a CUDA graph records is the op sequence with its shapes and host values. Two steps
    of different tokens, routing, seeds and loss weights that share a bucket run the very same
    ops with the same arguments (so a graph of one replays the other from its buffers), and
    none of them reads a device value on the host (.item, nonzero, boolean indexing) or makes
    a tensor from host data."""
    ours, jobs, examples, pad_id = setup
    dropouts = [j.dropout for j in jobs]
    first = [examples[0][0:2], examples[1][0:2], examples[2][0:1]]
    # Other examples, and job a's tokens more or fewer, in the same bucket and as many segments.
    candidates = [[examples[0][i:i + 1], examples[1][j:j + 3], examples[2][k:k + 1]]
                  for i in range(8) for j in range(5) for k in range(8)]
    N = graphs.step_inputs(dropouts, first, [1] * 3, [1] * 3, pad_id).input_ids.size(1)
    second = next(rows for rows in candidates if graphs.step_inputs(dropouts, rows, [1] * 3, [1] * 3, pad_id)
                  .input_ids.size(1) == N and tokens(rows[0]) != tokens(first[0]))
    inputs = [graphs.step_inputs(dropouts, rows, [7, 5, 3], [11, None, 13], pad_id) for rows in (first, second)]
    inputs[1] = inputs[1]._replace(seed=inputs[1].seed * 3 + 1)
    N = inputs[0].input_ids.size(1)
    assert N == inputs[1].input_ids.size(1) and len(inputs[0].starts) == len(inputs[1].starts)
    assert not torch.equal(inputs[0].input_ids, inputs[1].input_ids)
    assert not torch.equal(inputs[0].adapter, inputs[1].adapter)
    ours.train()
    names = tuple(j.name for j in jobs)
    step = graphs.Step(ours, names, [p for n in names for p in lora.adapter_parameters(ours, n)], N,
                       len(inputs[0].starts) - 1, "cpu")
    step.run(inputs[0])   # the warm-up: builds the coefficient tables
    traces = []
    for step_input in inputs:
        for buffer, value in zip(step.inputs, step_input):
            buffer.copy_(value)
        with Recorder() as recorder:
            step.compute()
        traces.append(recorder.ops)
    assert len(traces[0]) > 1000
    assert traces[0] == traces[1]
    syncing = ("_local_scalar_dense", "nonzero", "masked_select", "lift_fresh", "masked_scatter", "unique",
               "repeat_interleave")
    assert not [op for op in traces[0] if any(s in op[0] for s in syncing)]
    bool_index = [op for op in traces[0] if op[0].startswith("aten.index.") and "torch.bool" in str(op[1])]
    assert not bool_index


def test_the_recorder_sees_host_reads(setup):
    """The check above can fail: fused_step's eager packed path reads the host (boolean
    indexing of the labelled positions) and its ops depend on the routing."""
    ours, jobs, examples, pad_id = setup
    ours.train()
    with Recorder() as recorder:
        train.fused_step(ours, jobs, [r[:2] for r in examples], [5, 5, 5], {}, pad_id, "cpu", packed=True, **GPU_PATH)
    assert [op for op in recorder.ops if "nonzero" in op[0] or "_local_scalar_dense" in op[0]]


def test_fits_only_what_the_fixed_step_computes(setup, tmp_path):
    ours, jobs, examples, _ = setup
    assert graphs.Graphs.fits(ours, jobs, examples, packed=True)
    assert not graphs.Graphs.fits(ours, jobs, examples, packed=False)
    dpo = job("d", jobs[0].data, objective="dpo")
    assert not graphs.Graphs.fits(ours, [jobs[0], dpo], examples[:2], packed=True)
    lora.add_adapters(ours, {"dora": lora.LoRAConfig(r=2, use_dora=True, targets=["q_proj"])})
    assert not graphs.Graphs.fits(ours, [jobs[0], job("dora", jobs[0].data)], examples[:2], True)
    assert not graphs.Graphs.fits(ours, jobs, [examples[0], [], examples[2]], True)


def test_a_run_with_cuda_graphs_trains_what_a_run_without_them_trains(tmp_path, base_dir, monkeypatch):
    """train.py with cuda_graphs (here the fixed-shape step runs eagerly) against the eager
    step on the GPU's path: the same adapters after several steps of three fused jobs, with
    dropout, gradient accumulation, a DPO job beside them that falls back to fused_step, and
    admissions as jobs finish."""
    jobs = [job("a", write_rows(tmp_path / "a.json", 8, 0, "reverse"), targets=list(Llama.LORA_TARGETS), dropout=0.2),
            job("b", write_rows(tmp_path / "b.json", 6, 1, "upper"), micro_batch_size=1, lr_schedule="cosine"),
            job("c", write_rows(tmp_path / "c.json", 4, 2, "count"), r=2, optimizer="sgd", epochs=3),
            job("d", write_pairs(tmp_path / "d.json", 4, 3), objective="dpo", epochs=1)]
    fixed_steps = []
    step = graphs.Graphs.step
    monkeypatch.setattr(graphs.Graphs, "step", lambda self, *a, **k: fixed_steps.append(a[1]) or step(self, *a, **k))
    runs = {}
    for graphed in (False, True):
        out = tmp_path / f"graphs-{graphed}"
        summary = train.train(run_cfg(base_dir, out, jobs, cuda_graphs=graphed, scheduler={"max_candidates": 2},
                                      fuse_adapters="always", dropout_draw="masks"))
        runs[graphed] = ({j.name: adapter(out, j.name) for j in jobs}, summary)
    for j in jobs:
        assert_same_adapter(runs[True][0][j.name], runs[False][0][j.name])
        assert runs[True][1][j.name]["steps"] == runs[False][1][j.name]["steps"] > 0
    assert len(fixed_steps) > 3 and all(job.objective == "sft" for jobs_of_step in fixed_steps for job in jobs_of_step)
