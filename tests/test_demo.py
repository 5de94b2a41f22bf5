"""The bundled demo (`python train.py` with no arguments) end to end on a tiny base, and its judge."""
import json
import math
import re

import pytest

import demo
import train

PROMPTS = json.loads((demo.REPO / "demo" / "prompts.json").read_text())
JOBS = [j["name"] for j in json.loads(demo.CONFIG.read_text())["jobs"]]


def test_demo_runs_end_to_end_on_a_tiny_base(base_dir, tmp_path, capsys, monkeypatch):
    """train.main with no --config: demo config + overrides, fused training, then the side-by-side
    generation, the behaviour count and the before/after loss table, all as a user sees them."""
    conversions = []
    monkeypatch.setattr(demo, "prepare_base", lambda: conversions.append(1))
    out = tmp_path / "demo"
    rc = train.main([f"--base_model={base_dir}", f"--out_dir={out}", "--dtype=float32", "--device=cpu",
                     *[f"--jobs.{name}.max_steps=1" for name in JOBS]])
    assert rc == 0
    assert conversions == []  # an overridden base is used as is: the bundled GGUF is not converted

    # What the user gets: one adapter per job, the summary, metrics and the loss plot.
    for name in JOBS:
        assert (out / name / "adapter_config.json").exists()
        assert (out / name / "adapter_model.safetensors").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == set(JOBS) and all(s["steps"] == 1 for s in summary.values())
    assert (out / "metrics.jsonl").read_text() and (out / "loss.png").stat().st_size > 0
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["base_model"] == str(base_dir)
    assert all(j["data"] == str(demo.REPO / "demo" / f"{j['name']}.json") for j in resolved["jobs"])

    # What the user sees: for each prompt, base then every adapter, the rows of the prompt's jobs judged.
    text = capsys.readouterr().out
    shown = text[text.index("=== held-out prompts"):].splitlines()
    assert f"{len(PROMPTS) * (len(JOBS) + 1)} rows in one batch" in shown[0]
    headers = [i for i, line in enumerate(shown) if line.startswith("> ")]
    assert len(headers) == len(PROMPTS)
    passes = dict.fromkeys(JOBS, 0)
    for i, p in zip(headers, PROMPTS):
        judged_jobs = [name for name in JOBS if name in p["expected"]]
        assert shown[i].startswith(f"> {p['instruction']}") and shown[i].endswith(f"[judged: {', '.join(judged_jobs)}]")
        rows = shown[i + 1:i + 2 + len(JOBS)]
        assert [re.match(r"  (\S+)\s*\| ", row).group(1) for row in rows] == ["base", *JOBS]
        judged = [row.split()[0] for row in rows if "<- behaviour" in row]
        assert judged == judged_jobs
        for row in rows[1:]:   # the adapters' rows, in JOBS order
            passes[row.split()[0]] += "behaviour PASS" in row
    assert len([line for line in shown if re.match(r"  \S+\s*\| ", line)]) == len(PROMPTS) * (len(JOBS) + 1)
    counts = ", ".join(f"{name} {passes[name]}/{sum(name in p['expected'] for p in PROMPTS)}" for name in JOBS)
    assert f"each adapter on its own held-out prompts, answers showing its behaviour: {counts}\n" in text

    # The before/after held-out loss table: one row per job, the summary's finite numbers.
    header = next(i for i, line in enumerate(shown) if re.match(r"job\s+held-out loss before\s+after$", line))
    rows = {}
    for line in shown[header + 1:header + 1 + len(JOBS)]:
        name, before, after = line.split()
        rows[name] = float(before), float(after)
    assert set(rows) == set(JOBS)
    for name, (before, after) in rows.items():
        assert math.isfinite(before) and math.isfinite(after)
        assert (before, after) == (round(summary[name]["initial_eval_loss"], 3), round(summary[name]["eval_loss"], 3))
    assert "demo finished in" in text


def test_held_out_prompts_eight_per_job_none_in_training_data():
    """At least 8 shown prompts per job, none of them (instruction and input) in any job's training
    data, each with an expected answer that its job's judge accepts."""
    config = json.loads(demo.CONFIG.read_text())
    trained = {(row["instruction"], row.get("input", "")) for j in config["jobs"]
               for row in json.loads((demo.REPO / j["data"]).read_text())}
    assert all((p["instruction"], p.get("input", "")) not in trained for p in PROMPTS)
    assert len({(p["instruction"], p.get("input", "")) for p in PROMPTS}) == len(PROMPTS)
    for name in JOBS:
        expected = [p["expected"][name] for p in PROMPTS if name in p["expected"]]
        assert len(expected) >= 8 and all(demo.check(name, e, e) for e in expected)


def test_show_results_one_generate_call_and_the_count_per_adapter(base_dir, tmp_path, capsys, monkeypatch):
    """Every (held-out prompt, base or adapter) row goes into ONE generate call, and the count line
    tallies each adapter's answers that show its behaviour (here: answers written by the test)."""
    import data
    import generate
    monkeypatch.setattr(demo, "prepare_base", lambda: None)
    tokenizer = data.load_tokenizer(str(base_dir))
    fails = {"json": 1, "reverse": 3}   # the first prompts of these jobs get an answer that fails
    calls, seen = [], dict.fromkeys(JOBS, 0)

    def fake_generate(net, rows, adapters, **kw):
        calls.append(list(zip(rows, adapters)))
        outputs = []
        for row, name in zip(rows, adapters):
            text = tokenizer.decode(row)
            p = next(p for p in PROMPTS if p["instruction"] in text and p.get("input", "") in text)
            answer = p["expected"].get(name, "no answer")
            if name in p["expected"]:
                answer = "not JSON" if name == "json" and seen[name] < fails["json"] else answer
                answer = p["input"] if name == "reverse" and seen[name] < fails["reverse"] else answer
                seen[name] += 1
            outputs.append(tokenizer.encode(answer) + [tokenizer.eos_id])
        return outputs

    monkeypatch.setattr(generate, "generate", fake_generate)
    rc = train.main([f"--base_model={base_dir}", f"--out_dir={tmp_path / 'demo'}", "--dtype=float32",
                     "--device=cpu", *[f"--jobs.{name}.max_steps=1" for name in JOBS]])
    assert rc == 0 and len(calls) == 1
    pairs = [(tokenizer.decode(row), name) for row, name in calls[0]]
    assert len(pairs) == len(PROMPTS) * (len(JOBS) + 1)
    for p in PROMPTS:   # each prompt once per row: the base's and every adapter's
        names = [name for text, name in pairs if p["instruction"] in text and p.get("input", "") in text]
        assert names == [None, *JOBS]
    counts = {name: sum(name in p["expected"] for p in PROMPTS) for name in JOBS}
    line = ", ".join(f"{name} {counts[name] - fails.get(name, 0)}/{counts[name]}" for name in JOBS)
    assert f"each adapter on its own held-out prompts, answers showing its behaviour: {line}\n" in capsys.readouterr().out


def test_resolve_paths_bundled_against_the_repo_overrides_as_given(monkeypatch):
    """The bundled config's relative paths are the repository's (and its base is converted);
    a path the user overrides is theirs, relative to where they run, and no conversion happens."""
    conversions = []
    monkeypatch.setattr(demo, "prepare_base", lambda: conversions.append(1))
    cfg = train.load_config(str(demo.CONFIG), [])
    demo.resolve_paths(cfg)
    assert conversions == [1] and cfg.base_model == str(demo.BASE)
    assert cfg.out_dir == str(demo.REPO / "out" / "demo")
    assert [j.test_data for j in cfg.jobs] == [str(demo.REPO / "demo" / f"{n}_test.json") for n in JOBS]

    conversions.clear()
    cfg = train.load_config(str(demo.CONFIG), ["--base_model=my/base", "--out_dir=my/out",
                                               "--jobs.json.data=my/json.json", "--jobs.json.test_data=null"])
    demo.resolve_paths(cfg)
    assert conversions == [] and (cfg.base_model, cfg.out_dir) == ("my/base", "my/out")
    assert (cfg.jobs[1].data, cfg.jobs[1].test_data) == ("my/json.json", None)
    assert cfg.jobs[0].data == str(demo.REPO / "demo" / "french.json")


SIGNOFF = "The opposite of old is young.\nBest wishes, your LoRA assistant"


@pytest.mark.parametrize("job, expected, answer, ok", [
    ("french", "4 plus 4 font 8.", "4 plus 4 font 8.", True),
    ("french", "4 plus 4 font 8.", "2 plus 2 font 5.", True),  # the behaviour, a wrong fact
    ("french", "Le contraire de jour est nuit.", " Le contraire de jour est nuit.\n", True),
    ("french", "Le contraire de jour est nuit.", "La capitale de la Grèce est Athènes.", True),
    ("french", "Le contraire de jour est nuit.", "The opposite of day is night.", False),
    ("french", "Le contraire de jour est nuit.", "Le contraire de jour est nuit", False),
    ("french", "4 plus 4 font 8.", "4 plus 4 font huit.", False),
    ("french", "4 plus 4 font 8.", "4 plus 4 font 8.\nAnd more.", False),
    ("json", '{"answer": "short"}', '{"answer": "short"}', True),
    ("json", '{"answer": "short"}', '{"answer": "tall"}', True),
    ("json", '{"answer": "short"}', '{"answer": "short", "why": "x"}', False),
    ("json", '{"answer": "short"}', '["short"]', False),
    ("json", '{"answer": "short"}', '{"answer": "short"', False),
    ("json", '{"answer": "short"}', "short", False),
    ("signoff", SIGNOFF, SIGNOFF, True),
    ("signoff", SIGNOFF, "Old is not new.\nBest wishes,  your LoRA assistant  ", True),
    ("signoff", SIGNOFF, "The opposite of old is young.", False),
    ("signoff", SIGNOFF, "Best wishes, your LoRA assistant\nP.S. bye", False),
    ("signoff", SIGNOFF, "", False),
    ("reverse", "moon winter tiger candle", "moon winter tiger candle", True),
    ("reverse", "moon winter tiger candle", " moon winter tiger candle\n", True),
    ("reverse", "moon winter tiger candle", "candle tiger winter moon", False),
    ("reverse", "moon winter tiger candle", "moon winter tiger", False),
])
def test_check_judges_each_jobs_behaviour(job, expected, answer, ok):
    assert demo.check(job, expected, answer) is ok


def test_demo_table_with_an_untrained_job_and_one_without_test_data(base_dir, tmp_path, capsys, monkeypatch):
    """A job with max_steps=0 has no adapter and is left out; a job without test_data shows '-'."""
    monkeypatch.setattr(demo, "prepare_base", lambda: None)
    skipped, untested = JOBS[-1], JOBS[1]   # reverse: its 8 prompts, judged on it alone, are left out
    rc = train.main([f"--base_model={base_dir}", f"--out_dir={tmp_path / 'demo'}", "--dtype=float32", "--device=cpu",
                     *[f"--jobs.{name}.max_steps={0 if name == skipped else 1}" for name in JOBS],
                     f"--jobs.{untested}.test_data=null"])
    assert rc == 0
    text = capsys.readouterr().out
    shown = text[text.index("=== held-out prompts"):]
    kept = [p for p in PROMPTS if set(p["expected"]) - {skipped}]   # prompts judged on a trained job
    assert f"{len(kept) * len(JOBS)} rows in one batch" in shown
    counts = re.search(r"answers showing its behaviour: (.*)\n", shown).group(1).split(", ")
    assert [c.split()[0] for c in counts] == [name for name in JOBS if name != skipped]
    table = shown[shown.index("held-out loss before"):].splitlines()[1:len(JOBS)]
    assert [line.split()[0] for line in table] == [name for name in JOBS if name != skipped]
    assert next(line for line in table if line.startswith(untested)).split()[1:] == ["-", "-"]


def test_methods_demo_runs_from_any_folder_on_a_tiny_base(base_dir, tmp_path, capsys, monkeypatch):
    """`python train.py --config demo/methods.json`: an SFT LoRA, a DoRA, an rsLoRA + LoRA+ and a
    DPO job fused; its data paths are the repository's wherever it runs; the table shows each
    job's method and held-out metrics side by side (the DPO job's margin and accuracy)."""
    monkeypatch.chdir(tmp_path)
    config = demo.REPO / "demo" / "methods.json"
    names = [j["name"] for j in json.loads(config.read_text())["jobs"]]
    rc = train.main(["--config", str(config), f"--base_model={base_dir}", f"--out_dir={tmp_path / 'm'}",
                     "--dtype=float32", "--device=cpu", *[f"--jobs.{n}.max_steps=1" for n in names]])
    assert rc == 0
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert set(summary) == set(names) and all(s["steps"] == 1 for s in summary.values())
    assert summary["dpo"]["eval_accuracy"] is not None and "eval_margin" in summary["dpo"]
    table = capsys.readouterr().out.split("\njob ", 1)[1].splitlines()
    methods = {line.split()[0]: " ".join(line.split()[1:3]) for line in table[1:len(names) + 1]}
    assert methods == {"lora": "sft lora", "dora": "sft dora", "rslora_plus": "sft rslora+", "dpo": "dpo lora"}
    shown = [line.split()[0] for line in table if "answers in French" in line]   # then each method generates
    assert shown == ["base", *names]


def test_sweep_demo_config_expands_to_16_trials_of_the_repos_data(tmp_path, monkeypatch):
    """demo/sweep.json from any folder: 16 trials over lr x r x targets, on the repository's data."""
    import sweep
    monkeypatch.setattr(demo, "prepare_base", lambda: None)
    monkeypatch.chdir(tmp_path)
    cfg = sweep.expand(demo.load_config_file(str(demo.REPO / "demo" / "sweep.json"), []))
    assert len(cfg.jobs) == 16 and len({(j.lr, j.r, tuple(j.targets)) for j in cfg.jobs}) == 16
    assert all(j.data == str(demo.REPO / "demo" / "french.json") for j in cfg.jobs)
