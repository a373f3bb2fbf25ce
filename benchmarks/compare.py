"""Every method under one protocol on the offline dataset: a markdown table for docs/results.md.

    python benchmarks/compare.py [--seeds 0 1 2] [--rounds 10] [--clients 4] [--out runs/compare]

Each method runs `federate.py` with the same data, client split, rounds, seeds and optimiser
options (no per-method tuning) in its own process, one after the other. The table gives the
final mAP, CF1 and OF1 (mean +- std over seeds), the tunable parameters on this backbone and on
ViT-B/16 (VOC2007 classes, `--count-params`), and seconds per round. Results: OUT/compare.json
and OUT/compare.md. Runs that already finished under OUT are reused, so an interrupted
comparison continues where it stopped.
"""
import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["fedmpt", "fedmvp", "fed-dualcoop", "fed-poscoop", "fedtpg", "fed-maple", "fed-ram"]


def federate(args, env=None, capture=True):
    result = subprocess.run([sys.executable, str(ROOT / "federate.py"), *args], cwd=ROOT, env=env,
                            capture_output=capture, text=True)
    if result.returncode != 0:
        sys.exit(f"federate.py {' '.join(args)} failed (exit {result.returncode}):\n"
                 f"{((result.stdout or '') + (result.stderr or ''))[-3000:]}")
    return result.stdout


def run_once(name, options, seed, out: Path, env=None):
    """One finished run's metrics history (reused when OUT/NAME-sSEED already holds it)."""
    run_dir = out / f"{name}-s{seed}"
    if not (run_dir / "state.pt").exists():
        if run_dir.exists():  # an interrupted run continues from its checkpoint
            federate(["--resume", str(run_dir)], env)
        else:
            federate([*options, "--seed", str(seed), "--out", str(run_dir)], env)
    return json.loads((run_dir / "metrics.json").read_text())


def model_options(extra) -> list:
    """The options after -- that shape the model (ModelConfig's fields, e.g. --class-ctx 4), which
    the ViT-B/16 parameter count must see too; data and training options stay out (VOC classes)."""
    sys.path.insert(0, str(ROOT))
    from options import ModelConfig
    flags = {"--" + field.name.replace("_", "-") for field in dataclasses.fields(ModelConfig)}
    kept = []
    for i, option in enumerate(extra):
        if option.split("=")[0] in flags:
            kept += [option] if "=" in option else extra[i:i + 2]
    return kept


def add_run_options(parser):
    """--threads and the federate.py options after --: what every benchmark driver passes on."""
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for the runs (0: torch's default)")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more federate.py options for every run")


def run_settings(args) -> tuple:
    """(the runs' environment, the federate.py options after --) from add_run_options' arguments."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    return env, [a for a in args.extra if a != "--"]


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return f"{np.mean(values):.2f}" + (f" ± {np.std(values):.2f}" if len(values) > 1 else "")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--out", default="runs/compare")
    add_run_options(parser)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env, extra = run_settings(args)
    count_options = model_options(extra)  # the same for every method
    rows = {}
    for method in args.methods:
        options = ["--method", method, "--rounds", str(args.rounds), "--clients", str(args.clients), *extra]
        histories = [run_once(method, options, seed, out, env) for seed in args.seeds]
        config = json.loads((out / f"{method}-s{args.seeds[0]}" / "config.json").read_text())
        vit = json.loads(federate(["--method", method, "--clip", "ViT-B/16", "--random-init", "--count-params",
                                   *count_options], env).strip().splitlines()[-1])
        rows[method] = {"final": [h[-1] for h in histories], "zero": [h[0] for h in histories],
                        "seconds_per_round": float(np.mean([r["seconds"] for h in histories for r in h[1:]])),
                        "tunable": config["tunable_params"], "tunable_vit_b16": vit["tunable"]}
        print(f"{method}: mAP {mean_std([r['mAP'] for r in rows[method]['final']])}", flush=True)
    (out / "compare.json").write_text(json.dumps(rows, indent=1))
    # with `-- --client-eval` the runs score every client on its own test images: a worst-client column
    keys = ["mAP", "CF1", "OF1"] + (["client_mAP_worst"] if "client_mAP_worst" in rows[args.methods[0]]["final"][0] else [])
    lines = [f"| method | mAP | CF1 | OF1 |{' worst client (mAP) |' if len(keys) > 3 else ''} tunable (this backbone) "
             "| tunable (ViT-B/16, VOC) | s / round |", "|---" * (len(keys) + 4) + "|"]
    for method, row in rows.items():
        cells = [mean_std([r[key] for r in row["final"]]) for key in keys]
        lines.append(f"| {method} | {' | '.join(cells)} | {row['tunable']:,} | {row['tunable_vit_b16']:,} | "
                     f"{row['seconds_per_round']:.1f} |")
    first = next(iter(rows.values()))["zero"]
    prior, zero_shot = mean_std([r.get("label_prior_mAP") for r in first]), mean_std([r.get("zero_shot_mAP") for r in first])
    table = "\n".join(lines) + (f"\n\nSeeds {args.seeds}, {args.rounds} rounds, {args.clients} clients; "
                                f"label-prior mAP {prior}; the frozen backbone zero-shot: mAP {zero_shot}.\n")
    (out / "compare.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
