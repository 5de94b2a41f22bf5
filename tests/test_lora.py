"""LoRA against PEFT on the same weights, and the multi-adapter routing invariants."""
import json

import pytest
import torch

import lora
import lora_update
from llama import Llama
import model as M
from conftest import assert_lora_matches_peft, randomize_B
import peft_format

ALL = list(Llama.LORA_TARGETS)


@pytest.fixture
def ours(tiny_llama):
    path, _ = tiny_llama
    return M.load_model(path, dtype=torch.float32)


def test_init_equals_base(ours):
    idx = torch.randint(0, 384, (2, 9))
    base = ours(idx)
    lora.add_adapters(ours, {"a": lora.LoRAConfig(r=4, targets=ALL)})
    with lora.route(ours, ["a", "a"]):
        torch.testing.assert_close(ours(idx), base)


def test_forward_and_grads_match_peft(tmp_path, tiny_llama, ours):
    _, hf = tiny_llama
    cfg = lora.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj", "o_proj"])
    assert_lora_matches_peft(ours, hf, cfg, tmp_path / "job")


def test_saved_adapter_format(tmp_path, ours):
    from safetensors.torch import load_file
    lora.add_adapters(ours, {"job": lora.LoRAConfig(r=2, alpha=4, dropout=0.1, targets=["k_proj", "up_proj"])})
    peft_format.save_peft(ours, "job", tmp_path / "job")
    cfg = json.loads((tmp_path / "job" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["target_modules"]) == (2, 4, 0.1, ["k_proj", "up_proj"])
    keys = load_file(tmp_path / "job" / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight" in keys
    assert len(keys) == 2 * 2 * 2
    assert not list((tmp_path / "job").glob("*.tmp"))


def test_peft_saved_adapter_loads_into_ours(tmp_path, tiny_llama, ours):
    import peft
    path, hf = tiny_llama
    torch.manual_seed(5)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["gate_proj", "k_proj"],
                                                 init_lora_weights=False))
    pm.save_pretrained(tmp_path / "from_peft")
    name = peft_format.load_peft(ours, tmp_path / "from_peft")
    assert name == "from_peft"
    idx = torch.randint(0, 384, (1, 10))
    with lora.route(ours, [name]):
        torch.testing.assert_close(ours(idx), pm(idx).logits, atol=1e-5, rtol=1e-4)


def test_mixed_batch_equals_each_adapter_alone(ours):
    lora.add_adapters(ours, {
        "a": lora.LoRAConfig(r=2, alpha=4, targets=["q_proj", "v_proj"]),
        "b": lora.LoRAConfig(r=8, alpha=8, targets=ALL),
        "c": lora.LoRAConfig(r=4, alpha=32, targets=["down_proj"]),
    })
    for i, name in enumerate("abc"):
        randomize_B(ours, name, seed=i)
    idx = torch.randint(0, 384, (6, 11), generator=torch.Generator().manual_seed(6))
    names = ["b", None, "a", "c", "b", "a"]  # non-contiguous rows and a base-only row
    with lora.route(ours, names):
        mixed = ours(idx)
    for row, name in enumerate(names):
        with lora.route(ours, [name]):
            alone = ours(idx[row:row + 1])
        torch.testing.assert_close(mixed[row], alone[0], atol=1e-5, rtol=1e-4)
    # And the adapters really differ from one another and from the base.
    assert (mixed[0] - mixed[1]).abs().max() > 1e-3 and (mixed[2] - mixed[1]).abs().max() > 1e-3


def test_base_weights_never_change(ours):
    lora.add_adapters(ours, {"a": lora.LoRAConfig(r=4, targets=ALL)}, seed=1)
    before = {k: v.clone() for k, v in ours.state_dict().items() if "lora_" not in k}
    params = lora.adapter_parameters(ours, "a")
    assert all(p.requires_grad for p in params)
    assert sum(p.requires_grad for p in ours.parameters()) == len(params) == 2 * 7 * 2
    opt = torch.optim.AdamW(params, lr=1e-2)
    idx = torch.randint(0, 384, (2, 8))
    for _ in range(2):
        with lora.route(ours, ["a", "a"]):
            ours(idx).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    after = ours.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert lora.adapter_parameters(ours, "a")[1].abs().sum() > 0  # B moved


def test_merge_equals_unmerged(ours):
    lora.add_adapters(ours, {"a": lora.LoRAConfig(r=4, alpha=8, targets=ALL)})
    randomize_B(ours, "a")
    idx = torch.randint(0, 384, (2, 8))
    base = ours(idx)
    with lora.route(ours, ["a", "a"]):
        unmerged = ours(idx)
    lora.merge(ours, "a")
    merged = ours(idx)  # no routing: the merged weights carry the adapter for every row
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)
    with lora.route(ours, ["a", "a"]):  # a merged adapter is not applied twice
        torch.testing.assert_close(ours(idx), unmerged, atol=1e-5, rtol=1e-4)
    lora.unmerge(ours, "a")
    torch.testing.assert_close(ours(idx), base, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(base, unmerged, atol=1e-3)


def test_dropout_mask_comes_from_the_job_rng_only(ours):
    """Same generator seed -> same masks, whatever else shares the batch or how long it is."""
    lora.add_adapters(ours, {n: lora.LoRAConfig(r=4, dropout=0.5, targets=ALL) for n in ("a", "b")})
    randomize_B(ours, "a")
    ours.train()
    idx = torch.randint(0, 384, (3, 16))
    short = idx[:1, :8]

    def run(batch, names, lengths):
        gens = {n: torch.Generator().manual_seed(7) for n in ("a", "b")}
        with lora.route(ours, names, lengths=lengths, generators=gens):
            return ours(batch)

    alone = run(short, ["a"], [8])
    padded = torch.cat([short, torch.zeros(1, 8, dtype=torch.long)], dim=1)
    fused = run(torch.cat([padded, idx[1:]]), ["a", "b", "b"], [8, 16, 16])
    torch.testing.assert_close(fused[0, :8], alone[0], atol=1e-5, rtol=1e-4)
    other_seed = torch.Generator().manual_seed(8)
    with lora.route(ours, ["a"], lengths=[8], generators={"a": other_seed}):
        assert not torch.allclose(ours(short), alone, atol=1e-4)


def test_bad_targets_and_names(ours):
    with pytest.raises(ValueError, match="valid targets: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj$"):
        lora.add_adapters(ours, {"a": lora.LoRAConfig(targets=["q_proj", "qkv"])})
    lora.add_adapters(ours, {"a": lora.LoRAConfig()})  # no targets named: the family's default
    assert peft_format.adapter_config(ours, "a").targets == ["q_proj", "k_proj", "v_proj", "o_proj"]
    with pytest.raises(ValueError, match="valid targets: q_proj, .*down_proj$"):  # adapter names are not targets
        lora.add_adapters(ours, {"b": lora.LoRAConfig(targets=["a"])})
    with pytest.raises(ValueError, match="already exists"):
        lora.add_adapters(ours, {"a": lora.LoRAConfig()})
    with pytest.raises(KeyError, match="no adapter named \\['zz'\\]"):
        with lora.route(ours, ["zz"]):
            pass


def logits_and_grads(model, idx, names, lengths, packed: bool, **path):
    """Real tokens' logits (examples in order) and the adapters' gradients of a toy loss, the
    batch run padded or packed, each adapter's dropout seeded alike; path: lora.route's options."""
    real = torch.arange(idx.size(1))[None, :] < torch.tensor(lengths)[:, None]
    gens = {n: torch.Generator().manual_seed(3) for n in set(names) if n}
    with lora.route(model, names, lengths=lengths, generators=gens, packed=packed, **path):
        logits = model(idx[real][None], segments=tuple(lengths))[0] if packed else model(idx)[real]
    logits.square().mean().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return logits.detach(), grads


def assert_all_agree(results):
    # The paths sum in different orders (e.g. one x [A_q; A_k; A_v]^T against three matmuls):
    # fp32 rounding of logits of magnitude ~1, hence atol 3e-5.
    for logits, grads in results[1:]:
        torch.testing.assert_close(logits, results[0][0], atol=3e-5, rtol=1e-4)
        for key in grads:
            torch.testing.assert_close(grads[key], results[0][1][key], atol=1e-5, rtol=1e-4)


def with_random_adapters(model, configs: dict, rows: int) -> torch.Tensor:
    """Add these adapters, B randomized (each its own seed), model in training mode; returns
    a batch of `rows` random token rows of 11."""
    lora.add_adapters(model, configs)
    for i, name in enumerate(configs):
        randomize_B(model, name, seed=i)
    model.train()
    return torch.randint(0, 384, (rows, 11), generator=torch.Generator().manual_seed(9))


def on_both_paths(model, idx, names, lengths, packed: bool, dropout_draw: str = "auto") -> list:
    """logits_and_grads with all adapters in shared matmuls, then per adapter."""
    return [logits_and_grads(model, idx, names, lengths, packed, fuse=fuse, dropout_draw=dropout_draw)
            for fuse in (True, False)]


@pytest.mark.parametrize("dropout,draw", [(0.0, "auto"), (0.3, "auto"), (0.3, "masks")])
def test_concatenated_and_per_adapter_paths_agree_padded_or_packed(ours, dropout, draw):
    """The GPU path (all adapters in two matmuls) and the CPU path (a loop) give the same
    outputs and gradients, dropout masks included, on padded rows or the same examples packed
    end to end in one row (the masks are drawn over each adapter's real tokens in order).
    draw "masks": dropout as a GPU draws it (bool masks laid into the rows), here on the CPU."""
    idx = with_random_adapters(ours, {
        "a": lora.LoRAConfig(r=2, alpha=4, dropout=dropout, targets=["q_proj", "v_proj"]),
        "b": lora.LoRAConfig(r=8, alpha=8, dropout=dropout, targets=ALL),
        "c": lora.LoRAConfig(r=4, alpha=32, dropout=0.0, targets=["down_proj"]),
        # Only on the later layers of q/k/v and gate/up, which share their input.
        "d": lora.LoRAConfig(r=3, alpha=6, dropout=dropout, targets=["k_proj", "up_proj"])}, rows=7)
    results = [result for packed in (False, True) for result in on_both_paths(
        ours, idx, ["b", "b", None, "a", "a", "c", "d"], [11, 9, 11, 5, 7, 11, 8], packed, draw)]
    assert_all_agree(results)


def test_masks_tiling_the_batch_agree_on_both_paths(ours):
    """Every token routed to an adapter with dropout (the usual packed step): the concatenated
    path joins the adapters' masks end to end instead of writing each into a full mask."""
    idx = with_random_adapters(ours, {"a": lora.LoRAConfig(r=2, alpha=4, dropout=0.3, targets=["q_proj", "v_proj"]),
                                      "b": lora.LoRAConfig(r=8, alpha=8, dropout=0.1, targets=ALL)}, rows=4)
    for packed, lengths in ((True, [11, 9, 5, 7]), (False, [11] * 4)):
        assert_all_agree(on_both_paths(ours, idx, ["b", "b", "a", "a"], lengths, packed))


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("fuse,draw", [(False, "auto"), (True, "auto"), (False, "masks"), (True, "masks")])
def test_a_ranks_part_of_a_step_draws_one_process_masks(ours, fuse, draw, packed):
    """Data parallel (dist.split_step): a rank that holds some of a step's examples, told which
    of each adapter's tokens in the step they are, draws the dropout one process draws for
    them, so its outputs equal one process's for those examples: on both LoRA paths, with
    dropout drawn as on a CPU or as on a GPU, padded or packed."""
    lora.add_adapters(ours, {"a": lora.LoRAConfig(r=4, alpha=8, dropout=0.3, targets=ALL),
                             "b": lora.LoRAConfig(r=2, alpha=4, dropout=0.2, targets=["q_proj", "v_proj"])})
    for i, name in enumerate("ab"):
        randomize_B(ours, name, seed=i)
    ours.train()
    idx = torch.randint(0, 384, (5, 11), generator=torch.Generator().manual_seed(4))
    names, lengths = ["a", "a", "a", "b", "b"], [11, 7, 9, 5, 8]

    def outputs(rows, dropout_tokens=None):
        gens = {n: torch.Generator().manual_seed(3) for n in "ab"}
        ids, own = idx[rows], [lengths[i] for i in rows]
        real = torch.arange(ids.size(1))[None, :] < torch.tensor(own)[:, None]
        with torch.no_grad(), lora.route(ours, [names[i] for i in rows], lengths=own, generators=gens,
                                         packed=packed, dropout_tokens=dropout_tokens, fuse=fuse, dropout_draw=draw):
            return ours(ids[real][None], segments=tuple(own))[0] if packed else ours(ids)[real]

    whole = outputs([0, 1, 2, 3, 4])
    # This rank: a's 2nd and 3rd examples (its tokens 11..26 of 27) and b's 1st (0..4 of 13).
    part = outputs([1, 2, 3], {"a": (27, torch.arange(11, 27)), "b": (13, torch.arange(0, 5))})
    torch.testing.assert_close(part, whole[11:11 + 7 + 9 + 5], atol=1e-5, rtol=1e-5)
    # Told nothing, the rank draws its own masks: not one process's.
    assert not torch.allclose(outputs([1, 2, 3]), whole[11:32], atol=1e-3)


def test_a_shared_input_whose_first_layer_only_a_variant_adapts(ours):
    """q/k/v read one input; DoRA adapts q alone and plain LoRA k alone: the shared matmuls of
    the concatenated path hold k's adapter only, and both paths still agree."""
    idx = with_random_adapters(ours, {"v": lora.LoRAConfig(r=2, alpha=4, dropout=0.3, targets=["q_proj"], use_dora=True),
                                      "a": lora.LoRAConfig(r=4, alpha=8, dropout=0.3, targets=["k_proj"])}, rows=3)
    assert_all_agree(on_both_paths(ours, idx, ["v", "a", None], [11, 9, 11], packed=False))


def test_scattered_rows_agree_on_both_paths(ours):
    """An adapter's rows need not be adjacent in a padded batch (the index path); a variant
    (DoRA, on its own path) in the same batch leaves the others' shared matmuls as they are."""
    idx = with_random_adapters(ours, {"a": lora.LoRAConfig(r=2, alpha=4, dropout=0.3, targets=["q_proj", "v_proj"]),
                                      "b": lora.LoRAConfig(r=8, alpha=8, dropout=0.3, targets=ALL),
                                      "v": lora.LoRAConfig(r=4, alpha=8, dropout=0.3, targets=["k_proj", "o_proj"],
                                                           use_dora=True)}, rows=6)
    assert_all_agree(on_both_paths(ours, idx, ["b", "a", None, "b", "v", "a"], [11, 5, 11, 9, 8, 7],
                                   packed=False))


@pytest.mark.parametrize("packed", [False, True])
def test_routing_is_safe_under_activation_checkpointing(tiny_llama, packed):
    """Recomputed layers (backward inside the route block) see the same routing and redraw the
    same dropout masks: gradients equal those of the plain forward/backward, on padded rows
    (adapter a's rows scattered) or packed in one row."""
    path, _ = tiny_llama
    grads = []
    for checkpointed in (False, True):
        net = M.load_model(path, dtype=torch.float32)
        lora.add_adapters(net, {"a": lora.LoRAConfig(r=4, dropout=0.3, targets=ALL),
                                "b": lora.LoRAConfig(r=2, dropout=0.3, targets=["q_proj", "down_proj"])})
        randomize_B(net, "a")
        randomize_B(net, "b", seed=1)
        net.checkpoint_blocks = checkpointed  # llama.run_block: torch's non-reentrant checkpoint
        net.train()
        idx = torch.randint(0, 384, (3, 10), generator=torch.Generator().manual_seed(2))
        gens = {n: torch.Generator().manual_seed(5) for n in "ab"}
        names, lengths = (["a", "a", "b"], [10, 9, 7]) if packed else (["a", "b", "a"], [10, 7, 9])
        real = torch.arange(10)[None, :] < torch.tensor(lengths)[:, None]
        with lora.route(net, names, lengths=lengths, generators=gens, packed=packed):
            logits = net(idx[real][None], segments=tuple(lengths)) if packed else net(idx)
            logits.square().mean().backward()
        grads.append({k: p.grad for k, p in net.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 2 * (7 + 2)
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], atol=1e-6, rtol=1e-5)


def test_training_without_routing_is_a_clear_error(ours):
    lora.add_adapters(ours, {"a": lora.LoRAConfig(r=4, dropout=0.1, targets=ALL)})
    idx = torch.randint(0, 384, (2, 8))
    ours.eval()
    ours(idx)  # evaluation without routing: every row sees the base alone
    ours.train()
    with pytest.raises(RuntimeError, match="no routing: call the model inside `with lora.route"):
        ours(idx)
    # Under activation checkpointing, a backward outside the block recomputes without routing.
    ours.checkpoint_blocks = True
    with lora.route(ours, ["a", "a"]):
        loss = ours(idx).square().mean()
    with pytest.raises(RuntimeError, match="no routing"):
        loss.backward()


def test_rslora_and_gaussian_init_are_saved_truthfully_and_load_in_peft(tmp_path, tiny_llama, ours):
    """r=16, alpha=8 with rsLoRA scales by 8/4, not 8/16: the saved config must say use_rslora,
    or PEFT would load a different adapter."""
    import peft
    path, hf = tiny_llama
    cfg = lora.LoRAConfig(r=16, alpha=8, targets=["q_proj", "up_proj"], use_rslora=True, init="gaussian")
    lora.add_adapters(ours, {"rs": cfg})
    assert peft_format.adapter_config(ours, "rs") == cfg
    randomize_B(ours, "rs")
    peft_format.save_peft(ours, "rs", tmp_path / "rs")
    saved = json.loads((tmp_path / "rs" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["use_rslora"], saved["init_lora_weights"]) == (16, 8, True, "gaussian")
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "rs")
    idx = torch.randint(0, 384, (2, 9))
    with lora.route(ours, ["rs", "rs"]):
        torch.testing.assert_close(ours(idx), pm(idx).logits, atol=1e-5, rtol=1e-4)
    # And back: our loader reads the same fields.
    name = peft_format.load_peft(ours, tmp_path / "rs", "again")
    assert peft_format.adapter_config(ours, name) == cfg


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_dropout_keep_mask_rate_and_reproducibility(p):
    """keep_mask takes 16 bits of a counter-based hash per element: each element kept with
    probability 1 - drawn_p(p), and drawn_p(p) is within 2^-17 of p; the same seed gives the
    same mask, another seed another, and a token's mask is the same drawn with any others."""
    assert abs(lora_update.drawn_p(p) - p) <= 2**-17
    index = torch.arange(32 * 64)
    mask = lora_update.keep_mask(index, 96, p, seed=11)
    n = mask.numel()
    kept = mask.float().mean().item()
    assert abs(kept - (1 - lora_update.drawn_p(p))) < 5 * (p * (1 - p) / n) ** 0.5
    assert torch.equal(mask, lora_update.keep_mask(index, 96, p, seed=11))
    assert not torch.equal(mask, lora_update.keep_mask(index, 96, p, seed=12))
    assert torch.equal(mask[[5, 700, 3]], lora_update.keep_mask(torch.tensor([5, 700, 3]), 96, p, seed=11))
    # Neighbouring elements (from the same 64-bit word, and across words and tokens) are uncorrelated.
    flat = mask.flatten().float()
    for lag in (1, 4, 96):
        assert abs(torch.corrcoef(torch.stack([flat[:-lag], flat[lag:]]))[0, 1].item()) < 0.01
    # Neighbouring seeds (mix_seed of one adapter seed and neighbouring layers) are uncorrelated.
    other = lora_update.keep_mask(index, 96, p, seed=lora.mix_seed(11, 1)).flatten().float()
    assert abs(torch.corrcoef(torch.stack([flat, other]))[0, 1].item()) < 0.01


def splitmix64_reference(state: int) -> int:
    """splitmix64's output for a state, in Python integers (Vigna's splitmix64.c, by hand)."""
    z = state % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return z ^ (z >> 31)


def test_keep_mask_bits_are_splitmix64_of_the_counter():
    """The int64 arithmetic (wrapping multiplies, arithmetic shifts masked) gives splitmix64's
    exact outputs, and element j of token i is 16-bit piece j % 4 (little-endian, read as
    int16) of word i * ceil(width/4) + j // 4; the per-token form (seeds and thresholds as tensors) draws
    the same as one seed and p per call."""
    seed, width = 2**62 + 12345, 10                      # 3 words per token, the last one cut
    words = [splitmix64_reference(seed + c * 0x9E3779B97F4A7C15) for c in range(5 * 3)]
    p = 0.3
    pieces = [[(words[i * 3 + j // 4] >> (16 * (j % 4))) & 0xFFFF for j in range(width)] for i in range(5)]
    signed = torch.tensor(pieces) - 2**16 * (torch.tensor(pieces) >= 2**15)     # read as int16
    expected = signed >= round(p * 2**16) - 2**15
    got = lora_update.keep_mask(torch.arange(5), width, p, seed)
    assert torch.equal(got, expected)
    assert 0 < (~got).sum() < got.numel()
    per_token = lora_update.keep_mask(torch.arange(5), width, torch.full((5,), lora_update.drop_threshold(p), dtype=torch.int16),
                                      torch.full((5,), seed))
    assert torch.equal(per_token, expected)


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_drop_positions_are_independent_drops_at_rate_p(p):
    """The CPU's dropout (lora_update.drop_positions, geometric gaps between drops): sorted distinct
    positions in [0, n); each element dropped with probability drawn_p(p), evenly along the
    range, neighbours uncorrelated; reproducible from the seed; and the same whatever the
    number of words drawn at a time (here 7 at a time: hundreds of rounds)."""
    n = 32 * 64 * 96
    drops = lora_update.drop_positions(n, p, seed=11)
    assert drops.dtype == torch.long and bool((drops[1:] > drops[:-1]).all()) and 0 <= drops[0] and drops[-1] < n
    keep = lora_update.keep_of(drops, (n,)).float()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs((1 - keep.mean().item()) - lora_update.drawn_p(p)) < 5 * sigma
    for quarter in keep.chunk(4):   # no drift along the range (a wrong gap law would show here)
        assert abs((1 - quarter.mean().item()) - p) < 5 * 2 * sigma
    assert abs(torch.corrcoef(torch.stack([keep[:-1], keep[1:]]))[0, 1].item()) < 0.01
    assert torch.equal(drops, lora_update.drop_positions(n, p, seed=11, draws=7))
    assert not torch.equal(drops, lora_update.drop_positions(n, p, seed=12))
    x = torch.randn(2, 3, 5)   # applying them: the same zeros as the mask they stand for
    few = lora_update.drop_positions(x.numel(), 0.5, seed=3)
    assert torch.equal(lora_update.apply_dropout(x, few), x * lora_update.keep_of(few, x.shape))


@pytest.mark.parametrize("fuse", [False, True])
def test_layers_reading_one_input_run_as_one_node(ours, monkeypatch, fuse):
    """llama.project: q/k/v, and gate/up, each one LoRAUpdate node per block (the outputs of
    all three computed in it), o and down one each; with k alone adapted, k alone in its node."""
    plans, apply = [], lora_update.LoRAUpdate.apply
    monkeypatch.setattr(lora_update.LoRAUpdate, "apply", lambda x, plan, *t: plans.append(plan) or apply(x, plan, *t))
    lora.add_adapters(ours, {"a": lora.LoRAConfig(r=2, dropout=0.1, targets=ALL),
                             "k": lora.LoRAConfig(r=2, targets=["k_proj"])})
    ours.train()
    idx = torch.randint(0, 384, (2, 9), generator=torch.Generator().manual_seed(1))
    blocks = ours.config.num_hidden_layers
    for name, outputs in (("a", [3, 2, 1, 1]), ("k", [1])):
        plans.clear()
        with lora.route(ours, [name, name], fuse=fuse):
            ours(idx).sum().backward()
        assert sorted(plan.outputs for plan in plans) == sorted(outputs * blocks)
