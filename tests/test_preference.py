"""Preference objectives (DPO, CPO, ORPO) per job, fused with SFT jobs: the loss and gradients against
transformers + PEFT by the published formulas, fused equals alone, a pair is the scheduler's
unit, bad rows, metrics, resume."""
import json
import random
import re
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import config
import data
import lora
import model as M
import peft_format
import objectives
import state
import jobs
import train
from conftest import WORDS, adapter, assert_same_adapter, job, randomize_B, run_cfg, write_rows
from objectives import OBJECTIVES
from scheduler import JobPlan, Scheduler

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
PREFERENCE = [name for name, objective in OBJECTIVES.items() if objective.pairs]   # the table's preference objectives


def write_pairs(path, n, seed, **fields):
    """Preference rows: reverse the words (chosen) rather than repeat them (rejected)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(2, 5))
        rows.append({"prompt": "Reverse the words.", "input": " ".join(words), "chosen": " ".join(words[::-1]),
                     "rejected": " ".join(words), **fields})
    path.write_text(json.dumps(rows) if path.suffix == ".json" else "\n".join(map(json.dumps, rows)))
    return str(path)


# ----------------------------------------------------------------------------- the oracle

def random_pairs(n: int, vocab: int, seed: int) -> list[data.Pair]:
    """Pairs of random token ids: a shared prompt (no labels) and answers of different lengths."""
    g = torch.Generator().manual_seed(seed)

    def ids(length):
        return torch.randint(0, vocab, (length,), generator=g).tolist()

    pairs = []
    for i in range(n):
        prompt = ids(4 + 2 * i)
        chosen, rejected = ids(3 + i), ids(6 - i)
        pairs.append(data.Pair(*(data.Example(prompt + answer, [-100] * len(prompt) + answer)
                                 for answer in (chosen, rejected))))
    return pairs


def answer_logps(model, example: data.Example) -> torch.Tensor:
    """The log-prob of each answer token of one sequence under a transformers model [n]."""
    logits = model(torch.tensor([example.input_ids])).logits[0, :-1]          # [T-1, V]
    labels = torch.tensor(example.labels[1:])
    answer = labels != -100
    return logits.log_softmax(-1)[answer].gather(1, labels[answer][:, None])[:, 0]


def published_loss(cfg: train.JobConfig, pm, pairs: list[data.Pair]) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7; label smoothing as conservative DPO), IPO (Azar et al.
    2023, eq. 17) and CPO (Xu et al. 2024, eq. 3 plus the NLL of the chosen answers) by their
    formulas, from PEFT's logits; the reference is the base (PEFT with its adapter disabled).
    Answers score the sum of their tokens' log-probs, the mean for IPO (as TRL)."""
    reduce = torch.mean if cfg.loss_type == "ipo" else torch.sum
    policy = [[answer_logps(pm, example) for example in (p.chosen, p.rejected)] for p in pairs]
    pi_c, pi_r = (torch.stack([reduce(logps[k]) for logps in policy]) for k in (0, 1))
    h = pi_c - pi_r
    if cfg.objective == "dpo":
        with pm.disable_adapter(), torch.no_grad():
            ref_c, ref_r = (torch.stack([reduce(answer_logps(pm, getattr(p, k))) for p in pairs])
                            for k in ("chosen", "rejected"))
        h = h - (ref_c - ref_r)
    beta, smoothing = cfg.beta, cfg.label_smoothing
    if cfg.loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - smoothing) * F.logsigmoid(beta * h) - smoothing * F.logsigmoid(-beta * h)
    loss = losses.mean()
    if cfg.objective == "cpo":   # the chosen answers' token-mean NLL, over all of them at once
        loss = loss + cfg.cpo_alpha * -torch.cat([logps[0] for logps in policy]).mean()
    return loss


@pytest.mark.parametrize("objective, loss_type, smoothing, micro, packed", [
    ("dpo", "sigmoid", 0.0, 3, True),
    ("dpo", "sigmoid", 0.2, 2, False),
    ("dpo", "ipo", 0.0, 2, True),
    ("cpo", "sigmoid", 0.1, 3, False),
    ("cpo", "ipo", 0.0, 1, True),
])
def test_loss_and_gradients_equal_the_published_formulas_on_peft(tmp_path, tiny_llama, objective, loss_type,
                                                                 smoothing, micro, packed):
    """Our fused step's loss (its micro-batches' shares summed) and adapter gradients equal those
    of the published formulas computed from transformers + PEFT logits, on the same weights."""
    import peft
    path, hf = tiny_llama
    cfg = train.JobConfig(name="p", data="-", objective=objective, loss_type=loss_type, beta=0.5,
                          label_smoothing=smoothing, cpo_alpha=0.7, r=4, alpha=8, dropout=0.0, targets=TARGETS)
    ours = M.load_model(path, dtype=torch.float32)
    lora.add_adapters(ours, {"p": cfg.lora_config()})
    randomize_B(ours, "p")
    peft_format.save_peft(ours, "p", tmp_path / "p")
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "p", is_trainable=True)
    pairs = random_pairs(3, hf.config.vocab_size, seed=1)

    expected = published_loss(cfg, pm, pairs)
    expected.backward()
    # One optimizer step of 3 pairs in micro-batches of `micro` pairs: each gives its share.
    chosen_tokens = sum(objectives.loss_tokens(cfg, pair) for pair in pairs)
    got = sum(train.fused_step(ours, [cfg], [pairs[start:start + micro]], [chosen_tokens], {}, 0, "cpu", packed,
                               step_rows=[len(pairs)])[0][0] for start in range(0, len(pairs), micro))
    torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=1e-5)
    assert got.abs() > 1e-3   # not a trivial zero
    peft_grads = {k.replace(".default", ""): p.grad for k, p in pm.named_parameters() if p.requires_grad}
    ours_grads = {f"base_model.model.{k.replace('.adapters.p', '')}": p.grad
                  for k, p in ours.named_parameters() if p.requires_grad}
    assert peft_grads.keys() == ours_grads.keys() and len(ours_grads) == 2 * 2 * len(TARGETS)
    for key in ours_grads:
        torch.testing.assert_close(ours_grads[key], peft_grads[key], atol=1e-5, rtol=1e-4)


def test_rewards_margin_and_accuracy(tiny_llama):
    """The reward sums of a fused step: beta (pi - ref) per answer (DPO), beta pi (CPO); the
    margin is their difference and a pair counts as right where it is > 0."""
    path, hf = tiny_llama
    ours = M.load_model(path, dtype=torch.float32)
    pairs = random_pairs(4, hf.config.vocab_size, seed=2)
    for objective in ("dpo", "cpo"):
        cfg = train.JobConfig(name=objective, data="-", objective=objective, beta=0.3, dropout=0.0, targets=TARGETS)
        lora.add_adapters(ours, {objective: cfg.lora_config()})
        randomize_B(ours, objective, seed=3)
        _, rewards, _, batch, _ = train.fused_step(ours, [cfg], [pairs], [1], {}, 0, "cpu")
        # The pairs' answers routed to the adapter, for DPO again to none: the reference.
        assert batch.adapter_names == [objective] * 8 + ([None] * 8 if objective == "dpo" else [])
        with torch.no_grad():
            def logps(names):
                with lora.route(ours, names):
                    return torch.stack([-F.cross_entropy(ours(torch.tensor([e.input_ids]))[0, :-1],
                                                         torch.tensor(e.labels[1:]), reduction="sum")
                                        for e in [p.chosen for p in pairs] + [p.rejected for p in pairs]])
            ours.eval()
            scores = cfg.beta * (logps([objective]) - (logps([None]) if objective == "dpo" else 0))
        chosen, rejected = scores[:4], scores[4:]
        expected = [chosen.sum(), rejected.sum(), (chosen - rejected > 0).sum(), 4]
        torch.testing.assert_close(rewards[0, :4], torch.tensor(expected, dtype=torch.float32), atol=1e-5, rtol=1e-5)
        assert not rewards[0, 4:].any()   # the sums another objective may have more of
        metrics = objectives.reward_means(cfg, rewards[0].tolist())
        assert metrics["margin"] == pytest.approx(float((chosen - rejected).mean()), abs=1e-5)
        assert metrics["accuracy"] == expected[2] / 4


def orpo_oracle(pm, pairs: list[data.Pair], lam: float) -> tuple[torch.Tensor, dict]:
    """ORPO (Hong et al. 2024) by its equations from PEFT's logits: L = L_SFT + lambda L_OR (eq. 6),
    L_OR = -log sigmoid(log(odds(y_w) / odds(y_l))) (eq. 7), odds(y) = P(y) / (1 - P(y)) (eq. 4)
    with P(y) the answer's mean token probability in log space (as TRL), L_SFT the chosen
    answers' token-mean NLL. Also TRL's metrics: rewards lambda log P(y), and the log odds."""
    policy = [[answer_logps(pm, example) for example in (p.chosen, p.rejected)] for p in pairs]
    p_c, p_r = (torch.stack([logps[k].mean() for logps in policy]).exp() for k in (0, 1))
    log_odds = torch.log((p_c / (1 - p_c)) / (p_r / (1 - p_r)))
    loss = -torch.cat([logps[0] for logps in policy]).mean() + lam * -F.logsigmoid(log_odds).mean()
    chosen, rejected = lam * p_c.log().detach(), lam * p_r.log().detach()
    return loss, {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                  "margin": (chosen - rejected).mean(), "accuracy": (chosen > rejected).float().mean(),
                  "log_odds": log_odds.detach().mean()}


@pytest.mark.parametrize("micro, packed", [(3, True), (2, False), (1, True)])
def test_orpo_loss_gradients_and_metrics_equal_its_equations_on_peft(tmp_path, tiny_llama, micro, packed):
    """ORPO's fused step (its micro-batches' shares summed) against its equations computed from
    transformers + PEFT logits on the same weights: the loss, every adapter gradient, the metrics."""
    import peft
    path, hf = tiny_llama
    cfg = train.JobConfig(name="p", data="-", objective="orpo", beta=0.5, r=4, alpha=8, dropout=0.0, targets=TARGETS)
    ours = M.load_model(path, dtype=torch.float32)
    lora.add_adapters(ours, {"p": cfg.lora_config()})
    randomize_B(ours, "p")
    peft_format.save_peft(ours, "p", tmp_path / "p")
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "p", is_trainable=True)
    pairs = random_pairs(3, hf.config.vocab_size, seed=1)

    expected, expected_metrics = orpo_oracle(pm, pairs, cfg.beta)
    expected.backward()
    chosen_tokens = sum(objectives.loss_tokens(cfg, pair) for pair in pairs)
    starts = range(0, len(pairs), micro)
    steps = [train.fused_step(ours, [cfg], [pairs[start:start + micro]], [chosen_tokens], {}, 0, "cpu", packed,
                              step_rows=[len(pairs)]) for start in starts]
    for (*_, batch, _), start in zip(steps, starts):   # both answers through the adapter, no reference rows
        assert batch.adapter_names == ["p"] * 2 * len(pairs[start:start + micro])
    torch.testing.assert_close(sum(loss[0] for loss, *_ in steps), expected.detach(), atol=1e-5, rtol=1e-5)
    metrics = objectives.reward_means(cfg, sum(rewards[0] for _, rewards, *_ in steps).tolist())
    assert metrics.keys() == expected_metrics.keys()
    for key, value in expected_metrics.items():
        assert metrics[key] == pytest.approx(float(value), abs=1e-5), key
    peft_grads = {k.replace(".default", ""): p.grad for k, p in pm.named_parameters() if p.requires_grad}
    ours_grads = {f"base_model.model.{k.replace('.adapters.p', '')}": p.grad
                  for k, p in ours.named_parameters() if p.requires_grad}
    assert peft_grads.keys() == ours_grads.keys() and len(ours_grads) == 2 * 2 * len(TARGETS)
    for key in ours_grads:
        assert ours_grads[key].abs().max() > 0
        torch.testing.assert_close(ours_grads[key], peft_grads[key], atol=1e-5, rtol=1e-4)


def test_orpo_fused_with_sft_equals_orpo_alone(tmp_path, base_dir):
    """An ORPO job trained fused with an SFT job (dropout on) ends with the adapter it trains
    alone, bitwise; its metrics lines carry its rewards and log odds."""
    orpo = job("orpo", write_pairs(tmp_path / "o.json", 6, 10), objective="orpo", beta=0.2, dropout=0.1,
               micro_batch_size=2, batch_size=4, targets=TARGETS, epochs=2)
    sft = job("sft", write_rows(tmp_path / "s.json", 8, 0, "count"), dropout=0.1, targets=TARGETS, epochs=2)
    train.train(run_cfg(base_dir, tmp_path / "fused", [sft, orpo]))
    train.train(run_cfg(base_dir, tmp_path / "alone", [orpo]))
    alone, together = adapter(tmp_path / "alone", "orpo"), adapter(tmp_path / "fused", "orpo")
    assert alone.keys() == together.keys() and all(torch.equal(together[k], alone[k]) for k in alone)
    assert max(v.abs().max() for k, v in together.items() if "lora_B" in k) > 1e-3
    lines = [json.loads(line) for line in (tmp_path / "fused" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["jobs"] for r in lines if "jobs" in r]
    assert any(len(jobs) == 2 for jobs in steps)   # they did share steps
    records = [jobs["orpo"] for jobs in steps if "orpo" in jobs and jobs["orpo"]["step"] > 0]
    assert records and all(r.keys() == {"step", "loss", "lr", *OBJECTIVES["orpo"].metrics} for r in records)


# ----------------------------------------------------------------------------- fused runs

def preference_jobs(d):
    """An SFT job, a DPO job (sigmoid with label smoothing, evaluated every step) and a CPO job
    (ipo). The DPO job's test_data are its first 4 training pairs: 8 pairs on a tiny random
    model teach nothing that carries to new ones, but they do show it learned those."""
    common = dict(dropout=0.1, targets=TARGETS, epochs=2)
    return [job("sft", write_rows(d / "s.json", 8, 0, "count"), **common),
            job("dpo", write_pairs(d / "d.json", 8, 1), objective="dpo", beta=0.5, label_smoothing=0.1,
                test_data=write_pairs(d / "dt.jsonl", 4, 1), eval_every=1, **common),
            job("cpo", write_pairs(d / "c.jsonl", 6, 3), objective="cpo", loss_type="ipo", beta=0.5, cpo_alpha=0.5,
                micro_batch_size=4, **common)]


def test_sft_dpo_cpo_fused_equal_each_alone(tmp_path, base_dir):
    """One fused run of an SFT, a DPO and a CPO job ends with the adapters each trains alone
    (dropout on: masks from each job's own RNG): bitwise packed; padded, up to the rounding of
    another layout. Metrics lines carry the preference jobs' rewards, margin and accuracy, eval
    lines and summary.json their held-out ones."""
    d = tmp_path
    jobs = preference_jobs(d)
    three = {"max_concurrent": 3, "max_candidates": 3}
    fused = train.train(run_cfg(base_dir, d / "fused", jobs, scheduler=three))
    train.train(run_cfg(base_dir, d / "padded", jobs, scheduler=three, packing=False))
    for j in jobs:
        train.train(run_cfg(base_dir, d / j.name, [j]))
        alone, together = adapter(d / j.name, j.name), adapter(d / "fused", j.name)
        assert alone.keys() == together.keys() and all(torch.equal(together[k], alone[k]) for k in alone)
        for key, value in adapter(d / "padded", j.name).items():   # 4 Adam steps amplify the rounding
            torch.testing.assert_close(value, alone[key], atol=5e-5, rtol=1e-4)
        assert max(v.abs().max() for k, v in together.items() if "lora_B" in k) > 1e-3

    lines = [json.loads(line) for line in (d / "fused" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "jobs" in r]
    assert any(len(r["jobs"]) == 3 for r in steps)   # they did share steps
    for r in steps:
        for name, record in r["jobs"].items():
            keys = {"step", "loss", "lr"} | ({"rewards/chosen", "rewards/rejected", "margin", "accuracy"}
                                              if name != "sft" else set())
            assert record.keys() == keys
            if name != "sft" and record["step"] > 0:
                assert record["margin"] == pytest.approx(record["rewards/chosen"] - record["rewards/rejected"])
                assert 0 <= record["accuracy"] <= 1
    evals = [r for r in lines if r.get("event") == "eval" and r["job"] == "dpo"]
    assert len(evals) == 4 and all({"eval_loss", "eval_margin", "eval_accuracy"} <= r.keys() for r in evals)
    admit = next(r for r in lines if r.get("event") == "admit" and r["job"] == "dpo")
    # At init the adapter is the base: policy = reference, margin 0, loss log 2 (sigmoid at 0).
    assert admit["initial_eval_margin"] == pytest.approx(0, abs=1e-6)
    assert admit["initial_eval_loss"] == pytest.approx(0.6931472, abs=1e-5)
    summary = json.loads((d / "fused" / "summary.json").read_text())
    assert summary == fused
    assert summary["dpo"]["eval_margin"] == evals[-1]["eval_margin"] > 0   # it learned to prefer the chosen
    assert summary["dpo"]["eval_accuracy"] == evals[-1]["eval_accuracy"] > 0.5
    assert summary["dpo"]["eval_loss"] < admit["initial_eval_loss"]
    assert {"final_margin", "final_accuracy"} <= summary["cpo"].keys() and "final_margin" not in summary["sft"]


def test_micro_batch_split_gives_the_same_update(tmp_path, base_dir):
    """Accumulating pairs over micro-batches equals one big batch: the loss is a mean over the step's pairs."""
    rows = write_pairs(tmp_path / "d.json", 8, 4)
    for objective in PREFERENCE:
        runs = {}
        for micro in (1, 4):
            out = tmp_path / f"{objective}{micro}"
            train.train(run_cfg(base_dir, out, [job("j", rows, objective=objective, dropout=0.0, micro_batch_size=micro,
                                                    epochs=1, targets=TARGETS)]))
            runs[micro] = adapter(out, "j")
        assert_same_adapter(runs[1], runs[4])


def test_interrupted_preference_run_resumes_exactly(tmp_path, base_dir, monkeypatch):
    """Stopped (SIGINT) mid-accumulation and resumed, a DPO and a CPO job end as uninterrupted:
    the step's reward sums and the last rewards are part of the checkpoint."""
    jobs = preference_jobs(tmp_path)[1:]
    reference = train.train(run_cfg(base_dir, tmp_path / "whole", jobs))
    real_step, calls = train.train_step, [0]

    def interrupt_at_3(run):
        real_step(run)
        calls[0] += 1
        if calls[0] == 3:   # dpo's step 2 is half accumulated (micro-batches of 2 of its 4 pairs)
            run.signal = signal.SIGINT

    cfg = run_cfg(base_dir, tmp_path / "stopped", jobs, checkpoint_every=0)
    monkeypatch.setattr(train, "train_step", interrupt_at_3)
    with pytest.raises(state.Interrupted):
        train.train(cfg)
    monkeypatch.setattr(train, "train_step", real_step)
    resumed = train.train(cfg)
    for j in jobs:
        whole, stopped = adapter(tmp_path / "whole", j.name), adapter(tmp_path / "stopped", j.name)
        assert all(torch.equal(whole[k], stopped[k]) for k in whole)
    keys = ("final_loss", "final_margin", "final_accuracy", "eval_loss", "eval_margin", "eval_accuracy")
    assert {k: resumed["dpo"][k] for k in keys} == {k: reference["dpo"][k] for k in keys}

    def steps(out):
        return [r["jobs"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "jobs" in r]
    assert steps(tmp_path / "stopped") == steps(tmp_path / "whole")


# ----------------------------------------------------------------------------- the scheduler's unit

def test_a_pair_is_one_unit_and_budgets_count_all_its_sequences(tmp_path, base_dir):
    """A preference job's plan holds each pair's sequences together (DPO: chosen, rejected and
    both again for the reference); tokens, padding and the token budget count all of them."""
    cfg = run_cfg(base_dir, tmp_path / "o", [job("dpo", write_pairs(tmp_path / "d.json", 6, 5), objective="dpo"),
                                             job("cpo", write_pairs(tmp_path / "c.json", 6, 5), objective="cpo")])
    _, train_sets, _, plans, _ = jobs.prepare(cfg)
    for plan, factor in zip(plans, (2, 1)):
        for pair, sequences in zip(train_sets[plan.name], plan.sequences):
            assert sequences == (len(pair.chosen.input_ids), len(pair.rejected.input_ids)) * factor
        while not plan.done:
            mb = plan.pop()
            lengths = [n for i in mb.indices for n in plan.sequences[i]]
            assert (mb.sequences, mb.tokens, mb.max_len) == (2 * factor * len(mb.indices), sum(lengths), max(lengths))
            assert mb.step_rows == (4 if mb.step % 2 == 0 else 2)   # 6 pairs an epoch: steps of 4 and 2

    # An SFT and a CPO job, 20 tokens a micro-batch each if a pair counted once, but the CPO
    # job's are 40: a budget they would share a step under if a pair's second answer were forgotten.
    def plans_():
        return [JobPlan("sft", [20] * 4, [5] * 4, 2, 2, 1, seed=0),
                JobPlan("cpo", [(10, 10)] * 4, [5] * 4, 2, 2, 1, seed=0)]
    for packed, budget in ((True, 50), (False, 100)):   # padded: 2 x 24 + 4 x 16 each alone, 6 x 24 fused
        sched = Scheduler(plans_(), "fast-fit", max_concurrent=2, token_budget=budget, pad_multiple=8, packed=packed)
        sched.admit()
        steps = []
        while not sched.done:
            steps.append(sched.next_step())
        assert [[mb.job for mb in step] for step in steps] == [["sft"], ["sft"], ["cpo"], ["cpo"]]
        assert sched.features(steps[2]) == ((40, 400) if packed else (4 * 16, 4 * 16 * 16))


def test_a_fused_step_never_splits_a_pair(tmp_path, base_dir):
    """Every fused batch of a run holds both answers of each pair it trains on (and for DPO the
    reference copies): tokens through the forward are all of its pairs' sequences."""
    pairs = write_pairs(tmp_path / "d.json", 6, 6)
    cfg = run_cfg(base_dir, tmp_path / "o", [job("dpo", pairs, objective="dpo", epochs=1, batch_size=2,
                                                 micro_batch_size=2, max_steps=1)])
    summary = train.train(cfg)
    _, train_sets, _, plans, _ = jobs.prepare(cfg)
    first = JobPlan("dpo", plans[0].lengths, plans[0].loss_tokens, 2, 2, 1, seed=cfg.seed).pop()
    assert summary["dpo"]["tokens"] == sum(2 * (len(train_sets["dpo"][i].chosen.input_ids)
                                                + len(train_sets["dpo"][i].rejected.input_ids)) for i in first.indices)


# ----------------------------------------------------------------------------- bad input

GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "p", "chosen": "a"}], "row 1: missing field 'rejected'"),
    ([GOOD, {"chosen": "a", "rejected": "b"}], "row 2: missing field 'prompt'"),
    ([{**GOOD, "chosen": 3}], "row 1: field 'chosen' must be a string, got int"),
    ([{**GOOD, "input": ["x"]}], "row 1: field 'input' must be a string, got list"),
    ([["p", "a", "b"]], "row 1: expected an object, got list"),
    ([{**GOOD, "rejected": "\ud800"}], "row 1: field 'rejected' has a lone surrogate"),
])
def test_bad_preference_rows_are_one_line_errors(tmp_path, base_dir, rows, message):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(data.DataError) as error:
        data.load_pairs(path, data.load_tokenizer(base_dir))
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value) and "\n" not in str(error.value)


def test_preference_data_errors_through_train(tmp_path, base_dir, capsys):
    """Through the command line: a bad line of a .jsonl, pairs with no answer token within
    cutoff_len, SFT rows given to a DPO job, and train_on_inputs on one: one line, exit 2."""
    good = write_pairs(tmp_path / "d.jsonl", 4, 7)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(good).read() + '\n{"prompt": "p", "chosen": "a", "rejected": null}\n')
    cases = [({"data": str(bad)}, "bad.jsonl: line 5: field 'rejected' must be a string, got NoneType"),
             ({"data": good, "cutoff_len": 8}, "no pair has a token of both answers within cutoff_len=8"),
             ({"data": write_rows(tmp_path / "s.json", 4, 0, "count")}, "s.json: row 1: missing field 'prompt'"),
             ({"data": good, "train_on_inputs": True}, "jobs[0].train_on_inputs: a dpo job scores its answers only")]
    for changes, message in cases:
        cfg = {"base_model": str(base_dir), "out_dir": str(tmp_path / "o"), "device": "cpu",
               "jobs": [{"name": "a", "data": good, "objective": "dpo", **changes}]}
        (tmp_path / "cfg.json").write_text(json.dumps(cfg))
        assert train.main(["--config", str(tmp_path / "cfg.json")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_pairs_are_formatted_like_sft_examples(tmp_path, base_dir):
    """A pair's answers are the SFT example of (prompt, input, answer): same template, EOS,
    labels on the answer only."""
    tok = data.load_tokenizer(base_dir)
    pairs = data.load_pairs(write_pairs(tmp_path / "d.json", 3, 8), tok, template="chat", cutoff_len=64)
    rows = json.loads((tmp_path / "d.json").read_text())
    for pair, row in zip(pairs, rows):
        for example, answer in ((pair.chosen, row["chosen"]), (pair.rejected, row["rejected"])):
            prompt, response = data.format_example("chat", tok, row["prompt"], row["input"], answer)
            assert example == data.make_example(tok, prompt, response, 64, train_on_inputs=False)
        prompt_len = pair.chosen.labels.count(-100)
        assert pair.chosen.input_ids[:prompt_len] == pair.rejected.input_ids[:prompt_len]   # one prompt


# ----------------------------------------------------------------------------- the table

def test_an_objective_checks_the_fields_it_reads_and_warns_of_the_others(tmp_path, base_dir, capsys):
    """A field the job's objective reads is checked (a ConfigError naming it); one it does not
    read, set away from its default, is ONE warning line naming the job and the field."""
    def problem(**fields):
        try:
            config.validate_job(train.JobConfig(name="a", data="-", **fields), "cfg.json", "jobs[0]")
        except config.ConfigError as e:
            return str(e)
    assert problem(objective="dpo", beta=0.0) == "cfg.json: jobs[0].beta: expected a finite number > 0, got 0.0"
    assert problem(objective="dpo", loss_type="hinge") == ("cfg.json: jobs[0].loss_type: expected one of "
                                                           "sigmoid, ipo, got 'hinge'")
    assert problem(objective="cpo", cpo_alpha=-1.0) == "cfg.json: jobs[0].cpo_alpha: expected a finite number >= 0, got -1.0"
    assert problem(objective="kto") == f"cfg.json: jobs[0].objective: expected one of {', '.join(OBJECTIVES)}, got 'kto'"
    assert problem(objective="sft", beta=0.0, loss_type="hinge") is None   # SFT reads neither
    assert problem(objective="dpo", cpo_alpha=-1.0) is None                # nor DPO cpo_alpha

    pairs = write_pairs(tmp_path / "d.json", 4, 9)
    cfg = run_cfg(base_dir, tmp_path / "o", [job("s", write_rows(tmp_path / "s.json", 4, 0, "count"), beta=0.3),
                                             job("d", pairs, objective="dpo", loss_type="ipo", label_smoothing=0.1,
                                                 cpo_alpha=2.0),
                                             job("c", pairs, objective="cpo", beta=0.2, cpo_alpha=0.5)])
    jobs.prepare(cfg)
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: job 's': beta is not read by its objective, sft",
                        "warning: job 'd': label_smoothing is not read by its objective, dpo (ipo, beta=0.1)",
                        "warning: job 'd': cpo_alpha is not read by its objective, dpo (ipo, beta=0.1)"]


def test_the_readme_table_lists_every_objective():
    """The README's objectives table has one row per entry of OBJECTIVES, in its order."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("\n## Objectives per job\n")[1].split("\n## ")[0]
    assert re.findall(r"^\| `(\w+)` \|", section, re.M) == list(OBJECTIVES)
