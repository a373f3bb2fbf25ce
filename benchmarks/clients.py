"""Two tables of docs/results.md on what federated users ask: clients that drop out, and
single-label data scored as FedMVP and CoCoOp score it.

    python benchmarks/clients.py --table dropout [--ps 0 0.3 0.6] [--seeds 0 1 2] [--out runs/compare] [--threads 1]
    python benchmarks/clients.py --table single-label [--methods fedmpt fed-dualcoop] [--seeds 0 1 2] [--out runs/clients]

dropout: FedMPT on the offline world (10 rounds, 4 clients, --client-eval) at each --client-dropout
p; p = 0 is compare.py's fedmpt run itself (the same options), reused when --out is compare.py's.
single-label: the shapes world reduced to one label per image (`write_single_label_world`: each
image holds one shape kind, drawn as the world draws it; four sites with label skew, each site's
test images beside its training images), every method twice: all classes seen (top-1 accuracy)
and half of them unseen (--unseen random:0.5: base, novel and H accuracy, CoCoOp's
base-to-novel protocol). Finished runs under OUT are reused. Results: OUT/<table>.md.
"""
import argparse
import csv
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from compare import METHODS, add_run_options, mean_std, run_once, run_settings  # noqa: E402

SITE_SKEW = 0.8  # share of a site's images whose class is one of its own three


def dropout_table(args, env, extra) -> str:
    lines = ["| --client-dropout p | mAP | worst client (mAP) | clients that reported, of those sampled | "
             "rounds where none reported |", "|---|---|---|---|---|"]
    rows = {}
    for p in args.ps:  # p = 0 last, say, when compare.py is still making its runs
        options = ["--method", "fedmpt", "--rounds", "10", "--clients", "4", "--client-eval", *extra]
        name = "fedmpt" if p == 0 else f"fedmpt-dropout{p:g}"
        histories = [run_once(name, options + (["--client-dropout", str(p)] if p else []), seed, Path(args.out), env)
                     for seed in args.seeds]
        rounds = [row for history in histories for row in history[1:]]
        reported = sum(row["clients_aggregated"] for row in rounds) / (4 * len(rounds))
        silent = [sum(row.get("none_reported", False) for row in history[1:]) for history in histories]
        rows[p] = (f"| {p:g} | {mean_std([h[-1]['mAP'] for h in histories])} | "
                   f"{mean_std([h[-1]['client_mAP_worst'] for h in histories])} | {reported:.0%} | "
                   f"{', '.join(map(str, silent))} of {len(rounds) // len(histories)} |")
    return ("\n".join(lines + [rows[p] for p in sorted(rows)])
            + f"\n\nFedMPT, seeds {args.seeds}, 10 rounds, 4 clients; final round, mean ± std.\n")


def write_single_label_world(out: Path, n_train=600, n_test=400, seed=0) -> Path:
    """The shapes world with one shape kind an image (the world's own layouts, every object of
    another kind left out), as a folder dataset with four sites: an image of site s holds one of
    the site's three kinds with SITE_SKEW, else any kind; test images get sites the same way."""
    from shapes import world
    kinds = world.SHAPES_CLASSES
    rng = random.Random(f"single-label {seed}")
    rows = []
    (out / "images").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            site = i % 4
            kind = rng.choice(kinds[3 * site:3 * site + 3] if rng.random() < SITE_SKEW else kinds)
            layout = world.sample_layout(rng, outline_share=world.OUTLINE_SHARE)
            objects = [o._replace(kind=kind) for o in layout.objects[:rng.randint(1, 2)]]
            name = f"images/{split}-{i:04d}.png"
            world.render(layout._replace(objects=objects)).save(out / name)
            rows.append([name, kind, split, f"site-{site}"])
    with open(out / "labels.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["image", "labels", "split", "client"], *rows])
    (out / "classes.txt").write_text("\n".join(kinds) + "\n")
    return out


def single_label_table(args, env, extra) -> str:
    out = Path(args.out)
    root = out / "single-label-world"
    if not (root / "labels.csv").exists():
        write_single_label_world(root)
    base = ["--dataset", "folder", "--root", str(root), "--rounds", "10", "--client-eval", *extra]
    lines = ["| method | top-1 accuracy | worst client (top-1 run, mAP) | base | novel | H |", "|---|---|---|---|---|---|"]
    rows = {}
    for method in args.methods:
        seen = [run_once(f"single-{method}", ["--method", method, *base], s, out, env) for s in args.seeds]
        split = [run_once(f"single-{method}-unseen", ["--method", method, *base, "--unseen", "random:0.5"], s, out, env)
                 for s in args.seeds]
        rows[method] = (seen, split)
    seen, split = next(iter(rows.values()))
    lines.append(f"| *the frozen backbone, zero-shot* | {mean_std([h[0]['zero_shot_top1_accuracy'] for h in seen])} | "
                 f"| {' | '.join(mean_std([h[0][f'zero_shot_{k}_accuracy'] for h in split]) for k in ('base', 'novel', 'H'))} |")
    for method, (seen, split) in rows.items():
        lines.append(f"| {method} | {mean_std([h[-1]['top1_accuracy'] for h in seen])} | "
                     f"{mean_std([h[-1]['client_mAP_worst'] for h in seen])} | "
                     f"{' | '.join(mean_std([h[-1][f'{k}_accuracy'] for h in split]) for k in ('base', 'novel', 'H'))} |")
    return "\n".join(lines) + (f"\n\nThe shapes world, one label an image (4 sites, {len(args.seeds)} seed(s) "
                               f"{args.seeds}, 10 rounds, final round); base/novel/H: --unseen random:0.5.\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", required=True, choices=("dropout", "single-label"))
    parser.add_argument("--ps", type=float, nargs="+", default=[0.0, 0.3, 0.6])
    parser.add_argument("--methods", nargs="+", default=["fedmpt", "fed-dualcoop"], choices=METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--out", default="")
    add_run_options(parser)
    args = parser.parse_args(argv)
    args.seeds = args.seeds or [0, 1, 2]
    args.out = args.out or ("runs/compare" if args.table == "dropout" else "runs/clients")
    env, extra = run_settings(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    table = (dropout_table if args.table == "dropout" else single_label_table)(args, env, extra)
    (Path(args.out) / f"{args.table}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
