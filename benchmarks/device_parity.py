"""CPU against CUDA: one fixed tunable state per method, its logits on the same frozen inputs on
both devices, in fp32 and with --precision bf16 on CUDA, against the CPU's fp32 logits.

    python benchmarks/device_parity.py [--clip ViT-B/16] [--out parity.json]

Every method is built on seeded random weights (random-init CLIP, seed 0), its tunable tensors
moved off their initial values by seeded noise, and scored on 4 random images encoded once (on
the CPU) as the feature store keeps them. Prints and writes the largest absolute and relative
logit differences.
"""
import argparse
import copy
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import experiment  # noqa: E402
from backbone import FrozenCLIP, load_clip  # noqa: E402
from baselines.fedmvp import load_attributes  # noqa: E402
from conditions import load_conditions  # noqa: E402
import client  # noqa: E402
import speed  # noqa: E402
from options import ModelConfig  # noqa: E402
from store import features  # noqa: E402

METHODS = ["fedmpt", "fed-poscoop", "fed-dualcoop", "fedtpg", "fed-maple", "fedmvp", "fed-ram"]


def fixed_model(method, backbone, precision):
    classes = data.known_classes("voc2007")
    attributes = load_attributes("voc2007", classes) if method == "fedmvp" else None
    backbone.precision = precision
    model = experiment.build_model(method, backbone, classes, load_conditions("", "voc2007"), ModelConfig(),
                                   attributes, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return speed.with_text_encoding(model, "shared")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", default="ViT-B/16")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--out", default="runs/parity.json")
    args = parser.parse_args(argv)
    cpu = FrozenCLIP(load_clip(args.clip, random_init=True))
    cuda = copy.deepcopy(cpu).to("cuda") if torch.cuda.is_available() else None
    images = torch.randn(4, 3, cpu.resolution, cpu.resolution, generator=torch.Generator().manual_seed(2))
    rows = []
    for method in args.methods:
        reference = fixed_model(method, cpu, "fp32")
        with torch.no_grad():
            stored = [torch.from_numpy(x) for x in features.as_stored(reference.encode_images(images))]
            expected = reference(*client.gather(stored, slice(None), "cpu"))
        row = {"method": method, "logit_range": float(expected.abs().max())}
        for precision in (["fp32", "bf16"] if cuda is not None else []):
            model = fixed_model(method, cuda, precision).to("cuda")
            with torch.no_grad():
                logits = model(*client.gather(stored, slice(None), "cuda")).cpu()
            difference = float((logits - expected).abs().max())
            row[precision] = {"max_abs": difference, "max_rel": difference / row["logit_range"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"clip": args.clip, "torch": torch.__version__, "cuda": cuda is not None,
                                          "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
