"""Many LoRA adapters on one frozen base, each batch row routed to its own adapter.

`add_adapters` swaps the targeted nn.Linear modules for MultiLoRALinear, which keeps the
frozen `weight`/`bias` as its own attributes (so a merged model saves under the hub's key
names) and holds any number of named adapters with their own rank, alpha and dropout.
The base matmul runs once over the whole fused batch; each adapter's low-rank delta
runs only over its own rows. Adapters are saved and loaded in PEFT's format.
"""
import json
import math
import os
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import quant

# "cuda": all adapters of a layer in two matmuls on GPUs, a loop over adapters on CPUs
# (see MultiLoRALinear.forward); "always" / "never" force one way (tests compare them).
FUSE_ADAPTERS = "cuda"

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHATGLM_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
# The vocabulary projections are never LoRA targets (PEFT would need modules_to_save for them).
OUTPUT_LAYERS = ("lm_head", "transformer.output_layer")


@dataclass
class LoRAConfig:
    r: int = 8                      # rank of the update B @ A
    alpha: float = 16               # the update is scaled by alpha / r
    dropout: float = 0.0            # dropout on the adapter's input (PEFT's lora_dropout)
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    init: str = "kaiming"           # "kaiming" (PEFT's default) or "gaussian" (the paper's)
    use_rslora: bool = False        # scale alpha / sqrt(r) instead (rsLoRA), as PEFT allows


@dataclass
class Routing:
    """Which rows of the fused batch belong to which adapter, set by `route`."""
    # (adapter name, its rows as a slice or index tensor, its own padded length, its RNG)
    groups: list[tuple[str, slice | torch.Tensor, int | None, torch.Generator | None]]
    cache: dict = field(default_factory=dict)

    def coefficients(self, layer: "MultiLoRALinear", names: list[str], B: int, training: bool) -> torch.Tensor:
        """[B, 1, sum r]: row i's coefficient is its adapter's scale on that adapter's r columns
        (with dropout's 1/(1-p) folded in while training), 0 elsewhere. Cached per adapter set."""
        key = (tuple(names), tuple(layer.scaling[n] for n in names), training)
        if key not in self.cache:
            ranks = [layer.lora_A[n].out_features for n in names]
            coef = torch.zeros(B, 1, sum(ranks))
            start = 0
            for name, r in zip(names, ranks):
                rows = next(g[1] for g in self.groups if g[0] == name)
                p = layer.dropout[name] if training else 0.0
                coef[rows.cpu() if torch.is_tensor(rows) else rows, :, start:start + r] = layer.scaling[name] / (1 - p)
                start += r
            self.cache[key] = coef.to(device=layer.lora_A[names[0]].weight.device)
        return self.cache[key]


class MultiLoRALinear(nn.Module):
    """A frozen Linear plus named LoRA adapters; y = x W^T + b + scale * drop(x) A^T B^T per row.

    The base may be quantized (quant.QuantLinear, QLoRA): it is then kept whole as `quantized`
    and `weight` is None until a merge dequantizes it.
    """

    def __init__(self, base: nn.Linear | quant.QuantLinear):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.quantized = base if isinstance(base, quant.QuantLinear) else None
        self.weight = base.weight if self.quantized is None else None
        self.bias = base.bias if self.quantized is None else None
        self.lora_A = nn.ModuleDict()   # name -> Linear(in, r)
        self.lora_B = nn.ModuleDict()   # name -> Linear(r, out)
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.merged: set[str] = set()
        self.routing: Routing | None = None

    def add_adapter(self, name: str, cfg: LoRAConfig, generator: torch.Generator, dtype: torch.dtype):
        device = (self.weight if self.quantized is None else self.quantized.weight).device
        A = nn.Linear(self.in_features, cfg.r, bias=False, device=device, dtype=dtype)
        B = nn.Linear(cfg.r, self.out_features, bias=False, device=device, dtype=dtype)
        # LoRA paper, section 4.1: B starts at zero so the adapted model starts as the base.
        # A: PEFT's Kaiming-uniform (a=sqrt(5), nn.Linear's own rule) or the paper's Gaussian.
        with torch.no_grad():
            cpu_A = torch.empty(A.weight.shape, dtype=torch.float32)
            if cfg.init == "gaussian":
                cpu_A.normal_(0, 1 / cfg.r, generator=generator)
            else:
                nn.init.kaiming_uniform_(cpu_A, a=math.sqrt(5), generator=generator)
            A.weight.copy_(cpu_A)
            nn.init.zeros_(B.weight)
        self.lora_A[name], self.lora_B[name] = A, B
        self.scaling[name] = cfg.alpha / (math.sqrt(cfg.r) if cfg.use_rslora else cfg.r)
        self.dropout[name] = cfg.dropout

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

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.scaling[name] * self.lora_B[name].weight @ self.lora_A[name].weight   # [out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_forward(x)                                   # [B, T, out], all rows at once
        groups = [g for g in self.routing.groups if g[0] in self.lora_A and g[0] not in self.merged] \
            if self.routing is not None else []
        if not groups:
            return out
        # Two ways to the same sum (bench.py measured both): on a GPU the step is bound by
        # kernel launches, so all adapters go through two matmuls; on a CPU the k-fold
        # wasted flops of that cost more than small per-adapter matmuls.
        concatenated = FUSE_ADAPTERS == "always" or (FUSE_ADAPTERS == "cuda" and x.is_cuda)
        delta = self.delta_concatenated(x, groups) if concatenated else self.delta_per_adapter(x, groups)
        return out + delta.to(out.dtype)

    def delta_concatenated(self, x: torch.Tensor, groups) -> torch.Tensor:
        """Every row through the concatenated A's; a per-row coefficient keeps only its own
        adapter's r columns (times its scale) and zeroes the rest, so B_cat adds exactly that
        adapter's update. Two matmuls per layer whatever the number of adapters."""
        names = [g[0] for g in groups]
        A = torch.cat([self.lora_A[n].weight for n in names])               # [sum r, in]
        B = torch.cat([self.lora_B[n].weight for n in names], dim=1)        # [out, sum r]
        coef = self.routing.coefficients(self, names, x.size(0), self.training)  # [B, 1, sum r]
        if self.training and any(self.dropout[n] > 0 for n in names):
            x = x.masked_fill(~self.dropout_keep(groups, x), 0)
        return ((x.to(A.dtype) @ A.t()) * coef) @ B.t()                                 # [B, T, out]

    def delta_per_adapter(self, x: torch.Tensor, groups) -> torch.Tensor:
        """Each adapter's update on its own rows only, assembled into one [B, T, out] tensor."""
        B, T, _ = x.shape
        keep = self.dropout_keep(groups, x) if self.training and any(self.dropout[g[0]] > 0 for g in groups) else None
        pieces, covered = [], 0   # deltas of consecutive row ranges, zeros where no adapter applies
        delta = None
        for name, rows, _, _ in groups:
            A, B_ = self.lora_A[name].weight, self.lora_B[name].weight
            x_rows = x[rows]                                                  # [b, T, in]
            scale = self.scaling[name]
            if keep is not None and self.dropout[name] > 0:
                x_rows = x_rows.masked_fill(~keep[rows], 0)
                scale = scale / (1 - self.dropout[name])  # dropout's 1/(1-p), on the small [b, T, r]
            x_rows = x_rows.to(A.dtype)
            piece = ((x_rows @ A.t()) * scale) @ B_.t()                        # [b, T, out]
            if not isinstance(rows, slice):  # rows scattered through the batch
                delta = piece.new_zeros(B, T, piece.size(-1)) if delta is None else delta
                delta = delta.index_add(0, rows, piece)
                continue
            if rows.start > covered:
                pieces.append(piece.new_zeros(rows.start - covered, T, piece.size(-1)))
            pieces.append(piece)
            covered = rows.stop
        if pieces:
            if covered < B:
                pieces.append(pieces[0].new_zeros(B - covered, T, pieces[0].size(-1)))
            # One cat, not an in-place add per adapter: autograd would copy the whole output
            # gradient once per adapter for in-place slices.
            delta = torch.cat(pieces) if delta is None else delta + torch.cat(pieces)
        return delta

    def dropout_keep(self, groups, x: torch.Tensor) -> torch.Tensor:
        """The dropout mask [B, T, in] (bool: autograd keeps 1 byte an element, not 4): each
        adapter's rows drawn from its own RNG, over its own padded length only, so the mask
        does not depend on what the rows were fused with."""
        B, T, d = x.shape
        keep = torch.zeros(B, T, d, dtype=torch.bool, device=x.device)
        for name, rows, own_len, generator in groups:
            own_len = T if own_len is None else min(own_len, T)
            p = self.dropout[name]
            if p == 0:
                keep[rows, :own_len] = True
                continue
            n_rows = len(range(B)[rows]) if isinstance(rows, slice) else len(rows)
            mask = torch.empty(n_rows, own_len, d, dtype=torch.bool, device=x.device)
            keep[rows, :own_len] = mask.bernoulli_(1 - p, generator=generator)
        return keep

    def extra_repr(self) -> str:
        ranks = {n: a.out_features for n, a in self.lora_A.items()}
        return f"in={self.in_features}, out={self.out_features}, adapters={ranks}"


# ----------------------------------------------------------------------------- adapters

def lora_layers(model: nn.Module):
    """(module path, MultiLoRALinear) for every LoRA-wrapped layer."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)]


def adapter_names(model: nn.Module) -> list[str]:
    names = {}
    for _, layer in lora_layers(model):
        names.update(dict.fromkeys(layer.lora_A.keys()))
    return list(names)


def default_targets(model: nn.Module) -> list[str]:
    """The attention projections, as Alpaca-LoRA and m-LoRA's examples target by default."""
    if any(n.endswith(".query_key_value") for n, _ in model.named_modules()):
        return ["query_key_value", "dense"]  # ChatGLM: fused qkv and the attention output
    return ["q_proj", "k_proj", "v_proj", "o_proj"]


def adapter_seed(seed: int, name: str) -> int:
    """A stable per-adapter seed, so an adapter's init never depends on its neighbours."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def add_adapters(model: nn.Module, configs: dict[str, LoRAConfig], *, seed: int = 0,
                 dtype: torch.dtype = torch.float32):
    """Add each named adapter to the Linear layers named in its targets (HF module names)."""
    linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                           if isinstance(m, (nn.Linear, quant.QuantLinear, MultiLoRALinear))
                           and n not in OUTPUT_LAYERS and not n.endswith(".quantized")})
    existing = adapter_names(model)
    for name, cfg in configs.items():
        if not name or "." in name:
            raise ValueError(f"adapter name {name!r}: must be non-empty and contain no '.'")
        if name in existing:
            raise ValueError(f"adapter {name!r} already exists")
        bad = [t for t in cfg.targets if t not in linear_names]
        if bad or not cfg.targets:
            raise ValueError(f"adapter {name!r}: targets {bad or cfg.targets} not in this model; "
                             f"valid targets: {', '.join(linear_names)}")
        if cfg.r < 1:
            raise ValueError(f"adapter {name!r}: r must be >= 1, got {cfg.r}")
        generator = torch.Generator().manual_seed(adapter_seed(seed, name))
        for path, module in list(model.named_modules()):
            if path.rsplit(".", 1)[-1] not in cfg.targets:
                continue
            if isinstance(module, (nn.Linear, quant.QuantLinear)):
                parent_path, _, child = path.rpartition(".")
                parent = model.get_submodule(parent_path)
                module = MultiLoRALinear(module)
                module.train(parent.training)  # a new module starts in training mode: follow the model
                setattr(parent, child, module)
            if isinstance(module, MultiLoRALinear):
                module.add_adapter(name, cfg, generator, dtype)
    mark_only_lora_trainable(model)
    return model


def remove_adapter(model: nn.Module, name: str):
    for _, layer in lora_layers(model):
        if name in layer.merged:
            raise ValueError(f"adapter {name!r} is merged; unmerge it before removing")
        if name in layer.lora_A:
            del layer.lora_A[name], layer.lora_B[name]
            del layer.scaling[name], layer.dropout[name]


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    params = []
    for _, layer in lora_layers(model):
        if name in layer.lora_A:
            params += [layer.lora_A[name].weight, layer.lora_B[name].weight]
    if not params:
        raise KeyError(f"no adapter named {name!r}; adapters: {adapter_names(model)}")
    return params


def mark_only_lora_trainable(model: nn.Module, verbose: bool = False):
    """Freeze everything but the adapters' A and B; print the counts when verbose."""
    for pname, p in model.named_parameters():
        p.requires_grad_(".lora_A." in pname or ".lora_B." in pname)
    if verbose:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")


@contextmanager
def route(model: nn.Module, names: list[str | None], *, lengths=None,
          generators: dict[str, torch.Generator] | None = None):
    """Route batch row i to adapter names[i] (None: the base alone) inside the block.

    lengths [B] (real tokens per row, right padding) trims each adapter's work to its own
    rows' padded length; generators gives each adapter its own dropout RNG stream.
    """
    known = set(adapter_names(model))
    unknown = {n for n in names if n is not None and n not in known}
    if unknown:
        raise KeyError(f"route: no adapter named {sorted(unknown)}; adapters: {sorted(known)}")
    device = next(model.parameters()).device
    groups = []
    for name in dict.fromkeys(n for n in names if n is not None):
        idx = [i for i, n in enumerate(names) if n == name]
        contiguous = idx == list(range(idx[0], idx[-1] + 1))
        rows = slice(idx[0], idx[-1] + 1) if contiguous else torch.tensor(idx, device=device)
        own_len = None if lengths is None else int(max(int(lengths[i]) for i in idx))
        groups.append((name, rows, own_len, (generators or {}).get(name)))
    routing = Routing(groups) if groups else None
    layers = [layer for _, layer in lora_layers(model)]
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
        if name in layer.lora_A and name not in layer.merged:
            if layer.quantized is not None:
                dequantized.append(layer.quantized.quant)
                layer.dequantize_base()
            with torch.no_grad():
                layer.weight += layer.delta_weight(name).to(layer.weight.dtype)
            layer.merged.add(name)
    if dequantized:
        print(f"merge {name!r}: {len(dequantized)} layers had a quantized ({', '.join(sorted(set(dequantized)))}) "
              f"base; merged into their DEQUANTIZED weights, which the adapter was trained against")


def unmerge(model: nn.Module, name: str):
    for _, layer in lora_layers(model):
        if name in layer.merged:
            with torch.no_grad():
                layer.weight -= layer.delta_weight(name).to(layer.weight.dtype)
            layer.merged.discard(name)


# ----------------------------------------------------------------------------- PEFT format

PEFT_PREFIX = "base_model.model."


def adapter_config(model: nn.Module, name: str) -> LoRAConfig:
    """Recover an adapter's config from its layers (rank, alpha, dropout, targets)."""
    layers = [(p, m) for p, m in lora_layers(model) if name in m.lora_A]
    if not layers:
        raise KeyError(f"no adapter named {name!r}; adapters: {adapter_names(model)}")
    _, first = layers[0]
    r = first.lora_A[name].out_features
    return LoRAConfig(r=r, alpha=first.scaling[name] * r, dropout=first.dropout[name],
                      targets=sorted({p.rsplit(".", 1)[-1] for p, _ in layers}))


def _atomic_write(path: Path, write):
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_peft(model: nn.Module, name: str, out_dir, base_model_path: str | None = None):
    """Write adapter_config.json + adapter_model.safetensors exactly as PEFT does."""
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = adapter_config(model, name)
    state = {}
    for path, layer in lora_layers(model):
        if name in layer.lora_A:
            state[f"{PEFT_PREFIX}{path}.lora_A.weight"] = layer.lora_A[name].weight.detach().contiguous().cpu()
            state[f"{PEFT_PREFIX}{path}.lora_B.weight"] = layer.lora_B[name].weight.detach().contiguous().cpu()
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_path,
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": cfg.targets, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
        "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
    }
    _atomic_write(out_dir / "adapter_model.safetensors",
                  lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    _atomic_write(out_dir / "adapter_config.json",
                  lambda p: p.write_text(json.dumps(peft_config, indent=2) + "\n"))


def load_peft(model: nn.Module, adapter_dir, name: str | None = None, *, dtype: torch.dtype = torch.float32) -> str:
    """Load a PEFT LoRA folder as adapter `name` (default: the folder's name); returns the name."""
    from safetensors.torch import load_file
    adapter_dir = Path(adapter_dir)
    name = name or adapter_dir.resolve().name
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file}: not found")
    pc = json.loads(config_file.read_text())
    if pc.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_file}: peft_type {pc.get('peft_type')!r} is not LORA")
    for key in ("use_dora", "layers_to_transform", "rank_pattern", "alpha_pattern", "modules_to_save"):
        if pc.get(key):
            raise ValueError(f"{config_file}: {key}={pc[key]!r} is not supported")
    if pc.get("bias", "none") != "none":
        raise ValueError(f"{config_file}: bias={pc['bias']!r} is not supported (only 'none')")
    targets = pc["target_modules"]
    if isinstance(targets, str):
        raise ValueError(f"{config_file}: target_modules as a regex ({targets!r}) is not supported; give a list")
    cfg = LoRAConfig(r=pc["r"], alpha=pc["lora_alpha"], dropout=pc.get("lora_dropout", 0.0),
                     targets=list(targets), use_rslora=pc.get("use_rslora", False))
    add_adapters(model, {name: cfg}, dtype=dtype)
    weights_file = adapter_dir / "adapter_model.safetensors"
    if weights_file.exists():
        state = load_file(str(weights_file))
    else:
        state = torch.load(adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True)
    expected = {}
    for path, layer in lora_layers(model):
        if name in layer.lora_A:
            expected[f"{PEFT_PREFIX}{path}.lora_A.weight"] = layer.lora_A[name].weight
            expected[f"{PEFT_PREFIX}{path}.lora_B.weight"] = layer.lora_B[name].weight
    # PEFT sometimes keeps the adapter name in keys ("lora_A.default.weight"); accept both.
    state = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
             for k, v in state.items()}
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        remove_adapter(model, name)
        raise KeyError(f"{weights_file}: keys do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for key, param in expected.items():
            if state[key].shape != param.shape:
                remove_adapter(model, name)
                raise ValueError(f"{weights_file}: {key} has shape {tuple(state[key].shape)}, "
                                 f"the model expects {tuple(param.shape)}")
            param.copy_(state[key])
    return name
