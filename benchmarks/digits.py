"""A folder dataset of real images: handwritten digits from scikit-learn, 2-3 to an image.

    python benchmarks/digits.py [--out data/digits] [--seed 0] [--train 600] [--test 300]
    python federate.py --dataset folder --root data/digits     # then train on it like your own data

The 1,797 8x8 scans that scikit-learn ships (`sklearn.datasets.load_digits`, written by 43
people) are split in two halves by a seeded draw: training images are composed only from the
first half, test images only from the second, so the test handwriting is never seen. Each 96 px
image holds 2-3 different digits, each scan upscaled to 24 px in its own cell of a 3 x 3 grid,
dark ink on light paper with a little noise. Three sites, one `client` each, with label skew:
an image of site s always holds one of SITE_DIGITS[s]. Classes are the digit words ("zero" ...
"nine"); with the shapes CLIP they lie outside its vocabulary (the vocabulary check warns).
This world is for measuring, never for choosing settings: nothing is tuned on it.
"""
import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SITE_DIGITS = [(0, 1, 2, 3), (4, 5, 6), (7, 8, 9)]
SIZE, CELL, DIGIT = 96, 32, 24


def compose(rng, scans, pools, digits) -> Image.Image:
    """One image: each digit a random scan of it from `pools`, in distinct random cells."""
    paper = 235 + rng.normal(0, 6, (SIZE, SIZE))
    for digit, cell in zip(digits, rng.choice(9, len(digits), replace=False)):
        scan = scans[rng.choice(pools[digit])] / 16.0  # (8, 8) ink in [0, 1]
        ink = np.asarray(Image.fromarray((scan * 255).astype(np.uint8)).resize((DIGIT, DIGIT), Image.BILINEAR)) / 255
        top = cell // 3 * CELL + rng.integers(0, CELL - DIGIT + 1)
        left = cell % 3 * CELL + rng.integers(0, CELL - DIGIT + 1)
        region = paper[top:top + DIGIT, left:left + DIGIT]
        paper[top:top + DIGIT, left:left + DIGIT] = region * (1 - ink) + 30 * ink
    grey = np.clip(paper, 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([grey] * 3, axis=-1))


def scan_halves(n_scans: int, seed: int) -> dict:
    """Which scans compose which split: a seeded half each, disjoint."""
    order = np.random.default_rng([seed, 1]).permutation(n_scans)
    return {"train": order[: n_scans // 2], "test": order[n_scans // 2:]}


def write_world(out: Path, names, site_classes, compose, seed=0, n_train=600, n_test=300) -> Path:
    """A folder dataset (labels.csv with a client column, classes.txt, images/) of 2-3 different
    classes an image: a training image of site s always holds one of site_classes[s], test images
    cycle over the same draws without a site. compose(rng, split, classes) draws the image."""
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for split, n in [("train", n_train), ("test", n_test)]:
        for i in range(n):
            site = i % len(site_classes)
            first = rng.choice(site_classes[site])
            others = rng.choice([c for c in range(len(names)) if c != first], rng.integers(1, 3), replace=False)
            classes = [int(first), *map(int, others)]
            name = f"images/{split}-{i:04d}.png"
            compose(rng, split, classes).save(out / name)
            rows.append([name, "|".join(names[c] for c in sorted(classes)), split,
                         f"site-{site}" if split == "train" else ""])
    with open(out / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "labels", "split", "client"])
        writer.writerows(rows)
    (out / "classes.txt").write_text("\n".join(names) + "\n")
    return out


def write(out: Path, seed: int = 0, n_train: int = 600, n_test: int = 300) -> Path:
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download
    scans, labels = load_digits(return_X_y=True)
    scans = scans.reshape(-1, 8, 8)
    halves = scan_halves(len(scans), seed)
    pools = {split: {d: [i for i in halves[split] if labels[i] == d] for d in range(10)} for split in halves}
    return write_world(out, NAMES, SITE_DIGITS, lambda rng, split, digits: compose(rng, scans, pools[split], digits),
                       seed, n_train, n_test)


def world_parser(doc: str, out: str) -> argparse.ArgumentParser:
    """The options of a folder-world writer: --out, --seed, --train, --test."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", default=out)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--test", type=int, default=300)
    return parser


def main(argv=None) -> int:
    args = world_parser(__doc__, "data/digits").parse_args(argv)
    out = write(Path(args.out), args.seed, args.train, args.test)
    print(f"wrote {args.train} training and {args.test} test images to {out} (labels.csv, classes.txt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
