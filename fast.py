"""Hand-written fast paths that the core calls in place of plain autograd, each tested equal to
its plain definition (values and gradients):
- the next-token loss through the output layer in chunks, no [N, V] logits kept
  (objectives.token_losses; the definition: F.cross_entropy over all logits);
- RMSNorm with its backward written out (llama.RMSNorm; the definition: the plain ops);
- block-diagonal causal attention over a packed row in one kernel: torch's variable-length flash
  kernel on CUDA, or SDPA with the segment mask for the fixed-shape step (llama.attend).
The fused LoRA arithmetic has its own module, lora_update.py. benchmarks.md has the timings.
"""
import functools
import inspect

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- the chunked loss

LOSS_CHUNK_ELEMENTS = 2**24  # logits per chunk of chunked_token_losses (64 MiB in fp32; see ChunkedTokenLosses)
LOSS_CHUNK_MIN_ROWS = 384    # but never fewer rows (223 MiB at a 152k vocabulary): each chunk reads the whole output layer


class ChunkedTokenLosses(torch.autograd.Function):
    """Cross-entropy of hidden [N, C] through a frozen output layer [V, C], chunk by chunk.

    The [N, V] logits never exist at once (a fused batch of 8 x 256 over SmolLM2's 49k
    vocabulary would hold 1.6 GB of them with their softmax and gradient). The losses are the
    graph's last op and each token's gradient is its loss's weight times (softmax - onehot) W,
    so forward computes that [N, C] term right after each chunk's logits and backward only
    scales it: no logits are kept, none recomputed. With large vocabularies 2^24 logits are few
    rows, and each chunk's two matmuls go through the whole [V, C] layer again (545 MB for
    Qwen2's 152k x 896), so a chunk has at least LOSS_CHUNK_MIN_ROWS rows. The chunk rule
    timed against all logits at once: `python scripts/loss_time.py --tokens 2048` (benchmarks.md).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, softcap: float | None):
        N, V = hidden.size(0), weight.size(0)
        dtype = torch.promote_types(hidden.dtype, torch.float32)          # softmax in fp32 at least
        losses = torch.empty(N, dtype=dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        # One logits buffer for every chunk: a fresh [341, 49k] fp32 tensor per chunk is mapped
        # anew (over malloc's 32 MiB mmap limit) and page-faulted on its first write.
        buffer = torch.empty(min(chunk, N), V, dtype=dtype, device=hidden.device)
        slopes = torch.empty_like(buffer) if softcap is not None and grad_hidden is not None else None
        for start in range(0, N, chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            logits = buffer[:len(t)]                                        # [n, V]
            if h.dtype == dtype:
                torch.mm(h, weight.t(), out=logits)
            else:   # bf16/fp16 hidden states: the softmax in fp32
                logits.copy_(h @ weight.t())
            if softcap is not None:   # logits capped as c * tanh(z / c) (Gemma), whose slope is 1 - tanh^2
                squashed = logits.div_(softcap).tanh_()
                if slopes is not None:
                    slope = torch.mul(squashed, squashed, out=slopes[:len(t)]).neg_().add_(1)
                logits = squashed.mul_(softcap)
            # log-sum-exp as top + log sum exp(logits - top), keeping those exps for the softmax:
            # exp runs once per logit, not twice (logsumexp, then the softmax).
            top = logits.amax(-1, keepdim=True)                             # [n, 1]
            target_logits = logits.gather(1, t[:, None])                    # [n, 1]
            probs = logits.sub_(top).exp_()                                 # unnormalised softmax, in place
            total = probs.sum(-1, keepdim=True)                             # [n, 1]
            losses[start:start + chunk] = (top + total.log() - target_logits)[:, 0]
            if grad_hidden is not None:
                probs.div_(total)
                probs[torch.arange(len(t), device=t.device), t] -= 1        # softmax - onehot
                if slopes is not None:
                    probs.mul_(slope)                                       # through the cap
                grad_hidden[start:start + chunk] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_hidden)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_losses[:, None].to(grad_hidden.dtype), None, None, None, None


def chunked_token_losses(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_elements: int = LOSS_CHUNK_ELEMENTS, min_rows: int = LOSS_CHUNK_MIN_ROWS,
                         softcap: float | None = None) -> torch.Tensor:
    """Per-token cross-entropy [N] of hidden [N, C] through the (frozen) output weight [V, C], in
    chunks of chunk_elements logits but at least min_rows rows; softcap: the logits capped as
    softcap * tanh(logits / softcap) first (the model's logit_softcap)."""
    if weight.requires_grad:
        raise ValueError("chunked_token_losses: the output layer must be frozen (its gradient is not computed)")
    return ChunkedTokenLosses.apply(hidden, weight, targets, max(min_rows, chunk_elements // weight.size(0)), softcap)


# ----------------------------------------------------------------------------- RMSNorm

class RMSNormFunction(torch.autograd.Function):
    """weight * x / rms(x), normalized in fp32 and cast back to x's dtype before the weight
    (transformers' Llama) or after it (weight_in_fp32: ChatGLM's order). The forward is those
    ops; the backward is written out: autograd over them spends most of its time multiplying
    by the [.., 1] statistics broadcast to [.., C] (pow's and mean's backward); the two are
    timed by `python scripts/block_time.py` (benchmarks.md)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, weight_in_fp32: bool):
        h = x.float()
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)               # [.., 1]
        ctx.save_for_backward(x, weight, rstd)
        ctx.weight_in_fp32 = weight_in_fp32
        if weight_in_fp32:
            return (weight * (h * rstd)).to(x.dtype)
        return weight * (h * rstd).type_as(x)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        h = x.float()
        grad_normed = grad.float() * weight                                    # d loss / d (h * rstd)
        # d/dh of h * rstd(h) applied to g: rstd * (g - h * rstd^2 * mean(g * h))
        dot = (grad_normed * h).mean(-1, keepdim=True).mul_(rstd.square())
        grad_x = grad_normed.sub_(h * dot).mul_(rstd).to(x.dtype)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            normed = h * rstd if ctx.weight_in_fp32 else (h * rstd).type_as(x)
            product = grad.float() * normed if ctx.weight_in_fp32 else grad * normed
            grad_weight = product.flatten(0, -2).sum(0).to(weight.dtype)
        return grad_x, grad_weight, None, None


# ----------------------------------------------------------------------------- attention over a packed row

@functools.cache
def varlen_takes_gqa() -> bool:
    """Whether this torch's varlen_attn takes enable_gqa (2.13 does, 2.11 does not)."""
    from torch.nn.attention.varlen import varlen_attn
    return "enable_gqa" in inspect.signature(varlen_attn).parameters


def attend_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor, longest: int,
                  window: int | None, gqa: bool) -> torch.Tensor:
    """torch's variable-length flash kernel over the segments of one packed row that begin at
    `starts` [E+1] (int32, the last = N): [1, nh, N, hd]. CUDA, 16-bit only."""
    from torch.nn.attention.varlen import varlen_attn   # here: importing it loads torch._dynamo (slow)
    left = -1 if window is None else window - 1                                   # keys i-left .. i
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))              # [N, heads, hd]
    extra = {}
    if gqa and varlen_takes_gqa():
        extra["enable_gqa"] = True
    elif gqa:   # torch < 2.13 takes no enable_gqa: each k/v head repeated for its group of q heads
        k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))
    y = varlen_attn(q, k, v, starts, starts, longest, longest, window_size=(left, 0), **extra)   # [N, nh, hd]
    return y.transpose(0, 1)[None]                                                 # [1, nh, N, hd]


def attend_packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row, gqa: bool) -> torch.Tensor:
    """Block-diagonal causal attention over a llama.PackedRow, with no host read: the flash kernel on
    CUDA in 16-bit, else SDPA with the [N, N] mask built from the segment numbers (the same
    arithmetic as segment by segment, at N^2 cost: for tests, and fp32 on a GPU)."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return attend_varlen(q, k, v, row.starts, row.longest, row.window, gqa)
    i = torch.arange(q.size(2), device=q.device)
    mask = (row.segment[:, None] == row.segment[None, :]) & (i[None, :] <= i[:, None])    # [N, N]
    if row.window is not None:
        mask &= i[None, :] > i[:, None] - row.window
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
