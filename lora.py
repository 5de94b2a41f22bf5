"""Many LoRA adapters on one frozen base, each batch row routed to its own adapter.

Read in this order: LoRAConfig; the variants (Adapter and the VARIANTS table: how each kind of
adapter starts, what it adds to the base output, which of its tensors train); MultiLoRALinear,
the layer, whose `reference_forward` is the definition (LoRA paper, section 4.1) in plain
autograd; then add_adapters / route / merge. `add_adapters` swaps the targeted nn.Linear
modules for MultiLoRALinear, which keeps the frozen `weight`/`bias` as its own attributes (so
a merged model saves under the hub's key names) and holds any number of named adapters.
The fused arithmetic that training runs instead (one autograd node per shared input, dropout
drawn independently of the fusion) is lora_update.py, tested equal to the definition.
peft_format.py saves and loads adapters in PEFT's format.
"""
import dataclasses
import itertools
import math
import typing
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora_update
import quant
from lora_update import DROPOUT_DRAWS, FUSE_OPTIONS, apply_dropout, concatenates, drawn_p, mix_seed, own_length  # noqa: F401

INITS = ("kaiming", "gaussian", "pissa", "olora")


@dataclass
class LoRAConfig:
    r: int = 8                      # rank of the update B @ A
    alpha: float = 16               # the update is scaled by alpha / r
    dropout: float = 0.0            # dropout on the adapter's input (PEFT's lora_dropout)
    targets: list[str] | None = None  # module names (the family's LORA_TARGETS); None: its DEFAULT_TARGETS
    variant: str = "lora"           # an entry of VARIANTS (below): lora | dora | pissa | olora | ...
    init: str = "kaiming"           # A's random draw: kaiming (PEFT's default) | gaussian (the paper's); pissa | olora: as variant
    use_rslora: bool = False        # scale alpha / sqrt(r) instead (rsLoRA, Kalajdzievski 2023)
    use_dora: bool = False          # PEFT's spelling of variant "dora"

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def resolved_variant(self) -> str:
        """The VARIANTS entry: `variant`, or the one PEFT's (and m-LoRA's) fields name: use_dora,
        init pissa | olora. Those stay the saved spelling, so PEFT and old configs read alike."""
        if self.use_dora:
            return "dora"
        return self.init if self.init in ("pissa", "olora") else self.variant


# ----------------------------------------------------------------------------- variants
# Each variant is an Adapter class: how it starts (init_weights), whether plain LoRA's
# s B A x carries it (`fused`: then lora_update.py's LoRAUpdate computes it with the layer's
# other adapters) or else its own `update` in plain autograd, and which of its tensors train.

class Adapter(nn.Module):
    """Plain LoRA on one layer (Hu et al. 2021): weights A [r, in], B [out, r], the update s B A x.
    The base of every variant: a variant changes what it must and declares it."""
    fused = True                          # s B A x: LoRAUpdate's plain arithmetic
    trains = ("lora_A", "lora_B")         # its tensors that train (the rest are frozen)
    reads_base = False                    # init_weights needs the base weight W
    additive = True                       # merging adds delta_weight to W, so unmerge can subtract it

    def __init__(self, in_features: int, out_features: int, cfg: LoRAConfig,
                 generator: torch.Generator, device, dtype: torch.dtype, base: torch.Tensor | None = None):
        super().__init__()
        self.config = cfg
        self.lora_A = nn.Linear(in_features, cfg.r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(cfg.r, out_features, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            self.init_weights(generator, base)
        for name, param in self.named_parameters():
            param.requires_grad_(name.partition(".")[0] in self.trains)

    def init_weights(self, generator: torch.Generator, base: torch.Tensor | None):
        """LoRA paper, section 4.1: B starts at zero so the adapted model starts as the base.
        A: PEFT's Kaiming-uniform (a=sqrt(5), nn.Linear's own rule) or the paper's Gaussian
        (std 1/r, as PEFT's init_lora_weights="gaussian"). Drawn on the CPU from the adapter's
        own generator, so the init is the same on every device."""
        cpu_A = torch.empty(self.lora_A.weight.shape, dtype=torch.float32)
        if self.config.init == "gaussian":
            cpu_A.normal_(0, 1 / self.config.r, generator=generator)
        else:
            nn.init.kaiming_uniform_(cpu_A, a=math.sqrt(5), generator=generator)
        self.lora_A.weight.copy_(cpu_A)
        nn.init.zeros_(self.lora_B.weight)

    @property
    def scaling(self) -> float:
        return self.config.scaling

    @property
    def is_variant(self) -> bool:
        """Needs its own update (not LoRAUpdate's plain x A^T B^T)."""
        return not self.fused

    def fused_tensors(self) -> list[torch.Tensor]:
        """What LoRAUpdate multiplies by: A [r, in], B [out, r]."""
        return [self.lora_A.weight, self.lora_B.weight]

    def fused_grads(self) -> tuple[bool, bool]:
        """Which of fused_tensors' A, B train: LoRAUpdate's backward computes only those gradients."""
        return "lora_A" in self.trains, "lora_B" in self.trains

    def lora_weight(self) -> torch.Tensor:
        """s B A [out, in]: what the adapter adds to the base weight."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def update(self, x: torch.Tensor, x_dropped: torch.Tensor, layer: "MultiLoRALinear") -> torch.Tensor:
        """What the adapter adds to the base output W x + b on these rows [.., out], in autograd:
        s B A drop(x) (x: the rows' input, x_dropped: with dropout; `layer`: for W)."""
        A, B = self.lora_A.weight, self.lora_B.weight
        return F.linear(F.linear(x_dropped.to(A.dtype), A), B) * self.scaling

    def delta_weight(self, W: torch.Tensor | None = None) -> torch.Tensor:
        """The update to the base weight W [out, in]: what merge adds."""
        return self.lora_weight()

    def peft_state(self, as_plain_lora: bool = False) -> dict[str, torch.Tensor]:
        """Its tensors under PEFT's names (after the module path)."""
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}

    def peft_fields(self) -> dict:
        """What it sets in PEFT's adapter_config.json beyond plain LoRA's fields."""
        return {}


class DoRA(Adapter):
    """Weight-decomposed LoRA (Liu et al. 2024): W' = m (W + s B A) / ||W + s B A||, row-wise,
    a learned magnitude m [out] (PEFT's lora_magnitude_vector); the norm is a constant in
    backward (the paper's section 4.3, as PEFT). Its rescaling of W is not a sum: own update."""
    fused = False
    trains = ("lora_A", "lora_B", "magnitude")
    reads_base = True
    additive = False

    def init_weights(self, generator: torch.Generator, base: torch.Tensor | None):
        super().init_weights(generator, base)   # m starts as the row norms of W + s B A, so W' starts as W
        self.magnitude = nn.Parameter(self.weight_norm(base).to(self.lora_A.weight.dtype))

    @torch.no_grad()
    def weight_norm(self, W: torch.Tensor) -> torch.Tensor:
        """||W + s B A|| per output row [out]: a constant in backward."""
        return torch.linalg.norm(W.to(self.lora_A.weight.dtype) + self.lora_weight(), dim=1)

    def update(self, x: torch.Tensor, x_dropped: torch.Tensor, layer: "MultiLoRALinear") -> torch.Tensor:
        delta = super().update(x, x_dropped, layer)
        W = layer.base_weight()
        scale = self.magnitude / self.weight_norm(W)                                  # [out]
        return (scale - 1) * F.linear(x_dropped.to(W.dtype), W).to(delta.dtype) + scale * delta

    def delta_weight(self, W: torch.Tensor | None = None) -> torch.Tensor:
        """m / ||W + s B A|| (W + s B A) - W."""
        delta = self.lora_weight()
        W = W.to(delta.dtype)
        return (self.magnitude / self.weight_norm(W))[:, None] * (W + delta) - W

    def peft_state(self, as_plain_lora: bool = False) -> dict[str, torch.Tensor]:
        return {**super().peft_state(), "lora_magnitude_vector": self.magnitude}

    def peft_fields(self) -> dict:
        return {"use_dora": True}


class PiSSA(Adapter):
    """PiSSA (Meng et al. 2024): A and B start as W's top-r singular triplets, sqrt(S/s) on each
    side, so s B0 A0 is W's best rank-r part, and the base becomes W - s B0 A0. The base is
    shared with other jobs, so it stays W and the adapter subtracts s B0 A0 x itself: its own
    update. B0, A0 are buffers (init_A, init_B). As PEFT's pissa_init."""
    fused = False
    reads_base = True

    def init_weights(self, generator: torch.Generator, base: torch.Tensor | None):
        A, B = self.from_weight(base.float(), self.config)
        self.lora_A.weight.copy_(A)
        self.lora_B.weight.copy_(B)
        self.register_buffer("init_A", A.to(self.lora_A.weight))
        self.register_buffer("init_B", B.to(self.lora_B.weight))

    @staticmethod
    def from_weight(W: torch.Tensor, cfg: LoRAConfig) -> tuple[torch.Tensor, torch.Tensor]:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        root = torch.sqrt(S[:cfg.r] / cfg.scaling)
        return root[:, None] * Vh[:cfg.r], U[:, :cfg.r] * root[None, :]

    def lora_weight(self) -> torch.Tensor:
        """s (B A - B0 A0)."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight - self.init_B @ self.init_A)

    def update(self, x: torch.Tensor, x_dropped: torch.Tensor, layer: "MultiLoRALinear") -> torch.Tensor:
        """s B A drop(x) - s B0 A0 x: the base as PiSSA leaves it, on the undropped x."""
        start = F.linear(F.linear(x.to(self.init_A.dtype), self.init_A), self.init_B) * self.scaling
        return super().update(x, x_dropped, layer) - start

    def peft_state(self, as_plain_lora: bool = False) -> dict[str, torch.Tensor]:
        """as_plain_lora: the plain LoRA of rank 2r that adds the same to the ORIGINAL base,
        s (B A - B0 A0) = s [B, B0] [A; -A0] (PEFT's own conversion for sharing such adapters)."""
        if not as_plain_lora:
            return super().peft_state()
        return {"lora_A.weight": torch.cat([self.lora_A.weight, -self.init_A]),
                "lora_B.weight": torch.cat([self.lora_B.weight, self.init_B], dim=1)}

    def peft_fields(self) -> dict:
        """Saved as plain LoRA of rank 2r (peft_state), same scale."""
        cfg = self.config
        return {"r": 2 * cfg.r, "lora_alpha": cfg.alpha * (math.sqrt(2) if cfg.use_rslora else 2)}


class OLoRA(PiSSA):
    """OLoRA (Büyükakyüz 2024): PiSSA's scheme with W = QR, B0 = Q[:, :r], A0 = R[:r]. As PEFT's olora_init."""

    @staticmethod
    def from_weight(W: torch.Tensor, cfg: LoRAConfig) -> tuple[torch.Tensor, torch.Tensor]:
        Q, R = torch.linalg.qr(W)
        return R[:cfg.r].contiguous(), Q[:, :cfg.r].contiguous()


class LoRAFA(Adapter):
    """LoRA-FA (Zhang et al. 2023): A stays frozen at its random init, only B trains; plain
    LoRA's arithmetic, without A's gradient (nor the input saved for it)."""
    trains = ("lora_B",)


VARIANTS: dict[str, type[Adapter]] = {   # LoRAConfig.variant -> its Adapter class
    "lora": Adapter,
    "dora": DoRA,
    "pissa": PiSSA,
    "olora": OLoRA,
    "lora-fa": LoRAFA,
}


class RouteGroup(NamedTuple):
    """The rows of the fused batch that one adapter owns (in a packed batch: its tokens)."""
    name: str
    rows: slice | torch.Tensor      # a slice when contiguous, else an index tensor
    length: int | None              # the longest of its rows (right padding), None: all T
    seed: int | None                # this forward's dropout seed, drawn from the job's RNG
    row_lengths: tuple[int, ...] | None = None   # real tokens of each of its rows (right padding)
    tokens: tuple[int, torch.Tensor] | None = None   # data parallel: (the adapter's real tokens in the
                                    # whole step, which of them are here): masks drawn for all, these kept


@dataclass
class Routing:
    """Which rows of the fused batch belong to which adapter, set by `route` (or graphs.route_tokens)."""
    groups: list[RouteGroup]
    cache: dict                      # per-row coefficients of the concatenated path, by adapter set
    packed: bool = False             # one packed row [1, N]: groups own token ranges, not rows
    tokens: typing.Any = None        # graphs.TokenRouting (route_tokens): every adapter through the concatenated path
    concatenated: bool = False       # all adapters through shared matmuls (lora.concatenates), else per adapter
    dropout_draw: str = "auto"       # auto: dropped positions on CPUs, bool masks on GPUs; masks: masks everywhere
    reference: bool = False          # every layer by its definition (MultiLoRALinear.reference_forward)


class MultiLoRALinear(nn.Module):
    """A frozen Linear plus named LoRA adapters; y = x W^T + b + adapter(x) per row.

    The base may be quantized (quant.QuantLinear, QLoRA): it is then kept whole as `quantized`
    and `weight` is None until a merge dequantizes it. `seed` (from the module's path) makes
    each layer's dropout masks differ from the other layers'; the layers that read the same
    input (the family's SHARED_INPUTS, e.g. q/k/v) share it (mask_key), so an adapter's dropout
    mask is one per shared input, and are computed together (forward_siblings, LoRAUpdate).
    """

    def __init__(self, base: nn.Linear | quant.QuantLinear, seed: int):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.quantized = base if isinstance(base, quant.QuantLinear) else None
        self.weight = base.weight if self.quantized is None else None
        self.bias = base.bias if self.quantized is None else None
        self.adapters = nn.ModuleDict()   # name -> Adapter
        self.merged: set[str] = set()
        self.routing: Routing | None = None
        self.seed = seed

    def adapts(self, name: str) -> bool:
        """Adapter `name` is on this layer and not merged into its weights."""
        return name in self.adapters and name not in self.merged

    def add_adapter(self, name: str, cfg: LoRAConfig, generator: torch.Generator, dtype: torch.dtype):
        device = (self.weight if self.quantized is None else self.quantized.weight).device
        variant = VARIANTS[cfg.resolved_variant]
        base = self.base_weight() if variant.reads_base else None
        if hasattr(base, "full_tensor"):   # a sharded base (FSDP2's DTensor): the whole weight (a collective)
            base = base.full_tensor()
        self.adapters[name] = variant(self.in_features, self.out_features, cfg, generator, device, dtype, base)

    def base_weight(self) -> torch.Tensor:
        """The base's weight [out, in], dequantized when quantized (a new tensor each call)."""
        return self.weight if self.quantized is None else self.quantized.dequantize()

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:  # dequantizes once for the whole fused batch
            return self.quantized(x)
        return F.linear(x, self.weight, self.bias)

    def dequantize_base(self):
        """Replace a quantized base by its dequantized weights (what the adapters were trained against)."""
        base = self.quantized
        del self.quantized
        self.quantized = None
        self.weight = nn.Parameter(base.dequantize(), requires_grad=False)
        self.bias = base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_siblings(x, (self,))[0]

    def forward_siblings(self, x: torch.Tensor, linears) -> list[torch.Tensor]:
        """Each of `linears` applied to x: this layer and the others that read the same input
        (q/k/v, gate/up: llama.project; any may be a plain Linear). The LoRA layers that some
        routed adapter adapts are computed together: in one autograd node (lora_update.add_updates),
        or by their definition (route's reference)."""
        routing = self.routing
        routed = [] if routing is None else routing.tokens.names if routing.tokens is not None else \
            [group.name for group in routing.groups]
        together = [m for m in linears if isinstance(m, MultiLoRALinear) and any(map(m.adapts, routed))]
        if not together:
            outs = []
        elif routing.reference:
            outs = [layer.reference_forward(x) for layer in together]
        elif routing.tokens is not None:
            outs = lora_update.token_updates(together, x)
        else:   # two faster ways to the same sum (bench.py measured both), chosen by `route` (lora.concatenates)
            outs = lora_update.add_updates(together, x, routing.concatenated)
        done = dict(zip(map(id, together), outs))
        return [done[id(m)] if id(m) in done else m.unadapted_forward(x) if isinstance(m, MultiLoRALinear) else m(x)
                for m in linears]

    def unadapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base alone, all rows at once [B, T, out]: no routed adapter is on this layer."""
        if self.routing is None and self.training and len(self.adapters) > len(self.merged):
            # Training with adapters but no rows routed: surely a forward (or, under
            # activation checkpointing, a backward) outside `with lora.route(...)`.
            raise RuntimeError("a LoRA layer ran in training mode with no routing: call the model "
                               "inside `with lora.route(model, names):` (under activation "
                               "checkpointing, run backward inside it too), or call model.eval()")
        return self.base_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The definition, in plain autograd (LoRA paper, section 4.1: h = W0 x + s B A x, s = alpha/r).
        The base output W0 x + b for every row; then on each adapter's rows (up to their own
        padded length) its update, from its input with dropout as PEFT's lora_dropout:
        s B A drop(x) for plain LoRA, or the variant's own (Adapter.update). The fused paths
        (lora_update.add_updates) compute the same sum faster, tested equal to this."""
        routing = self.routing
        B, T = (x.numel() // x.size(-1), 1) if routing.packed else x.shape[:2]   # what the groups index
        xs = x.reshape(B, T, x.size(-1))                                          # [B, T, in]
        out = self.base_forward(xs.reshape(B * T, -1)).view(B, T, self.out_features)   # [B, T, out]
        for group in routing.groups:
            if not self.adapts(group.name):
                continue
            adapter = self.adapters[group.name]
            length = own_length(group, T)
            rows = xs[group.rows, :length]                                        # [b, L, in]
            dropped, p = rows, adapter.config.dropout
            if self.training and p > 0:   # the same draw as the fused paths', so the same masks
                keep = self.dropout_keep(group, rows.shape, x.device, p)
                dropped = apply_dropout(rows, keep) / (1 - drawn_p(p))
            delta = adapter.update(rows, dropped, self)                           # [b, L, out]
            out[group.rows, :length] += delta.to(out.dtype)
        return out.view(*x.shape[:-1], self.out_features)

    def dropout_keep(self, group: RouteGroup, shape: torch.Size, device, p: float) -> torch.Tensor | None:
        """The group's dropout on this layer's input (lora_update.dropout_keep), or None without
        dropout: seeded by this forward's seed for the adapter and this layer's mask key (which
        the siblings share), so every path draws the same masks."""
        if p == 0:
            return None
        if group.seed is None:
            raise RuntimeError("lora.route was entered with the model in eval mode; call model.train() first")
        return lora_update.dropout_keep(group, shape, device, p, mix_seed(group.seed, self.seed),
                                        self.routing.dropout_draw)

    def extra_repr(self) -> str:
        ranks = {n: a.config.r for n, a in self.adapters.items()}
        return f"in={self.in_features}, out={self.out_features}, adapters={ranks}"


# ----------------------------------------------------------------------------- adapters

def lora_layers(model: nn.Module):
    """(module path, MultiLoRALinear) for every LoRA-wrapped layer."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)]


def adapter_names(model: nn.Module) -> list[str]:
    names = {}
    for _, layer in lora_layers(model):
        names.update(dict.fromkeys(layer.adapters.keys()))
    return list(names)


def adapter_configs(layers: list["MultiLoRALinear"]) -> dict[str, LoRAConfig]:
    """Each adapter's config, by name, from these LoRA layers (lora_layers' or a part of them)."""
    return {name: adapter.config for layer in layers for name, adapter in layer.adapters.items()}


def adapter_seed(seed: int, name: str) -> int:
    """A stable per-adapter seed, so an adapter's init never depends on its neighbours."""
    return mix_seed(seed, zlib.crc32(name.encode()))


def add_adapters(model: nn.Module, configs: dict[str, LoRAConfig], *, seed: int = 0,
                 dtype: torch.dtype = torch.float32):
    """Add each named adapter to the layers named in its targets (the family's module names).

    The model states its own facts (llama.Llama, chatglm.ChatGLM): LORA_TARGETS, the names
    an adapter may target, DEFAULT_TARGETS for a config that names none, and SHARED_INPUTS,
    the sets of layers that read the same input (their dropout masks are one: mask_key).
    """
    existing = adapter_names(model)
    for name, cfg in configs.items():
        if not name or "." in name:
            raise ValueError(f"adapter name {name!r}: must be non-empty and contain no '.'")
        if name in existing:
            raise ValueError(f"adapter {name!r} already exists")
        targets = list(model.DEFAULT_TARGETS if cfg.targets is None else cfg.targets)
        bad = [t for t in targets if t not in model.LORA_TARGETS]
        if bad or not targets:
            raise ValueError(f"adapter {name!r}: targets {bad or targets} are not LoRA targets of "
                             f"{model.config.model_type}; valid targets: {', '.join(model.LORA_TARGETS)}")
        if cfg.r < 1:
            raise ValueError(f"adapter {name!r}: r must be >= 1, got {cfg.r}")
        if cfg.init not in INITS:
            raise ValueError(f"adapter {name!r}: init {cfg.init!r}: expected one of {', '.join(INITS)}")
        if cfg.use_dora and cfg.init in ("pissa", "olora"):
            raise ValueError(f"adapter {name!r}: use_dora with init {cfg.init!r} is not supported")
        if cfg.variant not in VARIANTS or cfg.variant not in ("lora", cfg.resolved_variant):
            raise ValueError(f"adapter {name!r}: variant {cfg.variant!r}: expected one of {', '.join(VARIANTS)}, "
                             "and not also use_dora or init pissa | olora")
        cfg = dataclasses.replace(cfg, targets=targets)   # stored with the layers, saved by save_peft
        generator = torch.Generator().manual_seed(adapter_seed(seed, name))
        for layer in wrap_targets(model, targets):
            layer.add_adapter(name, cfg, generator, dtype)
    mark_only_lora_trainable(model)
    return model


def wrap_targets(model: nn.Module, targets) -> list["MultiLoRALinear"]:
    """Every layer named in targets as a MultiLoRALinear (a plain linear is swapped for one
    holding it); returns them. With all of model.LORA_TARGETS before the base is sharded
    (FSDP2, dist.py): adapters added later then live in layers FSDP already knows."""
    layers = []
    for path, module in list(model.named_modules()):
        if path.rsplit(".", 1)[-1] not in targets:
            continue
        if isinstance(module, (nn.Linear, quant.QuantLinear)):
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            module = MultiLoRALinear(module, seed=zlib.crc32(mask_key(model, path).encode()))
            module.train(parent.training)  # a new module starts in training mode: follow the model
            setattr(parent, child, module)
        if isinstance(module, MultiLoRALinear):
            layers.append(module)
    return layers


def mask_key(model: nn.Module, path: str) -> str:
    """What a layer's dropout masks are seeded by: its path, or for layers that read the same
    input (q/k/v) their shared name, "...self_attn.q_proj+k_proj+v_proj". Set by the path
    alone, so a job's masks never depend on which other layers some adapter wraps.

    One mask per shared input and adapter, where PEFT draws one per layer: each layer's
    update still sees its input dropped with probability p, as in PEFT; only the masks of
    q, k and v (gate and up) are now the same draw. That lets LoRAUpdate drop the input once
    and run it through the three A's in one matmul.
    """
    parent, _, child = path.rpartition(".")
    for names in model.SHARED_INPUTS:
        if child in names:
            return f"{parent}.{'+'.join(names)}"
    return path


def remove_adapter(model: nn.Module, name: str):
    for _, layer in lora_layers(model):
        if name in layer.merged:
            raise ValueError(f"adapter {name!r} is merged; unmerge it before removing")
        if name in layer.adapters:
            del layer.adapters[name]


def adapter_parameters(model: nn.Module, name: str, kind: str | None = None) -> list[nn.Parameter]:
    """The adapter's trainable tensors (its variant's `trains`), layer by layer; kind: only
    those whose name starts with it ("lora_A", "lora_B", "magnitude")."""
    params = []
    for _, layer in lora_layers(model):
        if name in layer.adapters:
            params += [p for n, p in layer.adapters[name].named_parameters()
                       if p.requires_grad and (kind is None or n.startswith(kind))]
    if not params and name not in adapter_names(model):
        raise KeyError(f"no adapter named {name!r}; adapters: {adapter_names(model)}")
    return params


def mark_only_lora_trainable(model: nn.Module, verbose: bool = False):
    """Freeze everything but the adapters, whose own tensors train as each one's variant says
    (set when it was made: Adapter.trains); print the counts when verbose."""
    owned = {id(p) for _, layer in lora_layers(model) for p in layer.adapters.parameters()}
    for param in model.parameters():
        if id(param) not in owned:
            param.requires_grad_(False)
    if verbose:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")


@contextmanager
def route(model: nn.Module, names: list[str | None], *, lengths=None,
          generators: dict[str, torch.Generator] | None = None, packed: bool = False,
          dropout_tokens: dict[str, tuple[int, torch.Tensor]] | None = None, elsewhere: tuple[str, ...] = (),
          fuse: bool | None = None, dropout_draw: str = "auto", reference: bool = False):
    """Route batch row i to adapter names[i] (None: the base alone) inside the block.

    lengths [B] (real tokens per row, right padding) trims each adapter's work to its own
    rows' padded length. With packed (data.pack: every example end to end in one row), names
    and lengths are per example and each adapter owns its examples' tokens. generators (CPU)
    gives each adapter its own dropout RNG stream: one seed is drawn from it per `route`, and
    every layer's mask follows from that seed, so a recomputed forward (activation
    checkpointing: run backward inside the block) draws the same masks. Adapters without a
    generator draw their seed from torch's global RNG.

    Data parallel (dist.py): each rank holds some of a step's examples. dropout_tokens[name] =
    (the adapter's real tokens in the whole step, the positions of this rank's among them):
    every mask is drawn for the whole step and this rank's part kept, so the masks are the
    ones one process draws. `elsewhere`: adapters in the step with no example here; their seed
    is drawn all the same, so that their streams stay in step on every rank.

    fuse: all adapters of a layer through shared matmuls (True), per adapter (False), or as
    suits the device (None; lora.concatenates). dropout_draw "auto": dropped positions on CPUs
    (lora_update.drop_positions), bool masks on GPUs (keep_mask, no host sync); "masks": masks
    everywhere (the GPU's draw, e.g. to test it on a CPU). reference: every layer by its
    definition in plain autograd (MultiLoRALinear.reference_forward), slower. Every path
    computes the same sum.
    """
    if dropout_draw not in DROPOUT_DRAWS:
        raise ValueError(f"route: dropout_draw {dropout_draw!r}: expected one of {', '.join(DROPOUT_DRAWS)}")
    layers = [layer for _, layer in lora_layers(model)]
    configs = adapter_configs(layers)
    unknown = {n for n in names if n is not None and n not in configs}
    if unknown:
        raise KeyError(f"route: no adapter named {sorted(unknown)}; adapters: {sorted(configs)}")
    if packed and lengths is None:
        raise ValueError("route: a packed batch needs the examples' lengths")
    lengths = None if lengths is None else [int(n) for n in lengths]
    device = next(model.parameters()).device
    ends = None if lengths is None else list(itertools.accumulate(lengths))   # packed token ends
    groups = []
    for name in elsewhere:
        draw_seed(model, configs[name], (generators or {}).get(name))
    dropout_tokens = dropout_tokens or {}
    for name in dict.fromkeys(n for n in names if n is not None):
        idx = [i for i, n in enumerate(names) if n == name]
        contiguous = idx == list(range(idx[0], idx[-1] + 1))
        seed = draw_seed(model, configs[name], (generators or {}).get(name))
        if packed:  # its examples' tokens, laid end to end: rows of one token each
            if not contiguous:
                raise ValueError(f"route: adapter {name!r}'s examples must be adjacent in a packed batch")
            groups.append(RouteGroup(name, slice(ends[idx[0]] - lengths[idx[0]], ends[idx[-1]]), None, seed,
                                     tokens=dropout_tokens.get(name)))
            continue
        rows = slice(idx[0], idx[-1] + 1) if contiguous else torch.tensor(idx, device=device)
        own = None if lengths is None else tuple(lengths[i] for i in idx)
        groups.append(RouteGroup(name, rows, None if own is None else max(own), seed, own, dropout_tokens.get(name)))
    with routed(layers, Routing(groups, cache={}, packed=packed, concatenated=concatenates(device, fuse),
                                dropout_draw=dropout_draw, reference=reference)):
        yield


def draw_seed(model: nn.Module, cfg: LoRAConfig, generator: torch.Generator | None) -> int | None:
    """An adapter's dropout seed for one forward (None: no dropout now), the next from its stream."""
    if model.training and cfg.dropout > 0:
        return int(torch.randint(2**62, (), generator=generator))
    return None


@contextmanager
def routed(layers: list[MultiLoRALinear], routing: Routing):
    """Every LoRA layer reads `routing` inside the block, and none after it."""
    for layer in layers:
        layer.routing = routing
    try:
        yield
    finally:
        for layer in layers:
            layer.routing = None


# ----------------------------------------------------------------------------- merge

def merge(model: nn.Module, name: str):
    """Fold adapter `name` into the base weights (every row then sees it).

    A quantized base is dequantized first: the adapter goes into the dequantized weights,
    which are what it was trained against (re-quantizing would lose most of the update).
    """
    dequantized = []
    for _, layer in lora_layers(model):
        if layer.adapts(name):
            if layer.quantized is not None:
                dequantized.append(layer.quantized.quant)
                layer.dequantize_base()
            with torch.no_grad():
                layer.weight += layer.adapters[name].delta_weight(layer.weight).to(layer.weight.dtype)
            layer.merged.add(name)
    if dequantized:
        print(f"merge {name!r}: {len(dequantized)} layers had a quantized ({', '.join(sorted(set(dequantized)))}) "
              f"base; merged into their DEQUANTIZED weights, which the adapter was trained against")


def unmerge(model: nn.Module, name: str):
    """Take a merged adapter out again by subtraction (not DoRA: its rescaling of W is not a sum)."""
    for _, layer in lora_layers(model):
        if name in layer.merged and not layer.adapters[name].additive:
            raise ValueError(f"adapter {name!r} is DoRA: merging rescaled each row of the weight, which "
                             "subtraction cannot undo; reload the base instead")
        if name in layer.merged:
            with torch.no_grad():
                layer.weight -= layer.adapters[name].delta_weight().to(layer.weight.dtype)
            layer.merged.discard(name)


def dequantize(model: nn.Module) -> int:
    """Dequantize the whole base (quant.dequantize), LoRA layers included with their adapters
    kept; returns how many layers."""
    count = 0
    for _, layer in lora_layers(model):
        if layer.quantized is not None:
            layer.dequantize_base()
            count += 1
    return count + quant.dequantize(model)
