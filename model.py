"""Load a Hugging Face checkpoint folder into our model: the one entry point, model.load_model.

check_checkpoint validates the folder first (config.json's fields, the shard index, safetensors
headers, keys and shapes) without reading a tensor. Then load_model picks the family by
config.json's model_type (FAMILIES, from each family module's MODEL_TYPES), builds the
model on the meta device and assigns the checkpoint's tensors shard by shard (single or sharded
safetensors, pytorch_model*.bin as a fallback) with a strict key check, quantizing Linears as
they are read when asked (quant.py).
Also the device and peak-memory helpers that train.py and bench.py share.
The model files import nothing from here.
"""
import ctypes
import json
import math
import os
import platform
import resource
import time
from pathlib import Path

import torch
import torch.nn as nn

import quant as Q
from chatglm import ChatGLM
from llama import Llama
from phi3 import Phi3


# ----------------------------------------------------------------------------- families

# config.json's model_type -> the family class that loads it. Each family declares its own facts as
# class attributes: MODEL_TYPES, Config (from_hf), CONFIG_FIELDS, LORA_TARGETS, DEFAULT_TARGETS,
# SHARED_INPUTS, OUTPUT_LAYER, RECOMPUTED_KEYS, MLORA_NAMES, FIXED_SHAPE_STEP.
FAMILIES = {model_type: family for family in (Llama, ChatGLM, Phi3) for model_type in family.MODEL_TYPES}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


# ----------------------------------------------------------------------------- checking

class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message is one line naming the file."""


MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header
# Bytes per element of the dtypes safetensors.torch reads (its _TYPES table).
SAFETENSORS_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1,
                           "F8_E5M2FNUZ": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4,
                           "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


def _error(file: Path, message: str) -> CheckpointError:
    return CheckpointError(f"{file}: {message}".replace("\n", " "))


def _read_json(file: Path):
    try:
        return json.loads(file.read_bytes().decode("utf-8"))
    except OSError as e:
        raise _error(file, f"cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise _error(file, f"not UTF-8 JSON: {e}") from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_config(config_file: Path, config) -> None:
    """Types and ranges of the config.json fields from_hf reads (the family's CONFIG_FIELDS), before
    anything is built."""
    if not isinstance(config, dict):
        raise _error(config_file, f"expected a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise _error(config_file, f"model_type {model_type!r} is not supported "
                                  f"(supported: {', '.join(FAMILIES)})")
    fields = FAMILIES[model_type].CONFIG_FIELDS
    for name, bound in {**fields.required, **fields.optional}.items():
        value = config.get(name)
        if value is None and name in fields.optional:  # from_hf falls back to a default or reads null as "none"
            continue
        if not _is_int(value) or not 1 <= value <= bound:
            raise _error(config_file, f"{name} must be an integer in [1, {bound}], got {value!r}")
    rope_dicts = []
    for name in ("rope_scaling", "rope_parameters"):
        if config.get(name) is not None and not isinstance(config[name], dict):
            raise _error(config_file, f"{name} must be an object or null, got {config[name]!r}")
        rope_dicts.append(config.get(name) or {})
    numbers = [(config, name) for name in fields.floats]
    numbers += [(rope, name) for rope in rope_dicts for name in ("rope_theta", "factor")]
    for where, name in numbers:
        value = where.get(name, 1.0)  # absent: from_hf's default
        if (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0
                or isinstance(value, float) and not math.isfinite(value)):  # json reads NaN, Infinity, 1e999
            raise _error(config_file, f"{name} must be a finite number > 0, got {value!r}")
    for name in fields.flags:
        if config.get(name) is not None and not isinstance(config[name], bool):
            raise _error(config_file, f"{name} must be true, false or null, got {config[name]!r}")
    hidden, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], fields.kv_heads(config)
    # from_hf derives head_dim = hidden_size // heads when config.json has none; releases that state
    # their own (Mistral Nemo: 5120 hidden, 32 heads of 128) still have a multiple of the heads.
    if hidden % heads:
        raise _error(config_file, f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    if kv_heads and heads % kv_heads:  # grouped-query attention: each kv head serves heads // kv_heads
        raise _error(config_file, f"num_attention_heads {heads} is not divisible by the {kv_heads} key/value heads")


def _safetensors_header(file: Path) -> dict[str, list[int]]:
    """{key: shape} from a safetensors header, checked against the file's size; no tensor is read.
    Format: 8-byte little-endian header length, a JSON header, then the data (safetensors README)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _error(file, f"{size} bytes: too short for a safetensors file")
        header_len = int.from_bytes(prefix, "little")
        if header_len > size - 8 or header_len > MAX_HEADER_BYTES:
            raise _error(file, f"header length {header_len} exceeds the file ({size} bytes) "
                               f"or the {MAX_HEADER_BYTES}-byte limit (truncated or not safetensors)")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _error(file, f"header is not UTF-8 JSON: {e}") from None
    if not isinstance(header, dict):
        raise _error(file, "header is not a JSON object")
    data_size = size - 8 - header_len
    shapes = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_DTYPE_BYTES:
            raise _error(file, f"tensor {key!r}: no known dtype in {entry!r}"[:300])
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
            raise _error(file, f"tensor {key!r}: shape {shape!r} is not a list of non-negative integers"[:300])
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(n) for n in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_size):
            raise _error(file, f"tensor {key!r}: data_offsets {offsets!r} are not within the file's "
                               f"{data_size} data bytes (truncated?)"[:300])
        nbytes = math.prod(shape) * SAFETENSORS_DTYPE_BYTES[entry["dtype"]]
        if offsets[1] - offsets[0] != nbytes:
            raise _error(file, f"tensor {key!r}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, "
                               f"its {entry['dtype']} shape {shape} needs {nbytes}")
        shapes[key] = shape
    return shapes


def check_checkpoint(path) -> dict:
    """Check a checkpoint folder without reading any tensor: config.json's fields, the index and the
    safetensors headers, keys and shapes against the model built on meta. Returns config.json.
    Each problem is a CheckpointError whose one-line message starts with the file at fault."""
    path = Path(path)
    if not path.is_dir():
        raise _error(path, "not a directory (expected a Hugging Face checkpoint folder)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise _error(config_file, f"not found (is {path} a Hugging Face checkpoint folder?)")
    config = _read_json(config_file)
    _check_config(config_file, config)
    try:
        with torch.device("meta"):
            model = build_model(config)
    except Exception as e:  # whatever the model code rejects, as one line naming the file
        if isinstance(e, KeyError):
            message = f"missing field {e}"
        elif isinstance(e, ValueError):  # from_hf's own messages start with "config.json: "
            message = str(e).removeprefix("config.json: ")
        else:
            message = f"{type(e).__name__}: {e}"
        raise _error(config_file, message) from None
    files = _checkpoint_files(path)
    if files[0].suffix != ".safetensors":  # pytorch_model*.bin: its keys are known only once unpickled
        for file in files:
            if file.stat().st_size == 0:
                raise _error(file, "empty file")
        return config
    shapes, found_in = {}, {}
    for file in files:
        for key, shape in _safetensors_header(file).items():
            if key in found_in:
                raise _error(file, f"tensor {key!r} is also in {found_in[key].name}")
            shapes[key], found_in[key] = shape, file
    # load_model's tolerance: a tied output weight may be absent or present, rope tables are recomputed.
    expected = {key: list(tensor.shape) for key, tensor in model.state_dict().items()}
    output_weight = f"{model.OUTPUT_LAYER}.weight"
    required = expected.keys() - {output_weight} if model.config.tie_word_embeddings else expected.keys()
    missing = sorted(required - shapes.keys())
    unexpected = sorted(k for k in shapes.keys() - expected.keys() if not k.endswith(model.RECOMPUTED_KEYS))
    if missing or unexpected:
        index = path / "model.safetensors.index.json"
        raise _error(index if index.exists() else files[0],
                     f"checkpoint does not match the {config['model_type']} model of config.json: "
                     f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                     f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for key, shape in shapes.items():
        if key in expected and shape != expected[key]:
            raise _error(found_in[key], f"tensor {key!r} has shape {shape}, config.json's model expects {expected[key]}")
    return config


# ----------------------------------------------------------------------------- loading

def _checkpoint_files(path: Path) -> list[Path]:
    """Single or sharded safetensors; pytorch_model*.bin only when no safetensors exist.
    An index must name plain files inside the folder that exist (CheckpointError otherwise)."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = path / index_name
        if index.exists():
            return _index_shards(path, index, Path(single).suffix)
        if (path / single).exists():
            return [path / single]
    raise _error(path, "no model.safetensors, sharded safetensors index or pytorch_model.bin")


def _index_shards(path: Path, index: Path, suffix: str) -> list[Path]:
    """The shards an index names: bare file names in the folder that exist, never a path out of it."""
    index_json = _read_json(index)
    weight_map = index_json.get("weight_map") if isinstance(index_json, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise _error(index, 'expected a JSON object with a non-empty "weight_map" object')
    shards = {}
    for name in weight_map.values():
        if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name
                or not name.endswith(suffix)):
            raise _error(index, f"shard {name!r} is not a plain {suffix} file name")
        if name in shards:
            continue
        # Checked on the path as written, not where a symlink points: the hub's cache folders
        # hold every file as a symlink into ../../blobs.
        file = path / name
        if Path(os.path.abspath(file)).parent != Path(os.path.abspath(path)):
            raise _error(index, f"shard {name!r} is outside {path}")
        if not file.is_file():
            raise _error(index, f"shard {name!r} does not exist")
        shards[name] = file
    return sorted(shards.values())


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


def keep_freed_memory() -> bool:
    """Process-wide, on Linux with glibc: memory freed by tensors stays in the process for the
    next ones (mallopt: allocations under 32 MiB from the heap, which is never trimmed), so the
    next step does not page-fault fresh pages in. train.py's command line and bench.py's worker
    processes set it. A fused step of 4 x 2 x 256 on 2 CPU cores: 4-5% faster (benchmarks.md);
    the base alone unchanged. Returns whether it was set."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3                     # <malloc.h>
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)) & bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def _proc_status(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        return None


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
