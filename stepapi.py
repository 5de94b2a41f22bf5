"""The step-level training API's engine (issue 33): the client owns the training loop, the
engine owns the model, as in Tinker's client: forward_backward, optim_step, sample, save, load,
each per LoRA. A layer: nothing in the core imports it; service.py / serve.py put it behind HTTP.

Calls of DIFFERENT LoRAs that wait at the same moment run as ONE fused forward and backward over
the shared frozen base (each row routed to its own adapter, lora.route), and each client's
log-probs, loss and gradients are those it would get alone (to float reassociation); sampling
is fused alike (generate.generate_rows), each call drawing from its own generator.

Read in this order: the wire types, the losses (LOSSES: one table), the checks that refuse a bad
call before any batch is built (so it fails alone), then Engine. One caller at a time: the
engine is not thread-safe (the service's trainer thread owns it).
"""
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch

import data
import files
import generate
import lora
import objectives
import peft_format

ENGINE_FILE = "engine_state.pt"   # beside a saved PEFT adapter: what continues training exactly (PEFT ignores it)


# ----------------------------------------------------------------------------- the wire types

@dataclass
class Datum:
    """One sequence. Position t of `tokens` (the model's input) predicts targets[t] (Tinker's
    alignment: targets are the tokens shifted by one). Per-token lists have len(tokens) values."""
    tokens: list[int]
    targets: list[int]
    weights: list[float] | None = None      # each token's loss weight (None: all 1); carries any normalisation
    logprobs: list[float] | None = None     # RL losses: the log-prob of each target when it was sampled
    advantages: list[float] | None = None   # RL losses: each token's advantage


class Call(NamedTuple):
    """One client's forward_backward request on one LoRA."""
    lora_id: str
    data: list[Datum]
    loss_fn: str = "cross_entropy"          # an entry of LOSSES
    loss_fn_config: dict | None = None      # the loss's settings (LOSSES[loss_fn].config: their defaults)


@dataclass
class Result:
    logprobs: list[list[float]]             # each datum's log-prob of each target (the training forward's)
    loss: float                             # the call's loss, a sum over its tokens


@dataclass
class SampleCall:
    lora_id: str | None                     # None: the bare base model
    prompt: list[int]
    n: int = 1                              # completions of this prompt
    temperature: float = 1.0                # 0: greedy
    top_p: float = 1.0
    max_tokens: int = 16
    stop: list[int | str] = field(default_factory=list)   # token ids and/or strings that end a completion
    seed: int | None = None                 # None: one drawn from the engine's own RNG


@dataclass
class Completion:
    tokens: list[int]                       # up to and including the stop id or the token that ends a stop string
    logprobs: list[float]                   # each token's log-prob under the model at temperature 1 (see sample)
    stop_reason: str                        # "stop" or "length"


@dataclass
class SampleResult:
    completions: list[Completion]


# ----------------------------------------------------------------------------- the losses
# Each is a sum over the call's tokens (Tinker's convention): weights carry any normalisation.
# logp [n]: the model's log-prob of each target now; inputs: the datums' per-token fields [n],
# "weights" always there (1 where a datum gives none).

def cross_entropy(logp: torch.Tensor, inputs: dict, config: dict) -> torch.Tensor:
    """-sum(weights * logp): supervised learning's negative log-likelihood."""
    return -(inputs["weights"] * logp).sum()


def importance_sampling(logp: torch.Tensor, inputs: dict, config: dict) -> torch.Tensor:
    """-sum(weights * ratio * advantages), ratio = p / q = exp(logp - sampling logp): REINFORCE
    with an importance weight for the sampler q (Tinker's importance_sampling, which has no
    weights: here they default to 1 and mask or scale tokens, e.g. 0 on the prompt)."""
    ratio = torch.exp(logp - inputs["logprobs"])
    return -(inputs["weights"] * ratio * inputs["advantages"]).sum()


def ppo(logp: torch.Tensor, inputs: dict, config: dict) -> torch.Tensor:
    """-sum(weights * min(ratio A, clip(ratio, 1 - clip_low, 1 + clip_high) A)): PPO's clipped
    surrogate (Schulman et al. 2017, eq. 7), token by token as Tinker's ppo."""
    ratio, advantages = torch.exp(logp - inputs["logprobs"]), inputs["advantages"]
    clipped = ratio.clamp(1 - config["clip_low"], 1 + config["clip_high"])
    return -(inputs["weights"] * torch.minimum(ratio * advantages, clipped * advantages)).sum()


class Loss(NamedTuple):
    fn: Callable[[torch.Tensor, dict, dict], torch.Tensor]
    needs: tuple[str, ...]                  # per-token fields a datum must give besides tokens, targets
    config: dict                            # loss_fn_config's fields and their defaults


LOSSES = {   # Call.loss_fn names its entry
    "cross_entropy": Loss(cross_entropy, (), {}),
    "importance_sampling": Loss(importance_sampling, ("logprobs", "advantages"), {}),
    "ppo": Loss(ppo, ("logprobs", "advantages"), {"clip_low": 0.2, "clip_high": 0.2}),
}

# optim_step's settings and defaults: Tinker's AdamParams (beta2 0.95, eps 1e-12, decoupled
# weight decay, grad_clip_norm 0 = none); "learning_rate", Tinker's spelling of lr, is read too.
ADAM_DEFAULTS = {"lr": 1e-4, "beta1": 0.9, "beta2": 0.95, "eps": 1e-12, "weight_decay": 0.0, "grad_clip_norm": 0.0}
ADAM_CHECKS = {"lr": (0, math.inf), "beta1": (0, 1), "beta2": (0, 1), "eps": (1e-30, math.inf),
               "weight_decay": (0, math.inf), "grad_clip_norm": (0, math.inf)}   # [low, high)

# create_lora's fields: LoRAConfig's own spellings (variant: an entry of lora.VARIANTS), and seed.
LORA_CHECKS = {
    "r": (lambda v: type(v) is int and v >= 1, "an integer >= 1"),
    "alpha": (lambda v: is_number(v) and v > 0, "a number > 0"),
    "dropout": (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "targets": (lambda v: isinstance(v, list) and bool(v) and all(isinstance(t, str) for t in v),
                "a non-empty list of module names"),
    "variant": (lambda v: v in lora.VARIANTS, f"one of {', '.join(lora.VARIANTS)}"),
    "init": (lambda v: v in ("kaiming", "gaussian"), "kaiming or gaussian"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false (rsLoRA: scale alpha / sqrt(r))"),
    "seed": (lambda v: type(v) is int, "an integer"),
    # train.py's job of this name with the same seed: its initial weights and dropout stream (jobs.add_job),
    # which depend on the adapter's name (lora.adapter_seed); examples/sft_api.py reproduces a job with it.
    "init_as": (lambda v: isinstance(v, str) and bool(v), "a non-empty job name"),
}


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ----------------------------------------------------------------------------- checks (a bad call fails alone)

class Checked(NamedTuple):
    """A checked forward_backward call, ready for the fused batch."""
    lora_id: str
    examples: list[data.Example]            # tokens + one pad, labels [-100] + targets (objectives.token_losses' layout)
    lengths: list[int]                      # each datum's tokens
    inputs: dict[str, torch.Tensor]         # per-token fields, all datums end to end [n] (CPU)
    loss: Loss
    config: dict


def token_ids(values, name: str, vocab: int) -> list[int]:
    if not isinstance(values, list) or not values:
        raise ValueError(f"{name}: expected a non-empty list of token ids")
    if any(type(t) is not int or not 0 <= t < vocab for t in values):
        raise ValueError(f"{name}: token ids must be integers in [0, {vocab})")
    return values


def per_token(values, name: str, length: int) -> torch.Tensor:
    """A per-token field as a float32 tensor [length], or ValueError naming it."""
    if not isinstance(values, list) or not all(is_number(v) for v in values):
        raise ValueError(f"{name}: expected a list of finite numbers")
    if len(values) != length:
        raise ValueError(f"{name}: {len(values)} values for {length} tokens")
    return torch.tensor(values, dtype=torch.float32)


def check_datum(i: int, datum: Datum, loss: Loss, vocab: int, max_length: int | None, pad_id: int):
    """(its data.Example, its per-token inputs) or ValueError: the call is refused."""
    if not isinstance(datum, Datum):
        raise ValueError(f"data[{i}]: expected a Datum, got {type(datum).__name__}")
    tokens = token_ids(datum.tokens, f"data[{i}].tokens", vocab)
    targets = token_ids(datum.targets, f"data[{i}].targets", vocab)
    if len(targets) != len(tokens):
        raise ValueError(f"data[{i}].targets: {len(targets)} values for {len(tokens)} tokens")
    if max_length is not None and len(tokens) > max_length:
        raise ValueError(f"data[{i}].tokens: {len(tokens)} tokens, over the maximum length {max_length}")
    inputs = {"weights": torch.ones(len(tokens)) if datum.weights is None
              else per_token(datum.weights, f"data[{i}].weights", len(tokens))}
    for name in loss.needs:
        if getattr(datum, name) is None:
            raise ValueError(f"data[{i}].{name}: missing (the loss needs it)")
        inputs[name] = per_token(getattr(datum, name), f"data[{i}].{name}", len(tokens))
    # One pad token after the sequence, so that the last target has a label position (labels are
    # aligned with the input: logits[t] against labels[t + 1]); it adds no token to the loss.
    return data.Example(tokens + [pad_id], [data.IGNORE_INDEX] + targets), inputs


def loss_config(loss_fn, config) -> tuple[Loss, dict]:
    if loss_fn not in LOSSES:
        raise ValueError(f"loss_fn {loss_fn!r}: expected one of {', '.join(LOSSES)}")
    loss, config = LOSSES[loss_fn], config or {}
    unknown = sorted(set(config) - set(loss.config)) if isinstance(config, dict) else ["(not a dict)"]
    if unknown:
        raise ValueError(f"loss_fn_config {unknown[0]!r}: {loss_fn} takes {', '.join(loss.config) or 'none'}")
    bad = [name for name, v in config.items() if not (is_number(v) and 0 <= v <= 1)]
    if bad:
        raise ValueError(f"loss_fn_config {bad[0]!r}: expected a number in [0, 1], got {config[bad[0]]!r}")
    return loss, {**loss.config, **config}


def adam_settings(adam: dict | None) -> dict:
    """optim_step's settings with their defaults (ADAM_DEFAULTS), or ValueError naming the field."""
    adam = {"lr" if k == "learning_rate" else k: v for k, v in (adam or {}).items()}
    for name, value in adam.items():
        if name not in ADAM_CHECKS:
            raise ValueError(f"adam {name!r}: unknown; fields: {', '.join(ADAM_DEFAULTS)}")
        low, high = ADAM_CHECKS[name]
        if not (is_number(value) and low <= value < high):
            raise ValueError(f"adam {name}={value!r}: expected a number in [{low}, {high})")
    return {**ADAM_DEFAULTS, **adam}


def check_sample_fields(call: SampleCall, vocab: int, max_length: int | None, tokenizer) -> None:
    """ValueError naming the first field of a sample call that is not allowed."""
    token_ids(call.prompt, "prompt", vocab)
    checks = {"n": type(call.n) is int and call.n >= 1, "max_tokens": type(call.max_tokens) is int and call.max_tokens >= 1,
              "temperature": is_number(call.temperature) and call.temperature >= 0,
              "top_p": is_number(call.top_p) and 0 < call.top_p <= 1, "seed": call.seed is None or type(call.seed) is int,
              "stop": isinstance(call.stop, list) and all(type(s) is int or (isinstance(s, str) and s) for s in call.stop)}
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise ValueError(f"{bad[0]}={getattr(call, bad[0])!r}: not allowed (n, max_tokens >= 1; temperature >= 0; "
                         "0 < top_p <= 1; stop: token ids and non-empty strings)")
    if max_length is not None and len(call.prompt) + call.max_tokens > max_length:
        raise ValueError(f"max_tokens: prompt + max_tokens = {len(call.prompt) + call.max_tokens}, "
                         f"over the maximum length {max_length}")
    if tokenizer is None and any(isinstance(s, str) for s in call.stop):
        raise ValueError("stop: strings need the engine's tokenizer (it has none)")


def check_each(calls: list, check) -> tuple[list, dict]:
    """(each call's slot: its ValueError, else None for now; {slot: the checked call})."""
    results, valid = [None] * len(calls), {}
    for i, call in enumerate(calls):
        try:
            valid[i] = check(call)
        except ValueError as e:
            results[i] = e
    return results, valid


def completion(call: SampleCall, tokens: list[int], logprobs: list[float], tokenizer) -> Completion:
    """A row's tokens cut at max_tokens, at its first stop id, or at the token that ends its
    first stop string, whichever comes first (that token kept, as generate keeps EOS)."""
    tokens, logprobs = tokens[:call.max_tokens], logprobs[:call.max_tokens]
    end = next((k + 1 for k, t in enumerate(tokens) if t in call.stop), None)
    strings = [s for s in call.stop if isinstance(s, str)]
    if strings and any(s in tokenizer.decode(tokens[:end]) for s in strings):
        end = next(k for k in range(1, len(tokens) + 1) if any(s in tokenizer.decode(tokens[:k]) for s in strings))
    return Completion(tokens[:end], logprobs[:end], "length" if end is None else "stop")


# ----------------------------------------------------------------------------- the engine

@dataclass
class LoRAState:
    config: lora.LoRAConfig
    seed: int                               # its init (lora.adapter_seed) and dropout stream
    optimizer: torch.optim.AdamW
    generator: torch.Generator              # its dropout stream (lora.route's generators)
    step: int = 0                           # optimizer steps taken


class Engine:
    """The LoRAs on one loaded base model (model.load_model; frozen, shared), each with its own
    config, AdamW optimizer and step counter; gradients accumulate in a LoRA's parameters from
    forward_backward until its optim_step. packed: a fused batch as one packed row (data.pack),
    else padded rows; max_length: the longest sequence taken (default: the model's positions)."""

    def __init__(self, model, tokenizer: data.Tokenizer | None, device, seed: int = 0, *,
                 packed: bool = True, max_length: int | None = None, prefix: str = "lora-"):
        self.model, self.tokenizer, self.device, self.seed, self.packed = model, tokenizer, device, seed, packed
        self.prefix = prefix   # of the ids: the service's ("_lora-") no job name can take
        self.vocab = model.get_submodule(model.OUTPUT_LAYER).weight.size(0)   # ids the model scores
        self.max_length = max_length or getattr(model.config, "max_position_embeddings", None)
        self.pad_id = tokenizer.pad_id if tokenizer is not None else 0
        self.loras: dict[str, LoRAState] = {}
        self.created = 0
        self.rng = torch.Generator().manual_seed(seed)   # the seeds of sample calls that give none

    # -- LoRAs

    def create_lora(self, config: dict | None = None) -> str:
        """A new LoRA (fields: LORA_CHECKS; targets default to all of the family's LORA_TARGETS,
        variant "lora", dropout 0); returns its id. Its init depends on its id (lora.adapter_seed)
        unless init_as names the train.py job whose init it takes."""
        config = check_lora_fields(config)
        seed, init_as = config.pop("seed", self.seed), config.pop("init_as", None)
        cfg = lora.LoRAConfig(**{"targets": list(self.model.LORA_TARGETS), **config})
        lora_id = self.new_id()
        lora.add_adapters(self.model, {lora_id: cfg}, seed=seed)   # ValueError naming the field (targets, variant)
        if init_as is not None:   # train.py's job of that name: its weights (before the optimizer holds them)
            redraw_as(self.model, lora_id, cfg, seed, init_as)
        s = self.loras[lora_id] = self.new_state(lora_id, cfg, seed)
        if init_as is not None:   # and its dropout stream (jobs.add_job)
            s.generator.manual_seed(lora.mix_seed(lora.adapter_seed(seed, init_as), 1))
        return lora_id

    def new_id(self) -> str:
        self.created += 1
        return f"{self.prefix}{self.created:04d}"

    def new_state(self, lora_id: str, cfg: lora.LoRAConfig, seed: int) -> LoRAState:
        optimizer = torch.optim.AdamW(lora.adapter_parameters(self.model, lora_id), lr=ADAM_DEFAULTS["lr"])
        return LoRAState(cfg, seed, optimizer, torch.Generator().manual_seed(lora.adapter_seed(seed, lora_id)))

    def remove_lora(self, lora_id: str):
        """The LoRA's adapter and optimizer dropped (its memory freed)."""
        self.state(lora_id)
        lora.remove_adapter(self.model, lora_id)
        del self.loras[lora_id]

    def state(self, lora_id) -> LoRAState:
        if lora_id not in self.loras:
            raise ValueError(f"lora_id {lora_id!r}: no such LoRA")
        return self.loras[lora_id]

    # -- training

    def forward_backward(self, calls: list[Call]) -> list[Result | Exception]:
        """Every valid call in ONE forward and backward (fused_pass); a call refused by its
        checks gets its ValueError in its slot and the others run as they would without it."""
        results, valid = check_each(calls, self.check_call)
        for i, result in zip(valid, self.fused_pass([checked for checked in valid.values()])):
            results[i] = result
        return results

    def check_call(self, call: Call) -> Checked:
        if not isinstance(call, Call):
            raise ValueError(f"expected a Call, got {type(call).__name__}")
        self.state(call.lora_id)
        loss, config = loss_config(call.loss_fn, call.loss_fn_config)
        if not isinstance(call.data, list) or not call.data:
            raise ValueError("data: expected a non-empty list of Datum")
        checked = [check_datum(i, d, loss, self.vocab, self.max_length, self.pad_id) for i, d in enumerate(call.data)]
        inputs = {name: torch.cat([fields[name] for _, fields in checked]) for name in checked[0][1]}
        return Checked(call.lora_id, [example for example, _ in checked], [len(d.tokens) for d in call.data],
                       inputs, loss, config)

    def fused_pass(self, calls: list[Checked]) -> list[Result]:
        """The calls' rows in one batch (one LoRA's calls adjacent: lora.route wants an adapter's
        packed rows together), one forward routed row by row, each call's loss on its own
        tokens' log-probs, one backward of their sum. The log-probs come from
        objectives.token_losses (the chunked log-softmax over the whole vocabulary)."""
        if not calls:
            return []
        rank = {lora_id: i for i, lora_id in enumerate(dict.fromkeys(c.lora_id for c in calls))}
        order = sorted(range(len(calls)), key=lambda k: rank[calls[k].lora_id])
        ordered = [calls[k] for k in order]
        batch = data.make_batch([(c.lora_id, c.examples) for c in ordered], self.pad_id, self.packed).to(self.device)
        generators = {c.lora_id: self.loras[c.lora_id].generator for c in ordered}
        self.model.train()   # the adapters' dropout, as training's step
        with lora.route(self.model, batch.adapter_names, lengths=batch.lengths, generators=generators,
                        packed=batch.packed):
            token_nll, _ = objectives.token_losses(self.model, batch)                  # [N], datums end to end
            logps = (-token_nll).split([sum(c.lengths) for c in ordered])
            losses = torch.stack([c.loss.fn(logp, {k: v.to(logp.device) for k, v in c.inputs.items()}, c.config)
                                  for c, logp in zip(ordered, logps)])
            losses.sum().backward()   # inside the block: a recomputed block (checkpointing) routes alike
        values, all_logps = losses.detach().tolist(), (-token_nll).detach().tolist()   # syncs the device
        results, start = [None] * len(calls), 0
        for k, c, loss in zip(order, ordered, values):
            per_datum = []
            for n in c.lengths:
                per_datum.append(all_logps[start:start + n])
                start += n
            results[k] = Result(per_datum, loss)
        return results

    def optim_step(self, lora_id: str, adam: dict | None = None) -> dict:
        """AdamW on the LoRA's parameters with these settings (adam_settings; the gradient
        clipped to grad_clip_norm first when > 0), then its gradients cleared. A parameter with
        no gradient since the last step is left as it is (torch's rule). {"step": steps taken}."""
        s = self.state(lora_id)
        settings = adam_settings(adam)
        if settings["grad_clip_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(lora.adapter_parameters(self.model, lora_id), settings["grad_clip_norm"])
        for group in s.optimizer.param_groups:
            group.update(lr=settings["lr"], betas=(settings["beta1"], settings["beta2"]), eps=settings["eps"],
                         weight_decay=settings["weight_decay"])
        s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)
        s.step += 1
        return {"step": s.step}

    # -- sampling

    def sample(self, calls: list[SampleCall]) -> list[SampleResult | Exception]:
        """Every completion of every valid call in ONE batched generation (generate.generate_rows),
        each call drawing from its own generator (its seed), so it gets the same completions
        alone or fused with others. Each token's log-prob is the model's at temperature 1 over
        the whole output layer, whatever temperature and top_p sampled it: the quantity
        forward_backward returns, so an unchanged model's importance ratio is 1."""
        results, valid = check_each(calls, self.check_sample)
        if not valid:
            return results
        prompts, adapters, groups = [], [], []
        for call in valid.values():
            stop_ids = frozenset(t for t in call.stop if isinstance(t, int))
            generator = torch.Generator(device=self.device).manual_seed(call.seed)
            groups.append(generate.RowGroup(slice(len(prompts), len(prompts) + call.n), call.temperature, call.top_p,
                                            generator, stop_ids, call.max_tokens))
            prompts += [call.prompt] * call.n
            adapters += [call.lora_id] * call.n
        tokens, logprobs = generate.generate_rows(self.model, prompts, adapters, groups, max(g.max_new_tokens for g in groups),
                                                  self.pad_id, self.tokenizer.vocab_size if self.tokenizer else None)
        tokens, logprobs = tokens.tolist(), logprobs.tolist()   # syncs the device
        for (i, call), group in zip(valid.items(), groups):
            results[i] = SampleResult([completion(call, tokens[r], logprobs[r], self.tokenizer)
                                       for r in range(group.rows.start, group.rows.stop)])
        return results

    def check_sample(self, call: SampleCall) -> SampleCall:
        """The call with its seed drawn when it gives none, or ValueError naming the field."""
        if not isinstance(call, SampleCall):
            raise ValueError(f"expected a SampleCall, got {type(call).__name__}")
        if call.lora_id is not None:
            self.state(call.lora_id)
        check_sample_fields(call, self.vocab, self.max_length, self.tokenizer)
        seed = call.seed if call.seed is not None else int(torch.randint(2**62, (), generator=self.rng))
        return dataclasses.replace(call, seed=seed)

    # -- saving

    def save(self, lora_id: str, folder) -> None:
        """The LoRA as a PEFT adapter folder (peft_format.save_peft), and beside it ENGINE_FILE:
        its config, seed, step, optimizer state, dropout stream and exact tensors (every
        variant's, e.g. PiSSA's starting point, which PEFT's plain-LoRA form folds away), so
        that load continues training exactly. The PEFT folder is replaced as a whole first, so
        a kill in between leaves it without ENGINE_FILE (load then starts a fresh optimizer)."""
        s = self.state(lora_id)
        peft_format.save_peft(self.model, lora_id, folder)
        record = {"config": dataclasses.asdict(s.config), "seed": s.seed, "step": s.step,
                  "optimizer": s.optimizer.state_dict(), "dropout_rng": s.generator.get_state(),
                  "adapter": {path: layer.adapters[lora_id].state_dict() for path, layer in lora.lora_layers(self.model)
                              if lora_id in layer.adapters}}
        files.atomic_write(Path(folder) / ENGINE_FILE, write=lambda tmp: torch.save(record, tmp))

    def load(self, folder) -> str:
        """A saved LoRA as a new one; returns its id. With ENGINE_FILE it continues exactly where
        save left it; a PEFT folder without one (trained elsewhere) starts a fresh optimizer."""
        folder, lora_id = Path(folder), self.new_id()
        if not (folder / ENGINE_FILE).exists():
            peft_format.load_peft(self.model, folder, lora_id)
            cfg = peft_format.adapter_config(self.model, lora_id)
            self.loras[lora_id] = self.new_state(lora_id, cfg, self.seed)
            return lora_id
        record = torch.load(folder / ENGINE_FILE, map_location="cpu", weights_only=True)
        cfg = lora.LoRAConfig(**record["config"])
        add_saved_adapter(self.model, lora_id, cfg, record, folder / ENGINE_FILE)
        s = self.loras[lora_id] = self.new_state(lora_id, cfg, record["seed"])
        s.optimizer.load_state_dict(record["optimizer"])
        s.step = record["step"]
        s.generator.set_state(record["dropout_rng"])
        return lora_id


def check_lora_fields(config: dict | None) -> dict:
    """create_lora's fields checked by LORA_CHECKS (a copy), or ValueError naming the field."""
    config = dict(config or {})
    for name, value in config.items():
        if name not in LORA_CHECKS:
            raise ValueError(f"create_lora: unknown field {name!r}; fields: {', '.join(LORA_CHECKS)}")
        ok, expected = LORA_CHECKS[name]
        if not ok(value):
            raise ValueError(f"create_lora: {name}={value!r}: expected {expected}")
    return config


def redraw_as(model, lora_id: str, cfg: lora.LoRAConfig, seed: int, job_name: str):
    """The LoRA's weights drawn again as train.py draws those of its job `job_name` with this seed
    (lora.add_adapters: one generator, layer by layer in the model's order). A second draw:
    add_adapters seeds by the adapter's own name, and the core stays as it is."""
    generator = torch.Generator().manual_seed(lora.adapter_seed(seed, job_name))
    for _, layer in lora.lora_layers(model):
        if lora_id in layer.adapters:
            layer.add_adapter(lora_id, cfg, generator, torch.float32)   # replaces it (add_adapters' dtype)


def add_saved_adapter(model, lora_id: str, cfg: lora.LoRAConfig, record: dict, file: Path):
    """The adapter as Engine.save recorded it, every tensor exact, or ValueError when it does not fit."""
    lora.add_adapters(model, {lora_id: cfg}, seed=record["seed"])
    try:
        for path, layer in lora.lora_layers(model):
            if lora_id in layer.adapters:
                layer.adapters[lora_id].load_state_dict(record["adapter"][path])
    except (KeyError, RuntimeError) as e:
        lora.remove_adapter(model, lora_id)
        raise ValueError(f"{file}: does not fit this model ({str(e).splitlines()[0]})") from None
