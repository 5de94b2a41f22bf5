"""Paths from a config (issue 29.23): checked like any other value, one line naming the field."""
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
