"""An empirical privacy audit: a loss-threshold membership-inference attack on the final global
model, and the utility-privacy table of client-level DP (--dp-noise, --dp-clip; privacy.py).

    python benchmarks/privacy.py [--out runs/privacy] [--seeds 0 1 2] [--rounds 10] [--threads 1]
    python benchmarks/privacy.py --quick        # a smoke test: fed-dualcoop, 4 clients, epsilon inf and 1, one seed
    python benchmarks/privacy.py --clients 100 --out runs/privacy-100; python benchmarks/privacy.py --merge runs/privacy runs/privacy-100 --out runs/privacy-all

The attack (Yeom et al., CSF 2018): an image scores -loss under the final global model (binary
cross-entropy summed over its known labels); members are the images the clients trained on,
non-members the images held out of training before the client split (--validation 0.2, seeded):
both are draws from the same training distribution of the offline world. (The test split is not
used: its images follow another distribution, without the spurious pairs of training, so a loss
gap there would be a distribution gap, not membership. One client's images alone are a K-means
cluster of label vectors, so against the held-out images they too would measure label skew.)
The attack AUC (sklearn's roc_auc_score) is 0.5 when the model's loss says nothing about
membership.

The table: mAP and attack AUC at epsilon in {inf, 16, 4, 1} (inf: no DP, FedAvg as the default
run), for FedMPT and Fed-DualCoOp, with 4 clients (all every round) and with 100 clients at
--client-fraction 0.1. For each epsilon the noise multiplier comes from the accountant
(privacy.noise_for_epsilon: the planned rounds spend that epsilon at delta 1e-5). The clip norm
S is per method (CLIP_NORMS: about half a client's update norm in the first rounds of a run
without DP; choosing it from the clients' own updates spends privacy that is not accounted, the
usual shortcut). Each cell is a federate.py run of its own under OUT (a finished one is reused,
an interrupted one continues); OUT/privacy.json holds every cell, OUT/privacy.md the table.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import experiment  # noqa: E402
import privacy  # noqa: E402
from benchmarks.compare import run_once  # noqa: E402
from evaluation import predict_scores  # noqa: E402
from options import Config  # noqa: E402
from store.runs import read_config, read_state  # noqa: E402

EPSILONS = [math.inf, 16.0, 4.0, 1.0]
METHODS = ["fedmpt", "fed-dualcoop"]
CLIP_NORMS = {"fedmpt": 5.0, "fed-dualcoop": 0.1}  # about half the update norm of a client's first rounds
SETTINGS = {"4 clients": ["--clients", "4"], "100 clients, 10 a round": ["--clients", "100", "--client-fraction", "0.1"]}
DELTA = 1e-5
HELD_OUT = 0.2  # --validation: the non-members


def noise_multiplier(setting: list, epsilon: float, rounds: int) -> float:
    """The noise multiplier whose `rounds` rounds spend `epsilon` at DELTA in this client setting."""
    clients = int(setting[setting.index("--clients") + 1])
    fraction = float(setting[setting.index("--client-fraction") + 1]) if "--client-fraction" in setting else 1.0
    q = privacy.sampling_rate(Config(clients=clients, client_fraction=fraction))
    return privacy.noise_for_epsilon(epsilon, q, rounds, DELTA)


def image_losses(model, inputs, targets, rows) -> np.ndarray:
    """Binary cross-entropy of each image's known labels (target -1: unknown, left out), summed."""
    p = predict_scores(model, inputs, rows=rows).double().clamp(1e-12, 1 - 1e-12)  # (n, C)
    y = targets[torch.as_tensor(rows)].double()
    known = y >= 0
    loss = -(y * p.log() + (1 - y) * (1 - p).log()) * known
    return loss.sum(dim=1).numpy()


def attack_auc(run_dir: Path) -> float:
    """The loss-threshold attack's AUC on a finished run: members (the clients' training images)
    against the held-out training images, scored -loss by the run's final global model."""
    cfg, model_cfg, _ = read_config(str(run_dir))
    exp = experiment.prepare(*experiment.resolve(cfg, model_cfg))
    inputs, targets = experiment.training_inputs(exp)
    exp.model.load_tunable_state(read_state(run_dir / "state.pt", "run the cell again"))
    exp.model.eval()
    members = sorted(row for split in exp.splits for row in split)
    non_members = sorted(exp.validation)
    losses = image_losses(exp.model, inputs, targets, members + non_members)
    is_member = np.r_[np.ones(len(members)), np.zeros(len(non_members))]
    return float(roc_auc_score(is_member, -losses))


def run_cell(out: Path, method, setting_name, epsilon, seed, rounds, env) -> dict:
    """One cell: its federate.py run (reused when finished) and its attack."""
    setting = SETTINGS[setting_name]
    options = [*setting, "--method", method, "--rounds", str(rounds), "--validation", str(HELD_OUT), "--threads", "1"]
    noise = None
    if math.isfinite(epsilon):
        noise = noise_multiplier(setting, epsilon, rounds)
        options += ["--dp-noise", repr(noise), "--dp-clip", repr(CLIP_NORMS[method]), "--dp-delta", repr(DELTA)]
    name = f"{method}-{setting[1]}clients-eps{epsilon:g}"
    history = run_once(name, options, seed, out, env)
    auc = attack_auc(out / f"{name}-s{seed}")
    cell = {"method": method, "setting": setting_name, "epsilon": epsilon, "seed": seed, "noise_multiplier": noise,
            "clip_norm": CLIP_NORMS[method] if noise is not None else None, "mAP": history[-1]["mAP"],
            "dp_epsilon": history[-1].get("dp_epsilon"), "attack_auc": auc}
    print(json.dumps(cell), flush=True)
    return cell


def table(cells: list, seeds: list, rounds: int) -> str:
    """The markdown table: mAP and attack AUC (mean +- std over seeds) per method, setting and epsilon."""
    def mean_std(values):
        return f"{np.mean(values):.2f} ± {np.std(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"

    def auc(values):
        return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"
    lines = ["| method | clients | epsilon | noise multiplier | mAP | attack AUC | seeds |", "|---|---|---|---|---|---|---|"]
    for method in METHODS:
        for setting in SETTINGS:
            for epsilon in EPSILONS:
                done = [c for c in cells if (c["method"], c["setting"], c["epsilon"]) == (method, setting, epsilon)]
                if done:
                    noise = done[0]["noise_multiplier"]
                    lines.append(f"| {method} | {setting} | {epsilon:g} | {'-' if noise is None else f'{noise:.3g}'} | "
                                 f"{mean_std([c['mAP'] for c in done])} | {auc([c['attack_auc'] for c in done])} | "
                                 f"{len(done)} |")
    return "\n".join(lines + ["", f"{rounds} rounds, delta {DELTA:g}, clip norm S: " +
                              ", ".join(f"{m} {s:g}" for m, s in CLIP_NORMS.items()) +
                              f"; members: the clients' training images, non-members: {HELD_OUT:.0%} of the training "
                              f"images held out; seeds {seeds}."])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/privacy")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="fed-dualcoop, 4 clients, epsilon inf and 1, the first seed")
    parser.add_argument("--clients", type=int, nargs="+", choices=[4, 100], default=[4, 100],
                        help="the settings to run (two processes may share the cores: one setting each, each its --out)")
    parser.add_argument("--merge", nargs="+", default=[], metavar="DIR",
                        help="run nothing: the table of the cells in these --out directories, written to --out")
    args = parser.parse_args(argv)
    out = Path(args.out)
    global METHODS, SETTINGS, EPSILONS
    if args.merge:
        cells = [cell for folder in args.merge for cell in json.loads((Path(folder) / "privacy.json").read_text())]
        out.mkdir(parents=True, exist_ok=True)
        (out / "privacy.md").write_text(table(cells, sorted({c["seed"] for c in cells}), args.rounds) + "\n")
        print(table(cells, sorted({c["seed"] for c in cells}), args.rounds))
        return report(cells)
    SETTINGS = {name: setting for name, setting in SETTINGS.items() if int(setting[1]) in args.clients}
    if args.quick:
        METHODS, SETTINGS, EPSILONS = ["fed-dualcoop"], {"4 clients": SETTINGS["4 clients"]}, [math.inf, 1.0]
        args.seeds = args.seeds[:1]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    torch.set_num_threads(1)
    cells = []
    out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:  # a seed at a time: a table cut short has every cell, over fewer seeds
        for setting in SETTINGS:
            for method in reversed(METHODS):  # the cheaper method first
                for epsilon in EPSILONS:
                    cells.append(run_cell(out, method, setting, epsilon, seed, args.rounds, env))
                    (out / "privacy.json").write_text(json.dumps(cells, indent=1))
                    (out / "privacy.md").write_text(table(cells, args.seeds, args.rounds) + "\n")
    print(table(cells, args.seeds, args.rounds))
    return report(cells)


def report(cells: list) -> int:
    """The attack AUC without DP beside the AUC at epsilon 1, per method and setting (mean over seeds)."""
    for method in METHODS:
        for setting in SETTINGS:
            plain, private = ([c["attack_auc"] for c in cells
                               if (c["method"], c["setting"], c["epsilon"]) == (method, setting, epsilon)]
                              for epsilon in (math.inf, 1.0))
            if plain and private:
                print(f"{method}, {setting}: attack AUC without DP {np.mean(plain):.3f}, with DP at epsilon 1 "
                      f"{np.mean(private):.3f}" + ("" if np.mean(plain) > np.mean(private) else
                                                   " (no higher without DP: the attack finds no membership signal)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
