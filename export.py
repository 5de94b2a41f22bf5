"""`python train.py --merge out/JOB --to DIR [--base DIR] [--quant Q]`: a trained adapter merged into
its base and written as a Hugging Face folder, checked against base + adapter, never over
anything this did not write.
"""
import json
import os
import shutil
from pathlib import Path

import torch

import files
import lora
import model as M
from config import ConfigError
import peft_format

MERGE_MARKER = "merged_from.json"   # in every folder export_merged writes: the only kind it replaces
FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")   # what a merged checkpoint's weights may be stored as


def check_merge_target(to: Path, inputs: list[Path]):
    """--merge writes `to` only where it destroys nothing it did not create: not inside an
    adapter or training run folder, not over a folder of anything else, nor over its inputs."""
    to = to.resolve()
    for folder in (to, *to.parents):
        if (folder / "adapter_config.json").exists() or (folder / "metrics.jsonl").exists():
            raise ConfigError(f"--to {to}: inside {folder}, an adapter or training run folder; choose a folder outside it")
    for path in inputs:
        if to == path.resolve() or to in path.resolve().parents:
            raise ConfigError(f"--to {to}: would replace {path}, an input of the merge")
    if to.exists() and (not to.is_dir() or any(to.iterdir()) and not (to / MERGE_MARKER).exists()):
        raise ConfigError(f"--to {to}: exists and is not a merge written by train.py ({MERGE_MARKER}); "
                          f"choose another folder or remove it")


def stored_dtype(stored: dict, config_file: Path) -> str:
    """The dtype the base's weights are stored in (config.json's torch_dtype, or dtype as newer
    transformers write it; float32 when neither), which the merge is written in: a float dtype."""
    key = "torch_dtype" if stored.get("torch_dtype") else "dtype"
    dtype = stored.get(key) or "float32"
    if dtype not in FLOAT_DTYPES:
        raise ConfigError(f"{config_file}: {key}: expected one of {', '.join(FLOAT_DTYPES)}, got {dtype!r}")
    return dtype


def export_merged(adapter_dir: str, to: str, base: str | None = None, quant: str | None = None) -> float:
    """Write base + adapter merged into a Hugging Face folder (config, weights, tokenizer).

    quant: the quantized base the adapter was trained on; it is then merged into the
    dequantized weights. Returns (and prints) max |logits difference| between the written
    model and base + adapter on a few prompts.
    """
    from safetensors.torch import save_file
    adapter_dir, to = Path(adapter_dir), Path(to)
    config_file = adapter_dir / "adapter_config.json"
    try:
        peft_config = json.loads(config_file.read_text())
        base = base or peft_config.get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"{config_file}: not a readable adapter config ({type(e).__name__}: {e})") from None
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{config_file}: no base_model_name_or_path; pass --base DIR")
    check_merge_target(to, [adapter_dir, Path(base)])
    dtype = stored_dtype(M.check_checkpoint(base), Path(base) / "config.json")
    net = M.load_model(base, dtype=torch.float32, quant=quant)
    try:
        name = peft_format.load_peft(net, adapter_dir)
    except (KeyError, ValueError, TypeError, OSError) as e:
        raise ConfigError(f"{adapter_dir}: cannot load the adapter onto {base}: {e}".replace("\n", " ")) from None
    net.eval()  # the adapter layers were just added, in training mode (dropout)
    prompts = torch.randint(0, net.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), lora.route(net, [name] * len(prompts)):
        expected = net(prompts)                                  # base + adapter, as trained
    lora.merge(net, name)
    lora.dequantize(net)  # the layers the adapter does not touch (a no-op without quant)
    state = {k: v.contiguous() for k, v in net.state_dict().items() if ".lora_" not in k}
    if getattr(net.config, "tie_word_embeddings", False):
        state.pop(f"{net.OUTPUT_LAYER}.weight", None)  # the same tensor as the embedding: stored once, as on the hub
    del net
    state = {k: v.to(getattr(torch, dtype)) for k, v in state.items()}
    to.parent.mkdir(parents=True, exist_ok=True)
    tmp = to.with_name(f".{to.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    try:
        for file in Path(base).iterdir():  # config and tokenizer files, not the old weights
            if file.is_file() and not file.name.startswith(("model", "pytorch_model")) and file.suffix != ".safetensors":
                shutil.copy(file, tmp / file.name)
        files.atomic_write(tmp / "model.safetensors", write=lambda p: save_file(state, str(p), metadata={"format": "pt"}))
        files.atomic_write(tmp / MERGE_MARKER, json.dumps({"adapter": str(adapter_dir.resolve()), "base": str(Path(base).resolve()),
                                                          "quant": quant}, indent=2) + "\n")
        files.replace_dir(tmp, to)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with torch.no_grad():
        divergence = (M.load_model(to, dtype=torch.float32)(prompts) - expected).abs().max().item()
    into = f"the DEQUANTIZED {quant} weights of {base}" if quant else base
    print(f"merged {adapter_dir} into {into} -> {to} ({dtype}); max |logits difference| against "
          f"base + adapter on {len(prompts)} random prompts of {prompts.size(1)} tokens: {divergence:.2e}"
          + (f" (the {dtype} rounding of the stored weights, as the base's own)" if dtype != "float32" else ""))
    return divergence
