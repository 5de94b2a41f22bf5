"""Generation: greedy against transformers (+ PEFT), mixed adapters, KV cache, sampling, CLI."""
import pytest
import torch

import data
import generate as G
import lora
from llama import Llama
import model as M
from conftest import make_hf_model, randomize_B, save_hf
import peft_format
from tokenizer_util import write_tokenizer_json

LENGTHS = (5, 9, 3, 7)  # different prompt lengths, so every batch is left padded
PAD = 0


def random_prompts(lengths=LENGTHS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 384, (n,), generator=g).tolist() for n in lengths]


def hf_generate(hf, prompts, max_new_tokens, eos_ids):
    """transformers' greedy generate on left-padded prompts; new tokens per row, cut after the first EOS."""
    T = max(len(p) for p in prompts)
    input_ids = torch.tensor([[PAD] * (T - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
                      pad_token_id=PAD, eos_token_id=sorted(eos_ids))
    rows = []
    for row in out[:, T:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
        rows.append(row[:end])
    return rows


def pick_eos(outputs):
    """A token generated mid-way by row 1 but never by row 0, so rows stop at different steps."""
    for i in range(2, len(outputs[1]) - 2):
        token = outputs[1][i]
        if token not in outputs[1][:i] and token not in outputs[0]:
            return token
    raise AssertionError("no suitable eos token in the greedy outputs")


def with_adapters(path):
    """Our model with two adapters of different ranks and targets, B randomized."""
    ours = M.load_model(path, dtype=torch.float32)
    lora.add_adapters(ours, {"a": lora.LoRAConfig(r=4, alpha=8, targets=list(Llama.LORA_TARGETS)),
                             "b": lora.LoRAConfig(r=2, alpha=16, targets=["q_proj", "v_proj", "down_proj"])})
    randomize_B(ours, "a", seed=1)
    randomize_B(ours, "b", seed=2)
    return ours


def test_greedy_equals_transformers_with_per_row_eos(tiny_llama):
    path, hf = tiny_llama
    ours = M.load_model(path, dtype=torch.float32)
    prompts = random_prompts()
    free = G.generate(ours, prompts, [None] * 4, max_new_tokens=12)
    assert free == hf_generate(hf, prompts, 12, set())
    eos = pick_eos(free)
    stopped = G.generate(ours, prompts, [None] * 4, max_new_tokens=12, stop_ids={eos}, pad_id=PAD)
    assert stopped == hf_generate(hf, prompts, 12, {eos})
    # Row 1 stops on the eos, which it keeps; row 0 runs to max_new_tokens.
    assert stopped[1][-1] == eos and len(stopped[1]) < 12 and stopped[0] == free[0]


def test_greedy_with_adapter_equals_peft(tmp_path, tiny_llama):
    import peft
    path, hf = tiny_llama
    ours = with_adapters(path)
    peft_format.save_peft(ours, "a", tmp_path / "a")
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "a")
    prompts = random_prompts(seed=2)
    got = G.generate(ours, prompts, ["a"] * 4, max_new_tokens=10)
    assert got == hf_generate(pm, prompts, 10, set())
    assert got != G.generate(ours, prompts, [None] * 4, max_new_tokens=10)  # the adapter matters


def test_mixed_adapters_equal_each_row_alone(tiny_llama):
    ours = with_adapters(tiny_llama[0])
    prompts = random_prompts((6, 2, 6, 9, 4, 6), seed=3)
    prompts[2] = prompts[5] = prompts[0]  # one prompt under b, None and a
    names = ["b", "a", None, "b", "a", "a"]
    mixed = G.generate(ours, prompts, names, max_new_tokens=10)
    for prompt, name, row in zip(prompts, names, mixed):
        assert row == G.generate(ours, [prompt], [name], max_new_tokens=10)[0]
    assert len({tuple(mixed[i]) for i in (0, 2, 5)}) == 3  # b, base and a answer differently


def test_kv_cache_equals_recomputing(tiny_llama):
    ours = with_adapters(tiny_llama[0])
    prompts = random_prompts(seed=4)
    names = ["a", None, "b", "a"]
    cached = G.generate(ours, prompts, names, max_new_tokens=10)
    # Reference: the whole left-padded sequence through the model at every step, no cache.
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad(), lora.route(ours, names):
        for _ in range(10):
            token = ours(ids, attention_mask=mask)[:, -1].argmax(-1)
            ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones(4, 1, dtype=torch.long)], 1)
    assert cached == ids[:, T:].tolist()


def test_sampling_seeds_and_top_p(tiny_llama):
    ours = M.load_model(tiny_llama[0], dtype=torch.float32)
    prompts = random_prompts(seed=5)
    kw = dict(max_new_tokens=8, temperature=1.0)
    first = G.generate(ours, prompts, [None] * 4, seed=0, **kw)
    assert first == G.generate(ours, prompts, [None] * 4, seed=0, **kw)
    assert first != G.generate(ours, prompts, [None] * 4, seed=1, **kw)
    greedy = G.generate(ours, prompts, [None] * 4, max_new_tokens=8)
    assert first != greedy
    assert G.generate(ours, prompts, [None] * 4, seed=0, top_p=1e-6, **kw) == greedy
    # generate puts the model in eval mode and gives back the mode it found.
    ours.train()
    G.generate(ours, prompts[:1], [None], max_new_tokens=2)
    assert ours.training


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square test of counts [V] against probabilities [V]: the p-value. Tokens of
    expected count below 5 are pooled into one bin (the test's usual validity rule)."""
    expected = probs.double() * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    if expected[-1] == 0:                            # no pooled bin
        observed, expected = observed[:-1], expected[:-1]
    statistic = ((observed - expected) ** 2 / expected).sum()
    df = len(expected) - 1
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), statistic / 2).item()  # chi2's sf


def nucleus_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution to draw from, by transformers' own logits warpers (the oracle)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(-1)


SAMPLING = [(1.0, 1.0), (0.7, 1.0), (0.7, 0.6), (1.5, 0.9)]   # (temperature, top_p)


@pytest.mark.parametrize("temperature, top_p", SAMPLING)
def test_first_tokens_follow_the_tempered_nucleus(tiny_llama, temperature, top_p):
    """10,000 first tokens (10 seeds x 1,000 rows of one prompt) against transformers' model with
    its temperature and top-p warpers: chi-square p > 1e-3 (fixed seeds: the same draws every run;
    measured 0.5-0.8), no token outside the nucleus; and the same counts against the distribution
    of a temperature 1.25x off are rejected (p < 1e-6; measured < 1e-17), so the bound has power."""
    path, hf = tiny_llama
    ours = M.load_model(path, dtype=torch.float32)
    prompt = random_prompts((5,), seed=5)[0]
    counts = torch.zeros(hf.config.vocab_size, dtype=torch.long)
    for seed in range(10):
        rows = G.generate(ours, [prompt] * 1000, [None] * 1000, max_new_tokens=1, temperature=temperature,
                          top_p=top_p, seed=seed)
        counts += torch.bincount(torch.tensor([row[0] for row in rows]), minlength=len(counts))
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[:, -1]       # [1, V]
    probs = nucleus_probs(logits, temperature, top_p)[0]
    assert (probs == 0).any() == (top_p < 1) and counts[probs == 0].sum() == 0   # nothing outside the nucleus
    assert chi_square_p(counts, probs) > 1e-3
    assert chi_square_p(counts, nucleus_probs(logits, 1.25 * temperature, 1.0)[0]) < 1e-6


@pytest.mark.parametrize("top_p, kept", [(0.3, 1), (0.7, 2), (0.8, 3), (0.9, 4), (1.0, 5)])
def test_top_p_keeps_the_smallest_set_that_reaches_it(top_p, kept):
    """Probabilities 1/2, 1/4, 1/8, 3/32, 1/32 (mass before each: 0, .5, .75, .875, .96875): top-p
    keeps the most likely tokens until their mass reaches top_p, as transformers' TopPLogitsWarper,
    and draws among them in proportion (chi-square on 20,000 draws of one seed)."""
    logits = torch.tensor([1 / 2, 1 / 4, 1 / 8, 3 / 32, 1 / 32]).log()
    probs = nucleus_probs(logits[None], 1.0, top_p)[0]
    assert (probs > 0).sum() == kept
    draws = G.sample(logits.expand(20_000, -1), 1.0, top_p, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=5)
    assert torch.equal(counts > 0, probs > 0)
    if kept > 1:                                        # one token kept: every draw is it, checked above
        assert chi_square_p(counts, probs) > 1e-3


def test_generate_text_adds_bos_and_chat_template(tmp_path):
    vocab = write_tokenizer_json(tmp_path / "base", add_bos=True)  # Llama 3 style: BOS from the post-processor
    # The model's 384 output ids outnumber the tokenizer's 300: generate_text chooses among the 300.
    save_hf(make_hf_model(vocab_size=max(vocab, 384)), tmp_path / "base")
    tokenizer = data.load_tokenizer(tmp_path / "base")
    ours = M.load_model(tmp_path / "base", dtype=torch.float32)
    texts = ["What is the capital of France?", "hello"]
    chat_texts = [f"<|im_start|>user\n{t}<|im_end|>\n<|im_start|>assistant\n" for t in texts]
    for chat, prompts in ((False, texts), (True, chat_texts)):
        ids = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
        expected = G.generate(ours, ids, [None, None], max_new_tokens=6, stop_ids=tokenizer.eos_ids,
                              pad_id=tokenizer.pad_id, vocab_size=vocab)
        assert all(t < vocab for row in expected for t in row)
        got = G.generate_text(ours, tokenizer, texts, [None, None], template="chat" if chat else "plain",
                              max_new_tokens=6)
        assert got == [tokenizer.decode(e, skip_special=True) for e in expected]


def test_cli_with_two_adapters_and_base(tmp_path, capsys):
    vocab = write_tokenizer_json(tmp_path / "base")
    save_hf(make_hf_model(vocab_size=max(vocab, 384)), tmp_path / "base")
    ours = with_adapters(tmp_path / "base")
    # Two folders with the same name: the second loads as "job-2".
    peft_format.save_peft(ours, "a", tmp_path / "x" / "job")
    peft_format.save_peft(ours, "b", tmp_path / "y" / "job")
    rc = G.main(["--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "x" / "job"),
                 "--adapter", str(tmp_path / "y" / "job"), "--with-base", "--prompt", "hello world",
                 "--prompt", "The quick brown fox", "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert rc == 0
    for label in ("[base] ", "[job] ", "[job-2] "):
        assert out.count(label) == 2, out
    assert out.index("prompt 1") < out.index("[job-2]") < out.index("prompt 2")
    assert "tokens/s" in out


def template_cli(tmp_path, monkeypatch):
    """A base, adapters saved with training.json (alpaca, chat) and one without, and G.generate
    recording the prompt ids and adapters it is given."""
    vocab = write_tokenizer_json(tmp_path / "base")
    save_hf(make_hf_model(vocab_size=max(vocab, 384)), tmp_path / "base")
    ours = with_adapters(tmp_path / "base")
    for name, folder, template in (("a", "al", "alpaca"), ("b", "ch", "chat")):
        peft_format.write_peft(tmp_path / folder, *peft_format.peft_files(ours, name),
                               {"training.json": {"template": template, "cutoff_len": 64}})
    peft_format.save_peft(ours, "a", tmp_path / "old")
    calls, real = [], G.generate
    monkeypatch.setattr(G, "generate", lambda model, prompts, adapters, **kw:
                        calls.append(list(zip(prompts, adapters))) or real(model, prompts, adapters, **kw))
    tok = data.load_tokenizer(tmp_path / "base")
    ids = lambda template, text: tok.add_prefix(tok.encode(data.build_prompt(template, tok, text)))
    return calls, ids


def test_cli_reads_each_adapter_through_its_saved_template(tmp_path, monkeypatch, capsys):
    calls, ids = template_cli(tmp_path, monkeypatch)
    base = ["--base", str(tmp_path / "base"), "--max-new-tokens", "2"]
    adapters = ["--adapter", str(tmp_path / "al"), "--adapter", str(tmp_path / "ch"), "--adapter", str(tmp_path / "old")]
    assert G.main(base + adapters + ["--with-base", "--prompt", "hi", "--prompt", "Name a color."]) == 0
    out = capsys.readouterr().out
    # Each adapter its own template (none saved: plain); the base once per template they use.
    rows = [(None, "alpaca"), (None, "chat"), (None, "plain"), ("al", "alpaca"), ("ch", "chat"), ("old", "plain")]
    assert calls[-1] == [(ids(template, text), name) for text in ("hi", "Name a color.") for name, template in rows]
    assert "old has no training.json" in out and out.count("[base, chat] ") == 2
    assert "templates: base, alpaca alpaca, base, chat chat, base, plain plain, al alpaca, ch chat, old plain" in out
    # --template overrides every saved one, and the base takes it too: one base row.
    assert G.main(base + adapters + ["--with-base", "--template", "mlora", "--prompt", "hi"]) == 0
    assert calls[-1] == [(ids("mlora", "hi"), name) for name in (None, "al", "ch", "old")]
    # No adapter: the text as it is, or the chat template with --chat (as --template chat).
    for flags, template in (([], "plain"), (["--chat"], "chat"), (["--template", "chat"], "chat")):
        assert G.main(base + flags + ["--prompt", "hi"]) == 0
        assert calls[-1] == [(ids(template, "hi"), None)]
    assert ids("plain", "hi") != ids("chat", "hi") != ids("alpaca", "hi")


def test_cli_template_without_a_prompt_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    calls, _ = template_cli(tmp_path, monkeypatch)
    jinja = tmp_path / "rows.jinja"
    jinja.write_text("{{ data_point['instruction'] }} {{ data_point['output'] }}")
    peft_format.write_peft(tmp_path / "j", *peft_format.peft_files(with_adapters(tmp_path / "base"), "a"),
                           {"training.json": {"template": str(jinja), "cutoff_len": 64}})
    base = ["--base", str(tmp_path / "base"), "--prompt", "hi"]
    capsys.readouterr()
    for flags, source, why in ((["--adapter", str(tmp_path / "j")], str(tmp_path / "j" / "training.json"),
                                "a Jinja template renders whole rows; it has no prompt of its own"),
                               (["--template", str(jinja)], "--template", "renders whole rows"),
                               (["--adapter", str(tmp_path / "al"), "--template", str(tmp_path / "nope.json")],
                                "--template", "nope.json: template file not found")):
        assert G.main(base + flags) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: template of {source}: ") and why in err and err.count("\n") == 1, err
    assert not calls
    with pytest.raises(SystemExit):
        G.main(base + ["--chat", "--template", "alpaca"])
    assert "--chat is --template chat" in capsys.readouterr().err
