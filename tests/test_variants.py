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
        masks[(id(self), group.name)] = None if keep is None else lora_update.keep_of(keep, shape)
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
        keep = next(masks[(id(s), name)] for s in layer.siblings if (id(s), name) in masks)
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
    ours = train.make_optimizer(lora.adapter_parameters(net, "a"), job,
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
