"""The tiny lm-eval tasks in tasks/ (local JSONL through tasks/local.py), loaded by lm-eval's own
TaskManager from another working directory: their docs, prompts, few-shot splits and scoring, and
the loader's one-line errors. No model: scoring is checked with an oracle LM that knows the answers."""
import contextlib
import shutil
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is eval.py's optional dependency")
from lm_eval.api.model import LM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"
# task: (test docs, few-shot docs, choices per doc or None for generation, start of the first prompt)
EXPECTED = {
    "arc_tiny": (40, 5, 4, "Question: Which gas do plants take in"),
    "boolq_tiny": (40, 5, 2, "The kettle in the staff room"),
    "qa_tiny": (30, 5, None, "Question: What is 7 plus 5?\nAnswer:"),
}


def task_manager(include_path: Path) -> TaskManager:
    # include_defaults=False: indexing lm-eval's ~15k built-in tasks takes seconds, and none is used here.
    return TaskManager(include_path=str(include_path), include_defaults=False)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """The three tasks, loaded through the `tiny` tag with another working directory."""
    with contextlib.chdir(tmp_path_factory.mktemp("elsewhere")):
        manager = task_manager(TASKS_DIR)
        assert sorted(manager.all_tags) == ["tiny"] and sorted(manager.all_subtasks) == sorted(EXPECTED)
        return manager.load(["tiny"])["tasks"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_task_docs_and_prompts(tasks, name):
    task = tasks[name]
    n_docs, n_fewshot, n_choices, prompt_start = EXPECTED[name]
    docs = list(task.eval_docs)
    assert len(docs) == n_docs and len(task.fewshot_docs()) == n_fewshot
    for doc in docs:
        target = task.doc_to_target(doc)
        if n_choices is None:
            assert isinstance(target, str) and 1 <= len(target.split()) <= 2, doc
        else:
            assert len(task.doc_to_choice(doc)) == n_choices and 0 <= target < n_choices, doc

    task.set_config(key="num_fewshot", value=0)
    task.build_all_requests(limit=None, rank=0, world_size=1)
    requests = task.instances
    assert len(requests) == n_docs * (n_choices or 1)
    context = requests[0].arguments[0]
    assert context.startswith(prompt_start) and context.endswith("Answer:"), context
    if n_choices is None:
        assert requests[0].arguments[1]["until"] == ["\n"] and requests[0].arguments[1]["do_sample"] is False
    else:
        assert requests[0].arguments[1] == " " + task.doc_to_choice(docs[0])[0]


def test_fewshot_examples_come_from_the_train_file(tasks):
    task = tasks["arc_tiny"]
    task.set_config(key="num_fewshot", value=2)
    task.build_all_requests(limit=1, rank=0, world_size=1)
    context = task.instances[0].arguments[0]
    train_questions = [doc["question"] for doc in task.fewshot_docs()]
    assert context.count("Question: ") == 3 and context.count("\n\n") == 2
    assert sum(question in context for question in train_questions) == 2


class Oracle(LM):
    """Gives the gold choice the highest log-likelihood, and generates the gold answer as a model
    might write it: a leading space, upper case, a full stop."""

    def loglikelihood(self, requests):
        out = []
        for request in requests:
            doc, (_, continuation) = request.doc, request.args
            choices = doc.get("choices", ["no", "yes"])
            gold = doc["answer"] if "choices" in doc else doc["label"]
            out.append((0.0 if continuation == " " + choices[gold] else -5.0, True))
        return out

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError

    def generate_until(self, requests):
        return [" " + request.doc["answer"].upper() + "." for request in requests]


def test_simple_evaluate_scores_an_oracle_perfectly(tmp_path):
    with contextlib.chdir(tmp_path):
        results = lm_eval.simple_evaluate(model=Oracle(), tasks=["tiny"], task_manager=task_manager(TASKS_DIR),
                                          num_fewshot=1, bootstrap_iters=0, log_samples=False)["results"]
    assert results["arc_tiny"]["acc,none"] == results["arc_tiny"]["acc_norm,none"] == 1.0
    assert results["boolq_tiny"]["acc,none"] == 1.0
    assert results["qa_tiny"]["exact_match,strip"] == 1.0


def copy_arc_task(folder: Path) -> Path:
    """arc_tiny's YAML and loader in folder, with its train file; the test file is the caller's."""
    (folder / "data").mkdir(parents=True)
    for name in ["arc_tiny.yaml", "local.py", "data/arc_tiny_train.jsonl"]:
        shutil.copy(TASKS_DIR / name, folder / name)
    return folder / "data" / "arc_tiny_test.jsonl"


@pytest.mark.parametrize("bad, message", [
    ('{"question": "q", "choices": ["a", "b"], "answer": 0}\n\n{"question": "q", "choices": [}\n',
     "line 3: invalid JSON (Expecting value at column 31)"),
    ('["q", ["a", "b"], 0]\n', "line 1: expected a JSON object, got list"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": "q", "choices": ["a", "b"]}\n',
     "line 2: fields ['choices', 'question'] differ from the first row's ['answer', 'choices', 'question']"),
    ("\n", "no rows"),
    (None, "file not found"),
], ids=["bad JSON", "not an object", "fields differ", "no rows", "missing"])
def test_a_bad_data_file_is_a_one_line_error_naming_it(tmp_path, bad, message):
    test_file = copy_arc_task(tmp_path / "tasks")
    if bad is not None:
        test_file.write_text(bad)
    with contextlib.chdir(tmp_path), pytest.raises((ValueError, FileNotFoundError)) as error:
        task_manager(tmp_path / "tasks").load(["arc_tiny"])
    assert str(error.value) == f"{test_file.resolve()}: {message}"
