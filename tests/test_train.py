"""The training loop: fused equals alone, exact accumulation, outputs, config errors."""
import dataclasses
import json
import os

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import data
import lora
from llama import Llama
import model as M
import fast
import objectives
import peft_format
import train
from conftest import Recorder, adapter, assert_same_adapter, job, randomize_B, run_cfg, write_rows


@pytest.mark.parametrize("gpu_path", [False, True])
def test_fused_job_equals_job_alone(tmp_path, base_dir, gpu_path):
    """Same seed, dropout on: fused with two other jobs or alone, the same final adapter. Also
    on the GPU's path run here (adapters in shared matmuls, dropout drawn as bool masks)."""
    path = dict(fuse_adapters="always", dropout_draw="masks") if gpu_path else {}
    d = tmp_path
    target = job("target", write_rows(d / "t.json", 12, 0, "reverse"))
    others = [job("wide", write_rows(d / "w.jsonl", 10, 1, "upper"), r=8, lr=3e-3, micro_batch_size=4,
                  targets=list(Llama.LORA_TARGETS), optimizer="sgd", momentum=0.9),
              job("count", write_rows(d / "c.json", 6, 2, "count"), lr_schedule="cosine", warmup_steps=1)]
    train.train(run_cfg(base_dir, d / "fused", [others[0], target, others[1]],
                        scheduler={"max_concurrent": 3, "max_candidates": 3}, **path))
    train.train(run_cfg(base_dir, d / "alone", [target], **path))
    fused, alone = adapter(d / "fused", "target"), adapter(d / "alone", "target")
    assert_same_adapter(fused, alone)
    # It trained: B moved away from its zero init.
    assert max(v.abs().max() for k, v in fused.items() if "lora_B" in k) > 1e-3


def test_micro_batch_split_gives_the_same_update(tmp_path, base_dir):
    rows = write_rows(tmp_path / "t.json", 8, 3, "reverse")
    runs = {}
    for mbs in (1, 4):
        out = tmp_path / f"mbs{mbs}"
        train.train(run_cfg(base_dir, out, [job("j", rows, dropout=0.0, micro_batch_size=mbs, epochs=1)]))
        runs[mbs] = adapter(out, "j")
    assert_same_adapter(runs[1], runs[4])


def test_loss_only_on_response_tokens(base_dir, tmp_path):
    tok = data.load_tokenizer(base_dir)
    examples = data.load_job_data(write_rows(tmp_path / "t.json", 4, 4, "reverse"), tok)
    batch = data.fuse([("a", examples)], tok.pad_id)
    ours = M.load_model(base_dir)
    losses, rows = objectives.token_losses(ours, batch)
    response = sum(sum(label != -100 for label in e.labels[1:]) for e in examples)
    assert losses.numel() == response < batch.num_tokens
    assert rows.tolist() == sorted(rows.tolist()) and set(rows.tolist()) == {0, 1, 2, 3}


def test_train_writes_outputs_and_adapters_load_in_peft(tmp_path, base_dir):
    import peft
    import transformers
    rows = write_rows(tmp_path / "t.json", 16, 5, "reverse")
    test_rows = write_rows(tmp_path / "test.json", 4, 6, "reverse")
    out = tmp_path / "out"
    summary = train.train(run_cfg(base_dir, out, [
        job("a", rows, test_data=test_rows, epochs=3, dropout=0.0, lr=3e-2, eval_every=2, save_every=4),
        job("b", rows, targets=["gate_proj", "down_proj"], max_steps=2)], scheduler={"max_candidates": 1}))
    assert json.loads((out / "config.json").read_text())["jobs"][0]["name"] == "a"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = [(r["event"], r["job"]) for r in lines if "event" in r and r["event"] != "eval"]
    # max_candidates=1: b is admitted only when a finishes.
    assert events == [("admit", "a"), ("finish", "a"), ("admit", "b"), ("finish", "b")]
    steps = [r for r in lines if "step" in r and "event" not in r]
    assert steps and all(r["tokens"] > 0 and r["peak_mem_mb"] > 0 for r in steps)
    assert summary["a"]["steps"] == 12 and summary["b"]["steps"] == 2
    assert summary["a"]["eval_loss"] < summary["a"]["initial_eval_loss"]  # it learned
    assert (out / "snapshots" / "a" / "step-4" / "adapter_model.safetensors").exists()
    assert not (out / "checkpoint").exists() and (out / "run.json").exists()  # finished: no run checkpoint left
    assert sum(1 for r in lines if r.get("event") == "eval") == 6
    # Every file the run wrote has the mode a plain open() gives under the umask (adapter weights
    # were once 0600: safetensors writes a private temporary file and renames it).
    umask = os.umask(0)
    os.umask(umask)
    modes = {str(f.relative_to(out)): oct(f.stat().st_mode & 0o777) for f in out.rglob("*") if f.is_file()}
    assert "a/adapter_model.safetensors" in modes and set(modes.values()) == {oct(0o666 & ~umask)}, modes
    # The saved adapter, loaded by PEFT onto transformers' model, gives our logits.
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(hf, out / "a")
    ours = M.load_model(base_dir)
    peft_format.load_peft(ours, out / "a")
    idx = torch.randint(0, 300, (2, 10))
    with lora.route(ours, ["a", "a"]):
        torch.testing.assert_close(ours(idx), pm(idx).logits, atol=1e-4, rtol=1e-4)


def write_config(tmp_path, base_dir, **changes):
    cfg = {"base_model": str(base_dir), "out_dir": str(tmp_path / "o"),
           "jobs": [{"name": "a", "data": write_rows(tmp_path / "t.json", 4, 7, "count")}]}
    cfg.update(changes)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.mark.parametrize("changes, overrides, message", [
    ({"sede": 1}, [], "cfg.json: sede: unknown key (did you mean 'seed'?)"),
    ({"seed": "x"}, [], "cfg.json: seed: expected int, got 'x'"),
    ({}, ["--scheduler.max_concurent=2"], "did you mean 'max_concurrent'"),
    ({}, ["--seed=abc"], "expected int, got 'abc'"),
    ({}, ["--jobs.zz.lr=1"], "no job named 'zz'"),
    ({"jobs": [{"name": "a", "data": "missing.json"}]}, [], "jobs[0].data (job 'a'): file not found: "),
    ({"jobs": [{"name": "a", "dat": "x.json"}]}, [], "cfg.json: jobs[0].dat: unknown key (did you mean 'data'?)"),
    ({}, ["--dtype=bf16"], "dtype: expected one of auto, float32, bfloat16, float16, got 'bf16'"),
    # Ranges and enums (issue 12's fuzz found each of these accepted, and wrong, or a traceback).
    ({}, ["--jobs.a.lr=NaN"], "jobs[0].lr: expected a finite number > 0, got nan"),
    ({}, ["--jobs.a.lr=Infinity"], "jobs[0].lr: expected a finite number > 0, got inf"),
    ({}, ["--jobs.a.lr=0"], "jobs[0].lr: expected a finite number > 0, got 0.0"),
    ({}, ["--jobs.a.lr=1e300"], "jobs[0].lr: expected a finite number > 0, got 1e+300"),   # past fp32: SGD crashed
    ({}, ["--jobs.a.alpha=-1"], "jobs[0].alpha: expected a finite number > 0"),
    ({}, ["--jobs.a.max_grad_norm=-1"], "jobs[0].max_grad_norm: expected null (no clipping) or a finite number > 0"),
    ({}, ["--jobs.a.cutoff_len=-1"], "jobs[0].cutoff_len: expected 2 <= cutoff_len"),
    ({}, ["--jobs.a.lr_schedule=cosin"], "jobs[0].lr_schedule: expected one of constant, linear, cosine, got 'cosin'"),
    ({}, ["--jobs.a.batch_size=-4"], "jobs[0].batch_size: expected 1 <= batch_size"),
    ({}, ["--jobs.a.micro_batch_size=3"], "jobs[0].micro_batch_size: expected a divisor of batch_size 16"),
    ({}, ["--jobs.a.epochs=-1"], "jobs[0].epochs: expected 1 <= epochs"),
    ({}, ["--jobs.a.dropout=1"], "jobs[0].dropout: expected 0 <= dropout < 1"),
    ({}, ["--jobs.a.r=0"], "jobs[0].r: expected 1 <= r"),
    ({}, ["--jobs.a.optimizer=adam"], "jobs[0].optimizer: expected one of adamw, sgd"),
    ({}, ["--jobs.a.early_stop=2"], "jobs[0].early_stop: needs test_data and eval_every > 0"),
    ({}, ["--jobs.a.name=/abs/a"], "jobs[0].name: expected a plain folder name"),
    ({}, ["--jobs.a.name=a/checkpoint-1"], "jobs[0].name: expected a plain folder name"),
    ({}, ["--jobs.a.name=checkpoint"], "jobs[0].name: expected a plain folder name"),
    ({"jobs": [{"name": "a", "data": "t.json"}, {"name": "A", "data": "t.json"}]}, [],
     "jobs[1].name: expected a unique name (jobs[0] has it)"),
    ({}, ["--device=tpu"], "device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
    ({}, ["--quant=nf5"], "quant: quant='nf5': expected null or one of"),
    ({}, ["--scheduler.max_concurrent=0"], "scheduler.max_concurrent: expected >= 1"),
    ({}, ["--scheduler.memory_budget_gb=-1"], "scheduler.memory_budget_gb: expected null or a number > 0"),
    ({}, ["--checkpoint_every=-1"], "checkpoint_every: expected >= 0"),
    # Against the base folder's config.json, before any weight is read.
    ({}, ["--jobs.a.targets=q_proj,qq_proj"], "jobs[0].targets: 'qq_proj' not in"),
    ({}, ["--jobs.a.cutoff_len=4096"], "jobs[0].cutoff_len: 4096 is more than the 256 positions of"),
])
def test_config_errors_are_one_clear_line(tmp_path, base_dir, capsys, changes, overrides, message):
    path = write_config(tmp_path, base_dir, **changes)
    assert train.main(["--config", path, *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_overrides_are_typed(tmp_path, base_dir):
    path = write_config(tmp_path, base_dir)
    cfg = train.load_config(path, ["--seed=7", "--scheduler.strategy=optimal-fit", "--jobs.a.lr=0.5",
                                   "--jobs.a.targets=q_proj,up_proj", "--quant=null"])
    assert (cfg.seed, cfg.scheduler.strategy, cfg.jobs[0].lr) == (7, "optimal-fit", 0.5)
    assert cfg.jobs[0].targets == ["q_proj", "up_proj"] and cfg.quant is None


def test_mlora_config_is_translated(tmp_path, base_dir):
    rows = write_rows(tmp_path / "t.json", 4, 8, "count")
    mlora = {"cutoff_len": 128, "save_step": 0, "train_lora_candidate_num": 3,
             "train_lora_simultaneously_num": 2, "train_strategy": "optim",
             "lora": [{"name": "x", "output": "x", "optim": "sgd", "lr": 0.01, "momentum": 0.5,
                       "batch_size": 4, "micro_batch_size": 2, "num_epochs": 1, "r": 4, "alpha": 8,
                       "dropout": 0.0, "target_modules": {"q_proj": True, "k_proj": False, "down_proj": True},
                       "data": rows, "prompt": "alpaca"}]}
    path = tmp_path / "mlora.json"
    path.write_text(json.dumps(mlora))
    cfg = train.load_config(str(path), [f"--base_model={base_dir}"])
    j = cfg.jobs[0]
    assert (j.optimizer, j.momentum, j.targets, j.cutoff_len, j.epochs) == ("sgd", 0.5, ["q_proj", "down_proj"], 128, 1)
    assert (cfg.scheduler.strategy, cfg.scheduler.max_candidates, cfg.scheduler.max_concurrent) == ("optimal-fit", 3, 2)


def test_lora_fields_of_a_job_reach_the_adapter(tmp_path, base_dir):
    """Every LoRAConfig field is a job field of the same name, from a file or an override, and
    reaches the trained adapter and its saved config."""
    assert {f.name for f in dataclasses.fields(lora.LoRAConfig)} <= {f.name for f in dataclasses.fields(train.JobConfig)}
    rows = write_rows(tmp_path / "t.json", 4, 0, "reverse")
    config = {"base_model": str(base_dir), "dtype": "float32", "device": "cpu", "out_dir": str(tmp_path / "out"),
              "jobs": [{"name": "a", "data": rows, "r": 16, "alpha": 8, "use_rslora": True, "init": "gaussian",
                        "targets": ["q_proj"], "batch_size": 2, "micro_batch_size": 2, "epochs": 1}]}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(config))
    cfg = train.load_config(str(path), ["--jobs.a.dropout=0.2"])
    assert cfg.jobs[0].lora_config() == lora.LoRAConfig(r=16, alpha=8, dropout=0.2, targets=["q_proj"],
                                                         init="gaussian", use_rslora=True)
    train.train(cfg)
    saved = json.loads((tmp_path / "out" / "a" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["lora_dropout"], saved["use_rslora"], saved["init_lora_weights"]) \
        == (16, 8, 0.2, True, "gaussian")
    with pytest.raises(train.ConfigError, match="use_rslora: expected bool"):
        train.load_config(str(path), ["--jobs.a.use_rslora=7"])


def test_metrics_hold_null_loss_before_a_jobs_first_step(tmp_path, base_dir):
    """metrics.jsonl holds JSON (null, never NaN) for a job that has not stepped yet."""
    d = tmp_path
    jobs = [job("slow", write_rows(d / "s.json", 8, 0, "reverse"), batch_size=8, micro_batch_size=2, epochs=1),
            job("fast", write_rows(d / "f.json", 4, 1, "count"), batch_size=2, micro_batch_size=2, epochs=1)]
    train.train(run_cfg(base_dir, d / "out", jobs, scheduler={"max_concurrent": 2}))
    steps = [json.loads(line) for line in (d / "out" / "metrics.jsonl").read_text().splitlines()
             if line.startswith('{"step"')]
    assert steps[0]["jobs"]["slow"] == {"step": 0, "loss": None, "lr": None}
    assert steps[0]["jobs"]["fast"]["step"] == 1 and steps[0]["jobs"]["fast"]["loss"] > 0


def test_dtype_auto_is_fp32_on_cpu(base_dir):
    assert M.resolve_dtype("auto", "cpu") == torch.float32 and M.resolve_dtype("auto", "cuda:0") == torch.bfloat16
    assert M.load_model(base_dir, dtype="auto").lm_head.weight.dtype == torch.float32


def test_chunked_loss_equals_full_logits_cross_entropy(base_dir, monkeypatch):
    """The output layer + loss in chunks gives the losses and adapter gradients of the plain
    [N, V] logits and F.cross_entropy, with chunks that do not divide N."""
    net = M.load_model(base_dir, dtype=torch.float32)
    lora.add_adapters(net, {"a": lora.LoRAConfig(r=4, targets=["q_proj", "down_proj"])})
    randomize_B(net, "a")
    ids = torch.randint(0, net.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :7] = -100
    labels[2, 15:] = -100
    batch = data.Batch(ids, labels, torch.tensor([20, 20, 15]), ["a"] * 3)
    results = []
    for chunked in (True, False):
        with lora.route(net, batch.adapter_names):
            if chunked:
                # chunks of 5 rows
                losses, rows = objectives.token_losses(net, batch, chunk_elements=5 * net.config.vocab_size + 1, min_rows=1)
            else:
                keep = torch.zeros_like(labels, dtype=torch.bool)
                keep[:, :-1] = labels[:, 1:] != -100
                losses = torch.nn.functional.cross_entropy(net(ids, output_mask=keep), labels[:, 1:][keep[:, :-1]],
                                                           reduction="none")
            (losses * torch.linspace(0.5, 2, len(losses))).sum().backward()
        results.append((losses.detach(), [p.grad.clone() for p in lora.adapter_parameters(net, "a")]))
        net.zero_grad(set_to_none=True)
    assert len(results[0][0]) == 13 + 13 + 8  # labels 7..19, 7..19 and 7..14
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    for got, expected in zip(results[0][1], results[1][1]):   # float32 noise scales with the tensor's largest
        torch.testing.assert_close(got, expected, atol=1e-6 * float(expected.abs().max()), rtol=1e-4)


def test_chunked_loss_of_half_precision_hidden_states_is_computed_in_float32(monkeypatch):
    """bf16 hidden states and output layer (a GPU's): the logits of each chunk are taken to fp32
    before the softmax, as F.cross_entropy over the fp32 logits of the same bf16 matmul."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 32, generator=g).bfloat16().requires_grad_()
    weight, targets = torch.randn(100, 32, generator=g).bfloat16(), torch.randint(0, 100, (50,), generator=g)
    losses = fast.chunked_token_losses(hidden, weight, targets, 7 * 100, 1)   # chunks of 7 rows, the last of 1
    losses.sum().backward()
    grad, hidden.grad = hidden.grad, None
    expected = torch.nn.functional.cross_entropy((hidden @ weight.t()).float(), targets, reduction="none")
    expected.sum().backward()
    assert losses.dtype == torch.float32
    torch.testing.assert_close(losses, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, hidden.grad)


def test_loss_chunks_have_at_least_the_minimum_rows(monkeypatch):
    """A large vocabulary makes LOSS_CHUNK_ELEMENTS few rows; chunks then take
    LOSS_CHUNK_MIN_ROWS rows (two output-layer matmuls per chunk), and the losses and
    gradient stay F.cross_entropy's."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 32, generator=g, requires_grad=True)
    weight, targets = torch.randn(100, 32, generator=g), torch.randint(0, 100, (50,), generator=g)
    with Recorder() as recorder:
        # 7 rows of a 100-word vocabulary, but chunks of at least 20: 20, 20 and 10 rows
        losses = fast.chunked_token_losses(hidden, weight, targets, chunk_elements=7 * 100, min_rows=20)
    assert sum(op.startswith("aten.mm.") for op, *_ in recorder.ops) == 2 * 3
    losses.sum().backward()
    expected = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, reduction="none")
    torch.testing.assert_close(losses, expected)
    torch.testing.assert_close(hidden.grad, torch.autograd.grad(expected.sum(), hidden)[0])


def test_activation_checkpointing_trains_the_same_adapters(tmp_path, base_dir, monkeypatch):
    """A run option: each block recomputed in backward, dropout masks redrawn the same; the
    adapters end as without it."""
    import llama
    calls = []
    monkeypatch.setattr(llama, "checkpoint", lambda *a, **kw: calls.append(1) or checkpoint(*a, **kw))
    d = tmp_path
    jobs = [job("a", write_rows(d / "a.json", 8, 0, "reverse"), dropout=0.2, targets=list(Llama.LORA_TARGETS)),
            job("b", write_rows(d / "b.json", 6, 1, "count"))]
    for name, checkpointing in (("plain", False), ("ckpt", True)):
        train.train(run_cfg(base_dir, d / name, jobs, activation_checkpointing=checkpointing,
                            scheduler={"max_concurrent": 2}))
    assert calls  # the checkpointed run really went through torch's checkpoint
    for name in ("a", "b"):
        assert_same_adapter(adapter(d / "ckpt", name), adapter(d / "plain", name))


@pytest.mark.parametrize("draw", ["auto", "masks"])
def test_packed_training_equals_padded(tmp_path, base_dir, draw):
    """Packing changes the layout, not what is learned: two jobs of ragged rows fused, dropout
    on, trained packed (one row, no padding) and padded end with the same adapters. The dropout
    masks are drawn over each job's real tokens in order, so they match too (draw "masks":
    as a GPU draws them, bool masks laid into the padded rows)."""
    d = tmp_path
    jobs = [job("rev", write_rows(d / "r.json", 8, 7, "reverse"), dropout=0.3,
                targets=list(Llama.LORA_TARGETS), train_on_inputs=True),
            job("count", write_rows(d / "c.json", 6, 8, "count"), r=8, micro_batch_size=4)]
    summaries = {}
    for packing in (True, False):
        summaries[packing] = train.train(run_cfg(base_dir, d / str(packing), jobs, packing=packing,
                                                 scheduler={"max_concurrent": 2}, dropout_draw=draw))
    for j in jobs:
        assert_same_adapter(adapter(d / "True", j.name), adapter(d / "False", j.name))
        assert summaries[True][j.name]["padding"] == 0 < summaries[False][j.name]["padding"]
    runs = {p: json.loads((d / str(p) / "run.json").read_text()) for p in (True, False)}
    assert runs[True]["tokens"] == runs[False]["tokens"] == runs[True]["padded_tokens"] < runs[False]["padded_tokens"]


def test_pack_lays_examples_end_to_end():
    examples = [data.Example([1, 2, 3], [-100, 2, 3]), data.Example([4, 5], [4, 5]), data.Example([6], [6])]
    batch = data.pack([("a", examples[:2]), (None, examples[2:])])
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6]]
    # Each example's first label is dropped: the token before it is another example's.
    assert batch.labels.tolist() == [[-100, 2, 3, -100, 5, -100]]
    assert batch.segments == (3, 2, 1) and batch.adapter_names == ["a", "a", None] and batch.num_tokens == 6
    keep = torch.tensor([[False, True, True, False, True, True]])
    assert batch.example_of(keep).tolist() == [0, 0, 1, 2]
    padded = data.fuse([("a", examples[:2]), (None, examples[2:])], pad_id=0, multiple_of=4)
    assert padded.segments is None and padded.input_ids.shape == (3, 4)
    assert padded.example_of(torch.ones(3, 4, dtype=torch.bool)).tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_packed_route_needs_adjacent_examples(tmp_path, base_dir):
    net = M.load_model(base_dir)
    lora.add_adapters(net, {"a": lora.LoRAConfig(), "b": lora.LoRAConfig()})
    with pytest.raises(ValueError, match="adapter 'a'.s examples must be adjacent"):
        with lora.route(net, ["a", "b", "a"], lengths=[2, 2, 2], packed=True):
            pass


def test_a_step_that_leaves_non_finite_weights_is_undone(base_dir):
    """optimizer_step: finite gradients, but an update that overflows the weights; the job gets
    its weights from before the step back, bit for bit, and the reason it stops."""
    from types import SimpleNamespace
    ours = M.load_model(base_dir)
    lora.add_adapters(ours, {"a": lora.LoRAConfig(r=2, targets=["q_proj"])})
    params = lora.adapter_parameters(ours, "a")
    for p in params:
        p.grad = torch.full_like(p, 1e3)      # lr x grad overflows fp32 even after any warmup's scaling
    before = [p.detach().clone() for p in params]
    cfg = train.JobConfig(name="a", data="-", lr=3e38, optimizer="sgd", max_grad_norm=None)
    s = SimpleNamespace(config=cfg, loss_sum=torch.zeros(()), reward_sums=torch.zeros(4), step=0, total_steps=4,
                        optimizer=torch.optim.SGD(params, lr=cfg.lr), lr=None, last_loss=None, last_rewards=None)
    reason = train.optimizer_step(SimpleNamespace(model=ours, device="cpu"), s)
    assert reason == "non-finite weights after step 1 (undone)" and s.step == 0
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(p.grad is None for p in params)
    # The same with a sane lr steps, and changes the weights.
    for p in params:
        p.grad = torch.full_like(p, 10.0)
    s.config = train.JobConfig(name="a", data="-", lr=1e-3, optimizer="sgd")
    assert train.optimizer_step(SimpleNamespace(model=ours, device="cpu"), s) is None and s.step == 1
    assert not torch.equal(params[0], before[0])


def test_the_start_up_summary_says_the_steps_run_and_names_the_default_targets(tmp_path, base_dir):
    """jobs.describe: each job's optimizer steps as the scheduler plans them (max_steps cutting its
    epochs said so), and the family's DEFAULT_TARGETS by name when a job names none."""
    import jobs
    rows = write_rows(tmp_path / "t.json", 20, 5, "reverse")   # 20 rows, batch 4: 5 steps an epoch
    cfg = run_cfg(base_dir, tmp_path / "o", [job("cut", rows, epochs=3, max_steps=4, targets=None),
                                             job("whole", rows, epochs=3, max_steps=40)])
    read = jobs.read_inputs(cfg)
    lines = jobs.describe(cfg, "cpu", read["train_sets"]).splitlines()[1:]
    planned = {plan.name: plan.total_steps for plan in read["plans"]}
    assert planned == {"cut": 4, "whole": 15}
    assert lines[0].startswith("  cut: 20 rows x 3 epochs, max_steps 4: 4 optimizer steps, r=4 alpha=8 "
                               f"{','.join(Llama.DEFAULT_TARGETS)} (the default targets), ")
    assert lines[1].startswith("  whole: 20 rows x 3 epochs: 15 optimizer steps, r=4 alpha=8 q_proj,v_proj, ")


def test_run_ends_with_held_out_prompts_base_vs_adapter_in_one_batch(tmp_path, base_dir, monkeypatch, capsys):
    """show_examples: the first N held-out prompts of each job with test_data, as its template builds
    them (data.build_prompt), base and adapter rows in ONE generate call, each answer what the
    saved adapter (or the bare base) gives alone; training.json beside every saved adapter."""
    import generate
    calls, real = [], generate.generate

    def recorded(*args, **kw):
        calls.append((args, kw, real(*args, **kw)))
        return calls[-1][2]
    monkeypatch.setattr(generate, "generate", recorded)
    rows = write_rows(tmp_path / "t.json", 8, 5, "reverse")
    tests = {"a": write_rows(tmp_path / "a.json", 4, 6, "reverse"), "m": write_rows(tmp_path / "m.json", 3, 7, "count")}
    jobs = [job("a", rows, test_data=tests["a"], max_steps=2, save_every=1),
            job("m", rows, test_data=tests["m"], template="mlora", max_steps=2),
            job("plain", rows, max_steps=1)]
    out = tmp_path / "out"
    train.train(run_cfg(base_dir, out, jobs, show_examples=2))
    text = capsys.readouterr().out
    assert len(calls) == 1
    (_, prompts, adapters), kw, outputs = calls[0]
    tok = data.load_tokenizer(base_dir)
    expected = []
    for spec in jobs[:2]:
        for row in json.loads(open(tests[spec.name]).read())[:2]:
            ids = tok.add_prefix(tok.encode(data.build_prompt(spec.template, tok, row["instruction"], row["input"])))
            expected += [(ids, None), (ids, spec.name)]
    assert list(zip(prompts, adapters)) == expected
    # Each row's answer is what the saved adapter (or the bare base) gives alone.
    alone = M.load_model(base_dir)
    for name in ("a", "m"):
        peft_format.load_peft(alone, out / name)
    for ids, name, answer in zip(prompts, adapters, outputs):
        assert real(alone, [ids], [name], **kw) == [answer]
    assert any(outputs[i] != outputs[i + 1] for i in range(0, len(outputs), 2))   # the adapters answer otherwise
    shown = text[text.index("held-out prompts, base vs adapter (8 rows in one batch"):]
    for name in ("a", "m"):
        assert shown.count(f"\n{name}  > ") == 2 and shown.count(f"\n    {name:<8}  ") == 2
    assert shown.count("\n    base      ") == 4 and "\nplain  > " not in shown
    for folder, template in ((out / "a", "alpaca"), (out / "m", "mlora"), (out / "snapshots" / "a" / "step-1", "alpaca")):
        assert json.loads((folder / "training.json").read_text()) == {"template": template, "cutoff_len": 256}
    # show_examples=0: no generation at the end.
    calls.clear()
    train.train(run_cfg(base_dir, tmp_path / "off", jobs[:1], show_examples=0))
    assert not calls and "held-out prompts" not in capsys.readouterr().out
