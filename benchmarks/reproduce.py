"""The paper's tables as commands, into a result store that a stopped grid continues from.

    python benchmarks/reproduce.py table1 --out runs/table1 [--dataset voc2007,coco2014,nuswide]
        [--methods fedmpt,fedmvp] [--t 0.1,0.2] [--seeds 0,1,2] [--rounds R] [--clients N]
        [--data-dir data] [--dry-run] [--keep-going] [-- more federate.py options]
        [--lockstep N] [--jobs N | --gpus 0,1,2,3 | --slurm [--slurm-partition P] [--slurm-time MIN] ...]
    python benchmarks/reproduce.py table3 --out runs/table3      # multiscene, mlrsnet: mAP / CF1 / OF1
    python benchmarks/reproduce.py table5 --out runs/table1      # cost: step times joined with the mAP rows
    python benchmarks/reproduce.py zsl --out runs/zsl            # unseen classes: COCO 48/17, NUS-WIDE 925/81

Every cell (method, dataset, t, seed) is one `python federate.py` run in its own process, into
OUT/runs/<cell>/; each finished cell appends a row to OUT/results.csv (method, dataset, t, seed,
rounds, clients, options, mAP, CF1, OF1, seconds, run directory, code version). A cell already
in results.csv is skipped and an interrupted one resumes from its checkpoint, so re-running the
same command after Ctrl-C or a crash continues where it stopped. results.csv is rewritten whole
for each row (a temporary file renamed over it), and read back through one checked reader
(`read_results`): a torn last row, which a crash of older code could leave, is dropped with a
note, any other bad row is an error naming its line. A grid holds OUT/.grid.lock while it runs:
a second grid on the same --out is refused (exit 2), so one cell never runs twice at once. Then OUT/<table>.md holds the
table in the paper's layout beside the published numbers, and table1 draws OUT/table1.png.

How the cells run: one process each, one at a time (`--jobs N`: N at once); `--lockstep N`: up to N
cells of one method, dataset and options (their seeds and t levels) side by side in one process
(speed/lockstep.py), each still its own run directory and row, equal to it run alone; `--gpus
0,1,...`: a worker per GPU (CUDA_VISIBLE_DEVICES its id), each process on whichever GPU is free;
`--slurm`: a Slurm job array through submitit, a task per process, each task appending its own
rows. Rows are appended under OUT/.results.lock, never twice for one cell.

Defaults follow the paper where it says: t in {0.1, ..., 1.0} and every method. It leaves
clients and rounds open; they come from the authors' code (CLIENTS_ROUNDS; docs/tables.md).
"""
import argparse
import concurrent.futures
import contextlib
import csv
import fcntl
import hashlib
import io
import json
import math
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from errors import FedMPTError  # noqa: E402
from store.files import save_figure, write_atomic  # noqa: E402
METHODS = ["fedmpt", "fedmvp", "fed-dualcoop", "fed-poscoop", "fedtpg", "fed-maple", "fed-ram"]
DATASETS = {"table1": ["voc2007", "coco2014", "nuswide"], "table3": ["multiscene", "mlrsnet"], "table5": [],
            "zsl": ["coco2014", "nuswide"]}
T_LEVELS = {"table1": [round(0.1 * i, 1) for i in range(1, 11)], "table3": [1.0], "table5": [], "zsl": [1.0]}
# zsl: the class split of each dataset (the published ones; elsewhere a seeded third of the classes)
ZSL_SPLITS = {"coco2014": "--zsl-split 48/17", "nuswide": "--zsl-split 925/81"}
ZSL_KEYS = ["seen_mAP", "unseen_mAP", "H_mAP", "gzsl_mAP", "unseen_F1@3", "gzsl_F1@3"]
ZSL_METHODS = [m for m in METHODS if m != "fed-poscoop"]  # its negatives are learned per class: it refuses
# (clients, rounds): the authors' README examples (docs/paper-facts); shapes: federate.py's defaults
CLIENTS_ROUNDS = {"voc2007": (2, 50), "coco2014": (8, 100), "nuswide": (4, 50), "multiscene": (2, 50),
                  "mlrsnet": (4, 50), "shapes": (4, 10), "folder": (4, 10)}
# Training images, for time estimates before any cell has finished (approximate where the
# published counts depend on the cleaning: COCO and NUS-WIDE drop images without labels)
TRAIN_IMAGES = {"voc2007": 5011, "coco2014": 82081, "nuswide": 161789, "multiscene": 7000, "mlrsnet": 87329,
                "shapes": 960}
CLASSES = {"voc2007": 20, "coco2014": 80, "nuswide": 81, "multiscene": 36, "mlrsnet": 60, "shapes": 12}
PAPER_NAMES = {"fedmpt": "FedMPT", "fedmvp": "FedMVP", "fed-dualcoop": "Fed-DualCoOp", "fed-poscoop": "Fed-PosCoOp",
               "fedtpg": "FedTPG", "fed-maple": "Fed-MaPLe", "fed-ram": "Fed-RAM"}
PUBLISHED = {  # FedMPT project page, CLIP ViT-B/16 (docs: paper facts)
    "table1": {"fed-dualcoop": {"voc2007": 84.94, "coco2014": 55.63, "nuswide": 45.00},
               "fedtpg": {"voc2007": 85.12, "coco2014": 58.69, "nuswide": 50.93},
               "fed-ram": {"voc2007": 85.67, "coco2014": 61.08, "nuswide": 53.33},
               "fedmvp": {"voc2007": 85.59, "coco2014": 61.64, "nuswide": 52.30},
               "fedmpt": {"voc2007": 89.51, "coco2014": 64.65, "nuswide": 56.69}},
    "table3": {"fed-dualcoop": {"multiscene": (40.09, 31.37, 50.18), "mlrsnet": (38.24, 40.61, 66.97)},
               "fed-ram": {"multiscene": (49.41, 39.07, 52.70), "mlrsnet": (47.83, 46.07, 66.18)},
               "fedmvp": {"multiscene": (49.56, 39.62, 54.16), "mlrsnet": (45.89, 44.98, 66.52)},
               "fedmpt": {"multiscene": (53.68, 43.97, 57.83), "mlrsnet": (58.76, 50.86, 71.22)}},
    "table5": {"fed-poscoop": (0.02, 38.93, 84.46), "fed-maple": (3.56, 65.25, 81.87), "fedtpg": (4.21, 59.43, 84.23),
               "fed-ram": (13.02, 384.51, 85.54), "fedmvp": (1.14, 75.80, 85.61), "fedmpt": (0.80, 97.03, 90.10)},
    # zsl: no federated zero-shot figure on these splits is published in a source we hold (the FedMPT page
    # has none; DualCoOp's and RAM's are centralized). Add a row here only with its source.
    "zsl": {}}
COLUMNS = ["method", "dataset", "t", "seed", "rounds", "clients", "options", "mAP", "CF1", "OF1", "seconds",
           "run_dir", "code_version"]


class GridError(Exception):
    """A grid that cannot go on; its message says what to do (exit 2 for options, 1 for a failed run)."""
    def __init__(self, message, code=2):
        super().__init__(message)
        self.code = code


# ---- Cells ---------------------------------------------------------------------------------
def cell_name(cell) -> str:
    name = f"{cell['dataset']}-{cell['method']}-t{cell['t']:g}-s{cell['seed']}-r{cell['rounds']}-c{cell['clients']}"
    return name + (f"-{hashlib.sha1(cell['options'].encode()).hexdigest()[:8]}" if cell["options"] else "")


def cell_key(row) -> tuple:
    return (row["method"], row["dataset"], float(row["t"]), int(row["seed"]), int(row["rounds"]),
            int(row["clients"]), row["options"])


def make_cells(args) -> list:
    cells = []
    for dataset in args.dataset:
        clients, rounds = CLIENTS_ROUNDS.get(dataset, CLIENTS_ROUNDS["folder"])
        split = [ZSL_SPLITS.get(dataset, "--unseen random:0.33")] if args.table == "zsl" else []
        for method in args.methods:
            for t in args.t:
                for seed in args.seeds:
                    cells.append({"method": method, "dataset": dataset, "t": t, "seed": seed,
                                  "rounds": args.rounds or rounds, "clients": args.clients or clients,
                                  "options": " ".join(split + args.extra)})
    unique = {cell_name(cell): cell for cell in cells}  # --seeds 0,0: one cell, run once
    return list(unique.values())


def federate_args(cell, run_dir: Path, data_dir: str) -> list:
    args = ["--dataset", cell["dataset"], "--method", cell["method"], "--heterogeneity", str(cell["t"]),
            "--seed", str(cell["seed"]), "--rounds", str(cell["rounds"]), "--clients", str(cell["clients"]),
            "--out", str(run_dir)]
    return args + (["--root", str(Path(data_dir) / cell["dataset"])] if data_dir else []) + cell["options"].split()


# ---- The result store ----------------------------------------------------------------------
def code_version() -> str:
    """The commit the code runs at ('-dirty' with uncommitted changes), or 'unknown' outside git."""
    try:
        described = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                   text=True, timeout=30)
        return described.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def columns_of(table: str) -> list:
    return COLUMNS + (ZSL_KEYS + [f"zero_shot_{k}" for k in ZSL_KEYS] if table == "zsl" else [])


NUMBERS = {"t": float, "seed": int, "rounds": int, "clients": int, "mAP": float, "CF1": float, "OF1": float,
           "seconds": float}  # the columns every row must hold as numbers (the zsl figures may be empty)


def read_results(path: Path, columns=COLUMNS) -> list:
    """results.csv, checked: the header holds `columns`, every row every column, each number a
    finite number. A torn last row (no line end: a crash mid-append of older code) is dropped
    with a note and the file rewritten without it; any other bad row is a GridError naming the
    line and the fix."""
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise GridError(f"{path}: cannot read it ({error}); restore it, or choose another --out.") from None
    if text and not text.endswith("\n"):
        kept = text[:text.rfind("\n") + 1]
        print(f"note: {path}: its last row was torn ({text[len(kept):][:60]!r}); dropped: that cell runs again "
              "(it resumes from its run directory).", file=sys.stderr)
        write_atomic(path, kept.encode())
        text = kept
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    if text and set(columns) - set(header):
        raise GridError(f"{path}: not a results file of this script (columns {', '.join(header)}); "
                        "choose another --out.")
    rows = []
    for row in reader:
        problem = row_problem(row, columns)
        if problem:
            raise GridError(f"{path} line {reader.line_num}: {problem}; restore the row as the grid wrote it, or "
                            "delete that line to run its cell again.")
        rows.append(row)
    return rows


def row_problem(row: dict, columns) -> str:
    """Why a results.csv row is not one this script wrote ('' when it is)."""
    if None in row or any(row.get(name) is None for name in columns):
        return f"{len(row) - (None in row)} fields where the header has {len(columns)}"
    for name, kind in NUMBERS.items():
        try:
            value = kind(row[name])
        except ValueError:
            return f"{name} {row[name]!r} is not a number"
        if not math.isfinite(value):
            return f"{name} {row[name]!r} is not a finite number"
    return ""


def append_result(path: Path, row: dict, columns=COLUMNS) -> bool:
    """One line per finished run: results.csv rewritten whole with it (store/files.write_atomic:
    a temporary file, flushed to disk, renamed), so a row is there whole or not at all. Writers
    take turns under OUT/.results.lock (Slurm tasks, GPU workers and the grid may all write); a
    cell already in the file is not added twice. Returns whether the row was added."""
    with results_lock(path):
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        if text.endswith("\n") and any(cell_key(r) == cell_key(row) for r in csv.DictReader(io.StringIO(text))):
            return False
        line = io.StringIO(newline="")
        writer = csv.DictWriter(line, columns)
        if not text:
            writer.writeheader()
        writer.writerow(row)
        write_atomic(path, (text + line.getvalue()).encode())
    return True


@contextlib.contextmanager
def results_lock(path: Path):
    """An exclusive lock on results.csv's lock file beside it (opened without following a link),
    held while one writer reads and rewrites results.csv."""
    lock = path.with_name(".results.lock")
    try:
        descriptor = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as error:
        raise GridError(f"cannot lock {path}: {lock} is {error.strerror}; remove it and run again.") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)  # waits for the writer before it
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


def finished_row(cell, run_dir: Path) -> dict:
    history = json.loads((run_dir / "metrics.json").read_text())
    final = history[-1]
    launches = read_launches(run_dir)
    seconds = sum(x["seconds"] for x in launches) or sum(r.get("seconds", 0) for r in history[1:])
    number = lambda value: "" if value is None else f"{value:.4f}"
    zsl = {**{k: number(final.get(k)) for k in ZSL_KEYS},  # with the frozen backbone's, from round 0
           **{f"zero_shot_{k}": number(history[0].get(f"zero_shot_{k}")) for k in ZSL_KEYS}} if "H_mAP" in final else {}
    return {**cell, **{k: f"{final[k]:.4f}" for k in ("mAP", "CF1", "OF1")}, "seconds": f"{seconds:.1f}",
            "run_dir": str(run_dir), "code_version": "+".join(dict.fromkeys(x["code"] for x in launches)) or "unknown",
            **zsl}


def read_launches(run_dir: Path) -> list:
    """[{code, seconds}] of each federate.py process of a cell (a resumed cell has several)."""
    path = run_dir / "launches.json"
    return json.loads(path.read_text()) if path.exists() else []


def run_cell(cell, run_dir: Path, log: Path, data_dir: str, version: str, threads: int = 0, gpu=None):
    """One federate.py process; an interrupted cell (config.json, no state.pt) resumes."""
    args = cell_arguments(cell, run_dir, data_dir)
    launch([str(ROOT / "federate.py"), *args], [run_dir], log, version, threads, gpu, cell_name(cell))


def cell_arguments(cell, run_dir: Path, data_dir: str) -> list:
    """federate.py's options for a cell: its own, or --resume RUN_DIR for one that has started
    (config.json); a run directory stopped before its first record is emptied first."""
    if run_dir.exists() and not (run_dir / "config.json").exists():
        shutil.rmtree(run_dir)  # stopped before its first record: nothing to keep
    run_dir.mkdir(parents=True, exist_ok=True)
    return ["--resume", str(run_dir)] if (run_dir / "config.json").exists() else federate_args(cell, run_dir, data_dir)


def run_lockstep(cells, out: Path, data_dir: str, version: str, threads: int = 0, gpu=None):
    """Cells side by side in one process (speed/lockstep.py: each resumes on its own); its output
    goes to one log, named in each cell's own."""
    run_dirs = [out / "runs" / cell_name(cell) for cell in cells]
    args = [argument for cell, run_dir in zip(cells, run_dirs)
            for argument in ["--cell", *cell_arguments(cell, run_dir, data_dir)]]
    log = out / "logs" / f"lockstep-{cell_name(cells[0])}-{len(cells)}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    for cell in cells:
        with open(out / "logs" / f"{cell_name(cell)}.log", "a") as own:
            own.write(f"(trained side by side with {len(cells) - 1} other cells: {log})\n")
    launch([str(ROOT / "speed" / "lockstep.py"), *args], run_dirs, log, version, threads, gpu,
           f"{len(cells)} cells side by side ({', '.join(map(cell_name, cells))})")


def launch(command, run_dirs, log: Path, version: str, threads: int, gpu, what: str):
    """A Python process of the grid, its output appended to `log`, with OMP_NUM_THREADS (threads)
    and CUDA_VISIBLE_DEVICES (gpu) when given; each run directory's launches.json records its
    share of the wall time, the code version and the GPU. A failed process is a GridError."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log, "a") as output:
        output.write(f"$ python {' '.join(command)}\n")
        output.flush()
        try:
            env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}),
                   **({"CUDA_VISIBLE_DEVICES": str(gpu)} if gpu is not None else {})}
            code = subprocess.run([sys.executable, *command], cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
                                  env=env).returncode
        finally:  # the wall time of the process, Ctrl-C included: what the next estimate uses
            share = round((time.time() - start) / len(run_dirs), 1)
            for run_dir in run_dirs:
                launch_record = {"code": version, "seconds": share, **({"gpu": str(gpu)} if gpu is not None else {}),
                                 **({"lockstep": len(run_dirs)} if len(run_dirs) > 1 else {})}
                write_atomic(run_dir / "launches.json", json.dumps(read_launches(run_dir) + [launch_record]).encode())
    if code != 0:
        tail = log.read_text().splitlines()[-15:]
        raise GridError(f"{what} failed (exit {code}); its output: {log}\n" + "\n".join(tail),
                        code=2 if code == 2 else 1)


def make_units(cells, size: int) -> list:
    """The grid's processes: cells in groups of at most `size` (--lockstep) that may train side by
    side, one method, dataset, rounds, clients and options each (their seeds and t levels differ)."""
    groups = {}
    for cell in cells:
        groups.setdefault((cell["method"], cell["dataset"], cell["rounds"], cell["clients"], cell["options"]),
                          []).append(cell)
    return [group[i:i + size] for group in groups.values() for i in range(0, len(group), size)]


def run_unit(unit, out: Path, data_dir: str, version: str, threads: int = 0, gpu=None) -> list:
    """A unit's cells that have no state.pt yet trained (one: federate.py; more: side by side);
    returns every cell's results.csv row."""
    pending = [cell for cell in unit if not (out / "runs" / cell_name(cell) / "state.pt").exists()]
    if len(pending) == 1:
        cell = pending[0]
        run_cell(cell, out / "runs" / cell_name(cell), out / "logs" / f"{cell_name(cell)}.log", data_dir, version,
                 threads, gpu)
    elif pending:
        run_lockstep(pending, out, data_dir, version, threads, gpu)
    return [finished_row(cell, out / "runs" / cell_name(cell)) for cell in unit]


# ---- Time estimates ------------------------------------------------------------------------
def seconds_per_round(cell, results, step_times) -> tuple:
    """(seconds, source) of one round of a cell: the median over finished cells of the same method
    and dataset of their wall time (start-up, encoding and evaluation included) per round, else
    steps per round x ms per step: OUT/step_time.json's (`table5` writes it), else the paper's
    Table 5 (a GPU, VOC's 20 classes; encoding and evaluation left out), else None."""
    done = [float(r["seconds"]) / int(r["rounds"]) for r in results
            if r["method"] == cell["method"] and r["dataset"] == cell["dataset"] and int(r["rounds"]) > 0]
    if done:
        return statistics.median(done), "finished cells"
    if cell["dataset"] not in TRAIN_IMAGES:
        return None, "unknown"
    steps = math.ceil(TRAIN_IMAGES[cell["dataset"]] / 32) + cell["clients"]  # one local epoch, batch 32
    measured = sorted((c, ms) for (m, c), ms in step_times.items() if m == cell["method"])
    if measured:
        return ms_at(measured, CLASSES.get(cell["dataset"], measured[0][0])) * steps / 1000, "step_time.json"
    proxy = "fed-poscoop" if cell["method"] == "fed-dualcoop" else cell["method"]  # not in Table 5
    ms = PUBLISHED["table5"][proxy][1]
    return ms * steps / 1000, f"paper's GPU ms/iter{' (Fed-PosCoOp as proxy)' if proxy != cell['method'] else ''}"


def cost_model_price(cells) -> str:
    """The cells' GPU-hours by the cost model (benchmarks/cost_model.py: counts of a step at ViT-B/16,
    fp32, shipped in benchmarks/cost_model.json): the floor at an H200's bf16 peak, at 40% of it, and
    launch-bound (5 us per operator)."""
    from benchmarks import cost_model
    counted = json.loads(cost_model.SHIPPED.read_text())
    cost = cost_model.grid_cost(cells, counted["rows"], "h200")
    hours = cost["hours"]
    return (f"cost model ({cost['cells']} of {len(cells)} cells; counts at {counted['clip']}, benchmarks/cost_model.json): "
            f"floor {hours['peak_ms']:,.1f} GPU-hours at an H200's bf16 peak (the arithmetic alone {hours['flops_ms']:,.1f}), "
            f"{hours['fed_ms']:,.1f} at 40% of it; launch-bound {hours['launch_ms']:,.1f} GPU-hours (5 us per operator).")


def ms_at(measured, n_classes) -> float:
    """ms per step at `n_classes` from [(classes, ms)] measured (step_time.py: VOC's 20 and COCO's
    80): linear in the class count between (and beyond) the two nearest, the one point alone."""
    if len(measured) == 1:
        return measured[0][1]
    (c0, ms0), (c1, ms1) = sorted(measured, key=lambda point: abs(point[0] - n_classes))[:2]
    return max(ms0 + (ms1 - ms0) * (n_classes - c0) / (c1 - c0), min(ms0, ms1) / 2) if c1 != c0 else ms0


def format_duration(seconds) -> str:
    if seconds is None:
        return "?"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


# ---- Tables --------------------------------------------------------------------------------
def mean_std(values, digits=2) -> str:
    if not values:
        return "—"
    text = f"{statistics.mean(values):.{digits}f}"
    return text + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


def rows_of(results, cells) -> dict:
    wanted = {cell_key(c) for c in cells}
    return {cell_key(r): r for r in results if cell_key(r) in wanted}


def table1(cells, rows, args) -> str:
    """Per method and dataset: each seed's mAP averaged over t, then mean ± std over seeds."""
    lines = ["| method | " + " | ".join(args.dataset) + " |", "|---|" + "---:|" * len(args.dataset)]
    for method in args.methods:
        entries = []
        for dataset in args.dataset:
            per_seed = []
            for seed in args.seeds:
                found = [float(r["mAP"]) for k, r in rows.items() if k[:2] == (method, dataset) and k[3] == seed]
                if len(found) == len(args.t):  # a seed counts once all its t levels finished
                    per_seed.append(statistics.mean(found))
            entries.append(mean_std(per_seed))
        lines.append(f"| {PAPER_NAMES[method]} | " + " | ".join(entries) + " |")
    published = [f"| {PAPER_NAMES[m]} | " + " | ".join(f"{v[d]:.2f}" if d in v else "—" for d in args.dataset) + " |"
                 for m, v in PUBLISHED["table1"].items() if any(d in v for d in args.dataset)]
    by_t = ["| method | dataset | " + " | ".join(f"t={t:g}" for t in args.t) + " |", "|---|---|" + "---:|" * len(args.t)]
    for method in args.methods:
        for dataset in args.dataset:
            by_t.append(f"| {PAPER_NAMES[method]} | {dataset} | " + " | ".join(
                mean_std([float(r["mAP"]) for k, r in rows.items() if k[:3] == (method, dataset, t)])
                for t in args.t) + " |")
    text = ["## Table 1: mAP averaged over t (mean ± std over seeds)", "", *lines, "",
            f"t in {{{', '.join(f'{t:g}' for t in args.t)}}}, seeds {args.seeds}; a seed counts once every t "
            "level of it finished.", "", "## mAP at each t (mean ± std over seeds)", "", *by_t]
    if published:
        text += ["", "## Published (FedMPT project page, ViT-B/16)", "", lines[0], lines[1], *published]
    return "\n".join(text) + "\n"


def table3(cells, rows, args) -> str:
    lines = ["| method | " + " | ".join(f"{d} mAP / CF1 / OF1" for d in args.dataset) + " |",
             "|---|" + "---|" * len(args.dataset)]
    for method in args.methods:
        entries = [" / ".join(mean_std([float(r[m]) for k, r in rows.items() if k[:2] == (method, dataset)])
                              for m in ("mAP", "CF1", "OF1")) for dataset in args.dataset]
        lines.append(f"| {PAPER_NAMES[method]} | " + " | ".join(entries) + " |")
    published = [f"| {PAPER_NAMES[m]} | " + " | ".join(" / ".join(f"{x:.2f}" for x in v[d]) if d in v else "—"
                                                        for d in args.dataset) + " |"
                 for m, v in PUBLISHED["table3"].items() if any(d in v for d in args.dataset)]
    text = ["## Table 3: mAP / CF1 / OF1 (mean ± std over seeds)", "", *lines, "",
            f"t {', '.join(f'{t:g}' for t in args.t)}, seeds {args.seeds}."]
    if published:
        text += ["", "## Published (FedMPT project page, ViT-B/16)", "", lines[0], lines[1], *published]
    return "\n".join(text) + "\n"


def zsl_table(cells, rows, args) -> str:
    """Per dataset and method: seen, unseen, H and GZSL mAP and F1@3 (mean ± std over seeds),
    with the frozen backbone alone (round 0's zero-shot figures) as the reference row."""
    text = ["## Unseen classes: mean ± std over seeds", ""]
    header = "| method | " + " | ".join(ZSL_KEYS) + " |"
    for dataset in args.dataset:
        found = [r for k, r in rows.items() if k[1] == dataset]
        text += [f"### {dataset} ({found[0]['options'].split(' --', 1)[0] if found else 'no cell finished'})", "",
                 header, "|---|" + "---:|" * len(ZSL_KEYS)]
        figures = lambda rs, prefix="": [mean_std([float(r[prefix + k]) for r in rs if r.get(prefix + k)]) for k in ZSL_KEYS]
        reference = list({r["seed"]: r for r in found}.values())  # one per seed: the backbone is the same for each method
        text.append("| zero-shot backbone | " + " | ".join(figures(reference, "zero_shot_")) + " |")
        for method in args.methods:
            text.append(f"| {PAPER_NAMES[method]} | " + " | ".join(figures([r for r in found if r["method"] == method]))
                        + " |")
        text.append("")
    text += [f"seeds {args.seeds}; unseen: mAP over the unseen classes on the test images holding one; H: their harmonic "
             "mean with seen; gzsl: every class, every image; F1@3: each image's 3 best classes (metrics.zsl_metrics). "
             "No published federated row is cited (PUBLISHED['zsl'])."]
    return "\n".join(text) + "\n"


def table5(results, step_json: Path, args) -> str:
    """Parameter counts and step times (benchmarks/step_time.py) beside the mAP rows of results.csv."""
    measured = json.loads(step_json.read_text())
    dataset = args.dataset[0] if args.dataset else "voc2007"
    lines = ["| method | total params | tunable params | train time | mAP | runs |", "|---|---:|---:|---:|---:|---:|"]
    for row in measured["rows"]:
        maps = [float(r["mAP"]) for r in results if r["method"] == row["method"] and r["dataset"] == dataset]
        lines.append(f"| {PAPER_NAMES[row['method']]} | {row['total'] / 1e6:.2f} M | {row['tunable']:,} | "
                     f"{row['ms_per_step']:.2f} ms/iter | {mean_std(maps)} | {len(maps)} |")
    published = ["| method | tunable params | train time | mAP |", "|---|---:|---:|---:|"] + [
        f"| {PAPER_NAMES[m]} | {p:.2f} M | {ms:.2f} ms/iter | {mAP:.2f} |" for m, (p, ms, mAP) in PUBLISHED["table5"].items()]
    return "\n".join([
        "## Table 5: cost", "", f"Step times: {measured.get('clip', 'ViT-B/16')} random init, VOC2007's 20 classes, "
        f"batch 32, device {measured['device']} ({step_json}). mAP: the mean of every {dataset} row of "
        "results.csv for the method (all t and seeds; `runs` counts them).", "", *lines, "",
        "## Published (FedMPT project page, ViT-B/16, a GPU)", "", *published]) + "\n"


def plot_table1(rows, args, path: Path):
    """mAP against t, one line per method (mean over seeds, bars: std), a panel per dataset, with
    the frozen backbone's zero-shot mAP (dashed) where a run recorded it."""
    from matplotlib.figure import Figure
    figure = Figure(figsize=(4.8 * len(args.dataset), 3.8))
    for i, dataset in enumerate(args.dataset):
        axes = figure.add_subplot(1, len(args.dataset), i + 1)
        for method in args.methods:
            points = [(t, [float(r["mAP"]) for k, r in rows.items() if k[:3] == (method, dataset, t)]) for t in args.t]
            points = [(t, v) for t, v in points if v]
            if points:
                axes.errorbar([t for t, _ in points], [statistics.mean(v) for _, v in points],
                              yerr=[statistics.stdev(v) if len(v) > 1 else 0 for _, v in points],
                              label=PAPER_NAMES[method], marker="o", markersize=3, capsize=2)
        runs = [Path(r["run_dir"]) / "metrics.json" for k, r in rows.items() if k[1] == dataset]
        zero_shot = next((json.loads(p.read_text())[0].get("zero_shot_mAP") for p in runs if p.exists()), None)
        if zero_shot is not None:
            axes.axhline(zero_shot, color="grey", linestyle="--", linewidth=1, label="zero-shot")
        axes.set_title(dataset)
        axes.set_xlabel("heterogeneity t (1: each client its cluster)")
        axes.set_ylabel("mAP (%)")
        axes.grid(alpha=0.3)
    figure.axes[0].legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, path, dpi=120)


# ---- The command ---------------------------------------------------------------------------
def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", choices=["table1", "table3", "table5", "zsl"])
    parser.add_argument("--out", required=True, help="the grid's directory: results.csv, runs/, logs/, tables")
    parser.add_argument("--dataset", help="comma-separated (table1: voc2007,coco2014,nuswide; table3: multiscene,"
                        "mlrsnet; table5: the dataset of the mAP column, voc2007; zsl: coco2014,nuswide, or another "
                        "with a seeded third of its classes unseen)")
    parser.add_argument("--methods", help="comma-separated; default every method (zsl: every one that scores unseen "
                                          "classes, all but fed-poscoop)")
    parser.add_argument("--t", help="heterogeneity levels, comma-separated (table1: 0.1,...,1.0; table3: 1.0)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=0, help="default per dataset: the authors' (CLIENTS_ROUNDS)")
    parser.add_argument("--clients", type=int, default=0, help="default per dataset: the authors' (CLIENTS_ROUNDS)")
    parser.add_argument("--data-dir", default="", help="a folder holding each dataset as DIR/<dataset> "
                                                       "(default: federate.py's data/<dataset>)")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and the time they should take")
    parser.add_argument("--keep-going", action="store_true", help="go on past a failed cell; exit 1 at the end")
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of each cell (0: torch's default); "
                        "1 keeps a CPU grid fast beside other torch processes (two at full threads slow each other many times)")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once (one GPU shared; without --threads "
                        "each gets its share of the CPU cores); the results equal those of one at a time")
    parser.add_argument("--lockstep", type=int, default=1, help="cells trained side by side in one process "
                        "(speed/lockstep.py): up to N cells of one method, dataset, rounds, clients and options (their "
                        "seeds and t levels) share the frozen encoders and each step's passes; each keeps its own run "
                        "directory and row, equal to it run alone")
    parser.add_argument("--gpus", default="", help="GPU ids, comma-separated: one worker per GPU "
                        "(CUDA_VISIBLE_DEVICES=id), each cell (or --lockstep group) on whichever GPU is free")
    parser.add_argument("--slurm", action="store_true", help="run the grid as a Slurm job array through submitit, a "
                        "task per cell or --lockstep group (logs in OUT/slurm/)")
    parser.add_argument("--slurm-partition", default="", help="--slurm: the partition (default: the cluster's)")
    parser.add_argument("--slurm-time", type=int, default=1440, help="--slurm: minutes each task may run")
    parser.add_argument("--slurm-gpus", type=int, default=1, help="--slurm: GPUs per task")
    parser.add_argument("--slurm-cpus", type=int, default=8, help="--slurm: CPU cores per task")
    parser.add_argument("--slurm-parallel", type=int, default=0, help="--slurm: tasks running at once (0: all)")
    parser.add_argument("--slurm-cluster", default="slurm", choices=["slurm", "local"], help="--slurm: local runs "
                        "the same tasks as processes on this machine (submitit's local executor: a check before "
                        "a cluster)")
    parser.add_argument("--steps", type=int, default=5, help="table5: timed steps per method")
    parser.add_argument("--clip", default="ViT-B/16", help="table5: the architecture timed (random init)")
    parser.epilog = "Options after -- go to every cell's federate.py (e.g. -- --clients-by scene --min-labels 7)."
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:len(argv) - len(extra) - (1 if "--" in argv else 0)])
    args.extra = extra
    try:
        args.methods = [m for m in args.methods.split(",") if m] if args.methods is not None else \
            (ZSL_METHODS if args.table == "zsl" else METHODS)
        args.seeds = [int(s) for s in args.seeds.split(",") if s]
        args.t = [float(t) for t in args.t.split(",") if t] if args.t else T_LEVELS[args.table]
        args.dataset = args.dataset.split(",") if args.dataset else DATASETS[args.table]
    except ValueError as error:
        raise GridError(f"--seeds and --t take comma-separated numbers ({error}).") from None
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        raise GridError(f"--methods {','.join(unknown) or '(empty)'}: choose from {','.join(METHODS)}.")
    if args.jobs < 1:
        raise GridError(f"--jobs {args.jobs}: give 1 or more cells at once.")
    if args.lockstep < 1:
        raise GridError(f"--lockstep {args.lockstep}: give 1 or more cells per process.")
    try:
        args.gpus = [int(g) for g in args.gpus.split(",") if g.strip()]
    except ValueError:
        raise GridError(f"--gpus {args.gpus}: give GPU ids, comma-separated (e.g. 0,1,2,3).") from None
    if any(g < 0 for g in args.gpus) or len(set(args.gpus)) != len(args.gpus):
        raise GridError(f"--gpus {args.gpus}: each id once, 0 or more.")
    if args.gpus and (args.jobs > 1 or args.slurm):
        raise GridError("--gpus runs one process per GPU on this machine; leave out --jobs and --slurm with it.")
    if args.slurm and (args.jobs > 1 or min(args.slurm_time, args.slurm_gpus + 1, args.slurm_cpus) < 1
                       or args.slurm_parallel < 0):
        raise GridError("--slurm: --slurm-time and --slurm-cpus must be 1 or more, --slurm-gpus and --slurm-parallel "
                        "0 or more, and --jobs left out (the cluster runs the tasks at once).")
    if any(not 0 < t <= 1 for t in args.t):
        raise GridError(f"--t {args.t}: each level must lie in (0, 1].")
    if {"--out", "--resume", "--seed", "--method", "--dataset", "--heterogeneity"} & {option.split("=", 1)[0]
                                                                                    for option in args.extra}:
        raise GridError("the options after -- may not set --out, --resume, --seed, --method, --dataset or "
                        "--heterogeneity (as --seed 5 or --seed=5): the grid sets them per cell.")
    return args


def run_grid(args, out: Path) -> list:
    """Run (or with --dry-run list) every cell; returns the grid's rows of results.csv."""
    results_path, version = out / "results.csv", code_version()
    results, step_json = read_results(results_path, columns_of(args.table)), out / "step_time.json"
    measured = json.loads(step_json.read_text()) if step_json.exists() else {}
    step_times = {(r["method"], r.get("classes", 20)): r["ms_per_step"]  # every class count measured (fp32)
                  for r in measured.get("cells", measured.get("rows", [])) if r.get("precision", "fp32") == "fp32"}
    cells = make_cells(args)
    done = {cell_key(r) for r in results}
    todo = [c for c in cells if cell_key(c) not in done]
    print(f"{len(cells)} cells, {len(cells) - len(todo)} finished, {len(todo)} to run (code {version}).")
    if args.dry_run:
        total, unknown, per_dataset = 0.0, 0, {}
        for cell in todo:
            per_round, source = seconds_per_round(cell, results, step_times)
            run_dir = out / "runs" / cell_name(cell)
            rounds_left = cell["rounds"]
            if (run_dir / "metrics.json").exists():
                rounds_left -= len(json.loads((run_dir / "metrics.json").read_text())) - 1
            estimate = per_round * rounds_left if per_round is not None else None
            total, unknown = total + (estimate or 0), unknown + (estimate is None)
            per_dataset[cell["dataset"]] = per_dataset.get(cell["dataset"], 0) + (estimate or 0)
            print(f"  {cell_name(cell):<58} {rounds_left:>4} rounds  {format_duration(estimate):>9}  ({source})")
        print("; ".join(f"{d}: {format_duration(t)}" for d, t in per_dataset.items()))
        print(f"total: {format_duration(total)} for {len(todo) - unknown} cells with an estimate"
              + (f"; {unknown} without one (none of their method and dataset finished yet: "
                 "run `table5` into this --out for step times, or let one cell finish)" if unknown else "") + ".")
        print(cost_model_price(todo))
        return []
    units = make_units(todo, args.lockstep)
    if args.slurm:
        submit_slurm(units, args, out, version)
        return read_results(results_path, columns_of(args.table))
    return run_units(units, args, out, version, results, results_path)


def run_units(units, args, out: Path, version: str, results: list, results_path: Path) -> list:
    """Every unit (make_units) in a process of its own: --jobs at once, or with --gpus one per GPU
    (CUDA_VISIBLE_DEVICES its id), each unit taking whichever GPU is free; this process alone
    writes the rows. Returns the grid's rows of results.csv."""
    workers = len(args.gpus) or args.jobs
    # --jobs N: N cells at once (one GPU shared; on the CPU the cores divided between them)
    threads = args.threads or (max(1, (os.cpu_count() or 1) // workers) if workers > 1 else 0)
    free = queue.Queue()
    for gpu in args.gpus:
        free.put(gpu)

    def one(unit):
        gpu = free.get() if args.gpus else None
        try:
            return run_unit(unit, out, args.data_dir, version, threads, gpu)
        finally:
            if gpu is not None:
                free.put(gpu)
    failures, done, total = [], 0, sum(map(len, units))
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
    try:
        started = {pool.submit(one, unit): (unit, time.time()) for unit in units}
        for future in concurrent.futures.as_completed(started):
            unit, start = started[future]
            try:
                rows = future.result()
            except GridError as error:
                if not args.keep_going:
                    raise
                failures.append(str(error))
                done += len(unit)
                print(f"[{done}/{total}] {', '.join(map(cell_name, unit))} failed", flush=True)
                continue
            for cell, row in zip(unit, rows):
                append_result(results_path, row, columns_of(args.table))  # one thread writes results.csv
                results.append(row)
                done += 1
                print(f"[{done}/{total}] {cell_name(cell)} mAP {float(row['mAP']):.2f} ({time.time() - start:.0f} s)",
                      flush=True)
    finally:  # Ctrl-C or a failed cell: no further cell starts; the running ones end (they got the Ctrl-C too)
        pool.shutdown(wait=True, cancel_futures=True)
    if failures:
        raise GridError(f"{len(failures)} cells failed:\n" + "\n".join(failures), code=1)
    return results


# ---- A Slurm cluster (submitit) ------------------------------------------------------------
def submit_slurm(units, args, out: Path, version: str):
    """The units as one Slurm job array through submitit, a task per unit: each task runs
    `reproduce.py --unit SPEC` (run_unit) and appends its cells' rows itself (append_result takes
    turns under a lock), so rows land even if this process is gone. This process waits for the
    array and says how each task ended; --slurm-cluster local runs the same tasks on this machine."""
    try:
        import submitit
    except ImportError:
        raise GridError("--slurm needs submitit: pip install -r requirements.txt") from None
    if not units:
        return
    specs = []
    for i, unit in enumerate(units):
        spec = out / "units" / f"{cell_name(unit[0])}-{len(unit)}.json"
        write_atomic(spec, json.dumps({"table": args.table, "out": str(out), "cells": unit, "data_dir": args.data_dir,
                                       "version": version, "threads": args.threads}).encode())
        specs.append(str(spec))
    executor = submitit.AutoExecutor(folder=out / "slurm" / "%j", cluster=None if args.slurm_cluster == "slurm"
                                     else "local")
    parameters = {"timeout_min": args.slurm_time, "name": f"fedmpt-{args.table}"}
    if args.slurm_cluster == "slurm":
        parameters.update(gpus_per_node=args.slurm_gpus, cpus_per_task=args.slurm_cpus, tasks_per_node=1,
                          slurm_array_parallelism=args.slurm_parallel or len(units),
                          **({"slurm_partition": args.slurm_partition} if args.slurm_partition else {}))
    executor.update_parameters(**parameters)
    task = submitit.helpers.CommandFunction([sys.executable, str(ROOT / "benchmarks" / "reproduce.py"), "--unit"],
                                            cwd=str(ROOT), verbose=False)
    jobs = executor.map_array(task, specs)
    print(f"submitted {len(jobs)} tasks ({sum(map(len, units))} cells) as job {jobs[0].job_id.split('_')[0]}; "
          f"their logs: {out / 'slurm'}; this command waits for them (Ctrl-C leaves them running).", flush=True)
    failures = []
    for job, unit in zip(jobs, units):
        try:
            job.result()
            print(f"task {job.job_id}: {', '.join(map(cell_name, unit))} done", flush=True)
        except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as error:
            failures.append(f"task {job.job_id} ({', '.join(map(cell_name, unit))}): {str(error).strip()[-600:]}")
    if failures:
        raise GridError(f"{len(failures)} tasks failed:\n" + "\n".join(failures), code=1)


def run_unit_file(spec_path: str) -> int:
    """`reproduce.py --unit SPEC`: one task of a Slurm array (submit_slurm): its unit trained, its
    rows appended to results.csv."""
    try:
        spec = json.loads(Path(spec_path).read_text())
        out = Path(spec["out"])
        rows = run_unit(spec["cells"], out, spec["data_dir"], spec["version"], spec["threads"])
        for row in rows:
            append_result(out / "results.csv", row, columns_of(spec["table"]))
        return 0
    except GridError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.code


def step_times_for(args, out: Path) -> Path:
    """OUT/step_time.json: benchmarks/step_time.py, run once per --out (delete it to measure again)."""
    path = out / "step_time.json"
    if not path.exists():
        command = [sys.executable, str(ROOT / "benchmarks" / "step_time.py"), "--methods",
                   *args.methods,
                   "--steps", str(args.steps), "--clip", args.clip, "--out", str(out / "step_time.md")]
        if args.dry_run:
            print(f"would run: {' '.join(command)}")
            return path
        if subprocess.run(command, cwd=ROOT).returncode != 0:
            raise GridError("benchmarks/step_time.py failed; see its output above.", code=1)
    return path


def check_out(out: Path):
    """--out, refused before anything is written when it, or a folder on its path, is a file."""
    for path in (out, *out.parents):
        if path.exists() and not path.is_dir():
            raise GridError(f"--out {out}: {path} is a file, not a folder; give another --out.")


def lock_grid(out: Path):
    """OUT/.grid.lock, held by this grid while it runs (opened without following a link): a second
    grid on the same --out would run the same cells in the same run directories at once."""
    path = out / ".grid.lock"
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as error:
        why = "a symbolic link this script did not create" if os.path.islink(path) else error.strerror
        raise GridError(f"cannot lock the grid {out}: {path} is {why}; remove it and run again.") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise GridError(f"another grid is running on --out {out} (it holds {path}); wait for it to end, or give "
                        "this one another --out.") from None
    return descriptor


def stop(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--unit"] and len(argv) == 2:  # a task of a --slurm array
        return run_unit_file(argv[1])
    lock = None
    try:
        args = parse(argv)
        out = Path(args.out).resolve()  # the cells run in the repository: paths must not depend on the caller's
        args.data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else ""
        check_out(out)
        if not args.dry_run:  # a dry run writes nothing
            out.mkdir(parents=True, exist_ok=True)
            lock = lock_grid(out)  # held until the grid ends (finally, below)
        if args.table == "table5":
            path = step_times_for(args, out)
            if not args.dry_run:
                write_atomic(out / "table5.md", table5(read_results(out / "results.csv"), path, args).encode())
                print((out / "table5.md").read_text())
            return 0
        results = run_grid(args, out)
        if args.dry_run:
            return 0
        cells = make_cells(args)
        rows = rows_of(results, cells)
        write_atomic(out / f"{args.table}.md", {"table1": table1, "table3": table3, "zsl": zsl_table}[args.table](
            cells, rows, args).encode())
        if args.table == "table1":
            plot_table1(rows, args, out / "table1.png")
        print((out / f"{args.table}.md").read_text())
        print(f"results: {out / 'results.csv'}; table: {out / (args.table + '.md')}")
        return 0
    except GridError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.code
    except FedMPTError as error:  # a file the grid writes (store/files.py): a full disk, a planted link
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nstopped; run the same command again to continue where it stopped.", file=sys.stderr)
        return 130
    finally:
        if lock is not None:
            os.close(lock)  # the grid's lock ends with it


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, stop)  # `kill` or a job scheduler's limit stops the grid like Ctrl-C
    sys.exit(main())
