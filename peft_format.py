"""Adapters in PEFT's format: adapter_config.json + adapter_model.safetensors, written as PEFT
writes them (save_peft, one folder replaced as a whole) and read back (load_peft)."""
import json
import os
from pathlib import Path

import torch
import torch.nn as nn

import files
import lora

PEFT_PREFIX = "base_model.model."


def adapter_config(model: nn.Module, name: str) -> lora.LoRAConfig:
    """The adapter's config, as it was added (targets resolved)."""
    return first_adapter(model, name).config


def first_adapter(model: nn.Module, name: str) -> lora.Adapter:
    """The adapter on its first layer (its variant and config are the same on all)."""
    for _, layer in lora.lora_layers(model):
        if name in layer.adapters:
            return layer.adapters[name]
    raise KeyError(f"no adapter named {name!r}; adapters: {lora.adapter_names(model)}")


def adapter_state(model: nn.Module, name: str, *, as_plain_lora: bool = False) -> dict[str, torch.Tensor]:
    """The adapter's weights under PEFT's keys (base_model.model.<module path>.lora_A.weight,
    DoRA's .lora_magnitude_vector). as_plain_lora: a PiSSA/OLoRA adapter as the plain LoRA of
    rank 2r that adds the same to the ORIGINAL base, s (B A - B0 A0) = s [B, B0] [A; -A0]
    (PEFT's own conversion for sharing such adapters)."""
    state = {}
    for path, layer in lora.lora_layers(model):
        if name in layer.adapters:
            for key, tensor in layer.adapters[name].peft_state(as_plain_lora).items():   # lora.Adapter.peft_state
                state[f"{PEFT_PREFIX}{path}.{key}"] = tensor
    return state


def save_peft(model: nn.Module, name: str, out_dir, base_model_path: str | None = None):
    """Write adapter_config.json + adapter_model.safetensors exactly as PEFT does, as a whole:
    both files go into a new folder that replaces `out_dir` in one step (replace_dir), so a
    reader or a kill never sees new weights beside an old config."""
    write_peft(out_dir, *peft_files(model, name, base_model_path))


def peft_files(model: nn.Module, name: str, base_model_path: str | None = None) -> tuple[dict, dict]:
    """What save_peft writes: (PEFT's adapter config, the weights by PEFT's keys, on the CPU)."""
    adapter = first_adapter(model, name)
    cfg = adapter.config
    state = {k: v.detach().contiguous().cpu() for k, v in adapter_state(model, name, as_plain_lora=True).items()}
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_path,
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": sorted(cfg.targets), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": cfg.use_rslora, "use_dora": False, "modules_to_save": None,
        # How the saved weights load: PiSSA/OLoRA were converted to plain LoRA on the original base.
        "init_lora_weights": cfg.init if cfg.init == "gaussian" else True,
        "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
        **adapter.peft_fields(),   # the variant's own (DoRA's use_dora; PiSSA's rank 2r)
    }
    return peft_config, state


def write_peft(out_dir, peft_config: dict, state: dict, extra: dict | None = None):
    """peft_files' config and weights (and `extra`, {file name: JSON}) as a PEFT folder, replacing out_dir as a whole."""
    import shutil
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files.atomic_write(tmp / "adapter_model.safetensors", write=lambda p: save_file(state, str(p), metadata={"format": "pt"}))
        for file, content in {"adapter_config.json": peft_config, **(extra or {})}.items():   # extra: ours beside PEFT's (training.json)
            files.atomic_write(tmp / file, json.dumps(content, indent=2) + "\n")
        files.replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    for key in ("layers_to_transform", "rank_pattern", "alpha_pattern", "modules_to_save"):
        if pc.get(key):
            raise ValueError(f"{config_file}: {key}={pc[key]!r} is not supported")
    if pc.get("bias", "none") != "none":
        raise ValueError(f"{config_file}: bias={pc['bias']!r} is not supported (only 'none')")
    targets = pc["target_modules"]
    if isinstance(targets, str):
        raise ValueError(f"{config_file}: target_modules as a regex ({targets!r}) is not supported; give a list")
    init = pc.get("init_lora_weights", True)
    cfg = lora.LoRAConfig(r=pc["r"], alpha=pc["lora_alpha"], dropout=pc.get("lora_dropout", 0.0),
                     targets=list(targets), use_rslora=pc.get("use_rslora", False), use_dora=pc.get("use_dora", False),
                     init=init if init in ("kaiming", "gaussian") else "kaiming")  # the weights come from the file
    lora.add_adapters(model, {name: cfg}, dtype=dtype)
    weights_file = adapter_dir / "adapter_model.safetensors"
    if weights_file.exists():
        state = load_file(str(weights_file))
    else:
        state = torch.load(adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True)
    expected = adapter_state(model, name)
    # PEFT sometimes keeps the adapter name in keys ("lora_A.default.weight"); accept both.
    state = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
             for k, v in state.items()}
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        lora.remove_adapter(model, name)
        raise KeyError(f"{weights_file}: keys do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for key, param in expected.items():
            if state[key].shape != param.shape:
                lora.remove_adapter(model, name)
                raise ValueError(f"{weights_file}: {key} has shape {tuple(state[key].shape)}, "
                                 f"the model expects {tuple(param.shape)}")
            param.copy_(state[key])
    return name
