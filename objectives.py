"""What a job learns from its rows of a fused step: the chunked next-token loss, the table of
objectives (OBJECTIVES: each one's fields, how its rows lay out as sequences, its per-job loss,
THE seam where an objective plugs in, its metrics and describe line).
"""
import dataclasses
import math
import typing
from typing import NamedTuple

import torch
import torch.nn.functional as F

import data
from fast import chunked_token_losses

Job = typing.Any   # a config.JobConfig: config imports this table to check jobs by it, so not the other way


def token_losses(model, batch: data.Batch, **chunking):
    """Next-token loss of every labelled position: (losses [N], the sequence each came from [N]).
    chunking: fast.chunked_token_losses' chunk sizes (tests)."""
    targets = batch.labels[:, 1:]                                       # [B, T-1]
    keep = torch.zeros_like(batch.labels, dtype=torch.bool)             # [B, T]
    keep[:, :-1] = targets != -100
    hidden = model(batch.input_ids, output_mask=keep, head=False, segments=batch.segments)   # [N, C]
    output_layer = model.get_submodule(model.OUTPUT_LAYER)
    losses = chunked_token_losses(hidden, output_layer.weight, targets[keep[:, :-1]], softcap=model.logit_softcap, **chunking)
    return losses, batch.example_of(keep)


class FusedRows(NamedTuple):
    """Several jobs' rows in one batch: the batch, each sequence's job [S] and each job's first
    sequence, and each job's real and processed tokens [k, 2] (on the CPU: bookkeeping)."""
    batch: data.Batch
    job_of_row: torch.Tensor
    first_row: list[int]
    counts: torch.Tensor


def fuse_rows(jobs: list[Job], examples: list[list], pad_id: int, packed: bool, device,
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


def job_losses(model, jobs: list[Job], fused: FusedRows, examples: list[list], step_loss_tokens: list[int],
               step_rows: list[int] | None = None, whole_batch: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward over a fused batch (inside lora.route) and each job's loss [k] (job_loss;
    0 for a job with no rows here) and its metric sums [k, METRIC_SUMS] (detached). whole_batch: the
    losses' graph reaches every row, those of no loss too (dist.py's stand-in rows)."""
    step_rows = step_rows or [len(rows) for rows in examples]
    token_nll, rows = token_losses(model, fused.batch)
    token_job = fused.job_of_row[rows]
    device = token_nll.device
    losses, rewards = torch.zeros(len(jobs), device=device), torch.zeros(len(jobs), METRIC_SUMS, device=device)
    here = [i for i, rows_i in enumerate(examples) if rows_i]
    results = [job_loss(jobs[i], token_nll[token_job == i], rows[token_job == i] - fused.first_row[i],
                        len(examples[i]), step_loss_tokens[i], step_rows[i]) for i in here]
    if here:
        losses = losses.index_put((torch.tensor(here, device=device),), torch.stack([loss for loss, _ in results]))
        rewards[here] = torch.stack([reward_sums for _, reward_sums in results]).detach()
    if whole_batch:
        losses = losses + 0 * token_nll.sum()
    return losses, rewards


# ----------------------------------------------------------------------------- the objectives

REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "margin", "accuracy")   # a preference job's metrics


class SFT:
    """Supervised fine-tuning: the next-token loss of each example's labelled tokens, a mean over
    its optimizer step's loss tokens (so accumulating micro-batches equals one big batch). Its
    attributes and methods are what every entry of OBJECTIVES answers."""
    pairs = False          # rows are data.Example (data.load_job_data), not data.Pair (data.load_pairs)
    token_mean = True      # loss = the step's summed token loss / its loss tokens (graphs.py's fixed-shape step)
    fields = ()            # the JobConfig fields it reads (validated; the others warned about when set)
    metrics = ()           # what it logs besides its loss, per step and per held-out eval
    sums = 0               # the detached sums its loss returns, that `means` turns into its metrics

    def checks(self, job: Job) -> list[tuple[str, bool, str]]:
        """(field, whether its value is right, what is expected) for each field it reads."""
        return []

    def used(self, job: Job) -> tuple[str, ...]:
        """The fields its loss reads with this job's settings."""
        return self.fields

    def parts(self, job: Job, rows: list) -> list[tuple[str | None, list[data.Example]]]:
        """The sequences its rows put in a fused batch, each part with its adapter (None: the bare base)."""
        return [(job.name, rows)]

    def adapter_rows(self, n: int) -> list[int]:
        """For n rows, the row of each sequence `parts` routes to the job's adapter, in its order."""
        return list(range(n))

    def loss_example(self, row) -> data.Example:
        """The sequence of a row whose labelled tokens count in the step's loss tokens."""
        return row

    def loss(self, job: Job, token_nll: torch.Tensor, rows: torch.Tensor, num_rows: int, step_loss_tokens: int,
             step_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(its loss on a micro-batch, its metric sums [sums]): see job_loss."""
        return token_nll.sum() / max(step_loss_tokens, 1), token_nll.new_zeros(0)

    def means(self, sums: list[float]) -> dict | None:
        """Its metrics from the sums over a step or an eval (None: nothing to log)."""
        return None

    def describe(self, job: Job) -> str:
        """Its part of the job's line at start ("": plain SFT, the default, says nothing)."""
        return ""


def finite(x) -> bool:
    """A finite number within fp32's range: the losses are computed in it."""
    return x is not None and math.isfinite(x) and abs(x) <= torch.finfo(torch.float32).max


FIELD_CHECKS = {   # an objective field's check, for the objectives that read it
    "beta": (lambda v: finite(v) and v > 0, "expected a finite number > 0"),
    "label_smoothing": (lambda v: finite(v) and 0 <= v < 0.5, "expected 0 <= label_smoothing < 0.5"),
    "cpo_alpha": (lambda v: finite(v) and v >= 0, "expected a finite number >= 0"),
}


class Preference:
    """What the preference objectives share: rows are pairs, each pair's chosen and rejected
    answers routed to the job's adapter (all chosen first, as TRL concatenates them), the loss
    a mean over the step's pairs, and rewards, margin and accuracy logged."""
    pairs, token_mean = True, False
    reference = False      # each pair's answers again, routed to no adapter: the frozen base scores them
    fields = ("loss_type", "beta", "label_smoothing")
    loss_types = ("sigmoid", "ipo")   # as TRL's loss_type
    metrics, sums = REWARD_KEYS, 4

    def checks(self, job: Job) -> list[tuple[str, bool, str]]:
        """(field, whether its value is right, what is expected) for each field it reads."""
        found = [(name, ok(getattr(job, name)), expected) for name, (ok, expected) in FIELD_CHECKS.items()
                 if name in self.fields]
        if "loss_type" in self.fields:
            found.insert(0, ("loss_type", job.loss_type in self.loss_types, f"expected one of {', '.join(self.loss_types)}"))
        return found

    def used(self, job: Job) -> tuple[str, ...]:
        """The fields its loss reads with the job's loss_type: ipo has no label smoothing (TRL ignores it too)."""
        return tuple(name for name in self.fields if not (name == "label_smoothing" and job.loss_type == "ipo"))

    def parts(self, job: Job, rows: list) -> list[tuple[str | None, list[data.Example]]]:
        answers = [pair.chosen for pair in rows] + [pair.rejected for pair in rows]
        return [(job.name, answers)] + ([(None, answers)] if self.reference else [])

    def adapter_rows(self, n: int) -> list[int]:
        return list(range(n)) * 2

    def loss_example(self, row) -> data.Example:
        return row.chosen   # the normaliser of a chosen-answer NLL term (CPO's, ORPO's)

    def answer_logps(self, token_nll: torch.Tensor, rows: torch.Tensor, num_pairs: int, mean: bool) -> torch.Tensor:
        """The log-prob of each answer [parts x 2, P] (the sum of its tokens' log-probs; mean: their mean)."""
        sequences = (4 if self.reference else 2) * num_pairs   # job_parts' order: chosen, rejected (, both again)
        logps = token_nll.new_zeros(sequences).index_add_(0, rows, -token_nll)        # [S]
        if mean:
            logps = logps / torch.bincount(rows, minlength=sequences).clamp(min=1)
        return logps.view(-1, num_pairs)

    def sigmoid_or_ipo(self, job: Job, h: torch.Tensor) -> torch.Tensor:
        """The pair loss of a log-ratio difference h [P]: sigmoid -(1 - ls) log sigmoid(beta h) -
        ls log sigmoid(-beta h) (DPO eq. 7; conservative DPO with label smoothing ls), or ipo
        (h - 1 / (2 beta))^2 (IPO, Azar et al. 2023, eq. 17)."""
        if job.loss_type == "ipo":
            return (h - 1 / (2 * job.beta)) ** 2
        smoothing = job.label_smoothing
        return -(1 - smoothing) * F.logsigmoid(job.beta * h) - smoothing * F.logsigmoid(-job.beta * h)

    @staticmethod
    def reward_sums(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
        """Sums [4]: chosen rewards, rejected rewards, pairs with margin > 0, pairs."""
        margins = chosen_rewards - rejected_rewards
        return torch.stack([chosen_rewards.sum(), rejected_rewards.sum(), (margins > 0).sum().to(margins.dtype),
                            margins.new_tensor(len(margins))]).detach()

    def means(self, sums: list[float]) -> dict | None:
        """Mean rewards, margin, accuracy from reward_sums (None before any pair)."""
        chosen, rejected, right, pairs = sums[:4]
        if not pairs:
            return None
        return dict(zip(REWARD_KEYS, (chosen / pairs, rejected / pairs, (chosen - rejected) / pairs, right / pairs)))

    def describe(self, job: Job) -> str:
        return f"{job.objective} ({job.loss_type}, beta={job.beta:g})"


class DPO(Preference):
    """DPO (Rafailov et al. 2023) as TRL's DPOTrainer, the reference being the frozen base: the
    pairs again, routed to no adapter, in the same fused batch. With pi, ref an answer's log-prob
    under the adapter and the base: h = (pi_c - pi_r) - (ref_c - ref_r); rewards beta (pi - ref)."""
    reference = True

    def loss(self, job: Job, token_nll: torch.Tensor, rows: torch.Tensor, num_rows: int, step_loss_tokens: int,
             step_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        chosen, rejected, ref_chosen, ref_rejected = self.answer_logps(token_nll, rows, num_rows,
                                                                       mean=job.loss_type == "ipo")
        ref_chosen, ref_rejected = ref_chosen.detach(), ref_rejected.detach()
        losses = self.sigmoid_or_ipo(job, (chosen - rejected) - (ref_chosen - ref_rejected))
        return losses.sum() / step_rows, self.reward_sums(job.beta * (chosen - ref_chosen),
                                                           job.beta * (rejected - ref_rejected))


class CPO(Preference):
    """CPO (Xu et al. 2024, eq. 3) as TRL's CPOTrainer: DPO's term on the policy alone (h = pi_c -
    pi_r; rewards beta pi), plus cpo_alpha x the chosen answers' NLL, a token mean over the step."""
    fields = Preference.fields + ("cpo_alpha",)

    def loss(self, job: Job, token_nll: torch.Tensor, rows: torch.Tensor, num_rows: int, step_loss_tokens: int,
             step_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        chosen, rejected = self.answer_logps(token_nll, rows, num_rows, mean=job.loss_type == "ipo")
        loss = self.sigmoid_or_ipo(job, chosen - rejected).sum() / step_rows
        if job.cpo_alpha:   # TRL: nn.CrossEntropyLoss over the chosen tokens; over the whole step here, as SFT's
            loss = loss + job.cpo_alpha * token_nll[rows < num_rows].sum() / max(step_loss_tokens, 1)
        return loss, self.reward_sums(job.beta * chosen, job.beta * rejected)


class ORPO(Preference):
    """ORPO (Hong et al. 2024, eq. 6-7) as TRL's ORPOTrainer: the chosen answers' NLL (a token
    mean over the step, as SFT's) - beta log sigmoid(log odds ratio), no reference; an answer's
    odds are p / (1 - p), p = exp(its mean token log-prob) (eq. 4); rewards beta log p."""
    fields, loss_types = ("beta",), ()    # beta: the paper's lambda (TRL's ORPOConfig.beta)
    metrics, sums = REWARD_KEYS + ("log_odds",), 5

    def loss(self, job: Job, token_nll: torch.Tensor, rows: torch.Tensor, num_rows: int, step_loss_tokens: int,
             step_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        chosen, rejected = self.answer_logps(token_nll, rows, num_rows, mean=True)
        # log odds = log p - log(1 - p), log(1 - p) as log(-expm1(log p)): exact as p nears 1
        log_odds = (chosen - rejected) - (torch.log(-torch.expm1(chosen)) - torch.log(-torch.expm1(rejected)))
        nll = token_nll[rows < num_rows].sum() / max(step_loss_tokens, 1)
        loss = nll - job.beta * F.logsigmoid(log_odds).sum() / step_rows
        sums = self.reward_sums(job.beta * chosen, job.beta * rejected)
        return loss, torch.cat([sums, log_odds.detach().sum()[None]])

    def means(self, sums: list[float]) -> dict | None:
        """The rewards' means and the mean log odds ratio (TRL's log_odds_chosen)."""
        metrics = super().means(sums)
        return metrics and {**metrics, "log_odds": sums[4] / sums[3]}

    def describe(self, job: Job) -> str:
        return f"orpo (lambda=beta={job.beta:g})"


OBJECTIVES = {"sft": SFT(), "dpo": DPO(), "cpo": CPO(), "orpo": ORPO()}   # a job's `objective` names its entry
METRIC_SUMS = max(objective.sums for objective in OBJECTIVES.values())   # a job's metric sums tensor, any objective


def objective_of(job: Job):
    """The job's entry of OBJECTIVES."""
    return OBJECTIVES[job.objective]


def unused_fields(job: Job) -> list[str]:
    """The objective fields (any entry's) set away from their defaults that the job's objective does not read."""
    defaults = {f.name: f.default for f in dataclasses.fields(job)}
    fields = dict.fromkeys(name for objective in OBJECTIVES.values() for name in objective.fields)
    return [name for name in fields if name not in objective_of(job).used(job) and getattr(job, name) != defaults[name]]


# The table's questions as module functions: the loop, dist.py, graphs.py and report.py ask these.

def job_loss(job: Job, token_nll: torch.Tensor, rows: torch.Tensor, num_rows: int,
             step_loss_tokens: int, step_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One job's loss on its rows of a fused step: THE seam where an objective plugs in.

    token_nll [n]: next-token losses of the job's labelled positions; rows [n]: which of the
    job's sequences each came from (0-based within its micro-batch, in job_parts' order, padded
    or packed alike); num_rows: the micro-batch's rows (examples, or pairs); step_loss_tokens,
    step_rows: those of its whole optimizer step, of which each micro-batch gives its share, so
    accumulating equals one big batch. Returns (loss, metric sums [METRIC_SUMS], detached, that
    reward_means turns into the objective's metrics; zeros where it has fewer).
    """
    loss, sums = objective_of(job).loss(job, token_nll, rows, num_rows, step_loss_tokens, step_rows)
    return loss, F.pad(sums, (0, METRIC_SUMS - len(sums)))


def reward_means(job: Job, sums: list[float]) -> dict | None:
    """The job's metrics from job_loss's sums over a step or an eval (None for SFT, or before any pair)."""
    return objective_of(job).means(sums)


def job_parts(job: Job, rows: list) -> list[tuple[str | None, list[data.Example]]]:
    """The sequences a job's rows put in a fused batch, each with its adapter (None: the bare base)."""
    return objective_of(job).parts(job, rows)


def adapter_rows(job: Job, n: int) -> list[int]:
    """For n rows, the row of each sequence job_parts routes to the job's adapter, in its order."""
    return objective_of(job).adapter_rows(n)


def sequence_lengths(job: Job, row) -> tuple[int, ...]:
    """The lengths of the sequences one row (example or pair) puts in a fused batch: the scheduler's unit."""
    return tuple(len(example.input_ids) for _, examples in job_parts(job, [row]) for example in examples)


def loss_tokens(job: Job, row) -> int:
    """Labelled tokens a row adds to its step's normaliser: an example's; a pair's chosen answer's."""
    return sum(label != data.IGNORE_INDEX for label in objective_of(job).loss_example(row).labels[1:])


