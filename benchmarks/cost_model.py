"""The cost of a training step from counts, not clocks: per method, class count and backbone, the
FLOPs (torch.utils.flop_counter), an estimate of the bytes moved and the operators dispatched (each
a kernel launch on a GPU) of one training step as federate.py runs it on CUDA (the loss, backward,
the gradient-norm guard and the SGD step: client.clip_and_step; the Sinkhorn's full iterations,
--text-encoding auto: shared prefixes where the method splits its text side). Everything is
counted on fake tensors (torch._subclasses.FakeTensorMode; CPU ones: autograd wants a CUDA
context for CUDA ones): no arithmetic runs, so every method at ViT-B/16 and three class counts takes
about two minutes of one core (the backbone is built for real, once). The optimizer and the gradient norm
are counted tensor by tensor as fake tensors run them (CUDA's foreach kernels take a few dozen
fewer operators). From the counts, per step:

    floor at peak  = max(FLOPs / the GPU's dense bf16 peak, bytes / its memory bandwidth)
    floor at 40%   = the same at 40% of both (what well-fed large kernels reach)
    launch-bound   = operators x 5 us (a small kernel's launch and run on a GPU)

and, with --grid, the same for every cell of a reproduce.py grid (steps: one local epoch of batch 32
on every training image, each client's last batch short, times the rounds; encoding the feature
store and evaluation left out). The counts are fp32's (bf16 moves about half the bytes, the same
FLOPs). Measured step times (benchmarks/step_time.py, a GPU's step_time.json) are what to trust
once they exist; this says what the hardware allows.

    python benchmarks/cost_model.py [--methods fedmpt ...] [--datasets voc2007 coco2014]
                                    [--clip ViT-B/16|shapes] [--gpu h200] [--grid table1 --seeds 0,1,2]
                                    [--batch-first] [--out runs/cost_model.json]
    python benchmarks/cost_model.py --from-json benchmarks/cost_model.json   # the shipped counts, priced again

`python benchmarks/cost_model.py --write` refreshes benchmarks/cost_model.json, the counts at
ViT-B/16 for every method and the class counts of reproduce.py's datasets, which `reproduce.py
--dry-run` prices its cells from.
"""
import argparse
import json
import math
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import baselines  # noqa: E402
import client  # noqa: E402
import ot  # noqa: E402
from fedmpt import asymmetric_loss  # noqa: E402

SHIPPED = Path(__file__).resolve().parent / "cost_model.json"
GRAD_CLIP = 10.0  # federate.py's default guard
LAUNCH_US = 5.0  # a small kernel on a GPU, launch to finish (the issue's ~5 us)
# dense bf16 peak (FLOP/s) and memory bandwidth (bytes/s), from the vendors' data sheets (SXM parts)
GPUS = {"h200": (989e12, 4.8e12), "h100": (989e12, 3.35e12), "a100": (312e12, 2.0e12)}
FEED = 0.4  # the share of peak that large, well-fed kernels reach
HOST_READ_TAGS = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)
# host reads that carry no such tag in every torch version
HOST_READ_NAMES = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "tolist"}


class OperatorCounter(TorchDispatchMode):
    """Every aten operator dispatched inside it (after autograd: forward and backward kernels
    alike), by name; an estimate of the bytes they move (each tensor read once, each output
    written once; views move nothing); and the host reads among them: operators whose result
    is a value on the host or whose output shape depends on the data (`.item()`, `bool(t)`,
    torch.equal, nonzero, masked_select, ...), each of which makes a GPU wait for the host.
    (`.tolist()` and `.numpy()` read memory without an operator: fake tensors, which hold no
    values, refuse them.)"""

    def __init__(self):
        super().__init__()
        self.ops, self.host_reads, self.bytes = Counter(), Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace != "aten":  # prim.device and kin: questions about a tensor, not kernels
            return out
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if self.reads_host(func, name, args):
            self.host_reads[name] += 1
        if not func.is_view:
            tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            self.bytes += sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())
        return out

    @staticmethod
    def reads_host(func, name, args) -> bool:
        """Whether the operator needs a value on the host: indexing by integer tensors is tagged
        with a data-dependent shape too, but only a boolean mask has one."""
        if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
            indices = args[1] if len(args) > 1 else []
            return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices)
        return any(tag in func.tags for tag in HOST_READ_TAGS) or name in HOST_READ_NAMES

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def fake_model(models, mode, device):
    """Every parameter and buffer of `models` (shared modules once) replaced in place by a fake
    tensor on `device` of the same shape and dtype: the modules then compute nothing."""
    done = {}
    for model in models:
        for module in model.modules():
            for table, make in ((module._parameters, lambda t, f: nn.Parameter(f, requires_grad=t.requires_grad)),
                                (module._buffers, lambda t, f: f)):
                for name, tensor in table.items():
                    if tensor is not None and not isinstance(tensor, torch._subclasses.FakeTensor):
                        if id(tensor) not in done:
                            with mode:
                                done[id(tensor)] = make(tensor, mode.from_tensor(tensor).to(device))
                        table[name] = done[id(tensor)]


@contextmanager
def full_iterations():
    """ot.sinkhorn with tol 0, as it runs on CUDA (the whole n_iters, no host read)."""
    solve = ot.sinkhorn
    ot.sinkhorn = lambda *args, **kwargs: solve(*args, **{**kwargs, "tol": 0.0})
    try:
        yield
    finally:
        ot.sinkhorn = solve


def training_step(model, inputs, targets):
    """One step as federate.py runs it after the batch is on the device: a function that runs it
    again (its optimizer kept, so a second call is a warm step with momentum buffers)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = client.local_optimizer(params, 1e-3)
    sums = torch.zeros(3, dtype=torch.float64, device=model.device)  # the step's numbers, summed on the device

    def step():
        loss = model.loss(inputs, targets, asymmetric_loss)
        optimizer.zero_grad()
        loss.backward()
        sums.add_(client.clip_and_step(optimizer, params, GRAD_CLIP, loss, len(targets)))
    return step


aten = torch.ops.aten


def attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return torch.utils.flop_counter.sdpa_flop_count(query, key, value)


def attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return torch.utils.flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# the CPU's fused attention, counted as CUDA's (flop_counter knows only the GPU kernels)
CPU_ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu: attention_flops,
                 aten._scaled_dot_product_flash_attention_for_cpu_backward: attention_backward_flops}


def count(work) -> dict:
    """FLOPs, bytes, operators and host reads of `work()` (run on fake tensors)."""
    operators = OperatorCounter()
    flops = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)
    with flops, operators:
        work()
    return {"flops": flops.get_total_flops(), "bytes": operators.bytes, "ops": operators.total,
            "host_reads": dict(operators.host_reads)}


def step_counts(model, batch_size, mode, device, batch_first=False) -> dict:
    """The counts of a warm training step of `model` (already fake), of its text side alone
    (forward + backward, as step_time.py times it) and of its transport calls; with `batch_first`
    also the step's operators on the batch-first blocks of --compile (speed/compiled.py)."""
    with mode:
        images = torch.zeros(batch_size, 3, model.backbone.resolution, model.backbone.resolution, device=device)
        with torch.no_grad():
            inputs = [x.float() for x in model.encode_images(images)]  # as client.gather hands them over
        n_classes = len(model.prompts.eot) // model.prompts.signs // model.prompts.shape[0]
        targets = torch.zeros(batch_size, n_classes, dtype=torch.long, device=device)
        with full_iterations():
            step = training_step(model, inputs, targets)
            step()  # warm: the momentum buffers exist from the second step on
            counts = count(step)
            counts["text"] = count(lambda: model.text_features().sum().backward())["ops"]
            solve, transport = ot.sinkhorn, []

            def counted(*args, **kwargs):  # each transport call's operators
                plan = []
                transport.append(count(lambda: plan.append(solve(*args, **kwargs)))["ops"])
                return plan[0]
            ot.sinkhorn = counted
            try:
                with torch.no_grad():
                    model.loss(inputs, targets, asymmetric_loss)
            finally:
                ot.sinkhorn = solve
            counts["transport"] = sum(transport)
            if batch_first:  # the same step on speed/compiled.py's batch-first blocks
                from speed.compiled import run_blocks
                model.backbone.run_blocks = run_blocks
                try:
                    counts["ops_batch_first"] = count(step)["ops"]
                finally:
                    del model.backbone.run_blocks
    return counts


def method_models(methods, datasets, clip, text_encoding="shared"):
    """{(method, dataset): model} on one real CPU backbone (built for real: prompts read their
    tokens on the host), the text side as --text-encoding auto runs it on CUDA."""
    from backbone import FrozenCLIP, load_clip
    from benchmarks.step_time import method_model
    if clip == "shapes":
        from shapes.model import load_shapes_clip
        backbone = FrozenCLIP(load_shapes_clip())
    else:
        backbone = FrozenCLIP(load_clip(clip, random_init=True))
    return {(m, d): method_model(m, backbone, d, "fp32", text_encoding, "cpu") for d in datasets for m in methods}


def count_methods(methods, datasets, clip="ViT-B/16", batch_size=32, batch_first=False) -> list:
    """One row per (dataset, method): its class count and step counts."""
    import data
    models = method_models(methods, datasets, clip)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_model(models.values(), mode, "cpu")
    rows = []
    for (method, dataset), model in models.items():
        rows.append({"method": method, "dataset": dataset, "classes": len(data.known_classes(dataset)),
                     **step_counts(model, batch_size, mode, "cpu", batch_first)})
    return rows


def floors(row, gpu="h200") -> dict:
    """ms per step: the arithmetic alone at the GPU's bf16 peak (flops_ms), the bytes alone at its
    bandwidth (bytes_ms), the floor (the longer of the two) at peak and at 40% of it, and launch-bound."""
    peak, bandwidth = GPUS[gpu]
    flops_ms, bytes_ms = row["flops"] / peak * 1e3, row["bytes"] / bandwidth * 1e3
    return {"flops_ms": flops_ms, "bytes_ms": bytes_ms, "peak_ms": max(flops_ms, bytes_ms),
            "fed_ms": max(flops_ms, bytes_ms) / FEED, "launch_ms": row["ops"] * LAUNCH_US * 1e-3}


def grid_cost(cells, rows, gpu="h200") -> dict:
    """GPU-hours of a reproduce.py grid (its cells) by the counts `rows` ({method, classes, ...}):
    at peak, at 40% of peak, launch-bound; and per dataset. A cell's class count missing from
    `rows` takes the nearest one counted for its method."""
    from benchmarks import reproduce
    hours = dict.fromkeys(["flops_ms", "bytes_ms", "peak_ms", "fed_ms", "launch_ms"], 0.0)
    per_dataset, per_method, priced = {}, {}, 0
    for cell in cells:
        classes = reproduce.CLASSES.get(cell["dataset"])
        counted = [r for r in rows if r["method"] == cell["method"]]
        if classes is None or cell["dataset"] not in reproduce.TRAIN_IMAGES or not counted:
            continue
        row, priced = min(counted, key=lambda r: abs(r["classes"] - classes)), priced + 1
        steps = (math.ceil(reproduce.TRAIN_IMAGES[cell["dataset"]] / 32) + cell["clients"]) * cell["rounds"]
        for key, ms in floors(row, gpu).items():
            hours[key] += steps * ms / 3.6e6
        ms = floors(row, gpu)["fed_ms"] * steps / 3.6e6
        per_dataset[cell["dataset"]] = per_dataset.get(cell["dataset"], 0.0) + ms
        per_method[cell["method"]] = per_method.get(cell["method"], 0.0) + ms
    return {"hours": hours, "fed_hours_by_dataset": per_dataset, "fed_hours_by_method": per_method, "cells": priced}


def table(rows, gpu) -> str:
    lines = [f"| dataset (classes) | method | GFLOP / step | GB moved (est.) | operators (text fwd+bwd, transport) "
             f"| ms at {gpu}: arithmetic at peak | bytes at bandwidth | floor at 40% | launch-bound (5 us / op) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        f = floors(row, gpu)
        lines.append(f"| {row['dataset']} ({row['classes']}) | {row['method']} | {row['flops'] / 1e9:,.1f} | "
                     f"{row['bytes'] / 1e9:.2f} | {row['ops']:,} ({row['text']:,}, {row['transport']:,}) | "
                     f"{f['flops_ms']:.2f} | {f['bytes_ms']:.2f} | {f['fed_ms']:.2f} | {f['launch_ms']:.1f} |")
    if any("ops_batch_first" in row for row in rows):
        lines += ["", "| dataset | method | operators / step, CLIP's blocks | on batch-first blocks | ratio |",
                  "|---|---|---:|---:|---:|"]
        lines += [f"| {r['dataset']} | {r['method']} | {r['ops']:,} | {r['ops_batch_first']:,} | "
                  f"{r['ops_batch_first'] / r['ops']:.2f} |" for r in rows if "ops_batch_first" in r]
    return "\n".join(lines)


def grid_lines(rows, table_name, seeds, gpu) -> list:
    from benchmarks import reproduce
    args = reproduce.parse([table_name, "--out", "unused", "--seeds", ",".join(map(str, seeds))])
    cells = reproduce.make_cells(args)
    cost = grid_cost(cells, rows, gpu)
    h = cost["hours"]
    lines = [f"{table_name}, seeds {','.join(map(str, seeds))}: {len(cells)} cells; the arithmetic alone "
             f"{h['flops_ms']:,.0f} GPU-hours at {gpu}'s bf16 peak ({h['flops_ms'] / FEED:,.0f} at 40%), the bytes alone "
             f"{h['bytes_ms']:,.0f}; floor (the longer) {h['peak_ms']:,.0f} at peak, {h['fed_ms']:,.0f} at 40% of it; "
             f"launch-bound {h['launch_ms']:,.0f} GPU-hours (5 us / op).",
             "At 40% of peak, by dataset: " + ", ".join(f"{d} {v:,.1f} h" for d, v in cost["fed_hours_by_dataset"].items())
             + "; by method: " + ", ".join(f"{m} {v:,.1f} h" for m, v in cost["fed_hours_by_method"].items()) + "."]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(baselines.METHODS), choices=list(baselines.METHODS))
    parser.add_argument("--datasets", nargs="+", default=["voc2007", "coco2014", "nuswide"],
                        help="whose class counts (and conditions) the prompts have")
    parser.add_argument("--clip", default="ViT-B/16", help="an architecture at random init, or 'shapes' (the shipped CLIP)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--gpu", default="h200", choices=list(GPUS))
    parser.add_argument("--grid", default="table1", help="a reproduce.py table to price ('' for none)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="", help="write the counts here as JSON")
    parser.add_argument("--batch-first", action="store_true",
                        help="also count each step on --compile's batch-first attention blocks (speed/compiled.py)")
    parser.add_argument("--from-json", default="", help="print the table and grid of counts written before (no counting)")
    parser.add_argument("--write", action="store_true", help=f"write the counts to {SHIPPED.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    if args.from_json:
        record = json.loads(Path(args.from_json).read_text())
        rows, args.clip, args.batch_size = record["rows"], record["clip"], record["batch_size"]
    else:
        rows = count_methods(args.methods, args.datasets, args.clip, args.batch_size, args.batch_first)
    print(f"{args.clip}, batch {args.batch_size}, counted on fake tensors (torch {torch.__version__}); "
          f"{args.gpu}: {GPUS[args.gpu][0] / 1e12:.0f} TFLOP/s bf16 dense, {GPUS[args.gpu][1] / 1e12:.2f} TB/s.\n")
    print(table(rows, args.gpu))
    if args.grid:
        print()
        print("\n".join(grid_lines(rows, args.grid, [int(s) for s in args.seeds.split(",")], args.gpu)))
    record = {"clip": args.clip, "batch_size": args.batch_size, "torch": torch.__version__, "rows": rows}
    for path in ([Path(args.out)] if args.out else []) + ([SHIPPED] if args.write else []):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
