"""The house: the method files stand on torch and clip alone, no module imports itself back
through others, and entry points import the loop, never the reverse."""
import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHOD = {"ot", "gating", "prompts", "backbone", "fedmpt"}
ROOMS = ["baselines", "conditions", "loaders", "shapes", "tools"]


def project_modules() -> dict:
    """{dotted module name: path} of the code a user runs (tests and benchmarks left out)."""
    modules = {path.stem: path for path in REPO.glob("*.py")}
    for room in ROOMS:
        for path in (REPO / room).glob("*.py"):
            modules[room if path.stem == "__init__" else f"{room}.{path.stem}"] = path
    return modules


def imports_of(path: Path, modules) -> set:
    """Project modules a file imports anywhere in it (late imports inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {name for name in names if name in modules}
    return found


def test_method_files_import_only_torch_clip_and_each_other():
    modules = project_modules()
    for name in METHOD:
        tree = ast.parse(modules[name].read_text())
        tops = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        tops |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        allowed = METHOD | {"errors", "torch", "clip"} | set(sys.stdlib_module_names)
        assert tops <= allowed, f"{name}.py imports {sorted(tops - allowed)}"


def test_no_import_circle_among_the_project_modules():
    modules = project_modules()
    graph = {name: imports_of(path, modules) - {name} for name, path in modules.items()}
    state = {}  # name -> "open" while on the path, "done" after

    def visit(name, path):
        state[name] = "open"
        for other in graph[name]:
            assert state.get(other) != "open", "import circle: " + " -> ".join(path + [other])
            if other not in state:
                visit(other, path + [other])
        state[name] = "done"
    for name in graph:
        if name not in state:
            visit(name, [name])


def test_entry_points_import_the_loop_never_the_reverse():
    modules = project_modules()
    assert "federate" in imports_of(modules["flower_app"], modules)
    assert "experiment" in imports_of(modules["predict"], modules)
    for core in ["federate", "experiment"]:
        assert not imports_of(modules[core], modules) & {"predict", "flower_app"}


def test_files_stay_short_and_the_root_small():
    modules = project_modules()
    long = {name: n for name, path in modules.items() if (n := len(path.read_text().splitlines())) > 400}
    assert not long, long
    assert len(list(REPO.glob("*.py"))) <= 13
