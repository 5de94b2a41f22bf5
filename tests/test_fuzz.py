"""Fuzzing train.py's input (issue 12): hundreds of generated bad configs, data files and base
folders. Each must end as a one-line error (exit 2) or a valid run (exit 0, or 3 for a job
stopped on non-finite values): no traceback, no hang, and the previous run's out_dir byte for
byte as it was. The cases are drawn from a fixed seed: the same cases every run."""
import contextlib
import copy
import faulthandler
import io
import json
import random
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest

import train
from conftest import make_hf_model, save_hf, write_rows
from tokenizer_util import write_tokenizer_json

CASE_TIMEOUT_S = 60     # a case past this is a hang: faulthandler ends the whole test run, loudly

BAD_VALUES = [None, -1, 0, 1, -0.5, 1e308, float("nan"), float("inf"), float("-inf"), "", "x", "../x", "/abs/x",
              [], {}, True, False, 2**63, "a" * 300, "\ud800", "nf5", "cuda:7", [1, "q_proj"], {"a": 1},
              "q_proj", ["nope"], 0.999, 1e-30, 10**6, "cosin", "adam"]
TOP_FIELDS = ["base_model", "jobs", "dtype", "device", "quant", "seed", "out_dir", "log_every", "checkpoint_every",
              "activation_checkpointing", "packing", "scheduler"]
SCHEDULER_FIELDS = ["strategy", "max_candidates", "max_concurrent", "memory_budget_gb", "token_budget"]
JOB_FIELDS = ["name", "data", "test_data", "template", "cutoff_len", "train_on_inputs", "dropout", "optimizer", "lr",
              "weight_decay", "momentum", "lr_schedule", "warmup_steps", "max_grad_norm", "batch_size",
              "micro_batch_size", "epochs", "max_steps", "eval_every", "save_every", "group_by_length", "priority",
              "early_stop", "diverge_factor", "r", "alpha", "targets", "init", "use_rslora"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base, data, and a finished run in `prev` that every case points its out_dir at."""
    tmp = tmp_path_factory.mktemp("fuzz")
    vocab = write_tokenizer_json(tmp / "base")
    base = save_hf(make_hf_model(vocab_size=max(vocab, 384), tie_word_embeddings=True), tmp / "base")
    rows = write_rows(tmp / "rows.json", 6, 1, "reverse")
    cfg = {"base_model": str(base), "dtype": "float32", "device": "cpu", "out_dir": str(tmp / "prev"),
           "jobs": [{"name": "a", "data": rows, "r": 2, "alpha": 4, "batch_size": 2, "micro_batch_size": 1,
                     "epochs": 1, "max_steps": 2, "targets": ["q_proj"]},
                    {"name": "b", "data": rows, "r": 2, "alpha": 4, "batch_size": 2, "micro_batch_size": 2,
                     "epochs": 1, "max_steps": 1, "template": "plain"}]}
    (tmp / "good.json").write_text(json.dumps(cfg))
    assert train.main(["--config", str(tmp / "good.json")]) == 0
    return tmp, cfg


def files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- case generators

def config_case(rng: random.Random, cfg: dict, tmp: Path) -> dict:
    """One field of the config set to a bad value, removed, or an unknown one added."""
    cfg = copy.deepcopy(cfg)
    where = rng.choice(["top", "scheduler", "job", "job", "job"])
    if where == "top":
        target, fields = cfg, TOP_FIELDS
    elif where == "scheduler":
        target, fields = cfg.setdefault("scheduler", {}), SCHEDULER_FIELDS
    else:
        target, fields = rng.choice(cfg["jobs"]), JOB_FIELDS
    action = rng.random()
    if action < 0.08 and target:
        target.pop(rng.choice(list(target)), None)
    elif action < 0.12:
        target[rng.choice(["sede", "lr_rate", "epoch", "jobz"])] = 1
    else:
        target[rng.choice(fields)] = rng.choice(BAD_VALUES)
    if target is not cfg and rng.random() < 0.1:   # a second fault elsewhere
        cfg[rng.choice(TOP_FIELDS)] = rng.choice(BAD_VALUES)
    if isinstance(cfg.get("out_dir"), str) and not cfg["out_dir"].startswith(str(tmp)):
        cfg["out_dir"] = cfg["out_dir"].lstrip("/.") or "x"   # a valid run writes inside tmp (the cwd), never above
    return cfg


def config_text_case(rng: random.Random, cfg: dict) -> bytes:
    """The config file itself broken: not JSON, not UTF-8, the wrong shape."""
    text = json.dumps(cfg)
    cut = rng.randrange(len(text))
    return rng.choice([
        text[:cut].encode(), b"", b"\xff\xfe\x00garbage", b"[]", b"42", b'"jobs"', b"null", b"{" * 5000,
        json.dumps({**cfg, "jobs": []}).encode(), json.dumps({**cfg, "jobs": {"a": 1}}).encode(),
        json.dumps({**cfg, "jobs": [1, 2]}).encode(), text.replace('"a"', '"a"', 1).encode() + b"}",
        json.dumps({"lora": [{"name": "x"}]}).encode(), json.dumps({"lora": "x"}).encode(),
        json.dumps({"lora": [{"name": "x", "data": "d", "r": 2, "alpha": 4, "lr": 1, "batch_size": 1,
                              "micro_batch_size": 1, "num_epochs": 1, "target_modules": ["q_proj"]}]}).encode(),
    ])


def data_case(rng: random.Random, tmp: Path, i: int) -> Path:
    """A data file with one bad row, bad bytes, or the wrong structure."""
    good = {"instruction": "Reverse the words.", "input": "a b", "output": "b a"}
    row = dict(good)
    key = rng.choice(["instruction", "input", "output", "extra"])
    row[key] = rng.choice([None, 1, 2.5, [], {}, True, "\ud800", "\x00", "a" * 20000, "🙂" * 50, ""])
    if rng.random() < 0.2:
        row.pop(rng.choice(["instruction", "output"]))
    rows = [good] * rng.randint(0, 3) + [row] + [good] * rng.randint(0, 3)
    suffix = rng.choice([".json", ".jsonl", ".json", ".jsonl", ".txt"])
    path = tmp / f"data{i}{suffix}"
    kind = rng.random()
    if kind < 0.6:
        text = json.dumps(rows) if suffix != ".jsonl" else "\n".join(map(json.dumps, rows))
        path.write_text(text)
    elif kind < 0.8:
        path.write_bytes(rng.choice([b"", b"\xff\xfe", b"\xef\xbb\xbf[]", b"[{]", b"{}", b"[1,2]", b'[["a"]]',
                                     b"\x00" * 100, b'{"instruction": "x"}\n{', b"[" * 10000, b'"\\ud800"',
                                     bytes(rng.randrange(256) for _ in range(200))]))
    elif kind < 0.9:
        path.mkdir()                         # a folder where a file should be
    else:
        path = tmp / f"missing{i}.json"
    return path


def corrupt_base(rng: random.Random, base: Path, dest: Path) -> Path:
    """A copy of the base folder with one file damaged."""
    shutil.copytree(base, dest)
    kind = rng.choice(["config", "config", "config", "weights", "weights", "tokenizer", "tokenizer", "index", "missing"])
    if kind == "config":
        config = json.loads((dest / "config.json").read_text())
        field = rng.choice(["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                            "vocab_size", "intermediate_size", "max_position_embeddings", "rms_norm_eps",
                            "rope_theta", "rope_scaling", "model_type", "tie_word_embeddings", "head_dim"])
        config[field] = rng.choice([None, 0, -1, 10**6, 1000000, 3, "x", True, [], {"rope_type": "yarn"},
                                    float("nan"), 1e-40, "gpt2", 63])
        text = json.dumps(config)
        (dest / "config.json").write_text(text if rng.random() < 0.8 else text[:rng.randrange(len(text))])
    elif kind == "weights":
        file = dest / "model.safetensors"
        blob = bytearray(file.read_bytes())
        how = rng.random()
        if how < 0.4:
            blob = blob[:rng.randrange(len(blob))]
        elif how < 0.7:
            for _ in range(rng.randint(1, 8)):    # flip bytes in the header
                blob[rng.randrange(min(len(blob), 400))] = rng.randrange(256)
        else:
            blob[:8] = rng.randrange(2**63).to_bytes(8, "little")
        file.write_bytes(bytes(blob))
    elif kind == "tokenizer":
        name = rng.choice(["tokenizer.json", "tokenizer_config.json"])
        file = dest / name
        if file.exists() and rng.random() < 0.5:
            text = file.read_text()
            file.write_text(text[:rng.randrange(len(text))])
        else:
            file.write_text(rng.choice(["[]", "{}", "null", '{"model": {"type": "Nope"}}', '{"chat_template": 3}',
                                        '{"bos_token": 7}', '{"chat_template": "{% for i in range(100000) %}'
                                        '{% for j in range(100000) %}x{% endfor %}{% endfor %}"}',
                                        '{"chat_template": "{{ nope | nofilter }}"}']))
    elif kind == "index":
        (dest / "model.safetensors").rename(dest / "w.safetensors")
        target = rng.choice(["../w.safetensors", "/etc/passwd", "w.safetensors", "nope.safetensors", 5])
        (dest / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": target}}))
    else:
        (dest / rng.choice(["config.json", "model.safetensors", "tokenizer.json"])).unlink()
    return dest


def path_case(rng: random.Random, i: int, tmp: Path, cfg: dict) -> tuple[str, Path]:
    """One path of the config (base folder, out_dir, a job's data, test_data or template file) as
    the OS refuses it: a name or a path longer than it allows, below an existing file, a NUL byte."""
    case = copy.deepcopy(cfg)
    job = rng.choice(case["jobs"])
    field = rng.choice(["base_model", "out_dir", "data", "test_data", "template"])
    target = case if field in ("base_model", "out_dir") else job
    target[field] = rng.choice([
        "n" * rng.randint(256, 400),                                      # one name past NAME_MAX (255 bytes)
        "/".join(["n" * 200] * rng.randint(21, 40)),                      # the whole path past PATH_MAX (4096)
        str(tmp / "good.json" / "sub") + rng.choice(["", "/deeper", ".json"]),   # below an existing file
        rng.choice(["o\x00ut", "ba\x00se", "rows\x00.json", str(tmp / "rows.json") + "\x00"]),   # a NUL byte
    ])
    path = tmp / f"path{i}.json"
    path.write_text(json.dumps(case))
    return f"path ({field})", path


def make_case(rng: random.Random, i: int, tmp: Path, cfg: dict) -> tuple[str, Path]:
    """(kind, config file) of case i."""
    path = tmp / f"case{i}.json"
    kind = rng.choice(["config"] * 5 + ["config-text"] + ["data"] * 3 + ["base"] * 3)
    if kind == "config-text":
        path.write_bytes(config_text_case(rng, cfg))
        return kind, path
    case = config_case(rng, cfg, tmp) if kind == "config" else copy.deepcopy(cfg)
    if kind == "data":
        job = rng.choice(case["jobs"])
        job[rng.choice(["data", "data", "test_data"])] = str(data_case(rng, tmp, i))
        if rng.random() < 0.3:
            job["template"] = rng.choice(["chat", "nope", str(data_case(rng, tmp, i + 10**6))])
    elif kind == "base":
        case["base_model"] = str(corrupt_base(rng, Path(cfg["base_model"]), tmp / f"base{i}"))
        if rng.random() < 0.3:
            case["jobs"][0]["template"] = "chat"
    path.write_text(json.dumps(case))
    return kind, path


def run_case(args: list[str]) -> tuple[int | str, str]:
    """(exit code, or "traceback: ..." for an exception that escaped main; its stderr)."""
    err = io.StringIO()
    faulthandler.dump_traceback_later(CASE_TIMEOUT_S, exit=True, file=sys.__stderr__)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = train.main(args)
    except BaseException as e:  # noqa: BLE001 - that is what the test counts
        code = f"traceback: {type(e).__name__}: {e}"
    finally:
        faulthandler.cancel_dump_traceback_later()
    return code, err.getvalue()


def test_fuzzed_inputs_end_in_one_line_or_a_valid_run(world, capsys, monkeypatch):
    tmp, cfg = world
    monkeypatch.chdir(tmp)    # relative paths in the cases resolve in tmp
    prev = Path(cfg["out_dir"])
    before = files(prev)
    rng, paths_rng = random.Random(1212), random.Random(2929)
    outcomes, failures = Counter(), []
    for i in range(360):   # 300 cases of every kind, then 60 of paths the OS refuses (issue 29.23)
        kind, path = make_case(rng, i, tmp, cfg) if i < 300 else path_case(paths_rng, i, tmp, cfg)
        code, err = run_case(["--config", str(path)])
        assert files(prev) == before, f"case {i} ({kind}) changed the previous run's out_dir"
        lines = err.strip().splitlines()
        if code == 2 and len(lines) == 1 and lines[0].startswith("error: "):
            if "holds a run of another config" not in lines[0]:
                outcomes[f"{kind}: one-line error"] += 1
                continue
            # A valid config, refused only because prev holds another run: it must run.
            loaded = train.load_config(str(path), [])
            steps = [f"--jobs.{j.name}.max_steps=1" for j in loaded.jobs]
            code, err = run_case(["--config", str(path), f"--out_dir={tmp / f'run{i}'}", *steps])
            if code in (0, 3):
                outcomes[f"{kind}: valid run (exit {code})"] += 1
                continue
        elif code == 0:
            outcomes[f"{kind}: same config as prev, nothing to do"] += 1
            continue
        failures.append((i, kind, path.read_bytes()[:300], code, err.strip()[-300:]))
        outcomes[f"{kind}: FAILED"] += 1
    assert files(prev) == before
    with capsys.disabled():
        print("\nfuzz outcomes:", dict(sorted(outcomes.items())))
    assert not failures, "\n".join(map(str, failures[:20]))
    assert sum(outcomes.values()) >= 360
