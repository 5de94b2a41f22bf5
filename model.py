"""Load a Hugging Face checkpoint folder into our model: the one entry point, model.load_model.

Reads config.json, picks the family by its model_type (llama.py: llama, mistral, qwen2;
chatglm.py: chatglm), builds the model on the meta device and assigns the checkpoint's
tensors shard by shard (single or sharded safetensors, pytorch_model*.bin as a fallback)
with a strict key check, quantizing Linears as they are read when asked (quant.py).
Also the device and peak-memory helpers that train.py and bench.py share.
The model files import nothing from here.
"""
import json
import resource
import time
from pathlib import Path

import torch
import torch.nn as nn

import quant as Q
from chatglm import ChatGLM, ChatGLMConfig
from llama import Llama, LlamaConfig


# ----------------------------------------------------------------------------- loading

def _checkpoint_files(path: Path) -> list[Path]:
    """Single or sharded safetensors; pytorch_model*.bin only when no safetensors exist."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = path / index_name
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [path / s for s in shards]
        if (path / single).exists():
            return [path / single]
    raise FileNotFoundError(f"{path}: no model.safetensors, sharded safetensors index or pytorch_model.bin")


def _read_shard(file: Path, device: str):
    """Yield (key, tensor) from one shard, one tensor at a time."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(file), framework="pt", device=device) as f:
            keys = list(f.keys())
        for key in keys:
            # The file is mapped afresh per tensor: mapped pages count as resident memory
            # until unmapped, so one map for the whole shard would hold it all in RAM.
            with safe_open(str(file), framework="pt", device=device) as f:
                tensor = f.get_tensor(key)
            yield key, tensor
    else:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        yield from state.items()


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: torch.dtype | str | None, device: str) -> torch.dtype | None:
    """A torch dtype from its name; "auto": bfloat16 on CUDA, float32 on the CPU, where bf16
    matmuls without native support (no AVX512-BF16/AMX) ran 7x slower than fp32 here."""
    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype {dtype!r}: expected auto, float32, bfloat16 or float16")
        return getattr(torch, dtype)
    return dtype


def reset_peak_memory(device: str) -> float:
    """Start a new peak-memory window; returns the memory in use now (MiB)."""
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:  # Linux: "5" resets the peak resident set size (VmHWM) to the current one
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then peak_memory reports the process's lifetime peak
    return _proc_status("VmRSS") or 0.0


def peak_memory(device: str) -> float:
    """Peak memory (MiB) since reset_peak_memory: CUDA max_memory_allocated, CPU peak RSS."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _proc_status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _proc_status(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        return None


def build_model(hf_config: dict) -> nn.Module:
    """Pick the family from config.json's model_type (an explicit switch, no registry)."""
    if hf_config.get("model_type") == "chatglm":
        return ChatGLM(ChatGLMConfig.from_hf(hf_config))
    return Llama(LlamaConfig.from_hf(hf_config))


def load_model(path, *, dtype: torch.dtype | str | None = None, device: str = "cpu",
               quant: str | None = None) -> nn.Module:
    """Build on the meta device and assign the checkpoint's tensors: one copy in memory.

    dtype None keeps the checkpoint's own dtype ("auto": see resolve_dtype). Every parameter must come from the
    checkpoint (tied lm_head excepted) and every checkpoint key must be used. quant
    (quant.QUANT_TYPES) quantizes each Linear but the output head as its weight is read.
    """
    Q.check_quant(quant)
    path, device = Path(path), resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file}: not found (is {path} a Hugging Face checkpoint folder?)")
    t0 = time.time()
    with torch.device("meta"):
        model = build_model(json.loads(config_file.read_text()))
    quantized = Q.quantize_linears(model, quant, skip=model.OUTPUT_LAYER) if quant else {}  # {weight key: QuantLinear}
    memory_before = reset_peak_memory(device)
    expected = set(model.state_dict().keys())
    output_weight = f"{model.OUTPUT_LAYER}.weight"
    if model.config.tie_word_embeddings:
        expected.discard(output_weight)
    seen, unexpected = set(), []
    for file in _checkpoint_files(path):
        state = {}
        for key, tensor in _read_shard(file, "cpu" if file.suffix != ".safetensors" else device):
            if key not in expected:
                # Some tied checkpoints still carry the output weight; rope tables are recomputed.
                if key == output_weight or key.endswith(model.RECOMPUTED_KEYS):
                    continue
                unexpected.append(key)
                continue
            tensor = tensor.to(device=device, dtype=dtype if dtype is not None else tensor.dtype)
            if key in quantized:  # the full-precision tensor is dropped as soon as it is quantized
                quantized[key].quantize_(tensor)
                seen.add(key)
                continue
            state[key] = tensor
        model.load_state_dict(state, strict=False, assign=True)
        seen |= state.keys()
        del state
    missing = sorted(expected - seen)
    if missing or unexpected:
        raise KeyError(f"{path}: checkpoint does not match the model: missing {missing[:10]}"
                       f"{' ...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}"
                       f"{' ...' if len(unexpected) > 10 else ''}")
    model.tie_weights()
    # Buffers built on meta are recomputed on the real device (always fp32 for rope).
    model.reset_buffers(device)
    model.requires_grad_(False)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters()) + sum(q.in_features * q.out_features
                                                                for q in quantized.values())
    peak = peak_memory(device)
    print(f"loaded {path} ({model.config.model_type}, {n_params / 1e6:.1f}M params, "
          f"{next(model.parameters()).dtype}{f', {quant} base' if quant else ''}, {device}) in {time.time() - t0:.1f}s; "
          f"weights {Q.model_bytes(model) / 2**20:.1f} MiB, peak {'GPU memory' if device.startswith('cuda') else 'RSS'} "
          f"{peak:.0f} MiB ({peak - memory_before:+.0f} MiB while loading)")
    return model
