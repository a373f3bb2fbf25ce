"""Spurious co-occurrence on the shapes world: who fires a label because its companion is there?

    python benchmarks/bias.py [--seeds 0 1 2] [--rounds 10] [--out runs/bias] [--rows FedMPT]
        [-- more federate.py options for every run, e.g. --lr 0.03]

Every client of the offline world trains on images where one pair of classes nearly always
co-occurs (shapes/world.py BIASED_PAIRS, a different pair per client); the test images are drawn without
those preferences. For zero-shot CLIP, Fed-PosCoOp, Fed-DualCoOp, FedMVP, FedMPT and FedMPT's
ablations (--ot uniform, --gate uniform, --conditions none), each on the same world, split,
rounds and seeds, the table gives the final mAP, the exclusive and co-occur mAP of the biased
classes and the irrelevant-activation rate (metrics.bias_metrics), mean +- std over seeds.
Writes OUT/bias.json, OUT/bias.md and OUT/bias.png; finished runs under OUT are reused.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import add_run_options, mean_std, run_once, run_settings  # noqa: E402

CONFIGS = {"Fed-PosCoOp": ["--method", "fed-poscoop"], "Fed-DualCoOp": ["--method", "fed-dualcoop"],
           "FedMVP": ["--method", "fedmvp"], "FedMPT": ["--method", "fedmpt"],
           "FedMPT, --ot-rho inf (exact OT)": ["--method", "fedmpt", "--ot-rho", "inf"],
           "FedMPT, --ot uniform": ["--method", "fedmpt", "--ot", "uniform"],
           "FedMPT, --gate uniform": ["--method", "fedmpt", "--gate", "uniform"],
           "FedMPT, --conditions none": ["--method", "fedmpt", "--conditions", "none"]}
KEYS = [("mAP", "mAP"), ("exclusive_mAP", "exclusive mAP"), ("cooccur_mAP", "co-occur mAP"),
        ("irrelevant_rate", "irrelevant activations %")]


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, len(KEYS), figsize=(4 * len(KEYS), 3.8))
    names = list(rows)
    for axis, (key, label) in zip(axes, KEYS):
        values = [[v for v in rows[n][key] if v is not None] for n in names]
        means = [np.mean(v) if v else np.nan for v in values]
        errors = [np.std(v) if v else 0 for v in values]
        axis.barh(range(len(names)), means, xerr=errors, color=["tab:gray"] + ["tab:blue"] * 3 + ["tab:red"] * 5)
        axis.set_yticks(range(len(names)), names if axis is axes[0] else [""] * len(names), fontsize=8)
        axis.invert_yaxis()
        axis.set_title(label + (" (lower is better)" if key == "irrelevant_rate" else ""), fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--out", default="runs/bias")
    parser.add_argument("--rows", default="", help="only the rows whose name starts with this, e.g. FedMPT")
    add_run_options(parser)
    args = parser.parse_args()
    env, extra = run_settings(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {"zero-shot CLIP": {key: [] for key, _ in KEYS}}
    for name, options in CONFIGS.items():
        if not name.startswith(args.rows):
            continue
        rows[name] = {key: [] for key, _ in KEYS}
        slug = name.split(" (")[0].lower().replace(",", "").replace(" --", "-").replace(" ", "-")
        for seed in args.seeds:
            history = run_once(slug, [*options, "--rounds", str(args.rounds), "--clients", str(args.clients), *extra],
                               seed, out, env)
            for key, _ in KEYS:
                rows[name][key].append(history[-1].get(key))
            if name == "FedMPT":  # the backbone alone: the same test images, "a photo of a <class>."
                zero = history[0]
                for key, _ in KEYS:
                    rows["zero-shot CLIP"][key].append(zero.get("zero_shot_mAP" if key == "mAP" else f"zero_shot_{key}"))
        print(f"{name}: " + ", ".join(f"{label} {mean_std(rows[name][key])}" for key, label in KEYS), flush=True)
    (out / "bias.json").write_text(json.dumps(rows, indent=1))
    lines = ["| method | " + " | ".join(label for _, label in KEYS) + " |", "|---" * (len(KEYS) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(mean_std(row[key]) for key, _ in KEYS) + " |" for name, row in rows.items()]
    table = "\n".join(lines) + (f"\n\nSeeds {args.seeds}, {args.rounds} rounds, {args.clients} clients"
                                f"{'; options ' + ' '.join(extra) if extra else ''}. Zero-shot "
                                "scores are cosines, not probabilities: no irrelevant-activation rate.\n")
    (out / "bias.md").write_text(table)
    plot(rows, out / "bias.png")
    print(table)


if __name__ == "__main__":
    main()
