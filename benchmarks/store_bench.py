"""The feature store, measured: decoding throughput with 0 and N DataLoader workers, anonymous
memory of a run at 1,000 and 8,000 training images (store vs in memory), and the store's size
per image and per dataset of the paper.

    python benchmarks/store_bench.py [--workers 2] [--sizes 1000 8000] [--out runs/store_bench.md]

Throughput: 300 VOC-size JPEGs (500 x 375, benchmarks/voc_like.py) through CLIP's preprocessing
at 224 px with a near-free encoder, so the figure is the input pipeline's. Memory: each size in
a fresh process: the shapes world with that many training images, the tiny CLIP (64 regions),
FedMPT's frozen inputs encoded (store: memory-mapped float16 from disk; in memory: the tensors
held by the process), then one local epoch over every training image; RssAnon from /proc.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Images of each dataset as we read them (train + test): VOC2007 trainval + test, COCO 2014
# train + val, NUS-WIDE's official lists (images without a concept kept), Multi-Scene-Clean,
# MLRSNet (all images; its split is ours).
PAPER_DATASETS = {"VOC2007": 9963, "COCO2014": 123287, "NUS-WIDE": 269648, "Multi-Scene-Clean": 14000,
                  "MLRSNet": 109161}
# Bytes per image of each input kind at a backbone: (v, P) = (1 + N) x D in float16; images
# 3 x 224 x 224 uint8 pixels; RAM's tokens (1 + N) x W in float16.
INPUTS = {"(v, P) ViT-B/16": 2 * 197 * 512, "(v, P) ViT-B/32": 2 * 50 * 512, "(v, P) ViT-L/14": 2 * 257 * 768,
          "(v, P) RN50": 2 * 50 * 1024, "images 224 px, uint8 (Fed-MaPLe; FedMVP adds v)": 3 * 224 * 224,
          "tokens ViT-B/16 (Fed-RAM)": 2 * 197 * 768}

MEMORY_PROBE = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import data
from store import features
from backbone import FrozenCLIP, load_clip
from client import local_train
from fedmpt import FedMPT
from options import Config, ModelConfig
from loaders.voc import VOCDataset
from shapes.world import SHAPES_CLASSES

def anon():
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1]) / 1024

root, use_store, cache = sys.argv[2], sys.argv[3] == "store", sys.argv[4]
torch.set_num_threads(1)
start = anon()
dataset = VOCDataset(root, "trainval", SHAPES_CLASSES, name="shapes")
backbone = FrozenCLIP(load_clip("tiny"))
dataset.transform = data.clip_transform(backbone.resolution)
model = FedMPT(backbone, SHAPES_CLASSES, ["color", "background"], ModelConfig(), seed=0)
key = features.store_key(backbone.fingerprint(), dataset, model.input_kind) if use_store else None
inputs, _ = features.encode_dataset(model.encode_images, dataset, key, cache, workers=0, log=lambda m: None)
encoded = anon()
local_train(model, model.tunable_state(), inputs, dataset.targets, list(range(len(dataset))),
            Config(batch_size=128), 1e-3, torch.Generator().manual_seed(0))
print(json.dumps({"start": start, "encoded": encoded, "trained": anon()}))
"""


def throughput(workers_list, n_images=300):
    import data
    from loaders.voc import VOC_CLASSES, VOCDataset
    from store import features
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "voc_like.py"), tmp, "--trainval", str(n_images),
                        "--test", "1"], check=True, capture_output=True)
        dataset = VOCDataset(tmp, "trainval", VOC_CLASSES, transform=data.clip_transform(224))
        cheap = lambda x: (x.mean(dim=(2, 3)),)  # the pipeline, not the encoder
        for workers in workers_list:
            start = time.perf_counter()
            features.encode_dataset(cheap, dataset, batch_size=32, workers=workers)
            results[workers] = n_images / (time.perf_counter() - start)
    return results


def memory(sizes):
    from shapes.world import generate_shapes_dataset
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            root = Path(tmp) / f"world-{n}"
            generate_shapes_dataset(root, n_trainval=n, n_test=10)
            for mode in ["store", "memory"]:
                result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(ROOT), str(root), mode,
                                         str(Path(tmp) / "cache")], capture_output=True, text=True, check=True)
                rows[(n, mode)] = json.loads(result.stdout.strip().splitlines()[-1])
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 8000])
    parser.add_argument("--out", default="runs/store_bench.md")
    args = parser.parse_args(argv)
    lines = []
    speed = throughput([0, args.workers])
    lines += ["| DataLoader workers | images / s (decode + preprocess, 500 x 375 -> 224) |", "|---:|---:|"]
    lines += [f"| {w} | {s:.0f} |" for w, s in speed.items()]
    rows = memory(args.sizes)
    lines += ["", "| training images | frozen inputs | anonymous MiB after encoding | after one local epoch |",
              "|---:|---|---:|---:|"]
    lines += [f"| {n:,} | {'store (memory-mapped)' if mode == 'store' else 'in memory (float16)'} | {r['encoded'] - r['start']:.0f} | {r['trained'] - r['start']:.0f} |"
              for (n, mode), r in rows.items()]
    lines += ["", "| input | KiB / image | " + " | ".join(PAPER_DATASETS) + " |",
              "|---|---:|" + "---:|" * len(PAPER_DATASETS)]
    for name, size in INPUTS.items():
        lines.append(f"| {name} | {size / 1024:.0f} | "
                     + " | ".join(f"{size * n / 2 ** 30:.1f} GiB" for n in PAPER_DATASETS.values()) + " |")
    fastest = max(speed.values())
    lines += ["", "Decoding alone at the fastest rate measured here: "
              + ", ".join(f"{name} {n / fastest / 60:.0f} min" for name, n in PAPER_DATASETS.items())
              + " (once per backbone and input kind; every later run reads the store)."]
    table = "\n".join(lines)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
