"""Local JSONL data for lm-evaluation-harness tasks, so a task needs no Hugging Face hub.

A task's YAML names it as `custom_dataset: !function local.load` and lists its files as
`dataset_kwargs: {data_files: {test: data/x.jsonl, train: data/x_train.jsonl}}`; relative paths
are read from this folder, so the tasks work from any working directory.
"""
import json
from pathlib import Path

import datasets

TASKS_DIR = Path(__file__).resolve().parent


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL file (one JSON object a line, blank lines skipped), every row with the
    first row's fields; anything else is a one-line error naming the file and line."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot be read ({e})") from None
    rows = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other characters it splits on.
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {line_number}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {line_number}: expected a JSON object, got {type(row).__name__}")
        # Dataset.from_list takes its columns from the first row: a field missing from or added to a
        # later row would become None or be dropped without a word.
        if rows and row.keys() != rows[0].keys():
            raise ValueError(f"{path}: line {line_number}: fields {sorted(row)} differ from the first row's "
                             f"{sorted(rows[0])}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def load(data_files: dict[str, str] | None = None, **metadata) -> datasets.DatasetDict:
    """One split per entry of data_files ({split: JSONL path}). lm-eval also passes the task's
    metadata (its version, config_source, the model's arguments), which the data does not need."""
    if not isinstance(data_files, dict) or not data_files:
        where = metadata.get("config_source", "the task's YAML")
        raise ValueError(f"{where}: local.load needs dataset_kwargs: {{data_files: {{test: FILE.jsonl}}}}, "
                         f"got data_files={data_files!r}")
    return datasets.DatasetDict({split: datasets.Dataset.from_list(read_jsonl(TASKS_DIR / file))
                                 for split, file in data_files.items()})
