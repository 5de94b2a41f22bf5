"""The fused LoRA arithmetic that lora.MultiLoRALinear runs: LoRAUpdate, one autograd node for
every adapter of the layers that share an input (q/k/v; gate/up), and dropout drawn from a seed
so that a job's masks do not depend on what it is fused with (positions on CPUs, masks on GPUs).
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


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
    a pass of x * keep that casts the mask first. On a 2-core CPU, 512 x 1536 (p = 0.05): the
    draw 0.3 ms against keep_mask's 1.4 ms. `draws`: words drawn at a time (default: ~n p and
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


# ----------------------------------------------------------------------------- the update

class UpdatePlan(NamedTuple):
    """What LoRAUpdate adds: `outputs` layers share one input x; per adapter, its rows, own
    length, scale and which of those layers it adapts. base: the node computes the frozen
    base outputs x W_j^T + b_j itself (else they come computed, e.g. by a quantized base)."""
    shape: tuple[int, int]          # (rows, length) the groups index: (B, T), or (N, 1) for a packed row
    outputs: int
    groups: list[tuple[slice | torch.Tensor, int, float | torch.Tensor, tuple[int, ...]]]   # scale: or per-row [rows, 1, sum r]
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
    the adapters' (on 2 CPU cores such sums over [N, 1536] cost as much as a small matmul).
    Saved for backward: each adapter's dropped input rows (a view of x without dropout),
    h = drop(x) A^T (r columns per layer) and its dropout (dropout_keep's); the base weights.
    Plain LoRA only: a variant needs its own update.
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
        for rows, length, scale, layers in plan.groups:
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
            saved += [keep, xr, h, A, *Bs]
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
        for rows, length, scale, layers in plan.groups:
            keep, xr, h, A = saved[:4]
            Bs, saved = saved[4:4 + len(layers)], saved[4 + len(layers):]
            ranks = [B.size(1) for B in Bs]
            grad_h = torch.empty_like(h)                                        # [b, L, sum r]
            grad_A_B = []
            for layer, h_j, grad_h_j, B in zip(layers, h.split(ranks, -1), grad_h.split(ranks, -1), Bs):
                g = grads[layer][rows, :length].to(B.dtype)                     # [b, L, out_j]
                grad_A_B.append(g.flatten(0, 1).t() @ h_j.flatten(0, 1))        # grad B_j [out_j, r]
                grad_h_j.copy_(torch.matmul(g, B))
            grad_h.mul_(scale)
            grad_A = grad_h.flatten(0, 1).t() @ xr.flatten(0, 1)                # [sum r, in]
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
            for grad_A_j, grad_B_j in zip(grad_A.split(ranks), grad_A_B):
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
