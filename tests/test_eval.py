"""eval.py against lm-eval's own `hf` model (transformers + PEFT) on a tiny checkpoint with two
saved adapters: every request's log-likelihood and is-greedy, rolling log-likelihoods,
generations, and (tasks/) every metric; all adapters answered in one fused pass."""
import math

import pytest
import torch

pytest.importorskip("lm_eval")

import eval as E  # noqa: E402
import lora  # noqa: E402
import model as M  # noqa: E402
import peft_format  # noqa: E402
from conftest import make_hf_model, randomize_B, save_hf  # noqa: E402
from tokenizer_util import write_tokenizer_json  # noqa: E402

MAX_LENGTH = 48   # short, so truncation and rolling windows happen on short texts


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(base folder, [adapter folders]): a tiny LLaMA whose tokenizer adds a BOS (Llama 3's way),
    and two adapters with different targets and random B's, saved as PEFT folders."""
    root = tmp_path_factory.mktemp("eval")
    vocab = write_tokenizer_json(root / "base", add_bos=True)
    base = save_hf(make_hf_model(vocab_size=vocab), root / "base")   # every id decodable, as for hf
    net = M.load_model(base, dtype=torch.float32)
    lora.add_adapters(net, {"a": lora.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]),
                            "b": lora.LoRAConfig(r=2, alpha=4, targets=["o_proj", "down_proj", "gate_proj"])})
    adapters = []
    for seed, name in enumerate(["a", "b"]):
        randomize_B(net, name, seed=seed + 1)
        peft_format.save_peft(net, name, root / name, base_model_path=str(base))
        adapters.append(root / name)
    return base, adapters


@pytest.fixture(scope="module")
def ours(folders):
    base, adapters = folders
    return E.load_evaluation(str(base), [str(a) for a in adapters], max_length=MAX_LENGTH, batch_size=3)


def hf_lm(base, adapter=None):
    from lm_eval.models.huggingface import HFLM
    return HFLM(pretrained=str(base), peft=str(adapter) if adapter else None, batch_size=4, max_length=MAX_LENGTH,
                device="cpu", dtype="float32")


def instances(kind, args):
    from lm_eval.api.instance import Instance
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


LOGLIKELIHOOD_ARGS = [
    ("Question: what is the colour of the sky?\nAnswer:", " blue"),
    ("Question: what is the colour of the sky?\nAnswer:", " green and yellow"),
    ("The quick brown fox ", "jumps over the lazy dog."),   # a trailing space moves to the continuation
    ("", "A text with no context at all."),                   # the prefix token conditions it
    ("Give three tips for staying healthy. " * 6, "Eat well."),   # longer than MAX_LENGTH: cut from the left
    ("Below is an instruction", " that describes a task"),
]


def test_loglikelihood_equals_lm_eval_hf_with_peft(folders, ours):
    """Every request of the base and of each adapter: log-likelihood (1e-4) and is-greedy equal
    to lm-eval's hf model (with peft= for an adapter); one request is its own greedy
    continuation, so is-greedy is seen true as well as false."""
    base, adapters = folders
    lm_class = E.fused_lm_class()
    lm = lm_class(ours, None)
    for context in ["The quick brown fox", "Question: what is", "Eat a balanced", "Below is an", "A small model"]:
        ids = lm.tok_encode(context)
        token = E.generate.generate(ours.model, [ids], [None], max_new_tokens=1)[0]
        text = ours.tokenizer.decode(token)
        if lm.tok_encode(context + text) == ids + token:   # the base's greedy token, as text that encodes back to it
            break
    else:
        raise AssertionError("no context whose greedy token round-trips")
    args = LOGLIKELIHOOD_ARGS + [(context, text)]
    seen_greedy = set()
    for name, adapter in zip(ours.names, [None, *adapters]):
        got = lm_class(ours, name).loglikelihood(instances("loglikelihood", args))
        want = hf_lm(base, adapter).loglikelihood(instances("loglikelihood", args))
        for (lp, g), (lp_hf, g_hf), a in zip(got, want, args):
            assert math.isclose(lp, lp_hf, rel_tol=1e-4, abs_tol=1e-4), (name, a, lp, lp_hf)
            assert g == g_hf, (name, a)
            seen_greedy.add(g)
    assert seen_greedy == {True, False}


def test_every_adapter_answered_in_one_fused_pass(folders):
    """The first adapter's requests are scored for the base and both adapters at once; the other
    adapters' requests then run no forward."""
    base, adapters = folders
    evaluation = E.load_evaluation(str(base), [str(a) for a in adapters], max_length=MAX_LENGTH)
    lm_class = E.fused_lm_class()
    first = [lm_class(evaluation, name).loglikelihood(instances("loglikelihood", LOGLIKELIHOOD_ARGS))
             for name in evaluation.names]
    assert evaluation.passes["loglikelihood"] == 1
    assert first[0] != first[1] != first[2]   # three models, three answers
    alone = E.score(evaluation.model, [("b", [1, 5, 9, 30], [40, 41])], MAX_LENGTH)
    fused = E.score(evaluation.model, [("a", [7, 8, 9], [10]), ("b", [1, 5, 9, 30], [40, 41]), (None, [3], [4, 5])], MAX_LENGTH)
    assert math.isclose(alone[0][0], fused[1][0], rel_tol=1e-5)


def test_rolling_loglikelihood_equals_lm_eval_hf(folders, ours):
    """A text several windows long (MAX_LENGTH 48) and a short one."""
    base, adapters = folders
    texts = [("The quick brown fox jumps over the lazy dog. " * 8,), ("Eat a balanced diet.",)]
    lm_class = E.fused_lm_class()
    for name, adapter in [(None, None), (ours.names[2], adapters[1])]:
        got = lm_class(ours, name).loglikelihood_rolling(instances("loglikelihood_rolling", texts))
        want = hf_lm(base, adapter).loglikelihood_rolling(instances("loglikelihood_rolling", texts))
        for lp, lp_hf in zip(got, want):
            assert math.isclose(lp, lp_hf, rel_tol=1e-4, abs_tol=1e-4), (name, lp, lp_hf)


def test_generate_until_equals_lm_eval_hf(folders, ours):
    """Greedy generations, cut at the stop strings, equal the hf model's for the base and an adapter."""
    base, adapters = folders
    args = [("Question: what is the colour of the sky?\nAnswer:", {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}),
            ("The quick brown", {"until": [".", "fox"], "max_gen_toks": 6}),
            ("Give three tips", {"until": ["\n"], "max_gen_toks": 8, "do_sample": False})]
    lm_class = E.fused_lm_class()
    for name, adapter in [(None, None), (ours.names[1], adapters[0])]:
        got = lm_class(ours, name).generate_until(instances("generate_until", args))
        want = hf_lm(base, adapter).generate_until(instances("generate_until", args))
        assert got == want, name
        assert any(got)


def test_score_rejects_what_lm_eval_rejects(ours):
    with pytest.raises(ValueError, match="request 0: a continuation of 0 tokens"):
        E.score(ours.model, [(None, [1, 2], [])], MAX_LENGTH)
    with pytest.raises(ValueError, match="request 0: an empty context"):
        E.score(ours.model, [(None, [], [3])], MAX_LENGTH)


def test_every_metric_equals_lm_eval_hf_on_the_shipped_tasks(folders, ours, tmp_path):
    """tasks/ (multiple choice and a generation task) through eval.evaluate for the base and both
    adapters: every metric of every task identical to lm-eval's simple_evaluate with its hf model
    (peft= for an adapter); the table and the JSON name them all."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    base, adapters = folders
    tasks = ["arc_tiny", "boolq_tiny", "qa_tiny"]
    results = E.evaluate(ours, tasks, include_path=str(E.Path(E.__file__).parent / "tasks"), limit=6)
    assert list(results) == ["base", "a", "b"]
    manager = TaskManager(include_path=str(E.Path(E.__file__).parent / "tasks"), include_defaults=False)
    for name, adapter in zip(results, [None, *adapters]):
        want = lm_eval.simple_evaluate(model=hf_lm(base, adapter), tasks=tasks, limit=6, task_manager=manager,
                                       bootstrap_iters=0, log_samples=False)["results"]
        got = results[name]["results"]
        assert set(got) == set(want) == set(tasks)
        for task in tasks:
            metrics = {k: v for k, v in want[task].items() if "," in k and "stderr" not in k}
            assert metrics and {k: got[task][k] for k in metrics} == metrics, (name, task)
    table = E.side_by_side(results)
    assert "| arc_tiny | acc_norm,none |" in table and "| qa_tiny | exact_match,strip |" in table
    assert table.splitlines()[0] == "| task | metric | base | a | b |"


def test_command_line_writes_every_adapter_and_fails_in_one_line(folders, tmp_path, capsys):
    base, adapters = folders
    out = tmp_path / "results.json"
    assert E.main(["--base", str(base), "--adapter", str(adapters[0]), "--adapter", str(adapters[1]),
                   "--tasks", "boolq_tiny", "--limit", "3", "--max_length", str(MAX_LENGTH), "--out", str(out)]) == 0
    written = E.json.loads(out.read_text())
    assert list(written) == ["base", "a", "b"] and all("boolq_tiny" in r["results"] for r in written.values())
    assert "1 fused scoring passes" in capsys.readouterr().out
    assert E.main(["--base", str(base), "--adapter", str(tmp_path / "nowhere"), "--tasks", "boolq_tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert "nowhere" in err and "\n" not in err, err


def test_registered_model_alone_equals_the_fused_one(folders, ours):
    """lm-eval's registry builds "fused-lora" from a model_args string (its own Evaluation of one
    adapter): the same log-likelihoods as the adapter's column of the fused Evaluation."""
    from lm_eval.api.registry import get_model
    base, adapters = folders
    E.fused_lm_class()
    alone = get_model("fused-lora").create_from_arg_string(f"base={base},adapter={adapters[1]},max_length={MAX_LENGTH}")
    args = LOGLIKELIHOOD_ARGS[:3]
    got = alone.loglikelihood(instances("loglikelihood", args))
    fused = E.fused_lm_class()(ours, ours.names[2]).loglikelihood(instances("loglikelihood", args))
    for (lp, g), (lp_f, g_f) in zip(got, fused):
        assert math.isclose(lp, lp_f, rel_tol=1e-5, abs_tol=1e-5) and g == g_f
