"""The house: the method files stand on torch and clip alone, no module imports itself back
through others, entry points import the loop (never the reverse), and the plain loop loads
neither Flower, nor the process tools, nor a comparison method it was not asked for."""
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHOD = {"ot", "gating", "prompts", "backbone", "fedmpt"}
ROOMS = ["baselines", "conditions", "launcher", "loaders", "shapes", "store", "tools", "zeroshot"]


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
    for core in ["federate", "experiment", "data"]:
        assert not imports_of(modules[core], modules) & {"predict", "flower_app"}
    for room in [name for name in modules if name.split(".")[0] in ("store", "launcher", "loaders", "baselines")]:
        assert not imports_of(modules[room], modules) & {"federate", "flower_app", "predict"}, room


def modules_loaded_by(code: str) -> list:
    """The modules a fresh interpreter holds after each step of `code` (steps split by '# --')."""
    report = "import json, sys; print(json.dumps(sorted(sys.modules)))"
    program = "\n".join(step + "\n" + report for step in code.split("# --"))
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return [set(json.loads(line)) for line in result.stdout.splitlines() if line.startswith("[")]


COMPARISON = {"baselines.coop", "baselines.fedmvp", "baselines.fedtpg", "baselines.maple", "baselines.ram",
              "baselines.common"}


def test_the_plain_loop_loads_no_flower_no_process_tools_and_no_method_it_was_not_asked_for():
    loaded, asked = modules_loaded_by("import federate\nfederate.parse_config(['--rounds', '1'])\n"
                                      "import baselines\nbaselines.model_class('fedmpt')\n# --\n"
                                      "baselines.model_class('fed-dualcoop')")
    assert not {m for m in loaded if m.split(".")[0] in ("flwr", "tomli_w", "launcher", "flower_app")}
    assert not loaded & COMPARISON, sorted(loaded & COMPARISON)
    assert not loaded & {"tools.download", "tools.explain", "loaders.coco", "loaders.nuswide", "loaders.folder",
                         "loaders.mlrsnet", "loaders.multiscene"}
    assert "baselines.coop" in asked and not asked & (COMPARISON - {"baselines.coop", "baselines.common"})


def test_the_readme_gives_the_method_files_true_sizes():
    readme = (REPO / "README.md").read_text()
    sizes = {name: len((REPO / f"{name}.py").read_text().splitlines()) for name in ("ot", "gating", "prompts",
                                                                                   "backbone", "fedmpt")}
    assert f"**The method is five files, {sum(sizes.values())} lines:**" in readme
    for name, n in sizes.items():
        assert re.search(rf"`{name}\.py` \([^)]*, {n}\)", readme), f"README: {name}.py has {n} lines"
