"""Choose one option per method on a validation split, never on the test split.

    python benchmarks/sweep.py --option lr --values 1e-3 1e-2 1e-1 [--methods fedmpt ...]
        [--seeds 0] [--validation 0.2] [--out runs/sweep-lr] [-- more federate.py options]

Every (method, value, seed) is one `federate.py --validation P` run in its own process (finished
runs under OUT are reused, an interrupted one resumes). The choice is the value with the best
final-round validation mAP (mean over seeds); the table beside it gives the share of clipped
steps and the mean gradient norm before clipping, so a choice that only works because clipping
sets every step shows itself. Test mAP is in each run's metrics.json but not in the table: it is
read once, for the chosen value, by whoever reports it. Results: OUT/sweep.json, OUT/sweep.md.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import METHODS, add_run_options, mean_std, run_once, run_settings  # noqa: E402


def summary(history) -> dict:
    """Final validation metrics and the clip statistics of a run's rounds."""
    rounds = history[1:]
    return {"val_mAP": history[-1]["val_mAP"], "best_val_mAP": max(r["val_mAP"] for r in rounds),
            "clip_share": float(np.mean([r["clip_share"] for r in rounds])),
            "grad_norm": float(np.mean([r["grad_norm"] for r in rounds]))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--option", required=True, help="a federate.py option without dashes, e.g. lr, ot-rho")
    parser.add_argument("--values", nargs="+", required=True)
    parser.add_argument("--methods", nargs="+", default=["fedmpt"], choices=METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--validation", type=float, default=0.2)
    parser.add_argument("--out", default="")
    add_run_options(parser)
    args = parser.parse_args(argv)
    out = Path(args.out or f"runs/sweep-{args.option}")
    out.mkdir(parents=True, exist_ok=True)
    env, extra = run_settings(args)
    results, lines = {}, []
    for method in args.methods:
        results[method] = {}
        for value in args.values:
            options = ["--method", method, "--validation", str(args.validation), f"--{args.option}", value, *extra]
            runs = [summary(run_once(f"{method}-{args.option}{value}", options, seed, out, env)) for seed in args.seeds]
            results[method][value] = {key: [run[key] for run in runs] for key in runs[0]}
            print(f"{method} --{args.option} {value}: val mAP {mean_std(results[method][value]['val_mAP'])}, "
                  f"clipped {100 * np.mean(results[method][value]['clip_share']):.0f}%", flush=True)
        best = max(results[method], key=lambda v: np.mean(results[method][v]["val_mAP"]))
        lines += [f"**{method}** (`--{args.option}`; chosen: {best})", "",
                  f"| {args.option} | val mAP (final) | val mAP (best round) | clipped steps | grad norm |",
                  "|---|---|---|---|---|"]
        for value, row in results[method].items():
            mark = " **←**" if value == best else ""
            lines.append(f"| {value}{mark} | {mean_std(row['val_mAP'])} | {mean_std(row['best_val_mAP'])} | "
                         f"{100 * np.mean(row['clip_share']):.0f}% | {np.mean(row['grad_norm']):.1f} |")
        lines.append("")
    note = (f"Validation share {args.validation} of every client's training images; seeds {args.seeds}; "
            f"other options: {' '.join(extra) or 'defaults'}.\n")
    (out / "sweep.json").write_text(json.dumps(results, indent=1))
    (out / "sweep.md").write_text("\n".join(lines) + "\n" + note)
    print("\n".join(lines) + "\n" + note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
