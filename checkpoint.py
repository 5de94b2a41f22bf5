"""A checkpoint folder checked before any tensor is read: config.json's fields (each family's
CONFIG_FIELDS), the shard index, the safetensors headers, their keys and shapes against the model
built on the meta device. Every problem is a CheckpointError whose one-line message starts with
the file at fault. model.load_model calls check_checkpoint first.
"""
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable, NamedTuple

import torch


# ----------------------------------------------------------------------------- what a family declares

# Bounds on config.json's sizes: far above any released model, low enough that a typo or a
# hostile file (num_hidden_layers 1000000 builds for minutes) stops before the model is built.
MAX_LAYERS = 1024


MAX_HIDDEN = 65536            # hidden_size (Llama 3.1 405B: 16384)


MAX_INTERMEDIATE = 2**20      # MLP width (405B: 53248)


MAX_HEADS = 1024              # query and key/value heads


MAX_HEAD_DIM = 1024


MAX_VOCAB = 2**22             # largest hub vocabularies are ~256k


MAX_POSITIONS = 2**24         # max_position_embeddings, seq_length, sliding_window


class ConfigFields(NamedTuple):
    """The config.json fields a family's from_hf reads, for check_checkpoint to check before
    anything is built: integers and their upper bounds (optional ones may be absent or null), numbers
    that must be finite and > 0, booleans, and how many key/value heads the config asks for."""
    required: dict[str, int]
    optional: dict[str, int]
    floats: tuple[str, ...]
    flags: tuple[str, ...]
    kv_heads: Callable[[dict], int | None]


# ----------------------------------------------------------------------------- checks

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


def _check_config(config_file: Path, config, families: dict) -> None:
    """Types and ranges of the config.json fields from_hf reads (the family's CONFIG_FIELDS), before
    anything is built."""
    if not isinstance(config, dict):
        raise _error(config_file, f"expected a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type not in families:
        raise _error(config_file, f"model_type {model_type!r} is not supported "
                                  f"(supported: {', '.join(families)})")
    fields = families[model_type].CONFIG_FIELDS
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


def check_checkpoint(path, families: dict) -> dict:
    """Check a checkpoint folder without reading any tensor: config.json's fields, the index and the
    safetensors headers, keys and shapes against the model built on meta (families: model.FAMILIES).
    Returns config.json.
    Each problem is a CheckpointError whose one-line message starts with the file at fault."""
    path = Path(path)
    if not path.is_dir():
        raise _error(path, "not a directory (expected a Hugging Face checkpoint folder)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise _error(config_file, f"not found (is {path} a Hugging Face checkpoint folder?)")
    config = _read_json(config_file)
    _check_config(config_file, config, families)
    try:
        with torch.device("meta"):
            family = families[config["model_type"]]
            model = family(family.Config.from_hf(config))
    except Exception as e:  # whatever the model code rejects, as one line naming the file
        if isinstance(e, KeyError):
            message = f"missing field {e}"
        elif isinstance(e, ValueError):  # from_hf's own messages start with "config.json: "
            message = str(e).removeprefix("config.json: ")
        else:
            message = f"{type(e).__name__}: {e}"
        raise _error(config_file, message) from None
    files = checkpoint_files(path)
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


def checkpoint_files(path: Path) -> list[Path]:
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


# ----------------------------------------------------------------------------- the weights' digest, for resume

FULL_DIGEST_BYTES = 64 * 2**20   # a weight file up to this size is hashed whole
SAMPLED_BLOCKS = 64              # else this many blocks of 4 KiB, spread evenly, with the size and header


def weights_digests(path) -> dict[str, str]:
    """{file: digest} of the base's weight files and their index, which a resumed run must find
    the same (jobs.input_digests); checkpoint_files' list, after check_checkpoint passed."""
    path = Path(path)
    indexes = [path / name for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json")]
    return {str(file): weights_digest(file) for file in [*filter(Path.is_file, indexes), *checkpoint_files(path)]}


def weights_digest(file: Path, full_below: int = FULL_DIGEST_BYTES) -> str:
    """sha256 of a weight file: of all of it when under `full_below` bytes; else of its size, its
    safetensors header (a .bin has none) and SAMPLED_BLOCKS blocks of 4 KiB spread evenly over it,
    a few hundred KiB read whatever the size. No mtime: a copied folder resumes. A change that misses
    every sampled block of a large file goes unseen; a re-save with other values changes them all."""
    digest, size = hashlib.sha256(), file.stat().st_size
    with open(file, "rb") as f:
        if size < full_below:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
            return digest.hexdigest()
        digest.update(size.to_bytes(8, "little"))
        if file.suffix == ".safetensors":   # check_checkpoint checked the header's length
            header_len = int.from_bytes(f.read(8), "little")
            digest.update(f.read(header_len))
        for i in range(SAMPLED_BLOCKS):
            f.seek(i * (size - 4096) // (SAMPLED_BLOCKS - 1))
            digest.update(f.read(4096))
    return "sampled:" + digest.hexdigest()
