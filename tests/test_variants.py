"""LoRA variants per adapter (issue 13): DoRA, rsLoRA, PiSSA and OLoRA inits, LoRA+, all against
PEFT with the same settings. Every variant's rows sit in ONE mixed batch of ours (PEFT refuses
DoRA in mixed batches; each PEFT model runs its variant's rows alone), in training mode with
dropout: PEFT's dropout modules are given our masks, so both compute on the same dropped
inputs. Logits and the gradients of every adapter tensor must agree; on an nf4 base too."""
import copy

import pytest
import torch
import torch.nn as nn

import lora
import lora_update
import model as M
import peft_format
import jobs
import train
from conftest import make_hf_model, randomize_B, save_hf
from tokenizer_util import write_tokenizer_json

T, ROWS = 12, 2   # every row T tokens (no padding), ROWS rows per variant
TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]
VARIANTS = {   # name -> (our LoRAConfig fields, PEFT's LoraConfig fields)
    "plain": (dict(), dict()),
    "dora": (dict(use_dora=True), dict(use_dora=True)),
    "rs": (dict(use_rslora=True, alpha=6), dict(use_rslora=True, lora_alpha=6)),
    "pissa": (dict(init="pissa"), dict(init_lora_weights="pissa")),
    "olora": (dict(init="olora"), dict(init_lora_weights="olora")),
    "rs_dora": (dict(use_rslora=True, use_dora=True, init="gaussian"),
                dict(use_rslora=True, use_dora=True, init_lora_weights="gaussian")),
}
QUANT_VARIANTS = ["plain", "dora", "rs"]   # PEFT refuses PiSSA on a quantized base and re-quantizes OLoRA's residual


class GivenDropout(nn.Module):
    """PEFT's lora_dropout replaced by a given keep mask, with our 1/(1-p) (lora_update.drawn_p)."""
    def __init__(self, keep: torch.Tensor, p: float):
        super().__init__()
        self.keep, self.scale = keep, 1 / (1 - lora_update.drawn_p(p))

    def forward(self, x):
        return x * self.keep * self.scale


def perturb(model, name: str, seed: int):
    """Trained-looking weights: B (and A, DoRA's magnitude) moved off their init."""
    randomize_B(model, name, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            if name in layer.adapters:
                a = layer.adapters[name]
                a.lora_A.weight.add_(torch.randn(a.lora_A.weight.shape, generator=g) * 0.05)
                if a.config.use_dora:
                    a.magnitude.mul_(1 + 0.1 * torch.randn(a.magnitude.shape, generator=g))


def run_ours(net, names, idx, p):
    """Our mixed batch in training mode: logits, every adapter tensor's gradient, the masks drawn."""
    masks, real = {}, lora.MultiLoRALinear.dropout_keep

    def recording(self, group, shape, device, prob):
        keep = real(self, group, shape, device, prob)
        masks[(self.seed, group.name)] = None if keep is None else lora_update.keep_of(keep, shape)   # one per shared input
        return keep
    net.train()
    lora.MultiLoRALinear.dropout_keep = recording
    try:
        with lora.route(net, [n for n in names for _ in range(ROWS)]):
            logits = net(idx)
    finally:
        lora.MultiLoRALinear.dropout_keep = real
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten(), reduction="sum")
    loss.backward()
    grads = {n: {k: v.grad.clone() for k, v in peft_named(net, n).items()} for n in names}
    return logits.detach(), grads, masks


def peft_named(net, name) -> dict:
    """Our adapter's tensors under PEFT's parameter names (lora_A.default.weight ...)."""
    out = {}
    for path, layer in lora.lora_layers(net):
        if name in layer.adapters:
            a = layer.adapters[name]
            out[f"{path}.lora_A.default.weight"] = a.lora_A.weight
            out[f"{path}.lora_B.default.weight"] = a.lora_B.weight
            if a.config.use_dora:
                out[f"{path}.lora_magnitude_vector.default.weight"] = a.magnitude
    return out


def run_peft(hf, net, name, peft_kwargs, idx_rows, masks, p):
    """PEFT with the same settings on this variant's rows alone, our weights and our masks."""
    import peft
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
        r=4, lora_alpha=peft_kwargs.pop("lora_alpha", 8), target_modules=TARGETS, lora_dropout=p, **peft_kwargs))
    params = dict(pm.base_model.model.named_parameters())
    with torch.no_grad():
        for key, value in peft_named(net, name).items():
            params[key].copy_(value)
    for path, layer in lora.lora_layers(net):
        keep = masks[(layer.seed, name)]
        pm.base_model.model.get_submodule(path).lora_dropout["default"] = GivenDropout(keep, p)
    pm.train()
    logits = pm(idx_rows).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), idx_rows[:, 1:].flatten(), reduction="sum")
    loss.backward()
    return logits.detach(), {k: params[k].grad for k in peft_named(net, name)}


def build(tmp_path, quant=None):
    hf = make_hf_model(vocab_size=384)
    path = save_hf(hf, tmp_path / "base")
    if quant:
        from test_quant import hf_quantized
        hf = hf_quantized(path, quant)
    net = M.load_model(path, dtype=torch.float32, quant=quant)
    return hf, net, path


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_variants_equal_peft_in_one_mixed_batch(tmp_path, quant):
    hf, net, _ = build(tmp_path, quant)
    names = list(VARIANTS) if quant is None else QUANT_VARIANTS
    p = 0.1
    for i, name in enumerate(names):
        lora.add_adapters(net, {name: lora.LoRAConfig(**{"r": 4, "alpha": 8, "targets": TARGETS, "dropout": p,
                                                          **VARIANTS[name][0]})}, seed=i)
        perturb(net, name, seed=10 + i)
    idx = torch.randint(0, 384, (ROWS * len(names), T), generator=torch.Generator().manual_seed(0))
    logits, grads, masks = run_ours(net, names, idx, p)
    tol = dict(atol=2e-5, rtol=1e-4) if quant is None else dict(atol=2e-4, rtol=1e-3)
    for i, name in enumerate(names):
        rows = slice(i * ROWS, (i + 1) * ROWS)
        want_logits, want_grads = run_peft(hf, net, name, dict(VARIANTS[name][1]), idx[rows], masks, p)
        torch.testing.assert_close(logits[rows], want_logits, **tol, msg=lambda m: f"{name} logits: {m}")
        assert grads[name].keys() == want_grads.keys()
        for key, want in want_grads.items():
            torch.testing.assert_close(grads[name][key], want, **tol, msg=lambda m: f"{name} {key}: {m}")
        assert all(g.abs().sum() > 0 for g in grads[name].values())   # every tensor really learns


def test_variant_adapters_save_load_in_peft_and_merge(tmp_path):
    """Saved adapters load in PEFT on the original base and give our logits (PiSSA/OLoRA as the
    plain LoRA of rank 2r they equal); merging each gives the same logits; DoRA cannot unmerge."""
    import peft
    import transformers
    hf, net, path = build(tmp_path)
    write_tokenizer_json(path)
    idx = torch.randint(0, 384, (2, T), generator=torch.Generator().manual_seed(1))
    for i, name in enumerate(VARIANTS):
        lora.add_adapters(net, {name: lora.LoRAConfig(**{"r": 4, "alpha": 8, "targets": TARGETS, **VARIANTS[name][0]})}, seed=i)
        perturb(net, name, seed=20 + i)
    net.eval()
    for name, (ours_kwargs, _) in VARIANTS.items():
        with torch.no_grad(), lora.route(net, [name, name]):
            expected = net(idx)
        peft_format.save_peft(net, name, tmp_path / name, str(path))
        saved = __import__("json").loads((tmp_path / name / "adapter_config.json").read_text())
        assert saved["use_dora"] == ours_kwargs.get("use_dora", False)
        assert saved["use_rslora"] == ours_kwargs.get("use_rslora", False)
        assert saved["r"] == (8 if name in ("pissa", "olora") else 4)
        pm = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(path), tmp_path / name).eval()
        with torch.no_grad():
            torch.testing.assert_close(pm(idx).logits, expected, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        # Our own loader reads it back (DoRA's magnitude included).
        other = M.load_model(path, dtype=torch.float32)
        peft_format.load_peft(other, tmp_path / name, name)
        with torch.no_grad(), lora.route(other, [name, name]):
            torch.testing.assert_close(other(idx), expected, atol=2e-5, rtol=1e-4)
        # Merged into the weights, the bare model gives the same logits.
        lora.merge(other, name)
        with torch.no_grad():
            torch.testing.assert_close(other(idx), expected, atol=2e-5, rtol=1e-4, msg=lambda m: f"merged {name}: {m}")
        if ours_kwargs.get("use_dora"):
            with pytest.raises(ValueError, match="subtraction cannot undo"):
                lora.unmerge(other, name)


def test_loraplus_equals_peft_create_loraplus_optimizer(tmp_path):
    """LoRA+ (loraplus_lr_ratio): B's lr is ratio x lr; two SGD steps equal PEFT's optimizer's (SGD:
    an update linear in the gradient, so float noise in the gradients stays noise; AdamW's
    m/sqrt(v) turns it into whole steps where a gradient is ~0)."""
    import peft
    from peft.optimizers import create_loraplus_optimizer
    hf, net, _ = build(tmp_path)
    lora.add_adapters(net, {"a": lora.LoRAConfig(r=4, alpha=8, targets=TARGETS)})
    randomize_B(net, "a", 3)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    params = dict(pm.base_model.model.named_parameters())
    with torch.no_grad():
        for key, value in peft_named(net, "a").items():
            params[key].copy_(value)
    job = train.JobConfig(name="a", data="-", optimizer="sgd", lr=1e-3, weight_decay=0.01, loraplus_lr_ratio=16.0)
    ours = jobs.make_optimizer(lora.adapter_parameters(net, "a"), job,
                                {id(p) for p in lora.adapter_parameters(net, "a", "lora_B")})
    theirs = create_loraplus_optimizer(pm, optimizer_cls=torch.optim.SGD, lr=1e-3, loraplus_lr_ratio=16.0,
                                       loraplus_weight_decay=0.01)   # PEFT's name for the groups' decay
    idx = torch.randint(0, 384, (2, T), generator=torch.Generator().manual_seed(2))
    net.train()
    for _ in range(2):
        with lora.route(net, ["a", "a"]):
            net(idx).logsumexp(-1).sum().backward()
        pm(idx).logits.logsumexp(-1).sum().backward()
        ours.step(), theirs.step(), ours.zero_grad(), theirs.zero_grad()
    for key, value in peft_named(net, "a").items():
        torch.testing.assert_close(value, params[key], atol=1e-6, rtol=1e-5, msg=lambda m: f"{key}: {m}")
    assert sorted(g["lr"] for g in ours.param_groups) == [1e-3, 16e-3]


def test_variant_jobs_fused_equal_each_alone(tmp_path, base_dir):
    """Through train.py: a plain, a DoRA, a PiSSA and an rsLoRA + LoRA+ job fused in one run end
    with the same adapters as each trained alone (dropout on), and their saved files load in PEFT."""
    from conftest import adapter, assert_same_adapter, job, run_cfg, write_rows
    rows = write_rows(tmp_path / "t.json", 8, 5, "reverse")
    jobs = [job("plain", rows), job("dora", rows, use_dora=True, lr=3e-3),
            job("pissa", rows, init="pissa", targets=["q_proj", "down_proj"]),
            job("rsplus", rows, use_rslora=True, loraplus_lr_ratio=8.0, optimizer="sgd", lr=0.05)]
    fused = tmp_path / "fused"
    train.train(run_cfg(base_dir, fused, jobs, scheduler={"max_candidates": 4, "max_concurrent": 4}))
    for j in jobs:
        alone = tmp_path / f"alone_{j.name}"
        train.train(run_cfg(base_dir, alone, [j]))
        # Within float rounding: where jobs wrap different layers, the base's gradients are summed
        # in another order (test_train's fused = alone tolerance).
        assert_same_adapter(adapter(fused, j.name), adapter(alone, j.name))
    assert any("lora_magnitude_vector" in k for k in adapter(fused, "dora"))


PATHS = {"per adapter": dict(fuse=False), "concatenated": dict(fuse=True),
         "per adapter, masks": dict(fuse=False, dropout_draw="masks"),
         "concatenated, masks": dict(fuse=True, dropout_draw="masks")}


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("variant", list(lora.VARIANTS))
def test_fused_paths_equal_the_definition(tmp_path, variant, packed):
    """lora_update.py's arithmetic is an optimisation of MultiLoRALinear.reference_forward (plain
    autograd): the variant on every target beside a plain adapter and base-only rows, dropout
    on, padded (rows scattered) or packed, per adapter or all in shared matmuls, dropout drawn
    as positions or as masks: the same logits, the same gradients of the input (through the
    embedding) and of every adapter tensor."""
    from test_lora import logits_and_grads
    _, net, _ = build(tmp_path)
    lora.add_adapters(net, {"v": lora.LoRAConfig(r=4, alpha=8, dropout=0.3, targets=list(net.LORA_TARGETS), variant=variant),
                            "o": lora.LoRAConfig(r=2, alpha=4, dropout=0.2, targets=["q_proj", "k_proj", "up_proj", "down_proj"])})
    for i, name in enumerate("vo"):
        perturb(net, name, seed=30 + i)
    net.model.embed_tokens.weight.requires_grad_(True)   # its gradient: the input's, through every layer
    net.train()
    idx = torch.randint(0, 384, (6, 11), generator=torch.Generator().manual_seed(5))
    # Packed: an adapter's examples adjacent (route's rule); padded: its rows scattered.
    names, lengths = (["v", "v", "v", None, "o", "o"], [11, 7, 8, 9, 5, 11]) if packed else \
        (["v", "o", None, "v", "o", "v"], [11, 5, 9, 7, 11, 8])
    for label, path in PATHS.items():
        draw = path.get("dropout_draw", "auto")
        want_logits, want = logits_and_grads(net, idx, names, lengths, packed, reference=True, dropout_draw=draw)
        logits, grads = logits_and_grads(net, idx, names, lengths, packed, **path)
        torch.testing.assert_close(logits, want_logits, atol=3e-5, rtol=1e-4, msg=lambda m: f"{label} logits: {m}")
        assert grads.keys() == want.keys() and "model.embed_tokens.weight" in grads
        for key in want:
            torch.testing.assert_close(grads[key], want[key], atol=1e-5, rtol=1e-4, msg=lambda m: f"{label} {key}: {m}")
            assert want[key].abs().sum() > 0, key   # every tensor learns, so a wrong gradient would show


def test_variant_field_and_peft_spellings_are_one_entry(tmp_path):
    """variant "dora" / "pissa" is PEFT's use_dora / init "pissa": the same adapter, saved with
    PEFT's fields; a variant not in lora.VARIANTS (or set twice) is a config error naming the entries."""
    import config
    _, net, path = build(tmp_path)
    for theirs, ours in ((dict(use_dora=True), dict(variant="dora")), (dict(init="pissa"), dict(variant="pissa"))):
        made = []
        for fields in (theirs, ours):   # the same name, so the same seeds
            lora.add_adapters(net, {"x": lora.LoRAConfig(r=4, targets=TARGETS, **fields)})
            adapters = [layer.adapters["x"] for _, layer in lora.lora_layers(net)]
            assert all(type(a) is lora.VARIANTS[ours["variant"]] for a in adapters)
            made.append(([a.state_dict() for a in adapters], peft_format.peft_files(net, "x")))
            lora.remove_adapter(net, "x")
        (states, (peft_config, weights)), (want_states, (want_config, want_weights)) = made
        assert peft_config == want_config and weights.keys() == want_weights.keys()
        for state, want in zip(states, want_states):
            torch.testing.assert_close(state, want)
    with pytest.raises(config.ConfigError, match=f"variant: expected one of {', '.join(lora.VARIANTS)}"):
        config.validate_job(config.JobConfig(name="j", data="x.json", variant="nope"), "cfg", "jobs[0]")
    with pytest.raises(config.ConfigError, match="variant"):
        config.validate_job(config.JobConfig(name="j", data="x.json", variant="pissa", use_dora=True), "cfg", "jobs[0]")


def test_lora_fa_freezes_A_trains_B_fused_equal_alone(tmp_path, base_dir, monkeypatch):
    """LoRA-FA: (a) A gets no gradient and ends as it started while B trains, (b) a job fused
    with a plain LoRA and a DoRA job ends as it does alone, (c) its rows go through LoRAUpdate's
    plain arithmetic (no update of its own) with no gradient asked for A. (That it equals the
    definition, dropout on, on every path: test_fused_paths_equal_the_definition.)"""
    from conftest import adapter, assert_same_adapter, job, run_cfg, write_rows
    rows = write_rows(tmp_path / "t.json", 8, 5, "reverse")
    fa = job("fa", rows, variant="lora-fa", targets=["q_proj", "k_proj", "v_proj", "down_proj"], lr=3e-3)
    net = M.load_model(base_dir)
    lora.add_adapters(net, {"other": lora.LoRAConfig(r=2, targets=["q_proj"]), "fa": fa.lora_config()}, seed=42)
    start = {k: v.detach().clone() for k, v in peft_format.adapter_state(net, "fa").items()}
    assert lora.adapter_parameters(net, "fa") == lora.adapter_parameters(net, "fa", "lora_B")   # A is not trained
    # (c) through LoRAUpdate, asked for B's gradient only, on both fused paths
    plans, apply = [], lora_update.LoRAUpdate.apply
    monkeypatch.setattr(lora_update.LoRAUpdate, "apply", lambda x, plan, *t: plans.append(plan) or apply(x, plan, *t))
    monkeypatch.setattr(lora.LoRAFA, "update", lambda *a: pytest.fail("LoRA-FA ran an update of its own"))
    idx = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    net.train()
    for fuse in (False, True):
        with lora.route(net, ["fa", "fa"], fuse=fuse):
            net(idx).logsumexp(-1).sum().backward()
    assert plans and all(group.trains == (False, True) for plan in plans for group in plan.groups)
    for _, layer in lora.lora_layers(net):
        if "fa" in layer.adapters:
            assert layer.adapters["fa"].lora_A.weight.grad is None and layer.adapters["fa"].lora_B.weight.grad.abs().sum() > 0
    # (b) fused with a plain LoRA and a DoRA job = alone; (a) A as it started, B moved
    jobs = [job("plain", rows), job("dora", rows, variant="dora", lr=3e-3), fa]
    train.train(run_cfg(base_dir, tmp_path / "fused", jobs, scheduler={"max_candidates": 3, "max_concurrent": 3}))
    train.train(run_cfg(base_dir, tmp_path / "alone", [fa]))
    fused = adapter(tmp_path / "fused", "fa")
    assert_same_adapter(fused, adapter(tmp_path / "alone", "fa"))
    for key, value in start.items():
        if "lora_A" in key:
            torch.testing.assert_close(fused[key], value, atol=0, rtol=0)
        else:
            assert (fused[key] - value).abs().max() > 1e-3, key


def test_readme_names_every_variant():
    """README's variants table has a row for each entry of lora.VARIANTS (plain LoRA is the default)."""
    from pathlib import Path
    readme = (Path(lora.__file__).parent / "README.md").read_text()
    section = readme.split("## Methods per job: LoRA variants\n", 1)[1].split("\n## ", 1)[0]
    missing = [name for name in lora.VARIANTS if name != "lora" and f'`variant: "{name}"`' not in section]
    assert not missing, missing
