"""Table 5's cost columns, measured side by side in one run: per method, tunable and total
parameters and the time of one training step at CLIP ViT-B/16 (random init, VOC2007's 20
classes, batch 32, frozen inputs cached as in training), on the CPU and, when present, on CUDA
with the step's peak GPU memory.

    python benchmarks/step_time.py [--methods fedmpt fed-poscoop ...] [--steps 2] [--device cpu]

Beside the methods it times CLIP's own text transformer, forward + backward, over FedMPT's 200
prompts (2 signs x 5 conditions x 20 classes) at the full 77 positions: the cost FedMPT's text
side had before it ran only the positions up to the last end token. It also reports
- text positions run / needed: positions the short encoding runs (every prompt to the batch's
  last end token) over the least an exact computation needs (each prompt to its own end token);
- activation memory of a FedMPT step, from the tensors autograd saves (an estimate of its GPU
  memory where no GPU is at hand).
Prints a markdown table and writes it to --out (JSON beside it).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loaders.voc import VOC_CLASSES  # noqa: E402
from store import features  # noqa: E402
import experiment  # noqa: E402
from backbone import FrozenCLIP, load_clip  # noqa: E402
from baselines.fedmvp import load_attributes  # noqa: E402
from conditions import load_conditions  # noqa: E402
from fedmpt import ModelConfig, asymmetric_loss  # noqa: E402

METHODS = ["fed-poscoop", "fed-dualcoop", "fedtpg", "fed-maple", "fedmvp", "fed-ram", "fedmpt"]


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(step, n_steps, device) -> float:
    """Median seconds of `step()` over n_steps, after one warm-up step."""
    step()
    times = []
    for _ in range(n_steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def method_step(method, backbone, images, targets, device):
    """(tunable, total, step function, model) of a method on cached inputs of `images`."""
    attributes = load_attributes("voc2007", VOC_CLASSES) if method == "fedmvp" else None
    model = experiment.build_model(method, backbone, VOC_CLASSES, load_conditions("", "voc2007"),
                                   ModelConfig(), attributes, seed=0).to(device)
    with torch.no_grad():  # as the store keeps them (float16, uint8 pixels), as a batch gathers them
        inputs = experiment.gather([torch.from_numpy(x) for x in features.as_stored(model.encode_images(images))],
                                   slice(None), device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)

    def step():
        loss = model.loss(inputs, targets, asymmetric_loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tunable = sum(p.numel() for p in params)
    return tunable, sum(p.numel() for p in model.parameters()), step, model, inputs


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


def saved_activation_bytes(step) -> int:
    """Bytes of the tensors autograd saves for backward during one step (each storage once)."""
    seen, total = set(), [0]

    def pack(tensor):
        key = (tensor.untyped_storage().data_ptr(), tensor.device)
        if key not in seen:
            seen.add(key)
            total[0] += tensor.untyped_storage().nbytes()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return total[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per method (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clip", default="ViT-B/16", help="the architecture, random init (tiny: for tests)")
    parser.add_argument("--out", default="runs/step_time.md")
    args = parser.parse_args(argv)
    device = args.device
    torch.manual_seed(0)
    backbone = FrozenCLIP(load_clip(args.clip, random_init=True)).to(device)
    images = torch.randn(args.batch_size, 3, backbone.resolution, backbone.resolution, device=device)
    targets = (torch.rand(args.batch_size, len(VOC_CLASSES), device=device) < 0.15).long()

    rows, seconds = [], {}
    for method in args.methods:
        tunable, total, step, model, inputs = method_step(method, backbone, images, targets, device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds[method] = time_steps(step, args.steps, device)
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None
        rows.append({"method": method, "tunable": tunable, "total": total, "ms_per_step": 1000 * seconds[method],
                     "peak_GiB": peak})
        print(f"{method}: {1000 * seconds[method]:.0f} ms per step", flush=True)
        if method == "fedmpt":
            embeddings, eot = model.prompts()
            needed = int((eot + 1).sum())
            text_ratio = len(eot) * (int(eot.max()) + 1) / needed
            activations = saved_activation_bytes(step) / 2 ** 30
            n_prompts = len(eot)
    reference = time_steps(full_text_step(backbone, n_prompts if "fedmpt" in seconds else 200, device),
                           args.steps, device)

    lines = [f"{args.clip} (random init), VOC2007's 20 classes, batch {args.batch_size}, device {device}; "
             f"median of {args.steps} steps after a warm-up.", "",
             "| method | tunable | total | ms / step | x Fed-PosCoOp |" + (" peak GPU GiB |" if device == "cuda" else ""),
             "|---|---:|---:|---:|---:|" + ("---:|" if device == "cuda" else "")]
    base = seconds.get("fed-poscoop")
    for row in rows:
        ratio = f"{seconds[row['method']] / base:.2f}" if base else "n/a"
        lines.append(f"| {row['method']} | {row['tunable']:,} | {row['total']:,} | {row['ms_per_step']:.0f} | {ratio} |"
                     + (f" {row['peak_GiB']:.2f} |" if device == "cuda" else ""))
    lines.append(f"| CLIP text transformer, {n_prompts if 'fedmpt' in seconds else 200} prompts x 77 positions, "
                 f"forward + backward | | | {1000 * reference:.0f} | |")
    if "fedmpt" in seconds:
        lines += ["", f"FedMPT step / full-length text step: {seconds['fedmpt'] / reference:.3f} (target <= 0.2).",
                  f"FedMPT text positions run / needed: {text_ratio:.2f} (target <= 1.5).",
                  f"FedMPT activations saved for backward: {activations:.2f} GiB per step (target <= 2 GiB)."]
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "reference_ms": 1000 * reference,
                                                    "device": device, "clip": args.clip}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
