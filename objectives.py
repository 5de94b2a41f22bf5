"""What a job learns from its rows of a fused step: the per-job loss, THE seam where an objective
plugs in (job_loss: SFT, DPO, CPO), the chunked next-token loss under it, how a job's rows lay
out as sequences, and the task scorer of held-out generations (task_correct).
"""
import re
from typing import NamedTuple

import torch
import torch.nn.functional as F

import data
from config import JobConfig

def token_losses(model, batch: data.Batch):
    """Next-token loss of every labelled position: (losses [N], the sequence each came from [N])."""
    targets = batch.labels[:, 1:]                                       # [B, T-1]
    keep = torch.zeros_like(batch.labels, dtype=torch.bool)             # [B, T]
    keep[:, :-1] = targets != -100
    hidden = model(batch.input_ids, output_mask=keep, head=False, segments=batch.segments)   # [N, C]
    output_layer = model.get_submodule(model.OUTPUT_LAYER)
    losses = chunked_token_losses(hidden, output_layer.weight, targets[keep[:, :-1]])
    return losses, batch.example_of(keep)


class FusedRows(NamedTuple):
    """Several jobs' rows in one batch: the batch, each sequence's job [S] and each job's first
    sequence, and each job's real and processed tokens [k, 2] (on the CPU: bookkeeping)."""
    batch: data.Batch
    job_of_row: torch.Tensor
    first_row: list[int]
    counts: torch.Tensor


def fuse_rows(jobs: list[JobConfig], examples: list[list], pad_id: int, packed: bool, device,
              stand_ins: tuple[str, ...] = ()) -> FusedRows:
    """Job i's rows examples[i] as the sequences job_parts lays out, all jobs in one batch
    (packed: end to end in one row; else padded rows). A job in `stand_ins` with no rows gets one
    1-token row without labels (dist.py: a sharded base needs every rank to run every block)."""
    stand_in = [data.Example([pad_id], [data.IGNORE_INDEX])]   # routed to its job's adapter, no loss
    parts = [job_parts(job, rows) if rows else [(job.name, stand_in)] if job.name in stand_ins else []
             for job, rows in zip(jobs, examples)]
    sequences = [sum(len(seqs) for _, seqs in job_part) for job_part in parts]
    batch = data.make_batch([part for job_part in parts for part in job_part], pad_id, packed).to(device)
    job_of_row = torch.tensor([i for i, n in enumerate(sequences) for _ in range(n)], device=device)
    counts = torch.zeros(len(jobs), 2, dtype=torch.long)
    for i, lengths in enumerate(batch.lengths.split(sequences)):   # real tokens, and processed (padding too)
        if examples[i]:   # not a stand-in row
            counts[i, 0] = lengths.sum()
            counts[i, 1] = lengths.sum() if batch.packed else len(lengths) * batch.input_ids.size(1)
    return FusedRows(batch, job_of_row, [sum(sequences[:i]) for i in range(len(jobs))], counts)


def job_losses(model, jobs: list[JobConfig], fused: FusedRows, examples: list[list], step_loss_tokens: list[int],
               step_rows: list[int] | None = None, whole_batch: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward over a fused batch (inside lora.route) and each job's loss [k] (job_loss;
    0 for a job with no rows here) and its reward sums [k, 4] (detached). whole_batch: the
    losses' graph reaches every row, those of no loss too (dist.py's stand-in rows)."""
    step_rows = step_rows or [len(rows) for rows in examples]
    token_nll, rows = token_losses(model, fused.batch)
    token_job = fused.job_of_row[rows]
    device = token_nll.device
    losses, rewards = torch.zeros(len(jobs), device=device), torch.zeros(len(jobs), 4, device=device)
    here = [i for i, rows_i in enumerate(examples) if rows_i]
    results = [job_loss(jobs[i], token_nll[token_job == i], rows[token_job == i] - fused.first_row[i],
                        len(examples[i]), step_loss_tokens[i], step_rows[i]) for i in here]
    if here:
        losses = losses.index_put((torch.tensor(here, device=device),), torch.stack([loss for loss, _ in results]))
        rewards[here] = torch.stack([reward_sums for _, reward_sums in results]).detach()
    if whole_batch:
        losses = losses + 0 * token_nll.sum()
    return losses, rewards


LOSS_CHUNK_ELEMENTS = 2**24  # logits per chunk of chunked_token_losses (64 MiB in fp32; see ChunkedTokenLosses)
LOSS_CHUNK_MIN_ROWS = 384    # but never fewer rows (223 MiB at a 152k vocabulary): each chunk reads the whole output layer


class ChunkedTokenLosses(torch.autograd.Function):
    """Cross-entropy of hidden [N, C] through a frozen output layer [V, C], chunk by chunk.

    The [N, V] logits never exist at once (a fused batch of 8 x 256 over SmolLM2's 49k
    vocabulary would hold 1.6 GB of them with their softmax and gradient). The losses are the
    graph's last op and each token's gradient is its loss's weight times (softmax - onehot) W,
    so forward computes that [N, C] term right after each chunk's logits and backward only
    scales it: no logits are kept, none recomputed. Chunk size, 2 CPU cores, 1229 tokens x
    SmolLM2's 49k vocabulary, fwd+bwd (median of 5, interleaved): 2^22 logits per chunk (85
    rows) 1.60 s, 2^24 (341 rows) 1.33 s, all at once through F.cross_entropy 1.41 s. With
    larger vocabularies 2^24 logits are few rows, and each chunk's two matmuls go through the
    whole [V, C] layer again (545 MB for Qwen2's 152k x 896), so a chunk has at least
    LOSS_CHUNK_MIN_ROWS rows. 2048 tokens x 152k, fwd+bwd: 110 rows a chunk 12.6-12.8 s, 384
    rows 9.4-10.1 s, all at once 10.8-11.8 s (`python scripts/loss_time.py --tokens 2048`).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        N, V = hidden.size(0), weight.size(0)
        chunk = max(LOSS_CHUNK_MIN_ROWS, LOSS_CHUNK_ELEMENTS // V)
        dtype = torch.promote_types(hidden.dtype, torch.float32)          # softmax in fp32 at least
        losses = torch.empty(N, dtype=dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        # One logits buffer for every chunk: a fresh [341, 49k] fp32 tensor per chunk is mapped
        # anew (over malloc's 32 MiB mmap limit) and page-faulted on its first write; the loss
        # alone, 1500 tokens fwd+bwd on 2 CPU cores: 1.37 -> 1.26 s with the buffer.
        buffer = torch.empty(min(chunk, N), V, dtype=dtype, device=hidden.device)
        for start in range(0, N, chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            logits = buffer[:len(t)]                                        # [n, V]
            if h.dtype == dtype:
                torch.mm(h, weight.t(), out=logits)
            else:   # bf16/fp16 hidden states: the softmax in fp32
                logits.copy_(h @ weight.t())
            # log-sum-exp as top + log sum exp(logits - top), keeping those exps for the softmax:
            # torch's logsumexp took 42 ms of a 341 x 49k chunk on 2 CPU cores, these four ops 17,
            # and exp runs once, not twice (logsumexp, then the softmax).
            top = logits.amax(-1, keepdim=True)                             # [n, 1]
            target_logits = logits.gather(1, t[:, None])                    # [n, 1]
            probs = logits.sub_(top).exp_()                                 # unnormalised softmax, in place
            total = probs.sum(-1, keepdim=True)                             # [n, 1]
            losses[start:start + chunk] = (top + total.log() - target_logits)[:, 0]
            if grad_hidden is not None:
                probs.div_(total)
                probs[torch.arange(len(t), device=t.device), t] -= 1        # softmax - onehot
                grad_hidden[start:start + chunk] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_hidden)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_losses[:, None].to(grad_hidden.dtype), None, None


def chunked_token_losses(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy [N] of hidden [N, C] through the (frozen) output weight [V, C]."""
    if weight.requires_grad:
        raise ValueError("chunked_token_losses: the output layer must be frozen (its gradient is not computed)")
    return ChunkedTokenLosses.apply(hidden, weight, targets)


REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "margin", "accuracy")   # a preference job's metrics


def job_loss(job: JobConfig, token_nll: torch.Tensor, rows: torch.Tensor, num_rows: int,
             step_loss_tokens: int, step_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One job's loss on its rows of a fused step: THE seam where an objective plugs in.

    token_nll [n]: next-token losses of the job's labelled positions; rows [n]: which of the
    job's sequences each came from (0-based within its micro-batch, in job_parts' order, padded
    or packed alike); num_rows: the micro-batch's rows (examples, or pairs). Each micro-batch
    gives its share of its optimizer step's mean, so accumulating equals one big batch:
      sft       the summed token loss / the step's loss tokens
      dpo, cpo  the summed pair losses / the step's pairs (preference_losses), and for cpo
                cpo_alpha x the chosen answers' summed token loss / the step's chosen tokens
    Returns (loss, reward sums [4]: chosen rewards, rejected rewards, pairs with margin > 0,
    pairs; zeros for SFT), detached sums that reward_means turns into metrics.
    """
    if job.objective == "sft":
        return token_nll.sum() / max(step_loss_tokens, 1), token_nll.new_zeros(4)
    losses, chosen_rewards, rejected_rewards = preference_losses(job, token_nll, rows, num_rows)
    loss = losses.sum() / step_rows
    if job.objective == "cpo" and job.cpo_alpha:
        # TRL's CPOTrainer: nn.CrossEntropyLoss over the chosen answers' tokens (a token mean);
        # over the whole step here, as SFT's, so accumulating equals one big batch.
        loss = loss + job.cpo_alpha * token_nll[rows < num_rows].sum() / max(step_loss_tokens, 1)
    margins = chosen_rewards - rejected_rewards
    rewards = torch.stack([chosen_rewards.sum(), rejected_rewards.sum(), (margins > 0).sum().to(margins.dtype),
                           margins.new_tensor(num_rows)])
    return loss, rewards.detach()


def preference_losses(job: JobConfig, token_nll: torch.Tensor, rows: torch.Tensor,
                      num_pairs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's or CPO's loss per pair [P] and the chosen and rejected rewards [P], from the token
    losses of the job's sequences (job_parts' order: the chosen answers, the rejected ones, and
    for dpo both again as the reference saw them). As TRL's DPOTrainer / CPOTrainer:
      log-prob of an answer   pi = sum of its tokens' log-probs; ipo: their mean
      h                       dpo: (pi_c - pi_r) - (ref_c - ref_r), the reference constant; cpo: pi_c - pi_r
      sigmoid                 -(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h)   (DPO eq. 7;
                              conservative DPO with label smoothing ls)
      ipo                     (h - 1 / (2 beta))^2   (IPO, Azar et al. 2023, eq. 17; no label smoothing)
      rewards                 dpo: beta (pi - ref); cpo: beta pi
    """
    sequences = (4 if job.objective == "dpo" else 2) * num_pairs
    logps = token_nll.new_zeros(sequences).index_add_(0, rows, -token_nll)         # [S]
    if job.loss_type == "ipo":
        logps = logps / torch.bincount(rows, minlength=sequences).clamp(min=1)
    logps = logps.view(-1, num_pairs)                                            # [2 or 4, P]
    chosen, rejected = logps[0], logps[1]
    if job.objective == "dpo":
        ref_chosen, ref_rejected = logps[2].detach(), logps[3].detach()
        h = (chosen - rejected) - (ref_chosen - ref_rejected)
        chosen_rewards, rejected_rewards = job.beta * (chosen - ref_chosen), job.beta * (rejected - ref_rejected)
    else:
        h = chosen - rejected
        chosen_rewards, rejected_rewards = job.beta * chosen, job.beta * rejected
    if job.loss_type == "ipo":
        losses = (h - 1 / (2 * job.beta)) ** 2
    else:
        smoothing = job.label_smoothing
        losses = -(1 - smoothing) * F.logsigmoid(job.beta * h) - smoothing * F.logsigmoid(-job.beta * h)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def reward_means(sums: list[float]) -> dict | None:
    """A preference job's metrics from job_loss's reward sums: mean rewards, margin, accuracy (None for SFT)."""
    chosen, rejected, right, pairs = sums
    if not pairs:
        return None
    return dict(zip(REWARD_KEYS, (chosen / pairs, rejected / pairs, (chosen - rejected) / pairs, right / pairs)))


def job_parts(job: JobConfig, rows: list) -> list[tuple[str | None, list[data.Example]]]:
    """The sequences a job's rows put in a fused batch, each with its adapter: SFT its examples;
    dpo/cpo each pair's chosen and rejected answers (all chosen first, as TRL concatenates them),
    and for dpo the same again routed to no adapter: the frozen base is the reference."""
    if job.objective == "sft":
        return [(job.name, rows)]
    answers = [pair.chosen for pair in rows] + [pair.rejected for pair in rows]
    return [(job.name, answers)] + ([(None, answers)] if job.objective == "dpo" else [])


def adapter_rows(job: JobConfig, n: int) -> list[int]:
    """For n rows, the row of each sequence job_parts routes to the job's adapter, in its order."""
    return list(range(n)) if job.objective == "sft" else list(range(n)) * 2


def sequence_lengths(job: JobConfig, row) -> tuple[int, ...]:
    """The lengths of the sequences one row (example or pair) puts in a fused batch: the scheduler's unit."""
    return tuple(len(example.input_ids) for _, examples in job_parts(job, [row]) for example in examples)


def loss_tokens(job: JobConfig, row) -> int:
    """Labelled tokens a row adds to its step's normaliser: an example's; a pair's chosen answer's (cpo's NLL)."""
    example = row if job.objective == "sft" else row.chosen
    return sum(label != data.IGNORE_INDEX for label in example.labels[1:])


def task_correct(metric: str, answer: str, expected: str, pattern: str | None = None) -> bool:
    """One generated answer (stripped) against a held-out row's output: exact (equal, stripped),
    contains (the stripped output is in it) or regex (re.fullmatch(pattern, answer))."""
    answer = answer.strip()
    if metric == "exact":
        return answer == expected.strip()
    if metric == "contains":
        return expected.strip() in answer
    if metric == "regex":
        return re.fullmatch(pattern, answer) is not None
    raise ValueError(f"task metric {metric!r}: expected exact, contains or regex")
