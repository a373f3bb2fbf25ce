"""Cross-dataset transfer offline: finished shapes runs scored on a second generated world.

    python benchmarks/transfer.py --grid runs/zsl-shapes [--out runs/zsl-shapes/transfer.md]

The second world is the shapes world drawn again with another seed (other images, other
placements) and labelled with another class list: six of the twelve shapes, in another order
(TRANSFER_CLASSES), written as a folder dataset (labels.csv). Every finished run of the grid's
results.csv is scored there with `predict.py --evaluate --dataset folder` (the text side rebuilt
for the six names, the trained state kept), beside the frozen backbone alone on the same images.
"""
import argparse
import csv
import json
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import predict  # noqa: E402
from shapes import world  # noqa: E402

TRANSFER_CLASSES = ["heart", "square", "ring", "star", "crescent", "triangle"]


def second_world(directory: Path, seed: int = 1) -> Path:
    """The folder dataset of the second world (written once): its test images, relabelled."""
    folder = directory / "folder"
    if (folder / "labels.csv").exists():
        return folder
    world.generate_shapes_dataset(directory / "voc", seed=seed)
    test = data.load_dataset("shapes", directory / "voc", "test")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = ["image,labels,split"]
    for i, (path, target) in enumerate(zip(test.images, test.targets)):
        shutil.copy(path, folder / "images" / Path(path).name)
        labels = [c for c in TRANSFER_CLASSES if target[test.classes.index(c)] == 1]
        lines.append(f"images/{Path(path).name},{'|'.join(labels)},{'train' if i % 4 == 0 else 'test'}")
    (folder / "classes.txt").write_text("\n".join(TRANSFER_CLASSES) + "\n")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", required=True, help="a reproduce.py --out on the shapes world (its results.csv)")
    parser.add_argument("--out", default="", help="the table (default GRID/transfer.md)")
    parser.add_argument("--world-dir", default="data/shapes-second")
    args = parser.parse_args(argv)
    grid = Path(args.grid)
    with open(grid / "results.csv", newline="") as file:
        rows = [r for r in csv.DictReader(file) if r["dataset"] == "shapes"]
    if not rows:
        print(f"error: {grid / 'results.csv'} holds no finished shapes run.", file=sys.stderr)
        return 2
    folder = second_world(Path(args.world_dir))
    found = {}
    for row in rows:
        if predict.main(["--run", row["run_dir"], "--evaluate", "--dataset", "folder", "--root", str(folder),
                         "--device", "cpu"]) != 0:
            return 2
        result = json.loads((Path(row["run_dir"]) / "evaluation-folder.json").read_text())
        found.setdefault(row["method"], []).append((float(row["mAP"]), result["mAP"], result["zero_shot"]["mAP"]))
    mean = lambda values: f"{statistics.mean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}"
                                                              if len(values) > 1 else "")
    lines = ["| method | shapes test mAP (all classes) | second world mAP | zero-shot backbone there |",
             "|---|---:|---:|---:|"]
    for method, values in found.items():
        lines.append(f"| {method} | " + " | ".join(mean([v[i] for v in values]) for i in range(3)) + " |")
    text = "\n".join([f"Transfer to a second shapes world (seed 1, classes {', '.join(TRANSFER_CLASSES)}), "
                      f"{len(rows)} runs of {grid}, mean ± std over seeds:", "", *lines]) + "\n"
    out = Path(args.out or grid / "transfer.md")
    out.write_text(text)
    print(text + f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
