"""`python train.py --help-config` lists every config field with its comment, read from the
dataclasses' source; an unknown key names the field meant, at any level, by other trainers' names too."""
import dataclasses
import json
import re
from pathlib import Path

import pytest

import config
import lora
import train

REPO = Path(__file__).resolve().parent.parent


def source_comments(file: str, cls: type) -> dict[str, str]:
    """{field: comment} of class cls straight from the text of `file` (`    name: type = x  # comment`
    lines in its body): an oracle that shares no code with config.help_text's ast / tokenize reading."""
    body = re.search(rf"^class {cls.__name__}\b.*?\n(?=\S)", (REPO / file).read_text(), re.M | re.S)[0]
    return {m[1]: m[2].strip() for m in re.finditer(r"^    (\w+): [^#\n]*#\s*(.*)$", body, re.M)}


def test_help_config_prints_every_field_with_its_comment(capsys):
    assert train.main(["--help-config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    classes = [(config.RunConfig, "Run"), (config.SchedulerConfig, "scheduler"), (config.JobConfig, "jobs"),
               (config.SweepConfig, "sweep")]
    for cls, title in classes:
        start = next(i for i, line in enumerate(lines) if line.startswith(title))
        section = lines[start + 1:]
        section = section[:next((i for i, line in enumerate(section) if not line.startswith("  ")), len(section))]
        rows = {line.split()[0]: line for line in section}
        fields = [f for f in dataclasses.fields(cls) if not (cls is config.RunConfig and f.name in ("jobs", "scheduler", "sweep"))]
        comments = source_comments("config.py", cls)
        if cls is config.JobConfig:   # the adapter's own fields are LoRAConfig's (JobConfig's dropout overrides)
            comments = source_comments("lora.py", lora.LoRAConfig) | comments
        assert list(rows) == [f.name for f in fields], title
        for f in fields:
            assert rows[f.name].endswith(comments[f.name]) and comments[f.name], (title, f.name)
            if f.default is not dataclasses.MISSING:
                assert f" {json.dumps(f.default)} " in rows[f.name], (title, f.name)
    assert "python train.py --help-config" in (REPO / "README.md").read_text()


@pytest.mark.parametrize("changes, overrides, message", [
    ({"jobs.learning_rate": 1e-4}, [], "jobs[0].learning_rate: unknown key (did you mean 'lr'?)"),
    ({"learning_rate": 1e-4}, [], "learning_rate: unknown key (did you mean 'lr' in each job?)"),
    ({"max_steps": 3}, [], "max_steps: unknown key (did you mean 'max_steps' in each job?)"),
    ({"strategy": "trivial"}, [], "strategy: unknown key (did you mean 'strategy' in scheduler?)"),
    ({"jobs.lora_alpha": 8}, [], "jobs[0].lora_alpha: unknown key (did you mean 'alpha'?)"),
    ({}, ["--max_step=5"], "--max_step: unknown key (did you mean '--jobs.NAME.max_steps'?)"),
    ({}, ["--learning_rate=1e-4"], "--learning_rate: unknown key (did you mean '--jobs.NAME.lr'?)"),
    ({}, ["--jobs.a.learning_rate=1e-4"], "--jobs.a.learning_rate: unknown key (did you mean 'lr'?)"),
    ({}, ["--num_train_epochs=2"], "--num_train_epochs: unknown key (did you mean '--jobs.NAME.epochs'?)"),
    ({}, ["--sede=1"], "--sede: unknown key (did you mean 'seed'?)"),
    ({"zzzz": 1}, [], "zzzz: unknown key (valid: base_model, jobs, "),
])
def test_an_unknown_key_names_the_field_meant(tmp_path, capsys, changes, overrides, message):
    cfg = {"base_model": "b", "jobs": [{"name": "a", "data": "d.json"}]}
    for key, value in changes.items():
        (cfg["jobs"][0] if key.startswith("jobs.") else cfg)[key.removeprefix("jobs.")] = value
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    assert train.main(["--config", str(path), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
