"""Federated training with a plain Python FedAvg loop, and the training command line.

    python federate.py                                   # offline shapes world, shipped shapes CLIP
    python federate.py --dataset voc2007 --root DIR --clip ViT-B/16 --device cuda

Round r: every sampled client copies the global tunable state, trains E local epochs on its own
images (client.local_train: SGD, cosine learning rate over rounds) and returns its state and
sample count n_i; the server checks each update and combines the accepted ones by the
`--aggregate` rule (aggregation.py), by default FedAvg:

    theta = sum_i n_i theta_i / sum_i n_i

The experiment itself (options, data, model, frozen features) is built by experiment.setup; the
same local training, sampling, accept_and_aggregate and round row run on Flower (flower_app.py).
"""
import dataclasses
import json
import math
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import availability
import clients_eval
from aggregation import AGGREGATORS
from client import local_train
from errors import exit_code
from evaluation import evaluate_global, thresholds_record
from experiment import Experiment, count_params, setup
from options import Config, ModelConfig, build_parser, flag
from speed.parallel_clients import train_together
from store import runs
from store.files import save_tensors, write_json


def parse_config(argv):
    """(Config, ModelConfig) from the command line; every option is a field of one of the two
    dataclasses, with its help, choices and range (options.py makes the parser)."""
    parser = build_parser((Config, ModelConfig), prog="federate.py",
                          description="Federated multi-label prompt tuning (FedMPT) with a plain FedAvg loop.")
    parser.add_argument("--count-params", action="store_true",
                        help="print {method, tunable, total} as one JSON line and exit; builds the "
                             "model on seeded random weights (no download), for the classes of "
                             "--dataset (voc2007, Table 5's setting, when --dataset is not given)")
    args = vars(parser.parse_args(argv))
    return tuple(config(**{f.name: args[f.name] for f in dataclasses.fields(config)}) for config in (Config, ModelConfig))


# ---- The server's pieces: the learning rate, client sampling, accepting and aggregating -----
def cosine_lr(base_lr, round_index, n_rounds):
    """Learning rate of round r (1-based): cosine from base_lr towards 0 over the rounds."""
    return 0.5 * base_lr * (1 + math.cos(math.pi * (round_index - 1) / n_rounds))


def sample_clients(rng: np.random.Generator, cfg: Config) -> list:
    """The clients of one round: a share --client-fraction of them (at least one), sorted."""
    n_sampled = max(1, round(cfg.client_fraction * cfg.clients))
    return sorted(rng.choice(cfg.clients, n_sampled, replace=False).tolist())


def client_generator(cfg: Config, round_index: int, client: int) -> torch.Generator:
    """The seed of a client's data order in a round: the same on every engine and on resume."""
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + round_index * 1_009 + client)


def validate_update(update: dict, reference: dict) -> str:
    """Why a client's state cannot be aggregated ('' if it can): keys, shapes, dtypes, finiteness."""
    if not isinstance(update, dict) or set(update) != set(reference):
        keys = set(update) if isinstance(update, dict) else set()
        return f"keys differ (missing {sorted(set(reference) - keys)}, unexpected {sorted(keys - set(reference))})"
    for name, expected in reference.items():
        tensor = update[name]
        if not isinstance(tensor, torch.Tensor) or tensor.shape != expected.shape:
            return f"{name} has shape {tuple(getattr(tensor, 'shape', ()))}, expected {tuple(expected.shape)}"
        if tensor.dtype != expected.dtype:
            return f"{name} has dtype {tensor.dtype}, expected {expected.dtype}"
        if not torch.isfinite(tensor).all():
            return f"{name} has non-finite values"
    return ""


def accept_and_aggregate(round_index, updates, reference, rule, log, combine=None):
    """What both engines do with a round's updates. `updates`: (client, state, n_samples, stats,
    problem) per sampled client, `problem` '' or why it sent nothing usable (no reply, its
    training failed). Updates that do not fit `reference` (validate_update) are left out too,
    with a log line; the rest are combined by the rule named `rule` (aggregation.AGGREGATORS),
    or by `combine` (states, sizes) -> state when given (client-level DP: privacy.py).
    Returns (new state, or None when no update was accepted; the round's training numbers from
    the accepted clients' local_train stats: the loss per image weighted by samples, the clipped
    share and the mean gradient norm weighted by local steps, Nones when none was accepted; their
    number; the left-out client ids, sorted)."""
    states, sizes, stats, rejected = [], [], [], []
    for client, state, n, client_stats, problem in updates:
        if problem:
            log(f"round {round_index}: client {client} {problem}; left out")
        elif problem := validate_update(state, reference):
            log(f"round {round_index}: client {client} update rejected: {problem}")
        if problem:
            rejected.append(client)
            continue
        states.append(state), sizes.append(n), stats.append(client_stats)
    if not states:
        if updates:  # (none at all: every sampled client dropped out, and availability.drop_out said so)
            log(f"round {round_index}: every client failed; the global state stays as it was")
        return None, {"loss": None, "clip_share": None, "grad_norm": None}, 0, sorted(rejected)
    steps = [s["steps"] for s in stats]
    combined = {"loss": float(np.average([s["loss"] for s in stats], weights=sizes)),
                **{key: float(np.average([s[key] for s in stats], weights=steps)) for key in ("clip_share", "grad_norm")}}
    return (combine or AGGREGATORS[rule])(states, sizes), combined, len(states), sorted(rejected)


def run_round(round_index, model, global_state, features, client_splits, sampled, cfg, log):
    """Train the sampled clients one after another (--parallel-clients N: N at a time, side by
    side: speed.parallel_clients), then accept_and_aggregate. A client whose training raises
    stops the run (RunFailed). Returns (new global state, the training numbers of the aggregated
    clients, their number, left-out client ids)."""
    inputs, targets = features
    lr = cosine_lr(cfg.lr, round_index, cfg.rounds)
    updates, size = [], cfg.parallel_clients
    for group in tqdm([sampled[i:i + size] for i in range(0, len(sampled), size)], desc=f"round {round_index}",
                      leave=False):
        rows, generators = [client_splits[c] for c in group], [client_generator(cfg, round_index, c) for c in group]
        try:
            results = ([local_train(model, global_state, inputs, targets, rows[0], cfg, lr, generators[0])]
                       if len(group) == 1 else train_together(model, global_state, inputs, targets, rows, generators,
                                                              cfg, lr))
        except Exception as error:  # out of memory, a bug: the run stops in one process
            raise runs.client_failed(round_index, group, error) from error
        updates += [(client, state, n, stats, "") for client, (state, n, stats) in zip(group, results)]
    combine = None
    if cfg.dp_clip:  # client-level DP: clipped updates, equal weights, seeded noise (privacy.py)
        import privacy
        combine = privacy.round_aggregator(cfg, round_index, global_state)
    new_state, stats, n_aggregated, rejected = accept_and_aggregate(round_index, updates, global_state,
                                                                    cfg.aggregate, log, combine)
    return (global_state if new_state is None else new_state), stats, n_aggregated, rejected


# ---- Rounds: what both engines record -----------------------------------------------------
TABLE_HEADER = (f"{'round':>5} {'train loss':>10} {'clipped':>7} {'grad norm':>9} {'mAP':>7} {'CF1':>7} {'OF1':>7} "
                f"{'seconds':>8}")
COLUMNS = [("loss", 10, ".4f"), ("clip_share", 7, ".0%"), ("grad_norm", 9, ".2f"), ("mAP", 7, ".2f"), ("CF1", 7, ".2f"),
           ("OF1", 7, ".2f"), ("seconds", 8, ".1f")]  # each printed row's, after the round (round 0 has no training)


def evaluate_round(exp: Experiment, round_index, seconds, stats=None, n_aggregated=0, rejected=(),
                   dropout=None) -> dict:
    """A round's row of metrics.json: the global model's test metrics (with --client-eval each
    client's too) and the round's training numbers (accept_and_aggregate's; `dropout`:
    availability.drop_out's record); round 0, the untuned model, carries the reference scores
    instead: the label prior and the frozen backbone zero-shot."""
    if stats is None:
        extra = {"label_prior_mAP": exp.prior_mAP, "zero_shot_mAP": exp.zero_shot["mAP"],
                 **{f"zero_shot_{k}": v for k, v in exp.zero_shot.items() if k != "mAP"}}
    else:
        extra = {"clip_share": stats["clip_share"], "grad_norm": stats["grad_norm"], "clients_aggregated": n_aggregated,
                 "clients_rejected": list(rejected), "failed": n_aggregated == 0, **(dropout or {})}
        if exp.cfg.dp_clip:  # client-level DP: epsilon spent after this round (privacy.py)
            import privacy
            extra["dp_epsilon"] = privacy.epsilon_spent(exp.cfg, round_index)
    loss = None if stats is None else stats["loss"]
    row = {"round": round_index, "loss": loss, "seconds": seconds, **evaluate_global(exp)}
    if exp.cfg.client_eval:  # every client on its own test images
        row.update(clients_eval.client_metrics(exp))
    return {**row, **extra}


def save_round(exp: Experiment, history: list, row: dict, rng=None):
    """Append the row; after a training round write checkpoint.pt (global state, history, the
    client-sampling generator: what --resume continues from), then metrics.json (a row per
    round): a write that fails leaves both at the last round saved whole. Print the row."""
    history.append(row)
    fix = f"continue the run with python federate.py --resume {exp.out}"
    if row["round"] > 0:
        save_tensors({"global_state": exp.model.tunable_state(), "round": row["round"], "history": history,
                      "rng_state": rng.bit_generator.state if rng else None}, exp.out / "checkpoint.pt", fix)
    write_json(exp.out / "metrics.json", history, fix)
    tqdm.write(" ".join([f"{row['round']:>5}", *(f"{'-':>{width}}" if row.get(key) is None else  # "-": no number
                                                 f"{row[key]:>{width}{spec}}" for key, width, spec in COLUMNS)]))
    if row["round"] == 0:
        tqdm.write(ROUND_ZERO.format(**row))
    sys.stdout.flush()


ROUND_ZERO = ("      round 0 is the untuned model (the tunable tensors as initialised, before any client trained), "
              "not zero-shot CLIP: the frozen backbone zero-shot is at mAP {zero_shot_mAP:.2f}, the label prior at "
              "{label_prior_mAP:.2f}")


# ---- The loop -----------------------------------------------------------------------------
def run(cfg: Config, model_cfg: ModelConfig, given: dict = None):
    """Train (or with --resume continue) a run; `given`: the options named on the command line."""
    checkpoint = None
    if cfg.resume:  # the run's own options and checkpoint, checked before the long setup
        cfg, model_cfg, checkpoint = runs.resume(cfg.resume, given)
        if (finished := runs.finished_history(cfg.resume, cfg.rounds)) is not None:
            return finished  # said so; nothing set up, nothing written
    exp = setup(cfg, model_cfg, record={"engine": "plain"}, state=checkpoint and checkpoint["global_state"])
    cfg, model, out = exp.cfg, exp.model, exp.out
    if cfg.resume and "rounds" in (given or {}):  # every check passed: only now config.json records it
        runs.extend_rounds(cfg.resume, cfg.rounds, checkpoint["round"] if checkpoint else 0)
    global_state, history, first_round = model.tunable_state(), [], 1
    start_state, rng = global_state, np.random.default_rng(cfg.seed)
    if checkpoint is not None:  # setup loaded its global state into the model
        history, first_round = runs.continue_from(checkpoint, rng, out)

    print(f"label prior mAP {exp.prior_mAP:.2f}; zero-shot mAP {exp.zero_shot['mAP']:.2f}; "
          f"client sizes {[len(s) for s in exp.splits]}")
    tqdm.write(TABLE_HEADER)
    if not history:  # round 0: the untuned model, with the reference scores
        save_round(exp, history, evaluate_round(exp, 0, 0.0))
    for round_index in range(first_round, cfg.rounds + 1):
        start = time.time()
        sampled, dropout = sample_clients(rng, cfg), None
        if cfg.client_dropout:  # sampled clients that fail to report (availability.py)
            sampled, dropout = availability.drop_out(cfg, round_index, sampled, tqdm.write)
        with runs.round_failure(out, round_index):
            global_state, stats, n_aggregated, rejected = run_round(
                round_index, model, global_state, exp.train, exp.splits, sampled, cfg, tqdm.write)
        model.load_tunable_state(global_state)
        row = evaluate_round(exp, round_index, time.time() - start, stats, n_aggregated, rejected, dropout)
        save_round(exp, history, row, rng)

    runs.check_trained(history, first_round, start_state, global_state)  # a run that could not train: exit 1
    save_tensors(global_state, out / "state.pt", f"python federate.py --resume {out} writes it from checkpoint.pt")
    if cfg.personalize:  # every client fine-tunes the final state (its order seeded as round R + 1)
        clients_eval.personalize(exp, global_state, [client_generator(cfg, cfg.rounds + 1, c)
                                                     for c in range(len(exp.splits))])
    if exp.validation:  # what predict.py labels with: thresholds chosen on held-out training images
        write_json(out / "thresholds.json", thresholds_record(exp, history[-1]["round"]))
    if cfg.plot:
        from tools import explain
        explain.plot_transport(model, exp.test_set, exp.test[0], exp.conditions["conditions"],
                               exp.test_set.classes, out / "plans.png")
        print(f"wrote {out / 'plans.png'}")
    print(f"final mAP {history[-1]['mAP']:.2f} (round 0: {history[0]['mAP']:.2f}, zero-shot "
          f"{exp.zero_shot['mAP']:.2f}, label prior {exp.prior_mAP:.2f}); run saved in {out}")
    runs.warn_after_run(history, cfg.lr, cfg.grad_clip)
    return history


def main(argv=None):
    """`federate.py [options]` trains (`--count-params`: prints the method's size and exits)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg, model_cfg = parse_config(argv)
    named = {argument.split("=")[0] for argument in argv if argument.startswith("--")}  # on the command line
    given = {f.name: getattr(c, f.name) for c in (cfg, model_cfg) for f in dataclasses.fields(c) if flag(f.name) in named}
    if "--count-params" in argv:
        if "dataset" not in given:
            cfg.dataset = "voc2007"  # Table 5's setting
        return exit_code(lambda: print(json.dumps(count_params(cfg, model_cfg))))
    return exit_code(run, cfg, model_cfg, given)


if __name__ == "__main__":
    sys.exit(main())
