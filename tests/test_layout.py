"""The house: the method files stand on torch, clip and numpy alone and stay small, the fast
paths in speed/ import the method (never the reverse), no module imports itself back through
others, entry points import the loop (never the reverse) and stop with one line on an older
interpreter, and the plain loop loads neither Flower, nor the process tools, nor a comparison
method it was not asked for."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
METHOD = {"ot", "gating", "prompts", "backbone", "fedmpt"}
ROOMS = ["baselines", "conditions", "launcher", "loaders", "shapes", "speed", "store", "tools", "zeroshot"]
STUDENT_PATH = ["federate", "experiment", "data", "client", "options", *sorted(METHOD)]  # what a student reads
ENTRY_POINTS = [pytest.param(name, marks=pytest.mark.slow) for name in ("federate", "predict", "flower_app")]  # each starts an interpreter


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


def top_level_imports(path: Path) -> set:
    """The top-level packages a file imports anywhere in it (late imports inside functions too)."""
    tree = ast.parse(path.read_text())
    tops = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    return tops | {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                   and node.module and node.level == 0}


def test_method_files_import_only_torch_clip_numpy_errors_and_each_other():
    modules = project_modules()
    allowed = METHOD | {"errors", "torch", "clip", "numpy"} | set(sys.stdlib_module_names)
    for name in METHOD:
        tops = top_level_imports(modules[name])
        assert tops <= allowed, f"{name}.py imports {sorted(tops - allowed)}"


def test_speed_imports_the_method_and_the_method_never_imports_speed():
    modules = project_modules()
    for name in METHOD:
        assert "speed" not in top_level_imports(modules[name]), f"{name}.py imports speed"
    speed = {name for name in modules if name.split(".")[0] == "speed"}
    assert speed >= {"speed", "speed.shared_prefix", "speed.parallel_clients"}
    assert set().union(*(imports_of(modules[name], modules) for name in speed)) & METHOD  # it stands on the method


def lines_of(name: str) -> int:
    return len((REPO / f"{name}.py").read_text().splitlines())


def test_the_method_and_the_loop_stay_short_enough_to_read_in_one_sitting():
    method = {name: lines_of(name) for name in METHOD}
    assert sum(method.values()) <= 650, method
    assert lines_of("federate") <= 300
    too_long = {name: lines_of(name) for name in STUDENT_PATH if lines_of(name) > 350}
    assert not too_long, f"files over 350 lines on the student path: {too_long}"


def test_no_function_on_the_student_path_is_over_50_lines():
    too_long = []
    for name in [name for name in STUDENT_PATH if name != "options"]:
        for node in ast.walk(ast.parse((REPO / f"{name}.py").read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 50:
                too_long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, too_long


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


def test_the_flower_bundle_carries_every_module_a_supernode_may_import():
    """pyproject.toml's fab-include: every project module (the root's and each room's) is in the
    Flower App bundle, or a SuperNode fails with "No module named ..." mid-run."""
    import fnmatch
    import tomllib
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["fab-include"]

    def included(relative: Path) -> bool:  # a pattern's segments match the path's, one for one
        return any(len(parts := pattern.strip("/").split("/")) == len(relative.parts)
                   and all(fnmatch.fnmatchcase(part, glob) for part, glob in zip(relative.parts, parts))
                   for pattern in patterns)
    left_out = [str(path.relative_to(REPO)) for path in project_modules().values() if not included(path.relative_to(REPO))]
    assert not left_out, f"not in pyproject.toml's fab-include: {left_out}"


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


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_an_interpreter_older_than_the_declared_minimum_stops_with_one_line(entry_point):
    """The libraries import as they would on that interpreter (they read sys.version_info
    themselves); then the entry point's own code stops with one `error:` line and exit 2."""
    import tomllib

    import errors
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert declared == ">=" + ".".join(map(str, errors.MINIMUM_PYTHON))
    older = ("import warnings; warnings.filterwarnings('ignore', message='pkg_resources is deprecated')\n"
             "import clip, numpy, PIL, torch, torchvision, tqdm\n"
             f"import sys; sys.version_info = (3, 10, 13); import {entry_point}")
    result = subprocess.run([sys.executable, "-c", older], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: fedmpt needs Python 3.11 or newer")
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
