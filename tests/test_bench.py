"""bench.py's plumbing on a tiny model: the schema, and that every system ran the same tokens.
(Speed is bench.py's business, never asserted in a unit test.)"""
import json
import os

import pytest

import bench

# Each system in fresh processes that import torch, transformers and PEFT: ~40 s on 2 CPU cores.
slow = pytest.mark.skipif(os.environ.get("RUN_SLOW") != "1", reason="spawns a process per system; set RUN_SLOW=1")


# train-py runs `python train.py` on text rows: it needs a base with a tokenizer, which the tiny
# random base has not (test_train_py_system runs it on one that has).
TINY_SYSTEMS = [system for system in bench.SYSTEMS if system != "train-py"]


def run_tiny_bench(tmp_path, *extra):
    out = tmp_path / "bench.json"
    bench.main(["--tiny", "--quick", "--k", "2", "--seq", "alpaca", "--rows", "2", "--steps", "1",
                "--repeats", "1", "--out", str(out), "--systems", ",".join(TINY_SYSTEMS), *extra])
    return out


def assert_schema_and_equal_work(out):
    result = json.loads(out.read_text())
    records = result["records"]
    assert {r["system"] for r in records} == set(TINY_SYSTEMS)
    fields = {"system", "k", "tokens", "latency_s", "latency_spread_s", "tokens_per_s", "peak_mem_mb",
              "padding_fraction", "gpu_util", "dtype", "quant", "rows", "seq"}
    for r in records:
        assert fields <= r.keys()
        assert r["latency_s"] > 0 and r["peak_mem_mb"] > 0 and 0 <= r["padding_fraction"] < 1
    # Same work for every system: the same real tokens went through the forward pass.
    assert len({r["tokens"] for r in records}) == 1 and records[0]["tokens"] > 0
    # Packed systems pad nothing; padded ones pad ragged rows (and padded fused rows pad more
    # than each job's rows alone).
    by_system = {r["system"]: r for r in records}
    for system in ("ours", "ours-seq", "base-only", "peft-seq-packed", "peft-parallel-packed"):
        assert by_system[system]["padding_fraction"] == 0, system
    assert by_system["hf-base-only"]["padding_fraction"] >= by_system["peft-seq"]["padding_fraction"] > 0
    (ratios,) = result["ratios"]
    assert {"ours/peft-seq", "ours/peft-seq-packed", "ours/peft-parallel", "ours/peft-parallel-packed",
            "ours/ours-seq", "ours/base-only", "base/hf-base", "graphs/ours", "graphs/peft-parallel"} <= ratios.keys()
    # The fixed-shape step pads to its bucket: one more segment of at least one token.
    assert 0 < by_system["ours-graphs"]["padding_fraction"] < 0.5
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_quick_tiny_bench_schema_and_equal_work_in_process(tmp_path):
    """Every system's workers, run in this process: the same checks in seconds."""
    assert_schema_and_equal_work(run_tiny_bench(tmp_path, "--in-process"))


def test_unpacked_bench_pads_fused_rows_more_than_each_job_alone(tmp_path):
    out = run_tiny_bench(tmp_path, "--in-process", "--no-packing", "--systems", "ours,ours-seq")
    by_system = {r["system"]: r for r in json.loads(out.read_text())["records"]}
    assert by_system["ours"]["padding_fraction"] >= by_system["ours-seq"]["padding_fraction"] > 0


def test_rounds_pool_the_repeats_of_every_round(tmp_path):
    out = run_tiny_bench(tmp_path, "--in-process", "--systems", "ours,base-only", "--rounds", "2")
    result = json.loads(out.read_text())
    assert [(r["system"], r["repeats"]) for r in result["records"]] == [("ours", 2), ("base-only", 2)]
    assert "median of 2 repeats after a warm-up (2 rounds of 1)" in result["title"]


@slow
def test_quick_tiny_bench_schema_and_equal_work(tmp_path):
    """The real thing: each system in fresh processes, peft-parallel as k concurrent ones."""
    assert_schema_and_equal_work(run_tiny_bench(tmp_path))


def test_memory_scenario_measures_checkpointing_and_peft_processes(tmp_path):
    """The memory scenario's plumbing on a tiny model, in-process: activation peaks come from
    the profiler's tensor accounting, and checkpointing lowers the step's peak."""
    out = tmp_path / "memory.json"
    bench.main(["--tiny", "--scenario", "memory", "--k", "2", "--steps", "1", "--repeats", "1",
                "--in-process", "--out", str(out)])
    result = json.loads(out.read_text())["memory"]
    assert result["k"] == 2 and result["activation_peak_mb"] > result["activation_peak_checkpointed_mb"] > 0
    assert result["activation_cut"] == pytest.approx(result["activation_peak_mb"] / result["activation_peak_checkpointed_mb"])
    for how in ("plain", "checkpointed"):   # like for like: both sides without checkpointing, and both with it
        ours, peft = result[f"ours_{how}_peak_rss_mb"], result[f"peft_parallel_{how}_peak_rss_mb"]
        assert ours > 0 and peft > 0 and result[f"ours_over_peft_memory_{how}"] == pytest.approx(ours / peft)


def test_train_py_system_runs_train_py_on_the_same_tokens(base_dir):
    """train-py: `python train.py --config` on text rows made to the bench's token counts, a fresh
    process per repeat; its time and tokens come from run.json."""
    import argparse
    args = argparse.Namespace(base=str(base_dir), rows=2, steps=2, seq="24", repeats=1, r=4, dropout=0.05,
                              targets="q_proj,v_proj", dtype="float32", device="cpu", packing=True,
                              checkpointing=False)
    raw = bench.train_py_system(args, 2)
    assert len(raw["times"]) == 1 and raw["times"][0] > 0 and raw["peak_mb"] > 0
    # 2 jobs x 2 steps x 2 rows of about 24 tokens each (the words' text stops at or just past it)
    assert 2 * 2 * 2 * 24 <= raw["tokens"] <= 2 * 2 * 2 * 28 and raw["padded_tokens"] == raw["tokens"]
