"""How long is the student path? Counts the project functions that a plain training run calls.

    python benchmarks/call_path.py [--list] [--json FILE] [--root CHECKOUT]

Runs the offline default training, `federate.main(["--rounds", "1", "--threads", "1", "--out", TMP])`
(the generated shapes world), in this process under a profile hook (sys.setprofile, and
threading.setprofile for any thread it starts) and counts, as distinct functions and their files:

- step: one local training step, from the return of the first torch.optim.SGD.step to the return
  of the second: the bookkeeping of step 1, the gather of the next batch, forward, loss, backward,
  the gradient-norm guard and the SGD step;
- run: everything the one-round run calls, from parsing the options to the saved state.

A project function is a Python code object (a def, a method or a lambda) whose file lies inside
the checkout, outside tests/, benchmarks/ and any virtualenv or site-packages, identified by (file
relative to the checkout, qualified name, first line). Module and class bodies (code without
CO_OPTIMIZED) and comprehensions (<listcomp>, <genexpr>, ...) are not functions a reader follows.

The measured run is a warm one: an unmeasured first run, in a subprocess so that no in-process
cache of it hides a call, makes what a checkout's first use makes (data/shapes, the cached image
features); so every call counts the same path. --root measures another checkout (an older commit):
its modules are imported, it is the working directory, only its files count. Nothing is left in
the checkout but data/shapes: the runs write to a temporary folder, and no bytecode.
"""
import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections import defaultdict
from pathlib import Path

RUN = ["--rounds", "1", "--threads", "1"]
TARGETS = {"step": (18, 6), "run": (110, None)}  # at most this many functions (and files): a short path
SKIPPED_NAMES = {"<module>", "<listcomp>", "<genexpr>", "<dictcomp>", "<setcomp>"}
SKIPPED_DIRS = {"tests", "benchmarks", "site-packages", "dist-packages", "venv", ".venv"}


class CallPath:
    """A profile hook: the project functions called in the whole run and in step 2 of SGD."""

    def __init__(self, root: Path, step_code):
        self.root, self.step_code = root, step_code
        self.known = {}  # code object -> its key, or None when it is no project function
        self.run, self.step, self.steps_done = set(), set(), 0

    def key(self, code):
        """(file, qualname, first line) of a project function's code, else None."""
        if code not in self.known:
            path = Path(os.path.abspath(code.co_filename))  # "<frozen abc>", "<string>": no file
            function = code.co_flags & inspect.CO_OPTIMIZED and code.co_name not in SKIPPED_NAMES
            inside = function and not code.co_filename.startswith("<") and path.is_relative_to(self.root)
            rel = path.relative_to(self.root) if inside else None
            project = inside and not SKIPPED_DIRS.intersection(rel.parts)
            self.known[code] = (rel.as_posix(), code.co_qualname, code.co_firstlineno) if project else None
        return self.known[code]

    def __call__(self, frame, event, arg):
        if event == "return" and frame.f_code is self.step_code:
            self.steps_done += 1
        elif event == "call" and (key := self.key(frame.f_code)) is not None:
            self.run.add(key)  # a generator's resumption is a "call" too: same function, same key
            if self.steps_done == 1:
                self.step.add(key)


def measure(root: Path) -> CallPath:
    """Run the one-round training of the checkout at `root` under the hook; returns the hook."""
    sys.dont_write_bytecode = True  # no __pycache__ left in the checkout
    here = Path(__file__).resolve().parent  # benchmarks/: its modules must not shadow the checkout's
    sys.path[:] = [str(root)] + [p for p in sys.path if Path(p or ".").resolve() != here]
    os.chdir(root)
    import torch
    import federate
    tracer = CallPath(root, inspect.unwrap(torch.optim.SGD.step).__code__)
    with tempfile.TemporaryDirectory() as tmp:
        quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # the measured run speaks
        subprocess.run([sys.executable, "federate.py", *RUN, "--out", f"{tmp}/warm"], cwd=root,
                       env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"), **quiet)
        threading.setprofile(tracer)
        sys.setprofile(tracer)
        try:
            status = federate.main([*RUN, "--out", f"{tmp}/run"])
        finally:
            sys.setprofile(None)
            threading.setprofile(None)
    if status:
        sys.exit(f"federate.main exited with {status}")
    if tracer.steps_done < 2:
        sys.exit(f"the run made {tracer.steps_done} SGD step(s): no whole second step to count")
    return tracer


def by_file(functions: set) -> dict:
    files = defaultdict(list)
    for path, qualname, line in sorted(functions):
        files[path].append((qualname, line))
    return dict(files)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the checkout to measure (default: the one this script is in)")
    parser.add_argument("--list", action="store_true", help="list the functions, grouped by file")
    parser.add_argument("--json", type=Path, help="also write the numbers (and the functions) to this file")
    args = parser.parse_args(argv)
    json_path = args.json and args.json.resolve()  # before the run changes the working directory
    tracer = measure(args.root.resolve())
    parts = {"step": by_file(tracer.step), "run": by_file(tracer.run)}
    summary = {name: {"functions": sum(map(len, files.values())), "files": len(files)}
               for name, files in parts.items()}
    print(f"\ncall path of `python federate.py --rounds 1` in {args.root.resolve()}")
    print(f"{'':<32}{'functions':>10}{'files':>7}")
    for name, label in (("step", "one local training step"), ("run", "the whole one-round run")):
        (functions, files), (most, most_files) = summary[name].values(), TARGETS[name]
        met = functions <= most and (most_files is None or files <= most_files)
        target = f"at most {most}" + (f" in {most_files} files" if most_files else "")
        print(f"{label:<32}{functions:>10}{files:>7}   target {target}: {'met' if met else 'NOT met'}")
    for name in parts if args.list else ():
        print(f"\n{name}:")
        for path, functions in parts[name].items():
            print(f"  {path} ({len(functions)})")
            for qualname, line in functions:
                print(f"    {line:>5}  {qualname}")
    if json_path:
        record = {name: dict(summary[name], by_file=parts[name]) for name in parts}
        json_path.write_text(json.dumps(dict(record, root=str(args.root.resolve())), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
