"""Paths from a config (issue 29.19, 29.23): checked like any other value, one line naming the
field; relative paths resolve against the working directory, and a missing file's message names
the job, the field and the full path tried."""
import json

import pytest

import train


def write_config(folder, base_dir, rows, **changes) -> str:
    cfg = {"base_model": str(base_dir), "dtype": "float32", "device": "cpu", "out_dir": str(folder / "out"),
           "jobs": [{"name": "a", "data": str(rows), "r": 2, "alpha": 4, "batch_size": 2, "micro_batch_size": 2,
                     "epochs": 1, "max_steps": 1, "targets": ["q_proj"]}]}
    for key, value in changes.items():
        (cfg["jobs"][0] if key in ("data", "test_data", "template") else cfg)[key] = value
    path = folder / "cfg.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("field, value, message", [
    ("base_model", "b" * 300, "base_model: longer than the OS allows (File name too long), got 'bbb"),
    ("base_model", "/".join(["b" * 200] * 30), "base_model: longer than the OS allows"),
    ("out_dir", "{tmp}/a.json/sub", "out_dir: {tmp}/a.json is a file, so no folder can be made below it"),
    ("out_dir", "{tmp}/a.json/sub/deeper", "out_dir: {tmp}/a.json is a file, so no folder can be made below it"),
    ("out_dir", "o\x00ut", "out_dir: a path cannot hold a NUL byte, got 'o\\x00ut'"),
    ("data", "d" * 300 + ".json", "jobs[0].data: longer than the OS allows"),
    ("test_data", "t\x00.json", "jobs[0].test_data: a path cannot hold a NUL byte"),
    ("template", "t" * 300 + ".json", "jobs[0].template: longer than the OS allows"),
])
def test_paths_the_os_refuses_are_one_line(tmp_path, base_dir, capsys, field, value, message):
    """The three the fuzz found ending in a traceback (ENAMETOOLONG, NotADirectoryError, 'embedded
    null byte'), and the same faults in the other path fields."""
    (tmp_path / "a.json").write_text("{}")
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"instruction": "a b", "output": "b a"}] * 2))
    path = write_config(tmp_path, base_dir, rows, **{field: value.replace("{tmp}", str(tmp_path))})
    assert train.main(["--config", path]) == 2
    assert error_line(capsys).startswith(f"error: {path}: " + message.replace("{tmp}", str(tmp_path)))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field", ["data", "test_data", "template"])
def test_a_missing_file_names_job_field_and_full_path(tmp_path, base_dir, capsys, monkeypatch, field):
    """Relative paths resolve against the working directory (not the config's folder): the same
    config finds its file run from one folder and not from another, which the message names."""
    (tmp_path / "here").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "here" / "rows.json").write_text(json.dumps([{"instruction": "a b", "output": "b a"}] * 2))
    relative = {"data": "rows.json", "test_data": "rows.json", "template": "tmpl.json"}[field]
    if field == "template":
        (tmp_path / "here" / "tmpl.json").write_text(json.dumps({"prompt_input": "{instruction} {input}",
                                                                 "prompt_no_input": "{instruction}"}))
    path = write_config(tmp_path, base_dir, tmp_path / "here" / "rows.json", **{field: relative})   # one relative path
    monkeypatch.chdir(tmp_path / "here")
    assert train.main(["--config", path]) == 0
    capsys.readouterr()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert train.main(["--config", path, f"--out_dir={tmp_path / 'out2'}"]) == 2
    line = error_line(capsys)
    named = "not a named template (alpaca, mlora, chat, plain), and file" if field == "template" else "file"
    assert line == (f"error: config: jobs[0].{field} (job 'a'): {named} not found: {tmp_path / 'elsewhere' / relative} "
                    f"(a relative path resolves against the working directory)")


def test_a_missing_base_folder_names_the_full_path(tmp_path, base_dir, capsys, monkeypatch):
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"instruction": "a b", "output": "b a"}] * 2))
    monkeypatch.chdir(tmp_path)
    assert train.main(["--config", write_config(tmp_path, base_dir, rows, base_model="nowhere")]) == 2
    assert error_line(capsys) == (f"error: config: base_model: checkpoint folder not found: {tmp_path / 'nowhere'} "
                                  f"(a relative path resolves against the working directory)")
