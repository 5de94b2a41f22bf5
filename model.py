"""Load a Hugging Face checkpoint folder into our model: the one entry point, model.load_model.

check_checkpoint validates the folder first (config.json's fields, the shard index, safetensors
headers, keys and shapes) without reading a tensor. Then load_model picks the family by
config.json's model_type (FAMILIES, from each family module's MODEL_TYPES), builds the
model on the meta device and assigns the checkpoint's tensors shard by shard (single or sharded
safetensors, pytorch_model*.bin as a fallback) with a strict key check, quantizing Linears as
they are read when asked (quant.py).
Also resolve_device and resolve_dtype, which train.py and bench.py share. The model files import nothing from here.
"""
import time
from pathlib import Path

import torch
import torch.nn as nn

import quant as Q
from checkpoint import CheckpointError, checkpoint_files  # noqa: F401
from checkpoint import check_checkpoint as check_folder
from scheduler import peak_memory, reset_peak_memory
from chatglm import ChatGLM
from gemma import Gemma2, Gemma3
from glm import Glm, Glm4
from llama import Llama
from olmo2 import Olmo2
from phi3 import Phi3
from qwen3 import Qwen3


# ----------------------------------------------------------------------------- families

# config.json's model_type -> the family class that loads it. Each family declares its own facts as
# class attributes: MODEL_TYPES, Config (from_hf), CONFIG_FIELDS, LORA_TARGETS, DEFAULT_TARGETS,
# SHARED_INPUTS, OUTPUT_LAYER, RECOMPUTED_KEYS, MLORA_NAMES, FIXED_SHAPE_STEP, NOT_SUPPORTED (README's table), logit_softcap.
FAMILIES = {model_type: family for family in (Llama, ChatGLM, Phi3, Qwen3, Olmo2, Glm, Glm4, Gemma2, Gemma3) for model_type in family.MODEL_TYPES}


# ----------------------------------------------------------------------------- loading


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
    matmuls without native support (no AVX512-BF16/AMX) run several times slower than fp32."""
    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype {dtype!r}: expected auto, float32, bfloat16 or float16")
        return getattr(torch, dtype)
    return dtype


def check_checkpoint(path) -> dict:
    """The folder checked without reading a tensor (checkpoint.py); returns its config.json."""
    return check_folder(path, FAMILIES)


def build_model(hf_config: dict) -> nn.Module:
    """The family of config.json's model_type (FAMILIES), its config mapped by its from_hf."""
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"config.json: model_type {model_type!r} is not supported (supported: {', '.join(FAMILIES)})")
    family = FAMILIES[model_type]
    return family(family.Config.from_hf(hf_config))


def load_model(path, *, dtype: torch.dtype | str | None = None, device: str = "cpu",
               quant: str | None = None) -> nn.Module:
    """Build on the meta device and assign the checkpoint's tensors: one copy in memory.

    dtype None keeps the checkpoint's own dtype ("auto": see resolve_dtype). Every parameter must come from the
    checkpoint (tied lm_head excepted) and every checkpoint key must be used. quant
    (quant.QUANT_TYPES) quantizes each Linear but the output head as its weight is read.
    The folder is checked first (check_checkpoint): a bad one is a one-line CheckpointError.
    """
    Q.check_quant(quant)
    path, device = Path(path), resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    t0 = time.time()
    config = check_checkpoint(path)  # CheckpointError before any tensor is read
    with torch.device("meta"):
        model = build_model(config)
    quantized = Q.quantize_linears(model, quant, skip=model.OUTPUT_LAYER) if quant else {}  # {weight key: QuantLinear}
    memory_before = reset_peak_memory(device)
    expected = set(model.state_dict().keys())
    output_weight = f"{model.OUTPUT_LAYER}.weight"
    if model.config.tie_word_embeddings:
        expected.discard(output_weight)
    seen, unexpected = set(), []
    for file in checkpoint_files(path):
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
