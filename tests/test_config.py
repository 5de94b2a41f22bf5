"""m-LoRA's config files, all three generations (tests/fixtures/mlora, see its README): each
translated field by field, every ignored field named in one warning line, what we cannot do a
one-line error, and each generation training a step from the folder m-LoRA ran it in."""
import json
from pathlib import Path

import pytest
import yaml

import config
import train
from config import ConfigError

FIXTURES = Path(__file__).parent / "fixtures" / "mlora"


def load(monkeypatch, gen: str, path: str, *overrides: str):
    """Load a fixture from its generation's folder, as m-LoRA ran it (no base folder is read)."""
    monkeypatch.chdir(FIXTURES / gen)
    return config.load_config(path, ["--base_model=base", *overrides])


def warning_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: m-LoRA config")]
    assert len(lines) == 1, lines
    return lines[0]


def edited(tmp_path, gen: str, path: str, edit) -> str:
    """A copy of a fixture config (beside tmp_path, read from the fixture's folder) changed by edit(raw)."""
    source = FIXTURES / gen / path
    raw = yaml.safe_load(source.read_text()) if source.suffix == ".yaml" else json.loads(source.read_text())
    edit(raw)
    out = tmp_path / source.name
    out.write_text(yaml.safe_dump(raw) if source.suffix == ".yaml" else json.dumps(raw))
    return str(out)


def run(gen: str, path: str, base_dir, out, monkeypatch, *overrides: str) -> int:
    """train.py's main on a fixture from its generation's folder, one optimizer step per job."""
    monkeypatch.chdir(FIXTURES / gen)
    cfg = config.load_config(path, [f"--base_model={base_dir}"])
    steps = [f"--jobs.{job.name}.max_steps=1" for job in cfg.jobs]
    return train.main(["--config", path, f"--base_model={base_dir}", f"--out_dir={out}", *steps, *overrides])


# ----------------------------------------------------------------------------- 2023: "lora" list with alpha, dropout

def test_2023_list_is_translated(monkeypatch, capsys):
    cfg = load(monkeypatch, "2023", "config/finetune.json")
    assert cfg.base_model == "base"
    assert (cfg.scheduler.strategy, cfg.scheduler.max_candidates, cfg.scheduler.max_concurrent) == ("optimal-fit", 3, 2)
    assert [j.name for j in cfg.jobs] == ["lora_0", "lora_1", "lora_2"]
    for j in cfg.jobs:
        assert (j.data, j.test_data, j.template) == ("data/data_demo.json", "data/test_data_demo.json",
                                                       "template/template_demo.json")
        assert (j.alpha, j.dropout, j.cutoff_len, j.epochs, j.batch_size, j.micro_batch_size) == (16, 0.05, 128, 1, 4, 2)
        assert (j.objective, j.train_on_inputs, j.max_grad_norm, j.group_by_length) == ("sft", True, None, False)
        assert (j.init, j.use_rslora, j.use_dora, j.loraplus_lr_ratio, j.lr_schedule, j.warmup_steps) \
            == ("kaiming", False, False, None, "constant", 0)
        # save_step and early_stop_test_step 4 micro-batches = 2 optimizer steps of 2 micro-batches
        assert (j.save_every, j.eval_every, j.early_stop, j.max_steps, j.priority) == (2, 2, None, None, 0)
    lora_0, lora_1, lora_2 = cfg.jobs
    assert (lora_0.optimizer, lora_0.lr, lora_0.momentum, lora_0.weight_decay, lora_0.r) == ("sgd", 1e-2, 0.9, 0.0, 8)
    assert (lora_1.optimizer, lora_1.lr, lora_1.weight_decay, lora_1.r) == ("adamw", 3e-4, 0.01, 8)
    assert lora_0.targets == lora_1.targets == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert lora_2.r == 16 and lora_2.targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
    assert warning_line(capsys) == (
        "warning: m-LoRA config config/finetune.json: ignored: pad_token_id (padding is masked, its id changes "
        "nothing); lora[0].test_batch_size, lora[1].test_batch_size, lora[2].test_batch_size (held-out rows go in "
        "micro-batches; no effect on training); lora[0].output, lora[1].output, lora[2].output (adapters are "
        "written to out_dir/<name>/)")


def test_2023_chatglm_names_and_per_adapter_fields(monkeypatch, capsys):
    cfg = load(monkeypatch, "2023", "config/finetune_chatglm.json")
    assert (cfg.scheduler.strategy, cfg.scheduler.max_candidates, cfg.scheduler.max_concurrent) == ("trivial", 4, 2)
    lora_0, lora_1 = cfg.jobs
    assert lora_0.targets == ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    assert lora_1.targets == ["query_key_value", "dense"]
    assert (lora_0.group_by_length, lora_1.group_by_length) == (False, True)
    assert (lora_0.eval_every, lora_1.eval_every, lora_1.test_data) == (1000, 0, None)
    line = warning_line(capsys)
    assert "lora[1].expand_side (" in line and "early_stop_test_step for lora[1] (the adapter has no test_data)" in line
    assert "lora[0].expand_side" not in line   # "right" is what we do


def test_2023_fixture_trains_a_step(tmp_path, base_dir, monkeypatch):
    """The whole 2023 file trains from its folder, with m-LoRA's own template file (its prompt holds {output})."""
    assert run("2023", "config/finetune.json", base_dir, tmp_path / "out", monkeypatch) == 0
    for name in ("lora_0", "lora_1", "lora_2"):
        saved = json.loads((tmp_path / "out" / name / "adapter_config.json").read_text())
        assert saved["r"] == (16 if name == "lora_2" else 8)
    assert "gate_proj" in json.loads((tmp_path / "out" / "lora_2" / "adapter_config.json").read_text())["target_modules"]




# ----------------------------------------------------------------------------- 2024: "lora" list with lora_alpha, variants

def test_2024_list_is_translated(monkeypatch, capsys):
    cfg = load(monkeypatch, "2024", "config/finetune.json")
    assert (cfg.scheduler.strategy, cfg.scheduler.max_candidates, cfg.scheduler.max_concurrent) == ("optimal-fit", 3, 2)
    lora_0, lora_1, lora_2 = cfg.jobs
    for j in cfg.jobs:
        assert (j.data, j.test_data, j.template) == ("data/data_demo.json", "data/test_data_demo.json",
                                                       "template/template_demo.json")
        assert (j.alpha, j.dropout, j.cutoff_len, j.epochs, j.batch_size, j.micro_batch_size) == (16, 0.05, 128, 1, 4, 2)
        assert (j.train_on_inputs, j.max_grad_norm, j.group_by_length, j.save_every, j.eval_every) == (True, None, False, 1000, 1000)
    assert (lora_0.optimizer, lora_0.lr, lora_0.momentum, lora_0.weight_decay) == ("sgd", 1e-2, 0.9, 0.01)
    assert (lora_0.use_rslora, lora_0.use_dora, lora_0.loraplus_lr_ratio, lora_0.init) == (True, False, 20.0, "kaiming")
    assert (lora_1.use_rslora, lora_1.use_dora, lora_1.loraplus_lr_ratio) == (False, True, None)
    assert (lora_1.optimizer, lora_1.weight_decay, lora_1.lr_schedule, lora_1.warmup_steps) == ("adamw", 0.01, "constant", 0)
    assert (lora_2.lr_schedule, lora_2.warmup_steps, lora_2.weight_decay, lora_2.init) == ("cosine", 1, 0.0, "gaussian")
    assert lora_2.targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
    line = warning_line(capsys)
    assert line.endswith("ignored: lora[0].test_batch_size, lora[1].test_batch_size, lora[2].test_batch_size "
                         "(held-out rows go in micro-batches; no effect on training)")


def test_2024_fixture_trains_a_step(tmp_path, base_dir, monkeypatch):
    """Its template is Alpaca-LoRA's format, which data.py reads: the file trains unchanged."""
    assert run("2024", "config/finetune.json", base_dir, tmp_path / "out", monkeypatch) == 0
    saved = {n: json.loads((tmp_path / "out" / n / "adapter_config.json").read_text()) for n in ("lora_0", "lora_1", "lora_2")}
    assert saved["lora_0"]["use_rslora"] and not saved["lora_0"]["use_dora"]
    assert saved["lora_1"]["use_dora"] and not saved["lora_1"]["use_rslora"]


def test_2024_defaults_and_warmup(tmp_path, monkeypatch, capsys):
    def edit(raw):
        plain, ratio, constant = raw["lora"]
        for key in ("prompt", "micro_batch_size", "optim", "test_data", "expand_side", "group_by_length"):
            plain.pop(key)
        plain["target_modules"] = ["q_proj", "w2_proj"]           # 2024 takes a list too
        ratio.update(scheduler_type="linear", warmup_ratio=0.5, num_epochs=2)
        ratio.pop("warmup_steps")
        constant.update(scheduler_type="constant", warmup_steps=3)  # transformers' constant has no warmup
    cfg = load(monkeypatch, "2024", edited(tmp_path, "2024", "config/finetune.json", edit))
    plain, ratio, constant = cfg.jobs
    assert (plain.template, plain.micro_batch_size, plain.optimizer, plain.test_data) == ("mlora", 4, "adamw", None)
    assert (plain.targets, plain.group_by_length) == (["q_proj", "down_proj"], False)
    # 6 rows, batches of 4: 2 optimizer steps an epoch, 2 epochs, half of them warm up
    assert (ratio.lr_schedule, ratio.warmup_steps) == ("linear", 2)
    assert (constant.lr_schedule, constant.warmup_steps) == ("constant", 0)
    line = warning_line(capsys)
    assert "lora[2].warmup_steps (m-LoRA's constant schedule has no warmup" in line
    assert "early_stop_test_step for lora[0] (the adapter has no test_data)" in line


# ----------------------------------------------------------------------------- 2025: YAML dispatcher, datasets, adapters, tasks

def test_2025_lora_dora_loraplus_are_translated(monkeypatch, capsys):
    lora = load(monkeypatch, "2025", "demo/lora/lora_case_1.yaml")
    assert (lora.scheduler.strategy, lora.scheduler.max_candidates, lora.scheduler.max_concurrent) == ("trivial", 2, 2)
    lora_0, lora_1 = lora.jobs
    for j in lora.jobs:
        assert (j.data, j.template, j.objective, j.train_on_inputs, j.max_grad_norm) == (
            "demo/data.json", "demo/prompt.yaml", "sft", True, None)
        assert (j.r, j.alpha, j.dropout, j.batch_size, j.micro_batch_size, j.epochs, j.cutoff_len) == (32, 64, 0.05, 4, 2, 1, 128)
        assert (j.optimizer, j.weight_decay, j.lr_schedule, j.warmup_steps, j.save_every) == ("adamw", 0.01, "constant", 0, 1000)
        assert (j.use_dora, j.use_rslora, j.loraplus_lr_ratio, j.group_by_length) == (False, False, None, False)
    assert (lora_0.name, lora_0.lr, lora_0.targets) == ("lora_0", 3e-4, ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert (lora_1.name, lora_1.lr, lora_1.targets[4:]) == ("lora_1", 3e-5, ["gate_proj", "down_proj", "up_proj"])
    assert warning_line(capsys) == (
        "warning: m-LoRA config demo/lora/lora_case_1.yaml: ignored: tasks[0].name, tasks[1].name (a job is named "
        "by its adapter); adapters[0].path, adapters[1].path (adapters are written to out_dir/<name>/)")

    dora = load(monkeypatch, "2025", "demo/dora/dora_case_1.yaml")
    assert [(j.name, j.use_dora, j.lr) for j in dora.jobs] == [("lora_0", False, 3e-4), ("dora_0", True, 1e-3)]
    assert "adapters[1].path" in warning_line(capsys)

    plus = load(monkeypatch, "2025", "demo/loraplus/loraplus_case_1.yaml")
    adamw, sgd = plus.jobs
    assert (adamw.loraplus_lr_ratio, adamw.optimizer, adamw.lr_schedule) == (8.0, "adamw", "constant")
    assert (sgd.loraplus_lr_ratio, sgd.optimizer, sgd.momentum, sgd.weight_decay, sgd.lr_schedule) == (8.0, "sgd", 0.9, 0.0, "cosine")
    assert "adapters[1].t_max (the cosine decays to 0 over the job's own optimizer steps)" in warning_line(capsys)


def test_2025_dpo_and_cpo_are_translated(tmp_path, monkeypatch, capsys):
    dpo = load(monkeypatch, "2025", "demo/dpo/dpo_case_1.yaml").jobs[0]
    assert (dpo.name, dpo.objective, dpo.loss_type, dpo.beta, dpo.label_smoothing) == ("lora_dpo", "dpo", "sigmoid", 0.1, 0.0)
    assert (dpo.data, dpo.template, dpo.train_on_inputs, dpo.batch_size, dpo.micro_batch_size) == (
        "demo/data.json", "demo/preference_prompt.yaml", False, 4, 4)
    assert "datasets[0].preprocess (file order; rows are shuffled here by the run's seed)" in warning_line(capsys)

    def sigmoid(raw):
        raw["tasks"][1]["loss_type"] = "sigmoid"
    cpo = load(monkeypatch, "2025", edited(tmp_path, "2025", "demo/cpo/cpo_case_1.yaml", sigmoid))
    for j, plus in zip(cpo.jobs, (None, 8.0)):
        assert (j.objective, j.loss_type, j.beta, j.label_smoothing, j.cpo_alpha, j.loraplus_lr_ratio) == (
            "cpo", "sigmoid", 0.1, 0.0, 1.0, plus)
    assert "tasks[0].label_smoothing, tasks[1].label_smoothing (m-LoRA's CPO does not read it)" in warning_line(capsys)


def test_2025_first_yaml_is_translated(monkeypatch, capsys):
    cfg = load(monkeypatch, "2025", "demo/dummy.yaml")
    lora_0, lora_1 = cfg.jobs
    assert (lora_0.template, lora_0.data, lora_0.lr_schedule, lora_1.lr_schedule) == (
        "demo/dummy_template.json", "demo/dummy_data.json", "constant", "cosine")
    assert (lora_1.r, lora_1.alpha, lora_1.targets[-1]) == (8, 16, "up_proj")
    line = warning_line(capsys)
    assert "tasks[0].name" not in line and "adapters[1].t_max" in line


def test_2025_fixture_trains_a_step(tmp_path, base_dir, monkeypatch):
    """The first YAML trains from its folder, with its own m-LoRA JSON template."""
    assert run("2025", "demo/dummy.yaml", base_dir, tmp_path / "out", monkeypatch) == 0
    assert (tmp_path / "out" / "lora_1" / "adapter_model.safetensors").is_file()




def test_2025_jinja_template_trains(tmp_path, base_dir, monkeypatch):
    assert run("2025", "demo/lora/lora_case_1.yaml", base_dir, tmp_path / "out", monkeypatch) == 0


# ----------------------------------------------------------------------------- errors, warnings, paths

def _drop(path: list):
    def edit(raw):
        obj = raw
        for key in path[:-1]:
            obj = obj[key]
        obj.pop(path[-1])
    return edit


def _set(path: list, value):
    def edit(raw):
        obj = raw
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value
    return edit


LORA_CASE = ("2025", "demo/lora/lora_case_1.yaml")
UNSUPPORTED = [
    (("2025", "demo/vera/vera_case_1.yaml"), None, "adapters[1].type: 'vera' adapters are not supported"),
    (("2025", "demo/cpo/cpo_case_1.yaml"), None, "tasks[1].loss_type: expected sigmoid, got 'hinge'"),
    (LORA_CASE, _set(["tasks", 0, "type"], "ppo"), "tasks[0].type: 'ppo' tasks are not supported"),
    (LORA_CASE, _set(["tasks", 0, "type"], "cit"), "tasks[0].type: 'cit' tasks are not supported"),
    (LORA_CASE, _set(["adapters", 0, "type"], "mixlora"), "adapters[0].type: 'mixlora' adapters are not supported"),
    (("2025", "demo/dpo/dpo_case_1.yaml"), lambda raw: (raw["adapters"].append(dict(raw["adapters"][0], name="ref")),
                                                        raw["tasks"][0].update(reference="ref")),
     "tasks[0].reference: the reference is the frozen base model here, not adapter 'ref'"),
    (LORA_CASE, _set(["dispatcher", "name"], "fair"), "dispatcher.name: expected one of default, backend, pipe"),
    (LORA_CASE, _set(["datasets", 0, "preprocess"], "sort"), "datasets[0].preprocess: expected default or shuffle"),
    (LORA_CASE, _set(["adapters", 0, "lrscheduler"], "linear"), "adapters[0].lrscheduler: expected cosine"),
    (("2025", "demo/dummy.yaml"), _set(["adapters", 1, "eta_min"], 1), "adapters[1].eta_min: the cosine decays to 0"),
    (LORA_CASE, _drop(["adapters", 0, "optimizer"]), "adapters[0].optimizer: missing: m-LoRA trains no adapter without one"),
    (LORA_CASE, _set(["tasks", 1, "adapter"], "lora_0"), "tasks[1].adapter: 'lora_0' is trained by tasks[0] too"),
    (LORA_CASE, _set(["tasks", 0, "dataset"], "other"), "tasks[0].dataset: no dataset named 'other'"),
    (LORA_CASE, _set(["datasets", 0, "prompt_type"], "preference"), "tasks[0].dataset: a train task needs prompt_type instruction"),
    (LORA_CASE, _set(["adapters", 0, "lr"], "fast"), "adapters[0].lr: expected a number, got 'fast'"),
    (("2023", "config/finetune.json"), _set(["train_strategy"], "greedy"), "train_strategy: expected optim or none"),
    (("2023", "config/finetune.json"), _set(["lora", 1, "optim"], "adam"), "lora[1].optim: expected adamw or sgd"),
    (("2023", "config/finetune.json"), _set(["cutoff_len"], -1), "cutoff_len: -1 (the model's own maximum length)"),
    (("2023", "config/finetune.json"), _set(["lora", 0, "target_modules", "q_proj"], "yes"),
     "lora[0].target_modules.q_proj: expected true or false"),
    (("2024", "config/finetune.json"), _set(["lora", 0, "scheduler_type"], "polynomial"), "lora[0].scheduler_type: expected one of"),
    (("2024", "config/finetune.json"), _set(["lora", 0, "task_name"], "glue:cola"), "lora[0].task_name: only casual"),
    (("2024", "config/finetune.json"), _set(["lora", 0, "val_set_size"], 0.1), "lora[0].val_set_size: a random split"),
    (("2024", "config/finetune.json"), _set(["lora", 0, "routing_strategy"], "mixtral"), "lora[0].routing_strategy: MixLoRA"),
    (("2024", "config/finetune.json"), _set(["lora", 0, "loraplus_lr_ratio"], 0.5), "lora[0].loraplus_lr_ratio: expected >= 1"),
    (("2024", "config/finetune.json"), _set(["lora", 0, "lora_init"], "pissa"), "lora[0].lora_init: expected original or gaussian"),
]
MISSING = [
    (("2023", "config/finetune.json"), ["lora", 0, "alpha"]),
    (("2023", "config/finetune.json"), ["lora", 2, "micro_batch_size"]),
    (("2023", "config/finetune.json"), ["train_lora_candidate_num"]),
    (("2024", "config/finetune.json"), ["lora", 1, "lora_alpha"]),
    (("2024", "config/finetune.json"), ["lora", 0, "lr"]),
    (LORA_CASE, ["dispatcher", "concurrency_num"]),
    (LORA_CASE, ["datasets", 0, "preprocess"]),
    (LORA_CASE, ["adapters", 1, "target_modules"]),
    (LORA_CASE, ["tasks", 0, "mini_batch_size"]),
    (("2025", "demo/dpo/dpo_case_1.yaml"), ["tasks", 0, "reference"]),
    (("2025", "demo/loraplus/loraplus_case_1.yaml"), ["adapters", 0, "lr_ratio"]),
]


def _message(tmp_path, monkeypatch, fixture, edit) -> str:
    gen, path = fixture
    path = edited(tmp_path, gen, path, edit) if edit else path
    with pytest.raises(ConfigError) as e:
        load(monkeypatch, gen, path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message


@pytest.mark.parametrize("fixture, edit, expected", UNSUPPORTED)
def test_unsupported_fields_are_one_line_errors(tmp_path, monkeypatch, fixture, edit, expected):
    assert expected in _message(tmp_path, monkeypatch, fixture, edit)


@pytest.mark.parametrize("fixture, path", MISSING)
def test_missing_fields_are_named(tmp_path, monkeypatch, fixture, path):
    field = ".".join(f"[{p}]" if isinstance(p, int) else p for p in path).replace(".[", "[")
    assert f"{field}: missing" in _message(tmp_path, monkeypatch, fixture, _drop(path))


def test_fields_m_lora_never_read_are_warned(tmp_path, monkeypatch, capsys):
    def edit(raw):
        raw["adapters"][0]["weight_decay"] = 0.1
        raw["seed"] = 7
    load(monkeypatch, "2025", edited(tmp_path, *LORA_CASE, edit))
    assert "seed, adapters[0].weight_decay (not an m-LoRA field)" in warning_line(capsys)
    def unused(raw):
        raw["adapters"].append(dict(raw["adapters"][0], name="spare", type="vera"))
        raw["datasets"].append(dict(raw["datasets"][0], name="spare"))
    load(monkeypatch, "2025", edited(tmp_path, *LORA_CASE, unused))
    assert "adapters[2], datasets[1] (no task uses it)" in warning_line(capsys)


def test_paths_stay_relative_to_the_current_folder(tmp_path, monkeypatch):
    """As in m-LoRA, data and template paths resolve against where it runs, not the config's folder."""
    monkeypatch.chdir(tmp_path)
    cfg = config.load_config(str(FIXTURES / "2024" / "config" / "finetune.json"), ["--base_model=base"])
    assert (cfg.jobs[0].data, cfg.jobs[0].template) == ("data/data_demo.json", "template/template_demo.json")
    assert not (tmp_path / cfg.jobs[0].data).exists()


def test_base_model_comes_from_the_command_line(monkeypatch):
    monkeypatch.chdir(FIXTURES / "2023")
    with pytest.raises(ConfigError, match=r"^config/finetune.json: base_model: an m-LoRA config names none; "
                                          r"pass --base_model=DIR$"):
        config.load_config("config/finetune.json", [])


def test_yaml_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dispatcher:\n  name: [default\n")
    with pytest.raises(ConfigError, match=r"^.*bad.yaml: cannot parse YAML: .*\(line \d+, column \d+\)$"):
        config.load_config(str(bad), [])
    keys = tmp_path / "keys.yml"
    keys.write_text("base_model: b\njobs:\n  - {name: a, data: d.json, 1: x}\n")
    with pytest.raises(ConfigError, match=r"keys.yml: key 1: expected a name"):
        config.load_config(str(keys), [])
    ours = tmp_path / "ours.yaml"   # our own format reads from YAML too
    ours.write_text("base_model: b\njobs:\n  - name: a\n    data: d.json\n    lr: 1e-3\n")
    assert config.load_config(str(ours), []).jobs[0].lr == 1e-3
