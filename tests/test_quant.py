"""QLoRA: 4-bit / 8-bit bases against transformers + bitsandbytes, LoRA on a quantized base
against LoRA on its dequantized twin, fused QLoRA training, generation and merge export."""
import pytest
import torch
import torch.nn as nn

import generate as G
import lora
from chatglm import ChatGLM
from llama import Llama
import model as M
import peft_format
import quant
import export
import train
from conftest import (adapter, assert_same_adapter, job, make_glm, make_hf_model, randomize_B, run_cfg, save_hf,
                      write_chatglm, write_rows)

ALL = list(Llama.LORA_TARGETS)
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def bnb_config(q: str, compute_dtype=torch.float32):
    import transformers
    if q == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=quant.INT8_THRESHOLD)
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.removesuffix("-dq"),
                                           bnb_4bit_use_double_quant=q.endswith("-dq"),
                                           bnb_4bit_compute_dtype=compute_dtype)


def hf_quantized(path, q: str, device: str = "cpu"):
    """transformers' own bitsandbytes loading of the same folder (the oracle)."""
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config(q),
                                                           dtype=torch.float32, device_map=device)
    for module in hf.modules():
        # On CPUs with AVX512-BF16, bitsandbytes' Linear4bit switches eval-mode inference to a
        # bf16 kernel; keep the fp32 dequantize + matmul, which is what ours computes.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return hf.eval()


def quantized_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, quant.QuantLinear)}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_hf(make_hf_model(), tmp_path_factory.mktemp("llama"))


# ----------------------------------------------------------------------------- the base

@pytest.mark.parametrize("q", ["nf4", "fp4", "nf4-dq", "int8"])
def test_logits_match_transformers_bitsandbytes(llama_dir, q):
    ours = M.load_model(llama_dir, dtype=torch.float32, quant=q)
    hf = hf_quantized(llama_dir, q)
    # The same quantizer on the same weights: the same bytes.
    ours_q, hf_q = ours.model.layers[1].mlp.down_proj, hf.model.layers[1].mlp.down_proj
    assert torch.equal(ours_q.weight.view(-1), hf_q.weight.data.view(-1))
    idx = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-5, rtol=1e-4)
    # Quantization really happened: the fp32 model answers differently.
    with torch.no_grad():
        assert (M.load_model(llama_dir, dtype=torch.float32)(idx) - ours(idx)).abs().max() > 1e-3


def test_what_is_quantized_and_memory(llama_dir, capsys):
    ours = M.load_model(llama_dir, dtype=torch.float32, quant="nf4")
    out = capsys.readouterr().out
    assert "nf4 base" in out and "peak RSS" in out and "MiB while loading" in out
    layers = quantized_layers(ours)
    assert len(layers) == 2 * 7 and all(n.startswith("model.layers.") for n in layers)
    # Embeddings, norms and the output head stay in full precision, as QLoRA keeps them.
    assert type(ours.lm_head) is nn.Linear and ours.model.embed_tokens.weight.dtype == torch.float32
    assert ours.model.norm.weight.dtype == torch.float32
    # 4 bits per weight plus one fp32 absmax per 64; double quantization shrinks the absmaxes.
    n = sum(m.in_features * m.out_features for m in layers.values())
    assert sum(m.nbytes() for m in layers.values()) == n // 2 + 4 * n // 64
    dq = quantized_layers(M.load_model(llama_dir, dtype=torch.float32, quant="nf4-dq"))
    assert sum(m.nbytes() for m in dq.values()) < n // 2 + 2 * n // 64
    with pytest.raises(ValueError, match="nf4, nf4-dq, fp4, fp4-dq, int8"):
        M.load_model(llama_dir, quant="nf3")


def test_chatglm_quantizes_the_same_way(tmp_path):
    """ChatGLM's fused query_key_value and dense_h_to_4h quantize like any Linear; transformers'
    Glm (split q/k/v, rows of 64 = one block each) with bitsandbytes is the oracle."""
    glm = make_glm(groups=2, rope_ratio=1)
    path = write_chatglm(glm, tmp_path / "chatglm", rope_ratio=1)
    glm.save_pretrained(tmp_path / "glm")
    ours = M.load_model(path, dtype=torch.float32, quant="nf4")
    assert {n.rsplit(".", 1)[-1] for n in quantized_layers(ours)} == set(ChatGLM.LORA_TARGETS)
    hf = hf_quantized(tmp_path / "glm", "nf4")
    idx = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-5, rtol=1e-4)
    lora.add_adapters(ours, {"a": lora.LoRAConfig(r=4, targets=list(ChatGLM.LORA_TARGETS))})
    assert len(lora.lora_layers(ours)) == 2 * 4


# ----------------------------------------------------------------------------- LoRA on a quantized base

def with_adapters(model):
    lora.add_adapters(model, {"a": lora.LoRAConfig(r=4, alpha=8, dropout=0.1, targets=ALL),
                              "b": lora.LoRAConfig(r=2, alpha=16, dropout=0.1, targets=["q_proj", "down_proj"])},
                      seed=3)
    randomize_B(model, "a", seed=1)
    randomize_B(model, "b", seed=2)
    return model


@pytest.mark.parametrize("q", ["nf4", "fp4-dq", "int8"])
def test_lora_on_quantized_base_equals_lora_on_dequantized(llama_dir, q):
    """Mixed batch, dropout on, training mode: same logits and adapter gradients as the same
    adapters on a plain fp32 model holding the dequantized weights."""
    quantized = with_adapters(M.load_model(llama_dir, dtype=torch.float32, quant=q))
    twin = M.load_model(llama_dir, dtype=torch.float32, quant=q)
    assert quant.dequantize(twin) == 14 and not quantized_layers(twin)
    twin = with_adapters(twin)
    idx = torch.randint(0, 384, (4, 10), generator=torch.Generator().manual_seed(2))
    names, lengths = ["a", "b", None, "a"], [10, 7, 10, 9]
    results = []
    for net in (quantized, twin):
        net.train()
        generators = {n: torch.Generator().manual_seed(5) for n in "ab"}
        with lora.route(net, names, lengths=lengths, generators=generators):
            logits = net(idx)
        logits.square().mean().backward()
        results.append((logits.detach(), {k: p.grad for k, p in net.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-4)
    assert results[0][1].keys() == results[1][1].keys()
    for key in results[0][1]:
        torch.testing.assert_close(results[0][1][key], results[1][1][key], atol=1e-5, rtol=1e-4)


def test_base_dequantized_once_per_layer_per_fused_step(llama_dir, monkeypatch):
    """k jobs fused: each quantized layer runs once over all rows, and its backward
    dequantizes once, however many adapters share the batch."""
    import bitsandbytes
    net = M.load_model(llama_dir, dtype=torch.float32, quant="nf4")
    lora.add_adapters(net, {n: lora.LoRAConfig(r=2, targets=ALL) for n in "abc"})
    rows_seen = []
    for layer in quantized_layers(net).values():
        layer.register_forward_hook(lambda m, inputs, out: rows_seen.append(inputs[0].numel() // inputs[0].size(-1)))
    backward_dequantized = []
    dequantize_4bit = bitsandbytes.functional.dequantize_4bit
    monkeypatch.setattr(bitsandbytes.functional, "dequantize_4bit",
                        lambda *a, **kw: backward_dequantized.append(1) or dequantize_4bit(*a, **kw))
    net.train()
    with lora.route(net, ["a", "a", "b", "c", "c", "c"]):
        net(torch.randint(0, 384, (6, 8))).logsumexp(-1).mean().backward()
    # Layer 0's q/k/v read the embeddings, which need no gradient: no backward through them.
    assert rows_seen == [6 * 8] * 14 and len(backward_dequantized) == 14 - 3   # every token, once


def test_fused_qlora_jobs_equal_each_alone(tmp_path, base_dir):
    d = tmp_path
    target = job("target", write_rows(d / "t.json", 8, 0, "reverse"), targets=ALL)
    other = job("other", write_rows(d / "o.jsonl", 6, 1, "upper"), r=8, lr=3e-3, optimizer="sgd", momentum=0.9)
    train.train(run_cfg(base_dir, d / "fused", [other, target], quant="nf4", scheduler={"max_concurrent": 2}))
    train.train(run_cfg(base_dir, d / "alone", [target], quant="nf4"))
    fused, alone = adapter(d / "fused", "target"), adapter(d / "alone", "target")
    assert_same_adapter(fused, alone)
    assert max(v.abs().max() for k, v in fused.items() if "lora_B" in k) > 1e-3  # it trained


def test_generation_on_quantized_base(llama_dir):
    net = with_adapters(M.load_model(llama_dir, dtype=torch.float32, quant="nf4"))
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 384, (n,), generator=g).tolist() for n in (5, 3, 7)]
    prompts[2] = prompts[0]
    names = ["a", "b", None]
    mixed = G.generate(net, prompts, names, max_new_tokens=6)
    for prompt, name, row in zip(prompts, names, mixed):
        assert row == G.generate(net, [prompt], [name], max_new_tokens=6)[0]
    assert mixed[0] != mixed[2]


# ----------------------------------------------------------------------------- merge export

def test_merge_export_from_4bit_base_uses_dequantized_weights(tmp_path, llama_dir, capsys):
    import transformers
    net = M.load_model(llama_dir, dtype=torch.float32, quant="nf4")
    lora.add_adapters(net, {"job": lora.LoRAConfig(r=4, alpha=8, dropout=0.1, targets=["q_proj", "v_proj", "up_proj"])})
    randomize_B(net, "job")
    net.eval()
    peft_format.save_peft(net, "job", tmp_path / "job", base_model_path=str(llama_dir))
    divergence = export.export_merged(str(tmp_path / "job"), str(tmp_path / "merged"), quant="nf4")
    out = capsys.readouterr().out
    assert "DEQUANTIZED nf4 weights" in out and "max |logits difference|" in out and divergence < 1e-4
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    idx = torch.randint(0, 384, (2, 12))
    with torch.no_grad(), lora.route(net, ["job", "job"]):
        expected = net(idx)
    torch.testing.assert_close(hf(idx).logits, expected, atol=1e-4, rtol=1e-4)
    # Merged into the original full-precision weights instead, the model would not be what was trained.
    export.export_merged(str(tmp_path / "job"), str(tmp_path / "fp32"))
    with torch.no_grad():
        assert (M.load_model(tmp_path / "fp32")(idx) - expected).abs().max() > 1e-2
    # lora.merge on the quantized model itself dequantizes the layers it touches, and says so.
    lora.merge(net, "job")
    assert "DEQUANTIZED" in capsys.readouterr().out
    with torch.no_grad():
        torch.testing.assert_close(net(idx), expected, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- CUDA

@cuda_only
@pytest.mark.parametrize("q", ["nf4", "int8"])
def test_logits_on_cuda_match_transformers(llama_dir, q):
    ours = M.load_model(llama_dir, dtype=torch.float32, device="cuda", quant=q)
    hf = hf_quantized(llama_dir, q, device="cuda")
    idx = torch.randint(0, 384, (2, 12), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-4, rtol=1e-4)


@cuda_only
def test_lora_on_4bit_equals_dequantized_on_cuda(llama_dir):
    quantized = with_adapters(M.load_model(llama_dir, dtype=torch.float32, device="cuda", quant="nf4-dq"))
    twin = M.load_model(llama_dir, dtype=torch.float32, device="cuda", quant="nf4-dq")
    quant.dequantize(twin)
    twin = with_adapters(twin)
    idx = torch.randint(0, 384, (3, 16), device="cuda")
    logits = []
    for net in (quantized, twin):
        net.eval()  # new adapter layers start in training mode: no dropout here
        with torch.no_grad(), lora.route(net, ["a", "b", None]):
            logits.append(net(idx))
    torch.testing.assert_close(logits[0], logits[1], atol=1e-3, rtol=1e-3)


@cuda_only
def test_fused_qlora_jobs_equal_each_alone_on_cuda(tmp_path, base_dir):
    target = job("target", write_rows(tmp_path / "t.json", 8, 0, "reverse"))
    other = job("other", write_rows(tmp_path / "o.json", 6, 1, "upper"), r=8, targets=ALL)
    for name, jobs in (("fused", [other, target]), ("alone", [target])):
        cfg = run_cfg(base_dir, tmp_path / name, jobs, quant="nf4", scheduler={"max_concurrent": 2})
        cfg.device = "cuda"
        train.train(cfg)
    fused, alone = adapter(tmp_path / "fused", "target"), adapter(tmp_path / "alone", "target")
    for key in fused:
        torch.testing.assert_close(fused[key], alone[key], atol=1e-4, rtol=1e-3)
