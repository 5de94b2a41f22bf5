"""Merge export and the bundled demo's files."""
import json
import os
from pathlib import Path

import pytest
import torch

import data
import demo
import lora
from llama import Llama
import model as M
import peft_format
import export
import report
import train
from conftest import randomize_B
from tokenizer_util import write_tokenizer_json

REPO = Path(__file__).resolve().parent.parent


def test_merged_export_loads_in_transformers(tmp_path, tiny_llama):
    import transformers
    path, _ = tiny_llama
    write_tokenizer_json(path)
    ours = M.load_model(path)
    lora.add_adapters(ours, {"job": lora.LoRAConfig(r=4, alpha=8, targets=list(Llama.LORA_TARGETS))})
    randomize_B(ours, "job")
    peft_format.save_peft(ours, "job", tmp_path / "job", base_model_path=str(path))
    assert train.main(["--merge", str(tmp_path / "job"), "--to", str(tmp_path / "merged")]) == 0
    merged_dir = tmp_path / "merged"
    assert (merged_dir / "tokenizer.json").exists() and not list(tmp_path.glob(".merged.partial"))
    umask = os.umask(0)
    os.umask(umask)
    assert (merged_dir / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask   # not safetensors' 0600
    hf = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    idx = torch.randint(0, 384, (2, 12))
    with lora.route(ours, ["job", "job"]):
        expected = ours(idx)
    torch.testing.assert_close(hf(idx).logits, expected, atol=1e-4, rtol=1e-4)
    base_logits = M.load_model(path)(idx)
    assert (base_logits - expected).abs().max() > 1e-2  # the adapter really changed something


def test_merge_never_replaces_what_it_did_not_create(tmp_path, tiny_llama, capsys):
    """`--merge out/a --to out` once deleted a whole training output with exit 0."""
    path, _ = tiny_llama
    write_tokenizer_json(path)
    ours = M.load_model(path)
    lora.add_adapters(ours, {"a": lora.LoRAConfig(r=4, alpha=8)})
    run = tmp_path / "out"
    peft_format.save_peft(ours, "a", run / "a", base_model_path=str(path))
    (run / "metrics.jsonl").write_text("{}\n")                      # a training run's folder
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")

    def files():
        return {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    before = files()
    for to, message in [(run, "an adapter or training run folder"), (run / "a" / "m", "an adapter or training run folder"),
                        (tmp_path / "mine", "exists and is not a merge written by train.py"),
                        (path, "would replace"), (tmp_path, "would replace")]:
        assert train.main(["--merge", str(run / "a"), "--to", str(to)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
        assert files() == before
    # Its own earlier output it replaces, whole.
    assert train.main(["--merge", str(run / "a"), "--to", str(tmp_path / "merged")]) == 0
    assert train.main(["--merge", str(run / "a"), "--to", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / export.MERGE_MARKER).exists() and not list(tmp_path.glob(".merged*"))


@pytest.mark.parametrize("key, value", [("torch_dtype", "int8"), ("dtype", "int8"), ("torch_dtype", "float8_e4m3fn")])
def test_merge_refuses_a_base_stored_in_no_float_dtype(tmp_path, tiny_llama, capsys, key, value):
    """config.json's torch_dtype (or dtype) is what the merge is written in: an integer dtype
    there is one line naming the file and field, before anything is loaded or written."""
    path, _ = tiny_llama
    config = json.loads((path / "config.json").read_text())
    config.pop("torch_dtype", None), config.pop("dtype", None)
    (path / "config.json").write_text(json.dumps({**config, key: value}))
    ours = M.load_model(path)
    lora.add_adapters(ours, {"a": lora.LoRAConfig(r=4, alpha=8)})
    peft_format.save_peft(ours, "a", tmp_path / "a", base_model_path=str(path))
    assert train.main(["--merge", str(tmp_path / "a"), "--to", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{path / 'config.json'}: {key}: expected one of float32" in err and repr(value) in err and "\n" not in err
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged*"))

def test_merge_usage_error(capsys):
    assert train.main(["--merge", "x"]) == 2
    assert "usage: python train.py --merge" in capsys.readouterr().err


def test_demo_config_and_data_are_valid(tmp_path):
    """The bundled config parses, and every demo data file loads with a chat tokenizer."""
    cfg = train.load_config(str(REPO / "demo" / "config.json"), [])
    assert len(cfg.jobs) == 4 and len({j.r for j in cfg.jobs}) > 1 and len({j.lr for j in cfg.jobs}) > 1
    write_tokenizer_json(tmp_path)
    tokenizer = data.load_tokenizer(tmp_path)
    for job in cfg.jobs:
        for file in (job.data, job.test_data):
            examples = data.load_job_data(REPO / file, tokenizer, job.template, job.cutoff_len)
            assert len(examples) >= 8
    prompts = json.loads((REPO / "demo" / "prompts.json").read_text())
    assert {job for p in prompts for job in p["expected"]} == {j.name for j in cfg.jobs}
    # Held-out prompts never appear in any training set.
    for p in prompts:
        for job in cfg.jobs:
            rows = json.loads((REPO / job.data).read_text())
            assert all((r["instruction"], r.get("input", "")) != (p["instruction"], p.get("input", "")) for r in rows)


def test_demo_checks():
    assert demo.check("json", '{"answer": "8"}', ' {"answer": "18"}')  # the format, not the sum
    assert not demo.check("json", '{"answer": "8"}', '{"answer": 8')
    assert not demo.check("json", '{"answer": "8"}', '["8"]')
    assert demo.check("signoff", "Hi.\n-- Sent by your friendly LoRA", "Hello.\n-- Sent by your friendly LoRA")
    assert not demo.check("signoff", "Hi.\n-- Sent by your friendly LoRA", "Hello.")
    assert demo.check("french", "x", "Le contraire de jour est nuit.")
    assert demo.check("french", "x", "La capitale de l'Italie est Rome.")
    assert not demo.check("french", "x", "The opposite of day is night.")
    assert demo.check("reverse", "b a", "b a") and not demo.check("reverse", "b a", "a b")


def test_loss_plot_is_written(tmp_path):
    lines = [{"step": s, "jobs": {"a": {"loss": 2.0 / s}, "b": {"loss": float("nan")}}} for s in range(1, 5)]
    lines.append({"event": "eval", "job": "a", "fused_step": 4, "eval_loss": 0.7, "time": 1.0})
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)))
    report.plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    from matplotlib import colors, image
    pixels = image.imread(tmp_path / "loss.png")                  # decoded: a whole PNG, not just its header
    assert pixels.shape == (450, 800, 4)                          # figsize 8 x 4.5 at 100 dpi, RGBA
    rgb = pixels[..., :3].reshape(-1, 3)
    assert len(torch.from_numpy(rgb).unique(dim=0)) > 10          # not one colour
    # Job a's line and dots (and legend) in the first colour of the cycle: many pixels of it.
    first = torch.tensor(colors.to_rgb("C0"))
    assert ((torch.from_numpy(rgb) - first).abs().max(dim=1).values < 0.02).sum() > 300
