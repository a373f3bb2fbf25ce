"""Table 5's cost columns and the cost model's inputs, measured side by side in one run: per
method, class count and precision, the milliseconds of one training step as federate.py runs it
(client.gather of the batch from the stored inputs, the loss, backward, the gradient-norm
guard and the SGD step: client.batches and client.clip_and_step) at CLIP ViT-B/16 (random init,
batch 32), with the shares of the text encoder (forward + backward), of the transport (the
Sinkhorn calls inside the step) and of loading (the gather), on the device it runs on, with the
step's peak GPU memory on CUDA.

    python benchmarks/step_time.py [--methods fedmpt fed-poscoop ...] [--datasets voc2007 coco2014]
                                   [--precisions fp32 bf16] [--steps 2] [--device cpu]

Beside the methods it times CLIP's own text transformer, forward + backward, over FedMPT's 200
VOC prompts (2 signs x 5 conditions x 20 classes) at the full 77 positions, and checks the two
CPU targets of issue #25 in the same run:
- FedMPT's text positions (2K prefixes + packed suffixes, --text-encoding shared) within 1.2x
  of the exact minimum (each condition's own prefix once per sign, each prompt's own suffix);
- a FedMPT step (VOC, fp32) at most 1/15 of that full-length text step.
Prints a markdown table and writes it to --out, with JSON beside it: "rows" (one per method, the
first class count and precision: what reproduce.py's --dry-run reads) and "cells" (every measurement).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import experiment  # noqa: E402
import ot  # noqa: E402
from backbone import FrozenCLIP, load_clip  # noqa: E402
from baselines.fedmvp import load_attributes  # noqa: E402
from conditions import load_conditions  # noqa: E402
import client  # noqa: E402
import speed  # noqa: E402
from fedmpt import asymmetric_loss  # noqa: E402
from options import ModelConfig  # noqa: E402
from speed.shared_prefix import text_positions  # noqa: E402
from store import features  # noqa: E402

METHODS = ["fed-poscoop", "fed-dualcoop", "fedtpg", "fed-maple", "fedmvp", "fed-ram", "fedmpt"]
GRAD_CLIP = 10.0  # federate.py's default guard


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_seconds(work, n_steps, device) -> float:
    """Median seconds of `work()` over n_steps, after one warm-up call."""
    work()
    times = []
    for _ in range(n_steps):
        synchronize(device)
        start = time.perf_counter()
        work()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


class Transport:
    """Wraps ot.sinkhorn for the time of a step: adds up the seconds its calls take."""

    def __init__(self, device):
        self.device, self.seconds, self.inner = device, 0.0, ot.sinkhorn

    def __call__(self, *args, **kwargs):
        synchronize(self.device)
        start = time.perf_counter()
        plan = self.inner(*args, **kwargs)
        synchronize(self.device)
        self.seconds += time.perf_counter() - start
        return plan


def method_model(method, backbone, dataset, precision, text_encoding, device):
    classes = data.known_classes(dataset)
    attributes = None
    if method == "fedmvp":
        described = load_attributes(dataset, classes)
        attributes = {"attributes": described["attributes"]}
    backbone.precision = precision
    model = experiment.build_model(method, backbone, classes, load_conditions("", dataset), ModelConfig(),
                                   attributes, seed=0)
    return speed.with_text_encoding(model.to(device), text_encoding)


def measure(model, stored, targets, device, n_steps) -> dict:
    """ms per training step as federate.py runs it, and the text, transport and loading shares."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = client.local_optimizer(params, 1e-3)
    rows = torch.randperm(len(targets), generator=torch.Generator().manual_seed(0))  # a shuffled batch
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # as client.local_train sums its steps

    def step():
        for inputs, batch_targets in client.batches(stored, targets, [rows], device):
            loss = model.loss(inputs, batch_targets, asymmetric_loss)
            optimizer.zero_grad()
            loss.backward()
            sums.add_(client.clip_and_step(optimizer, params, GRAD_CLIP, loss, len(rows)))

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = median_seconds(step, n_steps, device)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.device(device).type == "cuda" else None
    client.step_stats(sums, n_steps, n_steps * len(rows))  # the round's one read, as local_train does
    transport = Transport(device)
    ot.sinkhorn = transport
    try:
        step()
    finally:
        ot.sinkhorn = transport.inner
    loading = median_seconds(lambda: client.gather(stored, rows, device), n_steps, device)
    weights = None

    def text():
        nonlocal weights
        T = model.text_features()
        weights = torch.randn_like(T) if weights is None else weights
        (T * weights).sum().backward()
    text_seconds = median_seconds(text, n_steps, device)
    optimizer.zero_grad()
    return {"ms_per_step": 1000 * seconds, "text_share": text_seconds / seconds,
            "transport_share": transport.seconds / seconds, "loading_share": loading / seconds, "peak_GiB": peak,
            "tunable": sum(p.numel() for p in params), "total": sum(p.numel() for p in model.parameters())}


def full_text_step(backbone, n_prompts, device):
    """CLIP's text transformer over n_prompts full-length prompts, gradients to the inputs."""
    m = backbone.model
    embeddings = 0.02 * torch.randn(n_prompts, m.context_length, m.token_embedding.weight.shape[1], device=device)
    embeddings.requires_grad_(True)
    eot = torch.full((n_prompts,), m.context_length - 1, device=device)

    def step():
        x = backbone.run_blocks(m.transformer.resblocks, embeddings + m.positional_embedding)  # the 77-mask
        features = m.ln_final(x)[torch.arange(n_prompts, device=device), eot] @ m.text_projection
        features.square().sum().backward()
        embeddings.grad = None
    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--datasets", nargs="+", default=["voc2007", "coco2014"], choices=["voc2007", "coco2014", "nuswide"],
                        help="whose class counts (and conditions) the prompts have")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--text-encoding", default="shared", choices=["shared", "full", "auto"])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per measurement (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clip", default="ViT-B/16", help="the architecture, random init (tiny: for tests)")
    parser.add_argument("--out", default="runs/step_time.md")
    args = parser.parse_args(argv)
    device = args.device
    torch.manual_seed(0)
    backbone = FrozenCLIP(load_clip(args.clip, random_init=True)).to(device)
    images = torch.randn(args.batch_size, 3, backbone.resolution, backbone.resolution, device=device)
    stored_by_kind, rows = {}, []
    for dataset in args.datasets:
        n_classes = len(data.known_classes(dataset))
        targets = (torch.rand(args.batch_size, n_classes) < 0.15).long()
        for precision in args.precisions:
            for method in args.methods:
                model = method_model(method, backbone, dataset, precision, args.text_encoding, device)
                kind = model.input_kind
                if kind not in stored_by_kind:  # as the store keeps them: float16, uint8 pixels
                    with torch.no_grad():
                        stored_by_kind[kind] = [torch.from_numpy(x) for x in features.as_stored(model.encode_images(images))]
                row = {"dataset": dataset, "classes": n_classes, "precision": precision, "method": method,
                       **measure(model, stored_by_kind[kind], targets, device, args.steps)}
                if method == "fedmpt":
                    row["text_positions"] = text_positions(model)
                rows.append(row)
                print(f"{dataset} {precision} {method}: {row['ms_per_step']:.0f} ms per step", flush=True)
    reference = median_seconds(full_text_step(backbone, 200, device), args.steps, device)
    table = report(rows, reference, args)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    first = [r for r in rows if r["dataset"] == args.datasets[0] and r["precision"] == args.precisions[0]]
    # "rows": one per method, the first class count and precision (what reproduce.py reads); "cells": every measurement
    out.with_suffix(".json").write_text(json.dumps({"rows": first, "cells": rows, "reference_ms": 1000 * reference,
                                                    "device": device,
                                                    "device_name": device_name(device), "clip": args.clip,
                                                    "batch_size": args.batch_size, "torch": torch.__version__,
                                                    "threads": torch.get_num_threads(),
                                                    "text_encoding": args.text_encoding}, indent=1))
    return 0


def device_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu, {torch.get_num_threads()} threads"


def report(rows, reference, args) -> str:
    cuda = torch.device(args.device).type == "cuda"
    lines = [f"{args.clip} (random init), batch {args.batch_size}, {device_name(args.device)}, torch {torch.__version__}, "
             f"--text-encoding {args.text_encoding}; median of {args.steps} steps after a warm-up.", "",
             "| classes | precision | method | tunable | ms / step | text | transport | loading |"
             + (" peak GPU GiB |" if cuda else ""),
             "|---|---|---|---:|---:|---:|---:|---:|" + ("---:|" if cuda else "")]
    for row in rows:
        lines.append(f"| {row['dataset']} ({row['classes']}) | {row['precision']} | {row['method']} | {row['tunable']:,} | "
                     f"{row['ms_per_step']:.0f} | {row['text_share']:.0%} | {row['transport_share']:.0%} | "
                     f"{row['loading_share']:.1%} |" + (f" {row['peak_GiB']:.2f} |" if cuda else ""))
    lines.append(f"| VOC (20) | fp32 | CLIP text transformer, 200 prompts x 77 positions, forward + backward | | "
                 f"{1000 * reference:.0f} | | | |" + (" |" if cuda else ""))
    lines.append("")
    for row in rows:
        if row["method"] == "fedmpt" and row["precision"] == args.precisions[0]:
            positions = row["text_positions"]
            ratio = positions["run"] / positions["minimum"]
            lines.append(f"FedMPT text positions, {row['dataset']}: {positions['run']} run / {positions['minimum']} "
                         f"exact minimum = {ratio:.3f} (target <= 1.2: {'met' if ratio <= 1.2 else 'NOT met'}; "
                         f"whole prompts: {positions['whole']}).")
    for row in rows:
        if row["method"] == "fedmpt" and row["dataset"] == "voc2007" and row["precision"] == "fp32":
            ratio = row["ms_per_step"] / (1000 * reference)
            verdict = "met" if ratio <= 1 / 15 else "NOT met"
            lines.append(f"FedMPT step (VOC, fp32) / full-length text step: {ratio:.4f} = 1/{1 / ratio:.1f} "
                         f"(target <= 1/15: {verdict}" + ("" if args.clip == "ViT-B/16" else ", a target for ViT-B/16") + ").")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
