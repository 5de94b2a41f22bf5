"""The flat layout stays flat: imports between the top-level files run one way (no circles)."""
import ast
from pathlib import Path

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
    assert graph["llama"] == set() and graph["chatglm"] == {"llama"}
    assert "lora" not in graph["model"] | graph["quant"]     # LoRA is applied after loading
    assert "train" not in graph["demo"]                      # train.run_demo drives the demo
