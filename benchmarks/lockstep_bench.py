"""Cells side by side (speed/lockstep.py) against the same cells one after another, measured in
one run: a round of N cells of the offline world (FedMPT by default, seeds 0..N-1, every client
of each), trained as federate.py trains them (client.local_train, one client after another, one
cell after another) and as one lockstep pass (speed.lockstep.train_lanes), interleaved
--repeats times. Reports cell-steps per second of each (a cell-step: one local SGD step of one
client of one cell), their ratio, and the dispatched operators per cell-step of each (every aten
operator a TorchDispatchMode sees, gathering the batch included), and checks that every lane's
state equals its solo one (1e-5).

    OMP_NUM_THREADS=1 python benchmarks/lockstep_bench.py [--cells 8] [--method fedmpt] [--repeats 3]
        [--batches N] [--text-encoding auto|shared|full] [--out FILE.json]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import client  # noqa: E402
import experiment  # noqa: E402
import federate  # noqa: E402
import numpy as np  # noqa: E402
from options import Config, ModelConfig  # noqa: E402
from speed.lockstep import train_lanes  # noqa: E402


class CountOps(TorchDispatchMode):
    """Counts every aten operator dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def round_lanes(cells, round_index=1, batches=0) -> list:
    """Every sampled client of every cell in its first round: (global_state, inputs, targets, rows,
    generator); with `batches`, each client's first batches x batch size rows only (a shorter pass
    of the same steps)."""
    lanes = []
    for exp in cells:
        cfg = exp.cfg
        for c in federate.sample_clients(np.random.default_rng(cfg.seed), cfg):
            rows = exp.splits[c][:batches * cfg.batch_size] if batches else exp.splits[c]
            lanes.append((exp.model.tunable_state(), exp.train[0], exp.train[1], rows,
                          federate.client_generator(cfg, round_index, c)))
    return lanes


def fresh(lanes):
    """The same lanes with new generators (a lane's data order is drawn from its generator)."""
    return [(*lane[:4], torch.Generator().manual_seed(lane[4].initial_seed())) for lane in lanes]


def one_by_one(model, lanes, cfg, lr):
    """As federate.py trains them: one client after another, one cell after another."""
    return [client.local_train(model, *lane[:4], cfg, lr, lane[4]) for lane in lanes]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=8)
    parser.add_argument("--method", default="fedmpt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, default=0, help="each client's first N batches only (0: all)")
    parser.add_argument("--text-encoding", default="auto", choices=("auto", "shared", "full"),
                        help="both sides' (federate.py's option; auto: full on the CPU)")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    exps = []
    for seed in range(args.cells):
        exp = experiment.prepare(*experiment.resolve(Config(method=args.method, seed=seed, threads=1, workers=0,
                                                            text_encoding=args.text_encoding),
                                                     ModelConfig()))
        exp.train = experiment.training_inputs(exp)
        if exps:  # one frozen backbone and one copy of the features, as speed.lockstep shares them
            exp.model.backbone, exp.train = exps[0].model.backbone, (exps[0].train[0], exp.train[1])
        exps.append(exp)
    model, cfg = exps[0].model, exps[0].cfg
    lr = federate.cosine_lr(cfg.lr, 1, cfg.rounds)
    lanes = round_lanes(exps, batches=args.batches)
    steps = sum(len(client.client_order(lane[3], cfg, torch.Generator().manual_seed(0))) for lane in lanes)

    sides = (("one by one", one_by_one), ("lockstep", train_lanes))
    counts = {}
    for name, work in sides:
        with CountOps() as counter:
            work(model, fresh(lanes), cfg, lr)
        counts[name] = counter.count / steps
    seconds, results = {name: [] for name, _ in sides}, {}
    for _ in range(args.repeats):  # interleaved: every side sees the same load on shared cores
        for name, work in sides:
            start = time.perf_counter()
            results[name] = work(model, fresh(lanes), cfg, lr)
            seconds[name].append(time.perf_counter() - start)
    worst = max(float((a[0][k] - b[0][k]).abs().max() / (b[0][k].abs().max() or 1))
                for a, b in zip(results["lockstep"], results["one by one"]) for k in a[0])
    rate = {name: steps / float(np.median(times)) for name, times in seconds.items()}
    report = {"method": args.method, "cells": args.cells, "text_encoding": args.text_encoding, "lanes": len(lanes),
              "batches_per_client": args.batches or "all", "cell_steps": steps,
              "backbone": cfg.clip, "ops_per_cell_step": {k: round(v, 1) for k, v in counts.items()},
              "cell_steps_per_second": {k: round(v, 2) for k, v in rate.items()},
              "seconds": {k: [round(t, 2) for t in v] for k, v in seconds.items()},
              "speedup": round(rate["lockstep"] / rate["one by one"], 2),
              "largest_relative_state_difference": worst,
              "threads": torch.get_num_threads()}
    print(json.dumps(report, indent=1))
    print(f"{args.cells} {args.method} cells of the offline world ({cfg.clip} CLIP), one round, {len(lanes)} lanes, "
          f"{steps} cell-steps: one by one {counts['one by one']:.0f} operators and {rate['one by one']:.2f} "
          f"cell-steps/s; lockstep {counts['lockstep']:.0f} operators and {rate['lockstep']:.2f} cell-steps/s: "
          f"{report['speedup']:.2f}x; states equal to {worst:.1e} (relative)")
    if args.out:
        path = Path(args.out)
        previous = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(previous + [report], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
