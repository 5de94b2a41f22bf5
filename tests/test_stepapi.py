"""The step-level API's engine (stepapi.py, issue 33) on a tiny random checkpoint. Oracles: each
call run alone (fused = alone), the model's own full logits and log_softmax with autograd (the
losses and their gradients), torch.optim.AdamW on copies (optim_step), forward_backward itself
(sample's log-probs), PEFT on transformers' model (a saved LoRA)."""
import random

import pytest
import torch

import data
import lora
import model as M
from conftest import make_hf_model, randomize_B, save_hf
from stepapi import LOSSES, Call, Datum, Engine, SampleCall
from tokenizer_util import write_tokenizer_json

TIGHT = dict(atol=1e-6, rtol=1e-5)   # fused against alone: the same rows, other batch shapes


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny LLaMA (GQA, tied embeddings) with a tokenizer, as a Hugging Face folder."""
    path = tmp_path_factory.mktemp("stepapi") / "base"
    vocab = write_tokenizer_json(path)
    save_hf(make_hf_model(vocab_size=max(vocab, 384), tie_word_embeddings=True), path)
    return path


def engine_on(base, **kw) -> Engine:
    torch.manual_seed(0)
    return Engine(M.load_model(base, dtype=torch.float32), data.load_tokenizer(base), "cpu", seed=0, **kw)


def new_lora(engine: Engine, seed: int, **config) -> str:
    """A LoRA whose B is random (so A gets gradients and the LoRA changes the model)."""
    lora_id = engine.create_lora(config)
    randomize_B(engine.model, lora_id, seed)
    return lora_id


def datum(rng: random.Random, length: int, rl: bool = False) -> Datum:
    tokens = [rng.randrange(3, 300) for _ in range(length + 1)]
    fields = dict(weights=[rng.choice([0.0, 0.5, 1.0]) for _ in range(length)])
    if rl:
        fields |= dict(logprobs=[rng.uniform(-7, -4) for _ in range(length)],
                       advantages=[rng.uniform(-1, 1) for _ in range(length)])
    return Datum(tokens[:-1], tokens[1:], **fields)


def grads(engine: Engine, lora_id: str) -> list[torch.Tensor]:
    """The LoRA's gradients (cloned), then cleared."""
    params = lora.adapter_parameters(engine.model, lora_id)
    out = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return out


def three_calls(engine: Engine) -> list[Call]:
    """Three LoRAs of different ranks, targets and variants, each with its own loss and lengths."""
    a = new_lora(engine, 1, r=4, dropout=0.1)
    b = new_lora(engine, 2, r=8, targets=["q_proj", "v_proj"], variant="dora")
    c = new_lora(engine, 3, r=2, alpha=4, targets=["o_proj", "down_proj"], use_rslora=True)
    rng = random.Random(0)
    return [Call(a, [datum(rng, 9), datum(rng, 4)]),
            Call(b, [datum(rng, 13, rl=True)], "importance_sampling"),
            Call(c, [datum(rng, 6, rl=True), datum(rng, 11, rl=True)], "ppo", {"clip_low": 0.1})]


def alone(engine: Engine, call: Call, dropout_streams: dict):
    """The call run alone, its LoRA's dropout stream where it was before the fused run: the same masks."""
    engine.loras[call.lora_id].generator.set_state(dropout_streams[call.lora_id])
    return engine.forward_backward([call])[0]


def dropout_streams(engine: Engine) -> dict:
    return {lora_id: s.generator.get_state() for lora_id, s in engine.loras.items()}


def assert_same_results(got, want, tolerance=TIGHT):
    assert len(got.logprobs) == len(want.logprobs)
    for g, w in zip(got.logprobs, want.logprobs):
        torch.testing.assert_close(torch.tensor(g), torch.tensor(w), **tolerance)
    torch.testing.assert_close(torch.tensor(got.loss), torch.tensor(want.loss), **tolerance)


@pytest.mark.parametrize("packed", [True, False])
def test_fused_calls_equal_each_call_alone(base, packed):
    engine = engine_on(base, packed=packed)
    calls = three_calls(engine)
    streams = dropout_streams(engine)
    fused = engine.forward_backward(calls)
    fused_grads = [grads(engine, call.lora_id) for call in calls]
    for call, result, want_grads in zip(calls, fused, fused_grads):
        assert_same_results(result, alone(engine, call, streams))
        assert [len(lp) for lp in result.logprobs] == [len(d.tokens) for d in call.data]
        got = grads(engine, call.lora_id)
        assert len(got) == len(want_grads) and all(g.abs().sum() > 0 for g in got)
        for g, w in zip(got, want_grads):
            torch.testing.assert_close(g, w, **TIGHT)


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor):
    """Equal to float error against the plain definition (other arithmetic: full logits, not
    chunks): within 1e-5 of the tensor's largest value (IS gradients reach 36 after a large step)."""
    torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-4)


def test_calls_of_one_lora_in_one_batch_add_their_gradients(base):
    """Two calls of one LoRA with another LoRA's call between them (packed rows of one adapter
    must be adjacent: the engine orders them): each its own result, the LoRA the sum of both."""
    engine = engine_on(base)
    a, b = new_lora(engine, 1, r=4), new_lora(engine, 2, r=2)
    rng = random.Random(6)
    calls = [Call(a, [datum(rng, 7)]), Call(b, [datum(rng, 9)]), Call(a, [datum(rng, 5, rl=True)], "ppo")]
    fused = engine.forward_backward(calls)
    fused_grads = grads(engine, a)
    alone = [engine.forward_backward([call])[0] for call in calls]
    for got, want in zip(fused, alone):
        assert_same_results(got, want)
    grads(engine, a), grads(engine, b)   # cleared
    engine.forward_backward([calls[0]])
    first = grads(engine, a)
    engine.forward_backward([calls[2]])
    for g, x, y in zip(fused_grads, first, grads(engine, a)):
        torch.testing.assert_close(g, x + y, **TIGHT)


def hand_logps(engine: Engine, lora_id: str, d: Datum) -> torch.Tensor:
    """The targets' log-probs by the plain definition: the model's full logits, log_softmax, with autograd."""
    with lora.route(engine.model, [lora_id]):
        logits = engine.model(torch.tensor([d.tokens]))[0]                                # [T, V]
    return torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(d.targets)[:, None])[:, 0]


def test_losses_and_gradients_equal_their_formulas(base):
    engine = engine_on(base)
    lora_id = new_lora(engine, 1, r=4)
    d = datum(random.Random(1), 24)
    logp = hand_logps(engine, lora_id, d)
    (-(torch.tensor(d.weights) * logp).sum()).backward()
    hand_grads = grads(engine, lora_id)
    (result,) = engine.forward_backward([Call(lora_id, [d])])
    torch.testing.assert_close(torch.tensor(result.logprobs[0]), logp.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.loss, -(torch.tensor(d.weights) * logp.detach()).sum().item(), atol=1e-4, rtol=1e-5)
    for got, hand in zip(grads(engine, lora_id), hand_grads):
        assert_close_to_scale(got, hand)
    # The policy moves (a large step), then IS and PPO score the old log-probs: ratios leave [0.8, 1.2].
    sampled = logp.detach().tolist()
    engine.forward_backward([Call(lora_id, [d])])
    engine.optim_step(lora_id, {"lr": 0.05})
    rng = random.Random(2)
    d = Datum(d.tokens, d.targets, d.weights, sampled, [rng.uniform(-1, 1) for _ in d.tokens])
    for loss_fn, config in [("importance_sampling", {}), ("ppo", {"clip_low": 0.1, "clip_high": 0.3})]:
        (result,) = engine.forward_backward([Call(lora_id, [d], loss_fn, config)])
        got_grads = grads(engine, lora_id)
        logp = hand_logps(engine, lora_id, d)
        ratio, advantages, weights = torch.exp(logp - torch.tensor(sampled)), torch.tensor(d.advantages), torch.tensor(d.weights)
        if loss_fn == "ppo":
            clipped = ratio.clamp(0.9, 1.3)
            assert ((ratio < 0.9) | (ratio > 1.3)).any() and ((ratio > 0.9) & (ratio < 1.3)).any()
            want = -(weights * torch.minimum(ratio * advantages, clipped * advantages)).sum()
        else:
            want = -(weights * ratio * advantages).sum()
        want.backward()
        torch.testing.assert_close(result.loss, want.item(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(result.logprobs[0]), logp.detach(), atol=1e-5, rtol=1e-5)
        for got, hand in zip(got_grads, grads(engine, lora_id)):
            assert_close_to_scale(got, hand)


def test_optim_step_equals_torch_adamw_and_leaves_other_loras(base):
    engine = engine_on(base)
    a, b = new_lora(engine, 1, r=4), new_lora(engine, 2, r=2, targets=["v_proj"])
    rng = random.Random(3)
    params = lora.adapter_parameters(engine.model, a)
    copies = [p.detach().clone().requires_grad_() for p in params]
    settings = [{"lr": 1e-2, "beta1": 0.8, "beta2": 0.9, "eps": 1e-8, "weight_decay": 0.1}, {"learning_rate": 3e-3}]
    reference = torch.optim.AdamW(copies, lr=1.0)
    b_before = [p.detach().clone() for p in lora.adapter_parameters(engine.model, b)]
    for step, adam in enumerate(settings, 1):
        engine.forward_backward([Call(a, [datum(rng, 10)])])
        for p, c in zip(params, copies):
            c.grad = p.grad.clone()
        full = {"lr": 1e-4, "beta1": 0.9, "beta2": 0.95, "eps": 1e-12, "weight_decay": 0.0,
                **{"lr" if k == "learning_rate" else k: v for k, v in adam.items()}}
        for group in reference.param_groups:
            group.update(lr=full["lr"], betas=(full["beta1"], full["beta2"]), eps=full["eps"], weight_decay=full["weight_decay"])
        reference.step()
        assert engine.optim_step(a, adam) == {"step": step}
        assert all(p.grad is None for p in params)
        for p, c in zip(params, copies):
            assert torch.equal(p.detach(), c.detach())
    assert all(torch.equal(p, q) for p, q in zip(lora.adapter_parameters(engine.model, b), b_before))


def test_sample_reproducible_fused_or_alone_and_scored_like_forward_backward(base):
    engine = engine_on(base)
    a, b = new_lora(engine, 1, r=4), new_lora(engine, 2, r=8, targets=["q_proj", "v_proj"])
    calls = [SampleCall(a, [5, 9, 20, 7], n=3, temperature=1.0, max_tokens=8, seed=5),
             SampleCall(None, [11, 3], n=2, temperature=0.7, top_p=0.9, max_tokens=5, seed=7),
             SampleCall(b, [40, 41, 42, 43, 44, 45], temperature=0.0, max_tokens=6)]
    fused = engine.sample(calls)
    for call, result in zip(calls, fused):
        if call.seed is not None:
            (alone,) = engine.sample([call])
            assert [c.tokens for c in alone.completions] == [c.tokens for c in result.completions]
            for x, y in zip(alone.completions, result.completions):
                torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=1e-5)
        assert len(result.completions) == call.n
        assert all(len(c.tokens) == call.max_tokens and c.stop_reason == "length" for c in result.completions)
    first = fused[0].completions
    assert len({tuple(c.tokens) for c in first}) > 1   # n rows, n different draws
    other_seed = engine.sample([SampleCall(a, [5, 9, 20, 7], n=3, max_tokens=8, seed=6)])[0].completions
    assert [c.tokens for c in other_seed] != [c.tokens for c in first]
    # Each token's log-prob is forward_backward's of the same sequence (weights 0: no gradient).
    for c in first:
        tokens = calls[0].prompt + c.tokens
        d = Datum(tokens[:-1], tokens[1:], [0.0] * (len(tokens) - 1))
        (scored,) = engine.forward_backward([Call(a, [d])])
        torch.testing.assert_close(torch.tensor(scored.logprobs[0][-len(c.tokens):]), torch.tensor(c.logprobs),
                                   atol=1e-5, rtol=1e-5)
    # Stop ids and strings end a completion at their first occurrence, that token kept.
    tokens = first[0].tokens
    stop_id = tokens[3]
    (stopped,) = engine.sample([SampleCall(a, [5, 9, 20, 7], n=3, max_tokens=8, seed=5, stop=[stop_id])])
    assert stopped.completions[0].tokens == tokens[:tokens.index(stop_id) + 1]
    assert stopped.completions[0].stop_reason == "stop"
    text = engine.tokenizer.decode(tokens)
    stop_text = text[len(engine.tokenizer.decode(tokens[:2])):][:2]   # text that the third token starts
    assert stop_text and stop_text not in engine.tokenizer.decode(tokens[:2])
    (stopped,) = engine.sample([SampleCall(a, [5, 9, 20, 7], n=3, max_tokens=8, seed=5, stop=[stop_text])])
    end = next(k for k in range(1, 9) if stop_text in engine.tokenizer.decode(tokens[:k]))
    assert stopped.completions[0].tokens == tokens[:end] and stopped.completions[0].stop_reason == "stop"


def train_steps(engine: Engine, lora_id: str, seed: int, steps: int):
    rng = random.Random(seed)
    for _ in range(steps):
        engine.forward_backward([Call(lora_id, [datum(rng, 12), datum(rng, 7)])])
        engine.optim_step(lora_id, {"lr": 1e-2, "weight_decay": 0.01})


def test_save_then_load_continues_exactly_and_loads_in_peft(base, tmp_path):
    import peft
    import transformers
    engine = engine_on(base)
    lora_id = new_lora(engine, 1, r=4, dropout=0.1, targets=["q_proj", "v_proj", "down_proj"])
    train_steps(engine, lora_id, 0, 2)
    engine.save(lora_id, tmp_path / "saved")
    loaded = engine.load(tmp_path / "saved")
    assert engine.loras[loaded].step == 2
    train_steps(engine, loaded, 1, 2)
    train_steps(engine, lora_id, 1, 2)
    after = lora.adapter_parameters(engine.model, lora_id)
    assert all(torch.equal(p, q) for p, q in zip(after, lora.adapter_parameters(engine.model, loaded)))
    # Without the engine's file (a PEFT folder from elsewhere): the same weights, a fresh optimizer.
    (tmp_path / "saved" / "engine_state.pt").unlink()
    fresh = engine.load(tmp_path / "saved")
    assert engine.loras[fresh].step == 0 and not engine.loras[fresh].optimizer.state
    # PEFT on transformers' model reads the saved folder to the engine's logits.
    hf = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), tmp_path / "saved")
    idx = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    engine.model.eval()
    with lora.route(engine.model, [fresh, fresh]):
        ours = engine.model(idx)
    with lora.route(engine.model, [None, None]):
        bare = engine.model(idx)
    torch.testing.assert_close(ours, hf(idx).logits, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(ours, bare, atol=1e-3)   # the LoRA matters


def test_a_bad_call_fails_alone_with_a_one_line_error(base):
    engine = engine_on(base, max_length=32)
    good = three_calls(engine)
    a = good[0].lora_id
    rng = random.Random(4)
    d = datum(rng, 5)
    bad = {"lora_id": Call("lora-9999", [d]),
           "tokens": Call(a, [Datum([1, 2, 384], [2, 3, 4])]),
           "targets": Call(a, [Datum([1, 2, 3], [2, 3])]),
           "loss_fn": Call(a, [d], "dpo"),
           "advantages": Call(a, [Datum(d.tokens, d.targets, logprobs=[-1.0] * 5)], "ppo"),
           "data": Call(a, []),
           "maximum length": Call(a, [datum(rng, 33)]),
           "clip_low": Call(a, [datum(rng, 5, rl=True)], "ppo", {"clip_low": -1})}
    calls = [bad["lora_id"], good[0], bad["tokens"], good[1], *list(bad.values())[2:], good[2]]
    streams = dropout_streams(engine)
    results = engine.forward_backward(calls)
    fused_grads = [grads(engine, call.lora_id) for call in good]
    errors = [r for r in results if isinstance(r, Exception)]
    assert len(errors) == len(bad) and all(isinstance(e, ValueError) and "\n" not in str(e) for e in errors)
    for field, error in zip(bad, [results[0], results[2], *results[4:-1]]):
        assert field in str(error), (field, error)
    for call, result, want in zip(good, [results[1], results[3], results[-1]], fused_grads):
        assert_same_results(result, alone(engine, call, streams))
        for g, w in zip(grads(engine, call.lora_id), want):
            torch.testing.assert_close(g, w, **TIGHT)
    assert all(isinstance(r, ValueError) for r in engine.forward_backward([bad["data"], bad["loss_fn"]]))
    sampled = engine.sample([SampleCall(a, [5, 6], top_p=0.0), SampleCall(a, [5, 6], max_tokens=3, seed=1)])
    assert isinstance(sampled[0], ValueError) and "top_p" in str(sampled[0])
    assert sampled[1].completions[0].tokens == engine.sample([SampleCall(a, [5, 6], max_tokens=3, seed=1)])[0].completions[0].tokens


@pytest.mark.parametrize("config, field", [({"r": 0}, "r"), ({"variant": "nope"}, "variant"),
                                           ({"targets": ["nope"]}, "targets"), ({"rank": 4}, "rank"),
                                           ({"dropout": 1.5}, "dropout")])
def test_create_lora_refuses_a_bad_field_in_one_line(base, config, field):
    engine = engine_on(base)
    with pytest.raises(ValueError, match=field) as error:
        engine.create_lora(config)
    assert "\n" not in str(error.value)


def test_every_variant_of_the_table_trains_and_bad_adam_settings_are_refused(base):
    engine = engine_on(base)
    for variant in lora.VARIANTS:
        lora_id = engine.create_lora({"r": 2, "variant": variant, "targets": ["q_proj"]})
        before = [p.detach().clone() for p in lora.adapter_parameters(engine.model, lora_id)]
        engine.forward_backward([Call(lora_id, [datum(random.Random(5), 6)])])
        engine.optim_step(lora_id, {"lr": 1e-2})
        assert any(not torch.equal(p, q) for p, q in zip(lora.adapter_parameters(engine.model, lora_id), before)), variant
    for adam, field in [({"lr": -1}, "lr"), ({"beta2": 1.0}, "beta2"), ({"momentum": 0.9}, "momentum")]:
        with pytest.raises(ValueError, match=field):
            engine.optim_step(lora_id, adam)
    assert set(LOSSES) == {"cross_entropy", "importance_sampling", "ppo"}
    engine.remove_lora(lora_id)
    assert lora_id not in lora.adapter_names(engine.model)
    assert isinstance(engine.forward_backward([Call(lora_id, [datum(random.Random(5), 6)])])[0], ValueError)
