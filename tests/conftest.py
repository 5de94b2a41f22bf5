"""Shared test helpers: tiny random Hugging Face checkpoints written by transformers itself (the
oracle), training jobs on synthetic data, LoRA and ChatGLM helpers. Test modules import these
from here, never from each other."""
import contextlib
import io
import json
import multiprocessing
import os
import random
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

import lora
import train
from tokenizer_util import write_tokenizer_json

TINY = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models are hundreds of tiny sequential ops: on a shared, busy CPU two intra-op threads
    wait on each other at every op (seen: 10x slower), one thread does not. Session scope, so
    module-scoped fixtures run under it too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- LLaMA / Qwen2 checkpoints

def make_hf_model(kind: str = "llama", **overrides):
    """A tiny random transformers model (fp32, eval mode, fixed seed)."""
    import transformers
    torch.manual_seed(0)
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(**{**TINY, **overrides})
        model = transformers.Qwen2ForCausalLM(cfg)
    elif kind == "mistral":
        cfg = transformers.MistralConfig(**{**TINY, **overrides})
        model = transformers.MistralForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**{**TINY, **overrides})
        model = transformers.LlamaForCausalLM(cfg)
    # Default init (std 0.02) gives near-uniform logits; larger weights make any
    # mismatch visible.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.1)
    return model.eval()


def make_tiny(config_class: str, model_class: str, **config):
    """A tiny random transformers model of these classes (TINY sizes unless config says otherwise;
    fp32, eval mode, fixed seed), its weights larger than the default init as make_hf_model's."""
    import transformers
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**{**TINY, **config}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.1)
    return model.eval()


def save_hf(model, path: Path, old_config_keys: bool = False, **save_kwargs) -> Path:
    """save_pretrained, optionally rewriting config.json into the hub's older rope keys."""
    model.save_pretrained(path, **save_kwargs)
    if old_config_keys:
        cfg = json.loads((path / "config.json").read_text())
        rope = dict(cfg.pop("rope_parameters"))
        cfg["rope_theta"] = rope.pop("rope_theta")
        rope_type = rope.pop("rope_type")
        cfg["rope_scaling"] = None if rope_type == "default" else {"rope_type": rope_type, **rope}
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


@pytest.fixture
def tiny_llama(tmp_path):
    """(path, transformers model) of a tiny random LLaMA with GQA."""
    hf = make_hf_model()
    return save_hf(hf, tmp_path / "llama"), hf


# ----------------------------------------------------------------------------- training jobs

WORDS = "apple river stone cloud green small quick house music light paper ocean".split()


def write_rows(path, n, seed, kind):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(2, 6))
        if kind == "reverse":
            rows.append({"instruction": "Reverse the words.", "input": " ".join(words), "output": " ".join(words[::-1])})
        elif kind == "upper":
            rows.append({"instruction": "Shout: " + " ".join(words), "output": " ".join(words).upper()})
        else:
            rows.append({"instruction": "Count the words.", "input": " ".join(words), "output": str(len(words))})
    path.write_text(json.dumps(rows) if path.suffix == ".json" else "\n".join(map(json.dumps, rows)))
    return str(path)


@pytest.fixture
def base_dir(tmp_path):
    vocab = write_tokenizer_json(tmp_path / "base")
    hf = make_hf_model(vocab_size=max(vocab, 384), tie_word_embeddings=True)
    return save_hf(hf, tmp_path / "base")


def job(name, data_path, **kw):
    return train.JobConfig(**{"name": name, "data": data_path, "r": 4, "alpha": 8, "dropout": 0.1,
                              "targets": ["q_proj", "v_proj"], "lr": 1e-2, "batch_size": 4,
                              "micro_batch_size": 2, "epochs": 2, **kw})


def run_cfg(base_dir, out, jobs, **kw):
    sched = train.SchedulerConfig(**kw.pop("scheduler", {}))
    return train.RunConfig(base_model=str(base_dir), jobs=jobs, dtype="float32", device="cpu",
                           out_dir=str(out), scheduler=sched, **kw)


def adapter(out, name):
    return load_file(out / name / "adapter_model.safetensors")


def assert_same_adapter(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- LoRA

def randomize_B(model, name, seed=0):
    """B starts at zero; give it values so the adapter actually changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            if name in layer.adapters:
                w = layer.adapters[name].lora_B.weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.1)


# ----------------------------------------------------------------------------- ChatGLM checkpoints

V = 512  # padded vocab: room for the test tokenizer's pieces and ChatGLM's special tokens
TINY_GLM = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
                attention_bias=True, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def make_glm(groups: int, rope_ratio: float):
    """A tiny random transformers GlmForCausalLM: ChatGLM's architecture with split q/k/v."""
    import transformers
    torch.manual_seed(0)
    cfg = transformers.GlmConfig(**TINY_GLM, num_key_value_heads=groups, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0 * rope_ratio, "partial_rotary_factor": 0.5})
    glm = transformers.GlmForCausalLM(cfg)
    with torch.no_grad():  # larger than the default init, so any mismatch shows
        for name, p in glm.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.1)
    return glm.eval()


def chatglm_state(glm) -> dict:
    """Glm's weights renamed into THUDM's ChatGLM keys, q/k/v concatenated into query_key_value."""
    sd, out = glm.state_dict(), {}
    out["transformer.embedding.word_embeddings.weight"] = sd["model.embed_tokens.weight"]
    for i in range(glm.config.num_hidden_layers):
        g, c = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[c + f"self_attention.query_key_value.{kind}"] = torch.cat(
                [sd[g + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
        out[c + "self_attention.dense.weight"] = sd[g + "self_attn.o_proj.weight"]
        out[c + "mlp.dense_h_to_4h.weight"] = sd[g + "mlp.gate_up_proj.weight"]
        out[c + "mlp.dense_4h_to_h.weight"] = sd[g + "mlp.down_proj.weight"]
        out[c + "input_layernorm.weight"] = sd[g + "input_layernorm.weight"]
        out[c + "post_attention_layernorm.weight"] = sd[g + "post_attention_layernorm.weight"]
    out["transformer.encoder.final_layernorm.weight"] = sd["model.norm.weight"]
    out["transformer.output_layer.weight"] = sd["lm_head.weight"]
    # In THUDM's checkpoints, unused by their code (rope_ratio is applied elsewhere): skipped on load.
    out["transformer.rotary_pos_emb.inv_freq"] = torch.ones(4)
    return {k: v.contiguous() for k, v in out.items()}


def write_chatglm(glm, path, rope_ratio: float, shards: str = "safetensors"):
    """A THUDM-style folder: config.json with ChatGLM's field names, weights as safetensors or
    pytorch_model-0000x-of-0000y.bin shards with their index."""
    from safetensors.torch import save_file
    path.mkdir(parents=True, exist_ok=True)
    c = glm.config
    groups = c.num_key_value_heads
    config = {
        "model_type": "chatglm", "architectures": ["ChatGLMModel"],
        "num_layers": c.num_hidden_layers, "hidden_size": c.hidden_size, "ffn_hidden_size": c.intermediate_size,
        "kv_channels": c.head_dim, "num_attention_heads": c.num_attention_heads,
        "multi_query_attention": groups != c.num_attention_heads, "multi_query_group_num": groups,
        "padded_vocab_size": V, "vocab_size": V, "layernorm_epsilon": c.rms_norm_eps, "rmsnorm": True,
        "add_qkv_bias": True, "add_bias_linear": False, "post_layer_norm": True,
        "apply_residual_connection_post_layernorm": False, "fp32_residual_connection": False,
        "original_rope": True, "rope_ratio": rope_ratio, "seq_length": 256, "pre_seq_len": None,
        "quantization_bit": 0, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    state = chatglm_state(glm)
    if shards == "safetensors":
        save_file(state, str(path / "model.safetensors"))
    else:
        keys = list(state)
        names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
        halves = [keys[:len(keys) // 2], keys[len(keys) // 2:]]
        for name, part in zip(names, halves):
            torch.save({k: state[k] for k in part}, path / name)
        index = {"weight_map": {k: name for name, part in zip(names, halves) for k in part}}
        (path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return path


# ----------------------------------------------------------------------------- killed runs

def kill_at(target: str, n: int, before: bool = False, sig=signal.SIGKILL, when=None):
    """Patch module.function ("train.fused_step", "jobs.admit", "state.save_checkpoint", "files.atomic_write", "torch.save";
    the module its caller looks the name up in) so that its n-th call (or the n-th for which
    when(*args) holds) sends `sig` to this process, before the real call or after it."""
    import files
    import jobs
    import state
    import sweep
    module_name, function = target.split(".")
    module = {"train": train, "jobs": jobs, "files": files, "torch": torch, "state": state, "sweep": sweep}[module_name]
    real = getattr(module, function)
    calls = [0]

    def patched(*args, **kwargs):
        counted = when is None or when(*args)
        calls[0] += counted
        hit = counted and calls[0] == n
        if hit and before:
            os.kill(os.getpid(), sig)
        result = real(*args, **kwargs)
        if hit and not before:
            os.kill(os.getpid(), sig)
        return result
    setattr(module, function, patched)


def run_killed(path: str, patch: dict) -> int:
    """Run `train.py --config path` in a forked child that kills itself as `patch` (kill_at's
    arguments) says; its exit code."""
    def child():
        kill_at(**patch)
        with contextlib.redirect_stdout(io.StringIO()):
            os._exit(train.main(["--config", path]))
    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(120)
    assert not process.is_alive(), "the killed run hung"
    return process.exitcode


class Recorder(TorchDispatchMode):
    """Every aten op a step runs, with its arguments' shapes and non-tensor values."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        def describe(a):
            if isinstance(a, torch.Tensor):
                return ("tensor", tuple(a.shape), a.dtype)
            if isinstance(a, (list, tuple)):
                return tuple(describe(x) for x in a)
            return a
        self.ops.append((str(func), describe(args), describe(tuple(sorted((kwargs or {}).items())))))
        return func(*args, **(kwargs or {}))


def assert_lora_matches_peft(ours, hf, cfg, folder, layers: int = 2):
    """Adapter "job" (cfg, B randomized) on our model against PEFT on transformers' model `hf`
    with the same weights (our saved adapter loaded by PEFT): the logits, and the A and B
    gradients of one loss, on every targeted layer."""
    import lora
    import peft
    import peft_format
    lora.add_adapters(ours, {"job": cfg})
    randomize_B(ours, "job")
    peft_format.save_peft(ours, "job", folder)
    pm = peft.PeftModel.from_pretrained(hf, folder, is_trainable=True)
    idx = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(4))
    expected = pm(idx).logits
    with lora.route(ours, ["job", "job"]):
        got = ours(idx)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # Gradients of the same loss reach the same A and B.
    expected.square().mean().backward()
    got.square().mean().backward()
    peft_grads = {k.replace(".default", ""): p.grad for k, p in pm.named_parameters() if p.requires_grad}
    ours_grads = {f"base_model.model.{k.replace('.adapters.job', '')}": p.grad
                  for k, p in ours.named_parameters() if p.requires_grad}
    assert peft_grads.keys() == ours_grads.keys() and len(ours_grads) == layers * 2 * len(cfg.targets)
    for key in ours_grads:
        torch.testing.assert_close(ours_grads[key], peft_grads[key], atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- the service

@contextlib.contextmanager
def serving(app):
    """An ASGI app (serve.make_app's, guarded) served by uvicorn in a thread on a free localhost
    port, for a real client: yields its URL."""
    import threading
    import time
    import serve
    server = serve.uvicorn_server(app)
    sock = serve.bind("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started:
            assert time.time() < deadline
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)


def count_fused(engine) -> dict[str, list[int]]:
    """From now on, how many calls each of a stepapi.Engine's forward_backward passes and
    generations took: {"forward_backward": [...], "sample": [...]}."""
    sizes = {"forward_backward": [], "sample": []}
    for name in sizes:
        real = getattr(engine, name)
        setattr(engine, name, lambda calls, real=real, name=name: sizes[name].append(len(calls)) or real(calls))
    return sizes


@pytest.fixture(scope="module")
def served_base(tmp_path_factory) -> Path:
    """A tiny LLaMA (tied embeddings) with a tokenizer, as a Hugging Face folder: the base of the
    service's tests."""
    folder = tmp_path_factory.mktemp("base")
    vocab = write_tokenizer_json(folder)
    return save_hf(make_hf_model(vocab_size=max(vocab, 384), tie_word_embeddings=True), folder)
