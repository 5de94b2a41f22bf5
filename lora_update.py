"""The fused LoRA arithmetic that lora.MultiLoRALinear runs: LoRAUpdate, one autograd node for
every adapter of the layers that share an input (q/k/v; gate/up), and dropout drawn from a seed
so that a job's masks do not depend on what it is fused with (positions on CPUs, masks on GPUs).
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


FUSE_OPTIONS = ("auto", "always", "never")   # RunConfig.fuse_adapters


DROPOUT_DRAWS = ("auto", "masks")            # RunConfig.dropout_draw


def concatenates(device, fuse: bool | str | None = None) -> bool:
    """Whether a layer runs all its adapters through shared matmuls (MultiLoRALinear.forward):
    True / "always", False / "never", or None / "auto": on GPUs (bound by kernel launches),
    not on CPUs (where the k-fold wasted flops cost more than per-adapter matmuls)."""
    if fuse in (None, "auto"):
        return torch.device(device).type == "cuda"
    if fuse not in (True, False, "always", "never"):
        raise ValueError(f"fuse: expected True, False, None or one of {', '.join(FUSE_OPTIONS)}, got {fuse!r}")
    return fuse in (True, "always")


# ----------------------------------------------------------------------------- dropout

def drawn_p(p: float) -> float:
    """The dropout probability as keep_mask draws it: p rounded to a multiple of 2^-16
    (0.05 -> 0.0500031); the 1/(1-p) rescaling uses this value, so dropout stays unbiased."""
    return round(p * 2**16) / 2**16


GOLDEN = 0x9E3779B97F4A7C15 - 2**64            # splitmix64's constants, as signed int64
MIX_1 = 0xBF58476D1CE4E5B9 - 2**64
MIX_2 = 0x94D049BB133111EB - 2**64


def splitmix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 tensors (Steele, Lea, Flood 2014; Vigna's public-domain
    splitmix64.c): multiplies wrap modulo 2^64, >> is arithmetic in torch, so each shifted
    value is masked to its logical bits."""
    z = (z ^ ((z >> 30) & (2**34 - 1))) * MIX_1
    z = (z ^ ((z >> 27) & (2**37 - 1))) * MIX_2
    return z ^ ((z >> 31) & (2**33 - 1))


def drop_threshold(p: float) -> int:
    """keep_mask keeps an element when its 16 random bits, read as int16, are >= this."""
    return round(p * 2**16) - 2**15


def keep_mask(index: torch.Tensor, width: int, p: float | torch.Tensor, seed: int | torch.Tensor) -> torch.Tensor:
    """A dropout keep mask [n, width] (bool, True with probability 1 - drawn_p(p)) for the
    tokens numbered `index` [n] (long) of one adapter's stream `seed`.

    A counter-based draw: token i's elements are 16-bit pieces of splitmix64(seed + c GOLDEN),
    c = i * ceil(width/4) + j, four per 64-bit word. So a mask is a pure function of (seed, the
    token's number, the column): no Generator, no host read, any subset of tokens drawn alone,
    and the same for that token whatever it is fused with. seed and p may be per token
    (tensors [n]: the seed as an int64, p as drop_threshold's int16) so that one call draws
    the masks of many adapters at once: the fixed-shape step of graphs.py, captured in a CUDA
    graph with its seeds and thresholds in device buffers.
    """
    words = -(-width // 4)
    counter = index[:, None] * words + torch.arange(words, device=index.device)         # [n, words]
    seed = seed[:, None] if torch.is_tensor(seed) else seed
    bits = splitmix64(counter * GOLDEN + seed).view(torch.int16)[:, :width]            # [n, width]
    threshold = p[:, None] if torch.is_tensor(p) else drop_threshold(p)
    return bits >= threshold


def drop_positions(n: int, p: float, seed: int, draws: int | None = None) -> torch.Tensor:
    """Dropout on the CPU: the sorted positions in [0, n) that are dropped, each independently
    with probability drawn_p(p), drawn from `seed` (int64 [about n p]).

    Drawn as the gaps between drops, which are geometric: gap = 1 + floor(log u / log(1-p)),
    u uniform in (0, 1]. One random word per DROPPED element where a mask takes 16 bits per
    element (keep_mask), and applying it zeroes just those positions (index_fill_) instead of
    a pass of x * keep that casts the mask first. `draws`: words drawn at a time (default: ~n p and
    a margin of 6 standard deviations, so rarely a second time); the result does not depend on it.
    """
    generator = torch.Generator().manual_seed(seed)
    log_keep = math.log1p(-drawn_p(p))
    parts, last = [], -1
    count = draws or int(n * p + 6 * math.sqrt(n * p) + 64)
    while True:
        words = torch.randint(-2**63, 2**63 - 1, (count,), dtype=torch.int64, generator=generator)
        u = ((words & (2**53 - 1)) + 1).double().mul_(2.0**-53)                # uniform in (0, 1]
        gaps = u.log_().div_(log_keep).floor_().add_(1)
        positions = gaps.cumsum_(0).add_(last).long()                        # exact below 2^53
        if positions[-1] >= n:
            parts.append(positions[:int(torch.searchsorted(positions, n))])    # sorted: those below n
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        parts.append(positions)
        last = int(positions[-1])


def apply_dropout(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x with dropout's zeros (not rescaled): keep is a bool mask of x's shape (x * keep), or
    the positions to zero in x laid out contiguously (drop_positions; long)."""
    if keep.dtype == torch.bool:
        return x * keep
    return x.contiguous().view(-1).index_fill(0, keep, 0).view(x.shape)


def keep_of(keep: torch.Tensor, shape) -> torch.Tensor:
    """The bool keep mask of `shape` that `keep` (a mask, or dropped positions) stands for."""
    if keep.dtype == torch.bool:
        return keep.view(shape)
    return torch.ones(math.prod(shape), dtype=torch.bool, device=keep.device).index_fill_(0, keep, False).view(shape)


# ----------------------------------------------------------------------------- the layer's fused forward
# What lora.MultiLoRALinear runs in place of its definition (MultiLoRALinear.reference_forward),
# tested equal to it: the layers that read one input (q/k/v; gate/up) in one LoRAUpdate node,
# plain adapters' arithmetic by hand, per adapter or all of them in shared matmuls.

def mix_seed(*parts: int) -> int:
    """Combine integers into one 63-bit seed (stable across runs and machines)."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + part) % (2**63)
    return seed


def row_count(group, B: int) -> int:
    """How many of the batch's B rows the group (lora.RouteGroup) owns."""
    return len(range(B)[group.rows]) if isinstance(group.rows, slice) else len(group.rows)


def own_length(group, T: int) -> int:
    """The group's own padded length: positions after it are padding for all its rows."""
    return T if group.length is None else min(group.length, T)


def dropout_keep(group, shape, device, p: float, seed: int, draw: str) -> torch.Tensor | None:
    """A group's dropout over `shape` (its rows x its own length x in), or None without dropout:
    with draw "auto" on the CPU the positions dropped in that layout (drop_positions), else a
    bool keep mask (keep_mask: no host sync). Drawn from `seed` (this forward's seed for the
    adapter mixed with the layer's mask key), over its real tokens in order, then laid out in
    its rows: it does not depend on what the rows were fused with, nor on padding or packing,
    and a recomputation (activation checkpointing) draws exactly the same again."""
    rows, length, width = shape
    lengths = group.row_lengths
    padded = lengths is not None and any(n < length for n in lengths)
    # Drawn over its real tokens (data parallel: the whole step's), then this rank's kept, then laid out.
    total, here = group.tokens or (sum(min(n, length) for n in lengths) if padded else rows * length, None)
    real = (torch.arange(length) < torch.tensor(lengths)[:, None]) if padded else None   # [rows, length]
    if torch.device(device).type == "cpu" and draw == "auto":
        drops = drop_positions(total * width, p, seed)
        if here is not None:   # renumbered among this rank's tokens
            local = torch.full((total,), -1, dtype=torch.long).index_copy_(0, here.cpu(), torch.arange(len(here)))
            token = local[drops // width]
            drops = token[token >= 0] * width + drops[token >= 0] % width
        if real is not None:   # real token i -> its slot in the [rows, length] layout
            slots = real.flatten().nonzero().squeeze(1)
            drops = slots[drops // width] * width + drops % width
        return drops
    index = torch.arange(total, device=device) if here is None else here.to(device)
    flat = keep_mask(index, width, p, seed)                                   # [tokens here, width]
    if real is None:
        return flat.view(tuple(shape))
    return torch.zeros(tuple(shape), dtype=torch.bool, device=device).masked_scatter_(real.to(device)[..., None], flat)


def add_updates(layers: list, x: torch.Tensor, concatenated: bool) -> list[torch.Tensor]:
    """The outputs of `layers` (LoRA layers that read the same x, routed alike): each one's
    base output plus each adapter's update on its own rows and their own padded length only
    (rows of no adapter: the base alone), in one autograd node (LoRAUpdate).

    concatenated (the GPU path): ONE pseudo-group over all rows, x [A's of every layer and
    adapter]^T in one matmul, times a per-row coefficient that keeps only the row's own
    adapter's columns (with its scale), then per layer one matmul with its adapters' B's
    side by side. Each adapter's dropout is drawn exactly as on the per-adapter path and
    laid into one keep mask over x. Launches per layer no longer grow with the adapters.
    Adapters whose variant has its own update run it in plain autograd on their rows.
    """
    layer, routing = layers[0], layers[0].routing   # the dropout is drawn once, by the first
    B, T = (x.numel() // x.size(-1), 1) if routing.packed else x.shape[:2]   # rows x length the groups index
    plan, variants = [], []
    for group in routing.groups:
        owners = [i for i, each in enumerate(layers) if each.adapts(group.name)]
        if not owners:
            continue
        adapter = layers[owners[0]].adapters[group.name]    # one config per adapter, whatever the layer
        length = own_length(group, T)
        shape = (row_count(group, B), length, x.size(-1))
        keep, scale = None, adapter.scaling
        if layer.training and adapter.config.dropout > 0:
            keep = layer.dropout_keep(group, shape, x.device, adapter.config.dropout)
            scale = scale / (1 - drawn_p(adapter.config.dropout))     # dropout's 1/(1-p), on the small h
        if adapter.fused:
            plan.append((group, length, shape, keep, scale, owners, adapter.fused_grads()))
        else:
            variants.append((group.rows, length, keep, adapter.config.dropout, owners, group.name))
    if concatenated and plan:
        names = [[entry[0].name for entry in plan if i in entry[5]] for i in range(len(layers))]
        coef = coefficients(routing, layers, names, B, layer.training, x.device)   # [B, 1, sum of all r]
        plan, tensors = one_group(layers, names, joined_masks(plan, B, T, x), coef, T)
    else:
        tensors = []
        for group, _, _, keep, _, owners, _ in plan:
            tensors.append(keep)
            for i in owners:
                tensors += layers[i].adapters[group.name].fused_tensors()
        plan = [UpdateGroup(group.rows, length, scale, tuple(owners), trains)
                for group, length, _, _, scale, owners, trains in plan]
    outs = update(layers, x, (B, T), plan, tensors)
    xs = x.reshape(B, T, x.size(-1))
    for rows, length, keep, p, owners, name in variants:   # variants: plain autograd on their rows
        xr = xs[rows, :length]                                               # [b, L, in]
        dropped = xr if keep is None else apply_dropout(xr, keep) / (1 - drawn_p(p))
        index = (torch.arange(B, device=x.device)[rows][:, None], torch.arange(length, device=x.device)[None, :])
        for i in owners:
            delta = layers[i].adapters[name].update(xr, dropped, layers[i])
            outs[i] = outs[i].index_put(index, delta.to(outs[i].dtype), accumulate=True)
    return [out.view(*x.shape[:-1], out.size(-1)) for out in outs]


def token_updates(layers: list, x: torch.Tensor) -> list[torch.Tensor]:
    """add_updates for a graphs.TokenRouting (graphs.route_tokens): every adapter of the routing through
    the concatenated path's shared matmuls, its rows chosen by the per-token coefficients,
    the dropout of all of them in one keep_mask call from the per-token seeds. Fixed shapes,
    no host read: the same kernels whatever the tokens hold (graphs.py)."""
    layer, routing = layers[0], layers[0].routing
    tokens = routing.tokens
    names = [[n for n in tokens.names if each.adapts(n)] for each in layers]
    if not all(each.adapters[n].fused for each, own in zip(layers, names) for n in own):
        raise ValueError("route_tokens: adapters through LoRAUpdate's plain arithmetic only (not DoRA, PiSSA, OLoRA)")
    keep = None
    if layer.training and any(each.adapters[n].config.dropout > 0 for each, own in zip(layers, names) for n in own):
        seed = (tokens.seed * 1_000_003 + layer.seed) & (2**63 - 1)              # mix_seed(its seed, this layer's)
        keep = keep_mask(tokens.index, x.size(-1), tokens.threshold, seed)[:, None]   # [N, 1, in]
    coef = coefficients(routing, layers, names, len(tokens.adapter), layer.training, x.device)   # [N, 1, sum of all r]
    plan, tensors = one_group(layers, names, keep, coef, 1)
    return [out.view(*x.shape[:-1], out.size(-1)) for out in update(layers, x, (len(tokens.adapter), 1), plan, tensors)]


def update(layers: list, x: torch.Tensor, shape: tuple[int, int], plan: list, tensors: list) -> list[torch.Tensor]:
    """The layers' base outputs [rows, length, out_j] with the plan's updates added (LoRAUpdate).
    A frozen float base goes into the node (one input-gradient buffer); otherwise (a
    quantized or trainable base) its outputs are computed here as [tokens, out], never
    a view (F.linear on [B, T, in] with a bias returns one), and the node adds into them."""
    in_node = bool(plan) and all(each.quantized is None and not each.weight.requires_grad for each in layers)
    if in_node:
        bases = [t for each in layers for t in (each.weight, each.bias)]
        outs = LoRAUpdate.apply(x, UpdatePlan(shape, len(layers), plan, base=True), *bases, *tensors)
    else:
        outs = [each.base_forward(x.reshape(-1, x.size(-1))) for each in layers]
        if plan:
            outs = LoRAUpdate.apply(x, UpdatePlan(shape, len(outs), plan), *outs, *tensors)   # a tuple
    return [out.view(*shape, out.size(-1)) for out in outs]


def joined_masks(plan: list, B: int, T: int, x: torch.Tensor) -> torch.Tensor | None:
    """add_updates' per-adapter dropout (plan entries) laid into one keep mask over x."""
    masks = [(group.rows, length, keep_of(keep, shape)) for group, length, shape, keep, *_ in plan
             if keep is not None]
    if not masks:
        return None
    rows = [r for r, length, _ in masks if isinstance(r, slice) and length == T]
    if len(rows) == len(masks) and [r.start for r in rows] == [0] + [r.stop for r in rows[:-1]] \
            and rows[-1].stop == B:   # the masks tile x (packed, or rows of full length): one cat
        return torch.cat([mask for _, _, mask in masks])
    keep = torch.ones(B, T, x.size(-1), dtype=torch.bool, device=x.device)
    for r, length, mask in masks:
        keep[r, :length] = mask
    return keep


def one_group(layers: list, names: list[list[str]], keep: torch.Tensor | None, coef: torch.Tensor, T: int):
    """The concatenated path's plan and tensors: all rows as one group of the adapters
    names[i] of each layer i, their per-row coefficients as its scale, one keep mask
    over x, per layer its adapters' A's and B's side by side (a gradient for A's or B's when
    any of them trains)."""
    tensors, trains = [keep], (False, False)
    for each, own in zip(layers, names):
        if own:   # else only variants adapt this layer
            As, Bs = zip(*(each.adapters[n].fused_tensors() for n in own))
            tensors += [As[0] if len(As) == 1 else torch.cat(As), Bs[0] if len(Bs) == 1 else torch.cat(Bs, dim=1)]
            for n in own:
                trains = tuple(a or b for a, b in zip(trains, each.adapters[n].fused_grads()))
    return [UpdateGroup(slice(None), T, coef, tuple(i for i, own in enumerate(names) if own), trains)], tensors


def coefficients(routing, layers: list, names: list[list[str]], B: int, training: bool, device) -> torch.Tensor:
    """[B, 1, sum r]: the concatenated path's per-row coefficients over the columns of
    layers[0]'s adapters names[0], then layers[1]'s names[1], ...: row i's coefficient is
    its adapter's scale on that adapter's r columns (with dropout's 1/(1-p) folded in while
    training), 0 elsewhere. Cached in the routing per adapter set. With a TokenRouting: a
    table of one row per adapter of tokens.names (and one of zeros, for none), gathered per token."""
    adapters = [[each.adapters[n] for n in own] for each, own in zip(layers, names)]
    key = (tuple(tuple(own) for own in names), tuple(a.scaling for own in adapters for a in own), training)
    if key not in routing.cache:
        if routing.tokens is None:
            rows_of = {g.name: g.rows.cpu() if torch.is_tensor(g.rows) else g.rows for g in routing.groups}
        else:
            rows_of, B = {name: i for i, name in enumerate(routing.tokens.names)}, len(routing.tokens.names) + 1
        columns = []
        for own, owned in zip(names, adapters):
            for name, adapter in zip(own, owned):
                column = torch.zeros(B, 1, adapter.config.r)
                p = adapter.config.dropout if training else 0.0
                column[rows_of[name]] = adapter.scaling / (1 - drawn_p(p))
                columns.append(column)
        routing.cache[key] = torch.cat(columns, dim=-1).to(device)
    return routing.cache[key] if routing.tokens is None else routing.cache[key][routing.tokens.adapter]


# ----------------------------------------------------------------------------- the update

class UpdateGroup(NamedTuple):
    """One adapter's part of LoRAUpdate (or, concatenated, all adapters' as one)."""
    rows: slice | torch.Tensor      # its rows of the (rows, length) layout
    length: int                     # its own padded length
    scale: float | torch.Tensor     # s / (1 - p), or per-row coefficients [rows, 1, sum r]
    layers: tuple[int, ...]         # which of the node's layers it adapts
    trains: tuple[bool, bool]       # whether A, B get a gradient (its variant's Adapter.trains)


class UpdatePlan(NamedTuple):
    """What LoRAUpdate adds: `outputs` layers share one input x; its groups. base: the node
    computes the frozen base outputs x W_j^T + b_j itself (else they come computed, e.g. by a
    quantized base)."""
    shape: tuple[int, int]          # (rows, length) the groups index: (B, T), or (N, 1) for a packed row
    outputs: int
    groups: list[UpdateGroup]
    base: bool = False


class LoRAUpdate(torch.autograd.Function):
    """out_j + scale * drop(x) A_j^T B_j^T on each adapter's rows, for every adapter of the
    layers j that share the input x (q/k/v; gate/up; or one layer), in ONE autograd node,
    written into the base outputs in place.

    Per adapter the input is dropped once and goes through its layers' A's in one matmul,
    x [A_q; A_k; A_v]^T, and back through them in one matmul in backward. Autograd over
    per-adapter ops would also split x and out into rows, cat the outputs back, cat the rows'
    input gradients back and add them to the base's: passes over [N, in] or [N, out] that
    do no arithmetic. With plan.base the frozen base matmuls are in the node too, so the
    input gradient is ONE buffer: the base's grad_out_j W_j accumulate into it (addmm) and
    each adapter adds into its rows, where autograd would sum a gradient per layer and
    the adapters' (each sum a pass over [N, in] that does no arithmetic).
    Saved for backward: each adapter's dropped input rows (a view of x without dropout; only
    when A trains), h = drop(x) A^T (r columns per layer) and its dropout (dropout_keep's); the
    base weights. Gradients only for the A's and B's that train (UpdateGroup.trains). Plain
    LoRA's arithmetic only (Adapter.fused): a variant with its own update runs it apart.
    """

    @staticmethod
    def forward(ctx, x, plan: UpdatePlan, *tensors):
        # x [B, T, in]; tensors: per layer its frozen (W [out_j, in], bias or None) with
        # plan.base, else its computed base output [B*T, out_j]; then per adapter: its dropout
        # (a keep mask [b, L, in], dropped positions in it, or None), then (A [r, in],
        # B [out_j, r]) for each layer it adapts.
        head = 2 * plan.outputs if plan.base else plan.outputs
        rest = iter(tensors[head:])
        if plan.base:
            base_weights = tensors[:head:2]
            flat = x.reshape(-1, x.size(-1))
            outs = tuple(F.linear(flat, W, b) for W, b in zip(base_weights, tensors[1:head:2]))   # new tensors
        else:
            base_weights, outs = (), tensors[:head]
            ctx.mark_dirty(*outs)
        views = [o.view(*plan.shape, o.size(-1)) for o in outs]                 # [rows, length, out_j]
        x_shape, x = x.shape, x.reshape(*plan.shape, x.size(-1))
        saved = []
        for rows, length, scale, layers, trains in plan.groups:
            keep, weights = next(rest), [next(rest) for _ in range(2 * len(layers))]
            As, Bs = weights[0::2], weights[1::2]
            xr = x[rows, :length]                                               # [b, L, in]
            if keep is not None:
                xr = apply_dropout(xr, keep)
            xr = xr.to(As[0].dtype)
            A = As[0] if len(As) == 1 else torch.cat(As)                        # [sum r, in]
            h = torch.matmul(xr, A.t()).mul_(scale)                             # [b, L, sum r]
            for layer, h_j, B in zip(layers, h.split([a.size(0) for a in As], dim=-1), Bs):
                LoRAUpdate.add_product(views[layer], rows, length, h_j, B.t())           # + h_j B_j^T
            saved += [keep, xr if trains[0] else None, h, A, *Bs]    # x only for A's gradient
        ctx.plan, ctx.x_shape = plan, x_shape
        ctx.save_for_backward(*base_weights, *saved)
        return outs

    @staticmethod
    def backward(ctx, *grad_outs):
        plan, saved = ctx.plan, list(ctx.saved_tensors)
        base_weights, saved = (saved[:plan.outputs], saved[plan.outputs:]) if plan.base else ((), saved)
        grads = [g.view(*plan.shape, g.size(-1)) for g in grad_outs]
        grad_x = None
        if ctx.needs_input_grad[0] and plan.base:   # the base's part: sum_j grad_out_j W_j, in one buffer
            grad_x = torch.mm(grad_outs[0].reshape(-1, grad_outs[0].size(-1)), base_weights[0])
            for g, W in zip(grad_outs[1:], base_weights[1:]):
                grad_x.addmm_(g.reshape(-1, g.size(-1)), W)
            grad_x = grad_x.view(*plan.shape, ctx.x_shape[-1])
        elif ctx.needs_input_grad[0]:
            grad_x = grads[0].new_zeros(*plan.shape, ctx.x_shape[-1])
        grad_weights = []
        for rows, length, scale, layers, (train_A, train_B) in plan.groups:
            keep, xr, h, A = saved[:4]
            Bs, saved = saved[4:4 + len(layers)], saved[4 + len(layers):]
            ranks = [B.size(1) for B in Bs]
            grad_h = torch.empty_like(h)                                        # [b, L, sum r]
            grad_A_B = []
            for layer, h_j, grad_h_j, B in zip(layers, h.split(ranks, -1), grad_h.split(ranks, -1), Bs):
                g = grads[layer][rows, :length].to(B.dtype)                     # [b, L, out_j]
                grad_A_B.append(g.flatten(0, 1).t() @ h_j.flatten(0, 1) if train_B else None)   # grad B_j [out_j, r]
                grad_h_j.copy_(torch.matmul(g, B))
            grad_h.mul_(scale)
            grad_A = grad_h.flatten(0, 1).t() @ xr.flatten(0, 1) if train_A else None   # [sum r, in]
            target = None if grad_x is None else LoRAUpdate.block(grad_x, rows, length, grad_h.dtype)
            if target is not None and (keep is None or keep.dtype != torch.bool):
                # + (grad_h A) with the dropped positions left as they were, in one addmm_
                before = None if keep is None else target.view(-1)[keep]
                target.addmm_(grad_h.flatten(0, 1), A)
                if keep is not None:
                    target.view(-1).index_copy_(0, keep, before)
            elif grad_x is not None:
                grad_xr = torch.matmul(grad_h, A)                               # [b, L, in]
                if keep is not None:
                    grad_xr.mul_(keep_of(keep, grad_xr.shape))
                LoRAUpdate.add_into(grad_x, rows, length, grad_xr)
            grad_weights.append(None)                                           # keep
            for grad_A_j, grad_B_j in zip([None] * len(ranks) if grad_A is None else grad_A.split(ranks), grad_A_B):
                grad_weights += [grad_A_j, grad_B_j]
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
        if plan.base:   # the frozen weights and biases get none
            return grad_x, None, *[None] * (2 * plan.outputs), *grad_weights
        # Each output's gradient passes through unchanged: the updates were added to it.
        return grad_x, None, *grad_outs, *grad_weights

    @staticmethod
    def block(t: torch.Tensor, rows, length: int, dtype) -> torch.Tensor | None:
        """t[rows, :length] as a 2-D view [tokens, width] when it is one block of memory of
        `dtype` (a packed group, or unpadded rows), else None."""
        if not isinstance(rows, slice) or t.dtype != dtype:
            return None
        view = t[rows, :length]
        return view.view(-1, t.size(-1)) if view.is_contiguous() else None

    @staticmethod
    def add_product(t: torch.Tensor, rows, length: int, a: torch.Tensor, b: torch.Tensor):
        """t[rows, :length] += a @ b (a [rows, length, k], b [k, n]): in place by addmm_ where
        the target is one block (no [tokens, n] product written and read back), else add_into."""
        target = LoRAUpdate.block(t, rows, length, a.dtype)
        if target is not None:
            target.addmm_(a.flatten(0, 1), b)
        else:
            LoRAUpdate.add_into(t, rows, length, torch.matmul(a, b))

    @staticmethod
    def add_into(t: torch.Tensor, rows, length: int, value: torch.Tensor):
        """t[rows, :length] += value, in place (rows a slice, or an index tensor of distinct rows)."""
        if isinstance(rows, slice):
            t[rows, :length].add_(value.to(t.dtype))
        else:
            t[rows, :length] += value.to(t.dtype)
