"""The flat layout stays flat: imports between the top-level files run one way (no circles)."""
import ast
import re
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def imports_between_modules() -> dict[str, set[str]]:
    """{module: the repo's top-level modules it imports}, lazy imports inside functions included."""
    modules = {p.stem for p in REPO.glob("*.py")}
    graph = {}
    for path in REPO.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        graph[path.stem] = names & modules - {path.stem}
    return graph


def test_no_import_cycles():
    graph = imports_between_modules()
    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(module):] + [module])}")
        if module in done:
            return
        path.append(module)
        for dependency in sorted(graph[module]):
            visit(dependency)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_model_files_know_nothing_of_lora_or_files():
    graph = imports_between_modules()
    assert graph["llama"] == {"checkpoint", "fast"} and graph["chatglm"] == {"checkpoint", "llama"}
    assert graph["fast"] == set() and graph["checkpoint"] == set()
    assert "lora" not in graph["model"] | graph["quant"]     # LoRA is applied after loading
    assert "train" not in graph["demo"]                      # train.main drives the demo (demo.run)


# ----------------------------------------------------------------------------- the core and its layers

CORE = ["model.py", "llama.py", "lora.py", "data.py", "objectives.py", "train.py", "peft_format.py"]
LAYERS = {"dist", "graphs", "nonfinite", "sweep", "state", "mlora_config", "service", "service_loop", "submission",
          "stepclient",
          "remote", "serve", "stepapi"}
# train.py's entry: train() and main() pick the layers a run needs (README, "Read the code").
ENTRY = {"train", "train_on", "start", "add_layers", "main",
         "exit_with"}


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_reading_path_is_the_core_in_at_most_7_files_and_2500_lines():
    section = readme_section("Read the code")
    named = [name for name in CORE if f"`{name}`" in section.split("Nothing in them")[0]]
    assert named == CORE
    lines = sum(len((REPO / name).read_text().splitlines()) for name in CORE)
    assert len(CORE) <= 7 and lines <= 2500, lines


def test_the_core_references_no_layer():
    """No function or class of the core files imports a layer module (train.py's entry functions,
    which pick the layers, aside), and the core imports none at module level: nothing in it can
    call a layer."""
    for name in CORE:
        tree = ast.parse((REPO / name).read_text())
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = {a.name.split(".")[0] for a in node.names} if isinstance(node, ast.Import) else {node.module}
                assert not modules & LAYERS, f"{name} imports {modules & LAYERS}"
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or (name == "train.py" and node.name in ENTRY):
                continue
            used = {a.name.split(".")[0] for n in ast.walk(node) if isinstance(n, ast.Import) for a in n.names}
            used |= {n.module for n in ast.walk(node) if isinstance(n, ast.ImportFrom)}
            assert not used & LAYERS, f"{name}: {node.name} references {used & LAYERS}"


def test_readme_snippet_trains_two_adapters_fused_with_the_core_alone(capsys):
    """The README's snippet, as written: both losses fall, and the saved adapter loads back equal."""
    import lora
    import model as M
    import peft_format
    code = readme_section("Read the code").split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.splitlines()) <= 45
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    printed = [line.split(": loss ")[1] for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    first, last = ([float(part.split()[1]) for part in line.split(", ")] for line in (printed[0], printed[-1]))
    assert all(b < 0.8 * a for a, b in zip(first, last)), (first, last)
    fresh = M.load_model(scope["folder"])
    peft_format.load_peft(fresh, f"{scope['folder']}/upper")
    for ours, loaded in zip(lora.adapter_parameters(scope["base"], "upper"), lora.adapter_parameters(fresh, "upper")):
        assert torch.equal(ours, loaded)


def test_readme_names_every_test_that_needs_run_slow():
    """Each test skipped without RUN_SLOW=1 is named in README's Tests section, with RUN_SLOW."""
    tests = REPO / "tests"
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("\n## Tests"):]
    gated = []
    for file in sorted(tests.glob("test_*.py")):
        source = file.read_text()
        if "RUN_SLOW" in source:   # `slow = pytest.mark.skipif(... RUN_SLOW ...)`, then `@slow` on each
            gated += [f"{file.name}::{name}" for name in re.findall(r"@slow\ndef (\w+)", source)]
    assert len(gated) == 2 and "Two slow tests" in section and "RUN_SLOW=1" in section
    for name in gated:
        assert name in section, name


# A file name, not a module attribute: `model.safetensors`, `tokenizer.json`, `sweep.png` ...
FILE_SUFFIXES = {"py", "json", "jsonl", "safetensors", "model", "png", "md", "txt", "toml", "yaml", "pt", "sh", "gguf", "html"}


def readme_code_references() -> list[str]:
    """Every `module.name[.attr]` in README.md's inline code whose module is a top-level file:
    fenced blocks aside (commands and snippets), file names and config keys (`sweep.space.lr`) aside."""
    import dataclasses
    import config
    sections = {"scheduler": config.SchedulerConfig, "sweep": config.SweepConfig, "jobs": config.JobConfig}
    modules = {p.stem for p in REPO.glob("*.py")}
    text = re.sub(r"```.*?```", "", (REPO / "README.md").read_text(), flags=re.S)
    found = []
    for span in re.findall(r"`([^`\n]+)`", text):
        for match in re.finditer(r"(?<![\w.\-/])([a-z_]\w*)((?:\.\w+)+)", span):
            module, attrs = match.group(1), match.group(2)[1:].split(".")
            fields = {f.name for f in dataclasses.fields(sections[module])} if module in sections else set()
            if module in modules and attrs[-1] not in FILE_SUFFIXES and attrs[0] not in fields | {"NAME", "FIELD"}:
                found.append(match.group(0))
    return found


def test_readme_code_references_resolve():
    """Every function, class or table README.md names as `module.name` exists there, defined in
    that module (not merely imported into it): a rename or a move shows up here."""
    import importlib
    import inspect
    references = readme_code_references()
    assert len(references) > 10, references          # the pattern still finds what the README names
    for reference in references:
        module_name, *attrs = reference.split(".")
        obj = importlib.import_module(module_name)
        for attr in attrs:
            assert hasattr(obj, attr), f"README.md names `{reference}`: no {attr!r} in {getattr(obj, '__name__', obj)}"
            obj = getattr(obj, attr)
        if len(attrs) == 1 and (inspect.isfunction(obj) or inspect.isclass(obj)):
            assert obj.__module__ == module_name, f"README.md names `{reference}`, defined in {obj.__module__}"
