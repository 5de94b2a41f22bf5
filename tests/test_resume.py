"""Never lose a run (issue 12): a run killed at any point and rerun ends bitwise equal to an
uninterrupted one; out_dir is claimed before it is touched; a non-finite job stops alone.

The killed runs are forked children that SIGKILL themselves at a chosen point (a patched
function); the rerun is the same command, in this process."""
import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import run_killed, write_rows


def write_run(tmp_path, base_dir, out_name="out", **changes):
    """A config file: 3 jobs, 2 admitted at a time (c waits for a slot), dropout, early
    stopping with best-adapter restore (a), SGD with momentum (b), snapshots, checkpoints every 2 steps."""
    rows = write_rows(tmp_path / "t.json", 8, 5, "reverse")
    upper = write_rows(tmp_path / "u.jsonl", 6, 6, "upper")
    test_rows = write_rows(tmp_path / "test.json", 4, 7, "reverse")
    common = {"r": 4, "alpha": 8, "dropout": 0.1, "targets": ["q_proj", "v_proj", "down_proj"],
              "batch_size": 4, "micro_batch_size": 2}
    cfg = {"base_model": str(base_dir), "dtype": "float32", "device": "cpu", "out_dir": str(tmp_path / out_name),
           "checkpoint_every": 2, "scheduler": {"max_candidates": 2, "max_concurrent": 2},
           "jobs": [{"name": "a", "data": rows, "test_data": test_rows, "eval_every": 1, "early_stop": 2,
                     "lr": 2e-2, "epochs": 2, "save_every": 2, **common},
                    {"name": "b", "data": upper, "optimizer": "sgd", "momentum": 0.9, "lr": 5e-2, "epochs": 2, **common},
                    {"name": "c", "data": rows, "lr": 1e-2, "epochs": 1, "lr_schedule": "cosine", "warmup_steps": 1,
                     **common}]}
    cfg.update(changes)
    path = tmp_path / f"{out_name}.json"
    path.write_text(json.dumps(cfg))
    return str(path), Path(cfg["out_dir"])


def outputs(out: Path) -> dict:
    """Every adapter and snapshot of a run, and each fused step's per-job losses."""
    files = {str(p.relative_to(out)): load_file(p) for p in sorted(out.rglob("adapter_model.safetensors"))}
    steps = [{name: job["loss"] for name, job in record["jobs"].items()}
             for record in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "jobs" in record]
    return {"files": files, "steps": steps, "summary_steps": {n: s["steps"] for n, s in
                                                                json.loads((out / "summary.json").read_text()).items()}}


def assert_bitwise_equal(a: dict, b: dict):
    assert a["files"].keys() == b["files"].keys()
    for name in a["files"]:
        for key, tensor in a["files"][name].items():
            assert torch.equal(tensor, b["files"][name][key]), f"{name} {key} differs"
    assert a["steps"] == b["steps"] and a["summary_steps"] == b["summary_steps"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: (its base folder, its outputs)."""
    from conftest import make_hf_model, save_hf
    from tokenizer_util import write_tokenizer_json
    tmp = tmp_path_factory.mktemp("reference")
    vocab = write_tokenizer_json(tmp / "base")
    base = save_hf(make_hf_model(vocab_size=max(vocab, 384), tie_word_embeddings=True), tmp / "base")
    path, out = write_run(tmp, base)
    assert train.main(["--config", path]) == 0
    return base, outputs(out)


def is_named(name):
    return lambda path, *rest: Path(path).name == name


KILL_POINTS = {
    "mid-step, before any checkpoint": dict(target="train.fused_step", n=1),
    "mid-step, between checkpoints": dict(target="train.fused_step", n=7),
    "during a checkpoint write (temp file written, not renamed)": dict(target="torch.save", n=2),
    "right after a checkpoint": dict(target="state.save_checkpoint", n=3),
    "during an adapter save (weights written, config not)": dict(
        target="files.atomic_write", n=1, before=True, when=is_named("adapter_config.json")),
    "between an adapter's folder swap and the next checkpoint": dict(target="files.replace_dir", n=2),
    "while writing the results (summary written, run.json not)": dict(
        target="files.atomic_write", n=1, before=True, when=is_named("run.json")),
}


@pytest.mark.parametrize("point", KILL_POINTS)
def test_killed_run_resumes_bitwise(tmp_path, reference, point):
    base, expected = reference
    path, out = write_run(tmp_path, base)
    assert run_killed(path, KILL_POINTS[point]) == -signal.SIGKILL
    assert not (out / "run.json").exists()
    assert train.main(["--config", path]) == 0            # the same command
    assert_bitwise_equal(outputs(out), expected)
    assert not list(out.glob(".*")), "temporary files left behind"


def test_sigint_checkpoints_and_exits_cleanly(tmp_path, reference, capsys):
    base, expected = reference
    path, out = write_run(tmp_path, base, checkpoint_every=0)   # only the signal checkpoints
    assert run_killed(path, dict(target="train.fused_step", n=5, sig=signal.SIGINT)) == 128 + signal.SIGINT
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    assert state["step"] == 5                                   # the step it was in completed
    assert train.main(["--config", path]) == 0
    assert "resumed" in capsys.readouterr().out
    assert_bitwise_equal(outputs(out), expected)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_out_dir_is_claimed_before_it_is_touched(tmp_path, reference, capsys):
    base, _ = reference
    path, out = write_run(tmp_path, base)
    assert train.main(["--config", path]) == 0
    before = snapshot(out)
    # The same command again: finished, nothing to do, nothing touched.
    assert train.main(["--config", path]) == 0
    assert "nothing to do" in capsys.readouterr().out and snapshot(out) == before
    # Another config into it: one line naming the first difference; nothing touched.
    assert train.main(["--config", path, "--jobs.b.lr=0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds a run of another config (jobs[1].lr: 0.05 there, 0.1 here)" in err and "\n" not in err
    assert snapshot(out) == before
    # A config that fails validation, a bad data row: nothing touched either.
    Path(tmp_path / "bad.json").write_text('[{"instruction": "x"}]')
    assert train.main(["--config", path, f"--jobs.c.data={tmp_path / 'bad.json'}", "--overwrite"]) == 2
    assert snapshot(out) == before
    # --overwrite: that run's outputs replaced, a file of the user's kept.
    (out / "notes.txt").write_text("mine")
    assert train.main(["--config", path, "--jobs.b.lr=0.1", "--jobs.c.max_steps=0", "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and not (out / "c").exists()
    assert json.loads((out / "config.json").read_text())["jobs"][1]["lr"] == 0.1
    # A folder that holds no run of ours is refused, even with --overwrite.
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.txt").write_text("x")
    assert train.main(["--config", path, f"--out_dir={other}", "--overwrite"]) == 2
    assert "holds no run of train.py" in capsys.readouterr().err and snapshot(other) == {"data.txt": b"x"}


def test_changed_data_is_not_resumed(tmp_path, reference, capsys):
    base, _ = reference
    path, out = write_run(tmp_path, base)
    assert run_killed(path, dict(target="state.save_checkpoint", n=1)) == -signal.SIGKILL
    before = snapshot(out)
    write_rows(tmp_path / "u.jsonl", 10, 99, "upper")   # b's data changed under the run
    assert train.main(["--config", path]) == 2
    assert "u.jsonl: changed since the run" in capsys.readouterr().err and snapshot(out) == before


def test_links_in_out_dir_are_never_followed(tmp_path, reference):
    """Issue 29.14: links inside out_dir to folders outside it, one named as a partial write,
    one beside the jobs, one among the snapshots; resuming, then --overwrite, unlink what they
    clean (never deleting through a link), and every folder outside with its files stays."""
    base, _ = reference
    path, out = write_run(tmp_path, base)
    assert run_killed(path, dict(target="state.save_checkpoint", n=1)) == -signal.SIGKILL
    outside = {name: tmp_path / name for name in ("outside", "outside_tmp", "outside_snap")}
    for folder in outside.values():   # each holds what remove_partial_writes looks for
        for inner in (".a.tmp-7", ".b.old-8", "."):
            (folder / inner).mkdir(parents=True, exist_ok=True)
            (folder / inner / "keep.txt").write_text("mine")
    before = {name: snapshot(folder) for name, folder in outside.items()}
    (out / "link").symlink_to(Path("..") / "outside")
    (out / ".a.tmp-999").symlink_to(outside["outside_tmp"])
    (out / "snapshots").mkdir(exist_ok=True)
    (out / "snapshots" / "link").symlink_to(outside["outside_snap"])
    assert train.main(["--config", path]) == 0            # resumed: remove_partial_writes
    assert not (out / ".a.tmp-999").is_symlink()          # the partial write's link went
    assert {name: snapshot(folder) for name, folder in outside.items()} == before
    (out / "c").rename(out / "c_moved")                   # job c's folder and the checkpoint: links
    (out / "c").symlink_to(outside["outside"])
    (out / "checkpoint").symlink_to(outside["outside_snap"])
    assert train.main(["--config", path, "--jobs.c.max_steps=1", "--overwrite"]) == 0   # clear_run
    assert not (out / "c").is_symlink() and not (out / "checkpoint").exists()
    assert {name: snapshot(folder) for name, folder in outside.items()} == before


# ----------------------------------------------------------------------------- non-finite values

@pytest.mark.parametrize("fuse", ["never", "always"])
def test_a_nonfinite_job_stops_alone(tmp_path, reference, capsys, fuse):
    """Job bad (SGD, lr 1e20, no clipping) blows up after its first step. It stops with its
    last finite adapter, flagged, exit 3; a and b end exactly as in a run where bad stopped
    there by max_steps, on both adapter paths (per adapter, and concatenated, where a NaN
    would reach every adapter as 0 x NaN)."""
    base, _ = reference
    rows = write_rows(tmp_path / "t.json", 8, 5, "reverse")
    jobs = [{"name": n, "data": rows, "r": 4, "alpha": 8, "dropout": 0.1, "batch_size": 4, "micro_batch_size": 2,
             "epochs": 2, "lr": 1e-2} for n in ("a", "b")]
    bad = {**jobs[0], "name": "bad", "optimizer": "sgd", "lr": 1e20, "max_grad_norm": None}

    def run(out, bad_job):
        cfg = {"base_model": str(base), "dtype": "float32", "device": "cpu", "out_dir": str(tmp_path / out),
               "fuse_adapters": fuse,
               "scheduler": {"max_candidates": 3, "max_concurrent": 3}, "jobs": [jobs[0], bad_job, jobs[1]]}
        (tmp_path / f"{out}.json").write_text(json.dumps(cfg))
        code = train.main(["--config", str(tmp_path / f"{out}.json")])
        return code, json.loads((tmp_path / out / "summary.json").read_text())

    code, summary = run("blowup", bad)
    assert code == 3 and "non-finite" in capsys.readouterr().err
    assert summary["bad"]["nonfinite"] and summary["bad"]["stopped"].startswith("non-finite")
    stopped_at = summary["bad"]["steps"]
    assert 1 <= stopped_at < 4 and not summary["a"]["nonfinite"] and not summary["b"]["nonfinite"]
    code, clean = run("clean", {**bad, "max_steps": stopped_at})
    assert code == 0
    for name in ("a", "b", "bad"):
        got, want = load_file(tmp_path / "blowup" / name / "adapter_model.safetensors"), \
            load_file(tmp_path / "clean" / name / "adapter_model.safetensors")
        for key in want:
            assert torch.isfinite(got[key]).all() and torch.equal(got[key], want[key]), f"{name} {key}"


def test_a_killed_run_with_cuda_graphs_resumes_bitwise(tmp_path, reference):
    """cuda_graphs (the fixed-shape step, eager on a CPU): killed right after its second
    checkpoint and rerun, it ends bitwise equal to its own uninterrupted run (the dropout
    seeds come from the jobs' checkpointed streams, as on the eager path)."""
    base, _ = reference
    whole_path, whole = write_run(tmp_path, base, out_name="whole", cuda_graphs=True)
    assert train.main(["--config", whole_path]) == 0
    path, out = write_run(tmp_path, base, cuda_graphs=True)
    assert run_killed(path, dict(target="state.save_checkpoint", n=2)) == -signal.SIGKILL
    assert (out / "checkpoint").exists() and not (out / "run.json").exists()
    assert train.main(["--config", path]) == 0
    assert_bitwise_equal(outputs(out), outputs(whole))


# ----------------------------------------------------------------------------- two Ctrl-Cs; two runs at once (issue 29)

def forked_main(path: str, patch=None, outcome=None):
    """train.main(["--config", path]) in a forked child (patch(): set up in it first); its exit
    code. `outcome` (a multiprocessing queue) receives what it printed on stderr."""
    import contextlib
    import io
    import multiprocessing
    import os

    def child():
        if patch is not None:
            patch()
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            status = train.main(["--config", path])
        if outcome is not None:
            outcome.put(err.getvalue())
            outcome.close()
            outcome.join_thread()   # flushed before os._exit
        os._exit(status)
    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    return process


def test_ctrl_c_twice_says_what_happened_and_the_rerun_says_it_starts_over(tmp_path, reference, capsys):
    """A second SIGINT inside step 2, before any checkpoint: stopped at once, saying that step
    was not checkpointed and that the same command starts the run over; the rerun says it does,
    and ends as the uninterrupted run."""
    import multiprocessing
    import os
    base, expected = reference
    path, out = write_run(tmp_path, base, checkpoint_every=0)

    def twice():
        real, calls = train.fused_step, [0]

        def fused_step(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 2:
                os.kill(os.getpid(), signal.SIGINT)   # noted: checkpoint after this step
                os.kill(os.getpid(), signal.SIGINT)   # again: stop at once
            return real(*args, **kwargs)
        train.fused_step = fused_step
    queue = multiprocessing.get_context("fork").Queue()
    process = forked_main(path, twice, queue)
    process.join(120)
    said = queue.get(timeout=10)
    assert process.exitcode == 128 + signal.SIGINT
    assert "SIGINT again during fused step 2: stopped at once" in said and "starts the run over" in said, said
    assert "interrupted before training started" not in said
    assert not (out / "checkpoint").exists()
    assert train.main(["--config", path]) == 0
    assert "wrote no checkpoint: it starts over" in capsys.readouterr().out
    assert_bitwise_equal(outputs(out), expected)


def test_a_second_run_on_the_same_out_dir_stops_and_touches_nothing(tmp_path, reference, capsys):
    """The same command twice at once: the one that finds out_dir held says so in one line with
    the holder's pid and writes nothing; the other's run is whole (every metrics line parses)."""
    import files
    import os
    base, expected = reference
    path, out = write_run(tmp_path, base)
    out.mkdir()
    with files.lock_dir(out):   # a run of this process holds it
        assert train.main(["--config", path]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: out_dir {out} is in use by another run (pid {os.getpid()}); wait for it to end, "
                       f"or use another out_dir"]
        assert not any(out.iterdir())
    first, second = forked_main(path), forked_main(path)   # both at once
    first.join(120)
    second.join(120)
    assert sorted([first.exitcode, second.exitcode]) == [0, 2]
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line)
    assert_bitwise_equal(outputs(out), expected)


def test_a_torn_metrics_line_before_the_checkpoint_is_dropped_on_resume(tmp_path, reference, capsys):
    """metrics.jsonl with a torn line before the checkpoint's offset (as two runs at once left it
    before out_dir was locked): the rerun drops it with a warning and finishes."""
    base, _ = reference
    path, out = write_run(tmp_path, base)
    assert run_killed(path, dict(target="state.save_checkpoint", n=2)) == -signal.SIGKILL
    lines = (out / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    torn = lines[:1] + [lines[1][:20] + lines[2]] + lines[3:]   # line 2 cut short, the next glued to it
    (out / "metrics.jsonl").write_bytes(b"".join(torn))
    state["metrics_bytes"] -= len(lines[1]) - 20
    torch.save(state, out / "checkpoint" / "state.pt")
    assert train.main(["--config", path]) == 0
    assert "1 torn line(s) before the checkpoint dropped" in capsys.readouterr().err
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line)
    assert (out / "run.json").exists()


def test_torchrun_fields_warn_in_one_process(tmp_path, reference, capsys):
    base, _ = reference
    path, out = write_run(tmp_path, base, shard_base=True, dist_timeout_s=30.0)
    assert train.main(["--config", path, "--jobs.a.epochs=1", "--jobs.b.epochs=1"]) == 0
    said = capsys.readouterr().out
    assert "warning: shard_base True does nothing in one process" in said
    assert "warning: dist_timeout_s 30.0 does nothing in one process" in said
    assert "scheduler.placement" not in said


def test_changed_tokenizer_template_or_weights_are_not_resumed(tmp_path, reference, capsys):
    """Resume reads the same tokenizer files, template files and base weights (issue 29, item 13):
    a change to any refuses in one line naming the file; put back, the run resumes."""
    import shutil
    from safetensors.torch import save_file
    base = shutil.copytree(reference[0], tmp_path / "base")
    template = tmp_path / "template.json"
    template.write_text(json.dumps({"prompt_input": "Q: {instruction}\n{input}\nA: ", "prompt_no_input": "Q: {instruction}\nA: "}))
    path, out = write_run(tmp_path, base)
    cfg = json.loads(Path(path).read_text())
    cfg["jobs"][2]["template"] = str(template)
    Path(path).write_text(json.dumps(cfg))
    assert run_killed(path, dict(target="state.save_checkpoint", n=1)) == -signal.SIGKILL
    before = snapshot(out)
    weights = load_file(base / "model.safetensors")
    changes = {base / "tokenizer_config.json": lambda file: file.write_text(json.dumps({"model_max_length": 77})),
               template: lambda file: file.write_text(file.read_text().replace("A: ", "Answer: ")),
               base / "model.safetensors": lambda file: save_file({k: v * 1.01 for k, v in weights.items()}, file,
                                                                  metadata={"format": "pt"})}
    for file, change in changes.items():
        existed, original = file.exists(), file.read_bytes() if file.exists() else None
        change(file)
        assert train.main(["--config", path]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: {file}: changed since the run in {out} started; restore it, or pass " \
                      f"--overwrite to start again" and snapshot(out) == before, file
        file.write_bytes(original) if existed else file.unlink()
    assert train.main(["--config", path]) == 0 and "resumed" in capsys.readouterr().out


def test_a_checkpoint_from_before_these_digests_resumes_bitwise(tmp_path, reference):
    """A checkpoint whose inputs hold only the data files and config.json (written before tokenizer,
    template and weight digests existed) resumes, checking what it holds, to the same adapters."""
    base, expected = reference
    path, out = write_run(tmp_path, base)
    assert run_killed(path, dict(target="state.save_checkpoint", n=2)) == -signal.SIGKILL
    file = out / "checkpoint" / "state.pt"
    state = torch.load(file, weights_only=True)
    old = {key for key in state["inputs"] if key.endswith((".json", ".jsonl")) and Path(key).parent != Path(base)}
    state["inputs"] = {key: digest for key, digest in state["inputs"].items()
                       if key in old or key == str(Path(base) / "config.json")}
    assert len(state["inputs"]) == 4   # t.json, u.jsonl, test.json, config.json
    torch.save(state, file)
    assert train.main(["--config", path]) == 0
    assert_bitwise_equal(outputs(out), expected)


def test_weights_digest_of_a_large_file_samples_it(tmp_path):
    """Above full_below bytes: the size, the safetensors header and sampled blocks, so a re-save with
    other values is seen; below: the whole file."""
    from safetensors.torch import save_file
    import checkpoint
    file = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(100_000, dtype=torch.float32)}, file)
    full, sampled = checkpoint.weights_digest(file), checkpoint.weights_digest(file, full_below=1000)
    assert sampled.startswith("sampled:") and full != sampled
    save_file({"w": torch.arange(100_000, dtype=torch.float32) + 1}, file)   # same header, same size
    assert checkpoint.weights_digest(file, full_below=1000) != sampled and checkpoint.weights_digest(file) != full


def test_every_file_the_tokenizer_reads_is_digested():
    """tokenizer.FILES (what resume digests) names every file name tokenizer.py's code opens."""
    import re
    import tokenizer
    source = Path(tokenizer.__file__).read_text()
    named = set(re.findall(r"""["']([\w.]+\.(?:json|model|jinja|py|txt))["']""", source))
    assert named - {"config.json"} == set(tokenizer.FILES)
