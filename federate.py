"""Federated training with a plain Python FedAvg loop, and the training command line.

    python federate.py                                   # offline shapes world, shipped shapes CLIP
    python federate.py --dataset voc2007 --root DIR --clip ViT-B/16 --device cuda

Round r: every sampled client copies the global tunable state, trains E local epochs on its own
images (SGD, cosine learning rate over rounds) and returns its state and sample count n_i; the
server checks each update and combines the accepted ones (`--aggregate`):

    mean          theta = sum_i n_i theta_i / sum_i n_i          (FedAvg, weighted by samples)
    median        theta = coordinate-wise median of the theta_i   (unweighted)
    trimmed-mean  theta = coordinate-wise mean after dropping the k largest and k smallest
                  values, k = floor(trim * n) (at least 1 once n >= 3)   (unweighted)

The robust rules bound what one poisoned client can do to the global model; with honest
clients they cost some accuracy on non-IID data because they ignore client sizes.
The experiment itself (options, data, model, frozen features) is built by experiment.setup;
the same local training, sampling, accept_and_aggregate and round record run on Flower (flower_app.py).
"""
import json
import math
import os
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from errors import Interrupted, RunFailed, exit_code
from evaluation import evaluate_global, gather, reference_scores, thresholds_record
from experiment import Config, Experiment, count_params, resume_config, setup, validate
from fedmpt import ModelConfig, asymmetric_loss, bce_loss
from prompts import stack_inputs
from store.files import save_tensors, write_json
from store.runs import check_extension, check_trained, extend_rounds, read_checkpoint, save_round
from tools.options import build_parser, config_from, given_options


def parse_config(argv):
    """(Config, ModelConfig) from the command line; every option is a field of one of the two
    dataclasses, with its help, choices and range (tools/options.py makes the parser)."""
    parser = build_parser((Config, ModelConfig), prog="federate.py",
                          description="Federated multi-label prompt tuning (FedMPT) with a plain FedAvg loop.")
    parser.add_argument("--count-params", action="store_true",
                        help="print {method, tunable, total} as one JSON line and exit; builds the "
                             "model on seeded random weights (no download), for the classes of "
                             "--dataset (voc2007, Table 5's setting, when --dataset is not given)")
    args = vars(parser.parse_args(argv))
    return config_from(Config, args), config_from(ModelConfig, args)


# ---- The federated pieces: local training, client sampling, aggregation -------------------
def local_train(model, global_state, inputs, targets, indices, cfg: Config, lr, generator):
    """One client's update: copy the global state, E epochs of SGD on the client's images
    (`inputs`: the tuple of cached tensors `model.encode_images` made, e.g. (v, P)).
    Returns (state, n_samples, stats), stats = {"loss": mean loss per image, "steps": local
    steps, "clip_share": share of steps whose gradient norm exceeded --grad-clip (0 with
    --grad-clip 0), "grad_norm": mean gradient norm before clipping}. The optimizer starts
    fresh every round, so nothing of it outlives the round (nor needs a checkpoint)."""
    model.load_tunable_state(global_state)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, loss_fn = local_optimizer(params, lr), loss_function(cfg)
    totals = StepTotals(model.device)
    for batch_inputs, batch_targets in batches(inputs, targets, client_order(indices, cfg, generator), model.device):
        loss = model.loss(batch_inputs, batch_targets, loss_fn)
        totals.add(loss, train_step(loss, optimizer, params, cfg.grad_clip), len(batch_targets), cfg.grad_clip)
    return model.tunable_state(), len(indices), totals.stats()


def local_optimizer(params, lr):
    """A client's SGD for one round (momentum 0.9, weight decay 1e-5): every training path's."""
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-5)


def loss_function(cfg: Config):
    return asymmetric_loss if cfg.loss == "asl" else bce_loss


def train_step(loss, optimizer, params, grad_clip) -> torch.Tensor:
    """Backward, the gradient-norm guard, the SGD step; returns the norm before clipping (a
    device tensor: reading it here would stop a GPU to wait for the host)."""
    optimizer.zero_grad()
    loss.backward()
    return clip_and_step(optimizer, params, grad_clip)


def clip_and_step(optimizer, params, grad_clip) -> torch.Tensor:
    """The gradient-norm guard and the SGD step on gradients already computed."""
    if grad_clip > 0:  # a guard: the first steps from random contexts can be large
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)  # the norm before clipping
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    optimizer.step()
    return norm


class StepTotals:
    """A client's training numbers, summed on the device in float64 (what Python floats summed
    before: the same values) and read once, after its last step."""

    def __init__(self, device):
        self.loss, self.norms, self.clipped = (torch.zeros((), dtype=torch.float64, device=device) for _ in range(3))
        self.seen, self.steps = 0, 0

    def add(self, loss, norm, n_images, grad_clip):
        norm = norm.detach().double()
        self.loss += loss.detach().double() * n_images
        self.norms += norm
        self.clipped += (norm > grad_clip).double() if grad_clip > 0 else 0.0
        self.seen, self.steps = self.seen + n_images, self.steps + 1

    def stats(self) -> dict:
        loss, norms, clipped = (float(t) for t in (self.loss, self.norms, self.clipped))  # the one host sync
        steps = max(self.steps, 1)
        return {"loss": loss / max(self.seen, 1), "steps": self.steps, "clip_share": clipped / steps,
                "grad_norm": norms / steps}


def client_order(indices, cfg: Config, generator) -> list:
    """A client's batches of rows for its E local epochs, each epoch in a fresh order drawn from its generator."""
    indices = torch.as_tensor(indices)
    return [batch for _ in range(cfg.local_epochs)
            for batch in indices[torch.randperm(len(indices), generator=generator)].split(cfg.batch_size)]


def batches(inputs, targets, order, device, prefetch=None):
    """(inputs, targets) of each batch of rows in `order` on the device (evaluation.gather); on
    CUDA (or with prefetch=True) a thread prepares the next batch while the current one trains."""
    prefetch = torch.device(device).type == "cuda" if prefetch is None else prefetch
    load = lambda rows: (gather(inputs, rows, device), targets[rows].to(device, non_blocking=True))
    if not prefetch:
        yield from map(load, order)
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        coming = pool.submit(load, order[0]) if order else None
        for i in range(len(order)):
            batch = coming.result()
            coming = pool.submit(load, order[i + 1]) if i + 1 < len(order) else None
            yield batch


def train_together(model, global_state, inputs, targets, client_rows, generators, cfg: Config, lr) -> list:
    """local_train for several clients side by side (--parallel-clients): [(state, n_samples,
    stats)] in the order of `client_rows` and `generators`. Each client has its own copy of the
    tunable tensors, its own batches and optimizer; at every step the active clients' prompts go
    through one text-encoder call (prompts.stack_inputs) and their losses are summed before one
    backward: a client's tensors reach only its own loss, so each gets exactly its own gradient
    (equal to local_train one client after another, up to float rounding: tests/test_parallel.py).
    Needs a method whose text side splits in two (`text_inputs`, `text_from`)."""
    from torch.func import functional_call
    device, loss_fn = model.device, loss_function(cfg)
    states = [{f"model.{name}": t.detach().clone().requires_grad_() for name, t in global_state.items()}
              for _ in client_rows]  # named as inside MethodCall
    optimizers = [local_optimizer(list(state.values()), lr) for state in states]
    orders = [client_order(rows, cfg, generator) for rows, generator in zip(client_rows, generators)]
    loaders = [batches(inputs, targets, order, device) for order in orders]
    totals = [StepTotals(device) for _ in states]
    methods = {name: MethodCall(model, name) for name in ("text_inputs", "text_from", "loss")}
    call = lambda i, method, *args, **kwargs: functional_call(methods[method], states[i], args, kwargs)
    for step in range(max(map(len, orders))):
        active = [i for i, order in enumerate(orders) if step < len(order)]
        parts = [call(i, "text_inputs") for i in active]
        encoded = model.prompts.run(model.backbone, stack_inputs(parts)).chunk(len(active))  # one encoder call
        losses = []
        for i, features in zip(active, encoded):
            batch_inputs, batch_targets = next(loaders[i])
            T = call(i, "text_from", features)
            losses.append((i, call(i, "loss", batch_inputs, batch_targets, loss_fn, T=T), len(batch_targets)))
            optimizers[i].zero_grad()
        torch.stack([loss for _, loss, _ in losses]).sum().backward()
        for i, loss, n in losses:
            totals[i].add(loss, clip_and_step(optimizers[i], list(states[i].values()), cfg.grad_clip), n, cfg.grad_clip)
    return [({name[len("model."):]: t.detach().clone() for name, t in state.items()}, len(rows), total.stats())
            for state, rows, total in zip(states, client_rows, totals)]


class MethodCall(torch.nn.Module):
    """A model's method as a module call: torch.func.functional_call runs a module's forward with
    other tensors in place of its parameters (here a client's own)."""

    def __init__(self, model, method: str):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, *args, **kwargs):
        return getattr(self.model, self.method)(*args, **kwargs)


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


def aggregate_weighted(states, weights):
    """FedAvg: theta = sum_i w_i theta_i / sum_i w_i, tensor by tensor."""
    total = float(sum(weights))
    return {key: sum(state[key] * (w / total) for state, w in zip(states, weights)) for key in states[0]}


def aggregate_median(states, weights=None):
    """Coordinate-wise median (for an even count, the mean of the two middle values)."""
    return {key: torch.stack([s[key] for s in states]).quantile(0.5, dim=0) for key in states[0]}


def aggregate_trimmed_mean(states, weights=None, trim=0.2):
    """Coordinate-wise mean of the values left after cutting k from each end."""
    n = len(states)
    k = min(max(int(trim * n), 1 if n >= 3 else 0), (n - 1) // 2)
    result = {}
    for key in states[0]:
        values = torch.stack([s[key] for s in states]).sort(dim=0).values  # (n, ...)
        result[key] = values[k:n - k].mean(dim=0)
    return result


# the --aggregate rules by name (Config.aggregate's choices; a test keeps the two alike)
AGGREGATORS = {"mean": aggregate_weighted, "median": aggregate_median, "trimmed-mean": aggregate_trimmed_mean}


def combine_stats(stats: list, sizes: list) -> dict:
    """A round's training numbers from its aggregated clients' local_train stats: the loss per
    image weighted by samples, the clipped share and the mean gradient norm weighted by local
    steps (Nones when no client was aggregated)."""
    if not stats:
        return {"loss": None, "clip_share": None, "grad_norm": None}
    steps = [s["steps"] for s in stats]
    return {"loss": float(np.average([s["loss"] for s in stats], weights=sizes)),
            **{key: float(np.average([s[key] for s in stats], weights=steps)) for key in ("clip_share", "grad_norm")}}


def accept_and_aggregate(round_index, updates, reference, rule, log):
    """What both engines do with a round's updates. `updates`: (client, state, n_samples, stats,
    problem) per sampled client, `problem` '' or why it sent nothing usable (no reply, its
    training failed). Updates that do not fit `reference` (keys, shapes, dtypes, finiteness:
    validate_update) are left out too, with a log line; the rest are combined by the rule
    named `rule`. Returns (new state, or None when no update was accepted; combine_stats of the
    accepted ones; their number; the left-out client ids, sorted)."""
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
        log(f"round {round_index}: every client failed; the global state stays as it was")
        return None, combine_stats([], []), 0, sorted(rejected)
    return AGGREGATORS[rule](states, sizes), combine_stats(stats, sizes), len(states), sorted(rejected)


# ---- Rounds: what both engines record -----------------------------------------------------
TABLE_HEADER = (f"{'round':>5} {'train loss':>10} {'clipped':>7} {'grad norm':>9} {'mAP':>7} {'CF1':>7} {'OF1':>7} "
                f"{'seconds':>8}")


def training_columns(stats: dict, n_aggregated: int, rejected: list) -> dict:
    """metrics.json's columns of a training round besides the loss and the evaluation."""
    return {"clip_share": stats["clip_share"], "grad_norm": stats["grad_norm"], "clients_aggregated": n_aggregated,
            "clients_rejected": rejected, "failed": n_aggregated == 0}


def record_round(exp: Experiment, history: list, round_index, loss, seconds, extra, rng=None):
    """Evaluate the global model (the model's current state), append the round's row to
    metrics.json, print it, and after a training round write checkpoint.pt (global state,
    history, the client-sampling generator's state): what `--resume` continues from."""
    row = {"round": round_index, "loss": loss, "seconds": seconds, **evaluate_global(exp), **extra}
    history.append(row)
    save_round(exp.out, history, exp.model.tunable_state(), round_index, rng.bit_generator.state if rng else None)
    number = lambda key: float("nan") if row.get(key) is None else row[key]  # round 0 has no training
    tqdm.write(f"{round_index:>5} {number('loss'):>10.4f} {number('clip_share'):>7.0%} {number('grad_norm'):>9.2f} "
               f"{row['mAP']:>7.2f} {row['CF1']:>7.2f} {row['OF1']:>7.2f} {seconds:>8.1f}")
    sys.stdout.flush()
    return row


def run_round(round_index, model, global_state, features, client_splits, sampled, cfg, log):
    """Train the sampled clients one after another (--parallel-clients N: N at a time, side by
    side: train_together), then accept_and_aggregate. A client whose training raises (out of
    memory, a bug) stops the run: RunFailed. Returns (new global state, combine_stats of the
    aggregated clients, their number, left-out client ids)."""
    inputs, targets = features
    lr = cosine_lr(cfg.lr, round_index, cfg.rounds)
    updates, size = [], max(1, getattr(cfg, "parallel_clients", 1))
    groups = [sampled[i:i + size] for i in range(0, len(sampled), size)]
    for group in tqdm(groups, desc=f"round {round_index}", leave=False):
        generators = [client_generator(cfg, round_index, client) for client in group]
        try:
            rows = [client_splits[c] for c in group]
            results = ([local_train(model, global_state, inputs, targets, rows[0], cfg, lr, generators[0])]
                       if len(group) == 1 else train_together(model, global_state, inputs, targets, rows, generators,
                                                              cfg, lr))
        except Exception as error:  # in one process a failing update is a failing run: stop it
            oom = isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower() \
                or "can't allocate memory" in str(error)
            clients = f"client {group[0]}" if len(group) == 1 else f"clients {group}"
            raise RunFailed(f"round {round_index}, {clients}: {type(error).__name__}: {error}"
                            + ("; out of memory: try a smaller --batch-size" if oom else "")) from error
        updates += [(client, state, n, stats, "") for client, (state, n, stats) in zip(group, results)]
    new_state, stats, n_aggregated, rejected = accept_and_aggregate(round_index, updates, global_state,
                                                                    cfg.aggregate, log)
    return (global_state if new_state is None else new_state), stats, n_aggregated, rejected


# ---- The loop -----------------------------------------------------------------------------
def run(cfg: Config, model_cfg: ModelConfig, given: dict = None):
    """Train (or with --resume continue) a run; `given`: the options named on the command line."""
    checkpoint = None
    if cfg.resume:  # the run's own options and checkpoint, checked before the long setup
        run_dir = cfg.resume
        cfg, model_cfg = resume_config(run_dir, given)
        path = Path(run_dir) / "checkpoint.pt"
        if path.exists():
            checkpoint = read_checkpoint(path, "restore it, or delete it to train the run again from round 0 "
                                         "with --resume")
        if "rounds" in (given or {}):
            check_extension(run_dir, cfg.rounds, checkpoint["round"] if checkpoint else 0)
    validate(cfg, model_cfg)  # bad options first, before anything else is said or built
    use_threads(cfg.threads)
    exp = setup(cfg, model_cfg, record={"engine": "plain"}, state=checkpoint and checkpoint["global_state"])
    cfg, model, out = exp.cfg, exp.model, exp.out
    if cfg.resume and "rounds" in (given or {}):  # every check passed: only now config.json records it
        extend_rounds(cfg.resume, cfg.rounds, checkpoint["round"] if checkpoint else 0)
    global_state, history, first_round = model.tunable_state(), [], 1
    start_state = global_state
    rng = np.random.default_rng(cfg.seed)
    if checkpoint is not None:  # setup loaded its global state into the model
        history, first_round = checkpoint["history"], checkpoint["round"] + 1
        rng.bit_generator.state = checkpoint["rng_state"]
        print(f"resuming {out} after round {checkpoint['round']}")
        write_json(out / "metrics.json", history)  # a run stopped between the two writes: metrics.json catches up

    print(f"label prior mAP {exp.prior_mAP:.2f}; zero-shot mAP {exp.zero_shot['mAP']:.2f}; "
          f"client sizes {[len(s) for s in exp.splits]}")
    tqdm.write(TABLE_HEADER)
    if not history:
        record_round(exp, history, 0, None, 0.0, reference_scores(exp))
    for round_index in range(first_round, cfg.rounds + 1):
        start = time.time()
        sampled = sample_clients(rng, cfg)
        try:
            global_state, stats, n_aggregated, rejected = run_round(
                round_index, model, global_state, exp.train, exp.splits, sampled, cfg, tqdm.write)
        except RunFailed as failure:
            (out / "error.log").write_text("".join(traceback.format_exception(failure.__cause__)))
            kept = f"checkpoint.pt keeps round {round_index - 1}" if round_index > 1 else "no round finished"
            raise RunFailed(f"{failure} (traceback in {out / 'error.log'}; {kept}; fix the cause and "
                            f"continue with --resume {out})") from failure.__cause__
        except KeyboardInterrupt:
            kept = (f"{out / 'checkpoint.pt'} keeps round {round_index - 1}" if round_index > 1
                    else "no round had finished")
            raise Interrupted(f"interrupted in round {round_index}: {kept}; continue with "
                              f"python federate.py --resume {out}") from None
        model.load_tunable_state(global_state)
        record_round(exp, history, round_index, stats["loss"], time.time() - start, rng=rng,
                     extra=training_columns(stats, n_aggregated, rejected))
    check_trained(history, first_round, start_state, global_state)  # a run that could not train: exit 1
    save_tensors(global_state, out / "state.pt", f"python federate.py --resume {out} writes it from checkpoint.pt")
    if exp.validation:  # what predict.py labels with: thresholds chosen on held-out training images
        write_json(out / "thresholds.json", thresholds_record(exp, history[-1]["round"]))
    if cfg.plot:
        from tools import explain
        explain.plot_transport(model, exp.test_set, exp.test[0], exp.conditions["conditions"],
                               exp.test_set.classes, out / "plans.png")
        print(f"wrote {out / 'plans.png'}")
    print(f"final mAP {history[-1]['mAP']:.2f} (round 0: {history[0]['mAP']:.2f}, zero-shot "
          f"{exp.zero_shot['mAP']:.2f}, label prior {exp.prior_mAP:.2f}); run saved in {out}")
    warn_if_untrained(history, cfg.lr) or warn_if_stalled(history, cfg.lr)
    return history


def use_threads(threads: int):
    """--threads N sets torch's CPU threads; with 0 (torch's default, one per core) a run that
    starts on busy cores says that one thread would be faster there (docs/usage.md)."""
    if threads:
        torch.set_num_threads(threads)
        return
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if cores > 1 and load >= 0.75 * cores:
        print(f"note: the CPUs are busy (load {load:.1f} on {cores} cores); a run that shares them is faster "
              "with --threads 1 (docs/usage.md).", file=sys.stderr)


def warn_if_untrained(history: list, lr: float, margin: float = 1.0) -> bool:
    """After the last round: a model that ranks the test images no better than the label prior
    (within `margin` mAP) learned nothing usable, whatever the exit code says; say so, and how
    to tell a collapse (round 0 was better) from a task the backbone cannot see."""
    final, start, prior = history[-1]["mAP"], history[0]["mAP"], history[0]["label_prior_mAP"]
    if final > prior + margin:
        return False
    collapsed = start > prior + margin
    print(f"warning: the final model ranks the test images no better than the label prior (final mAP "
          f"{final:.2f}, label prior {prior:.2f}, round 0 {start:.2f}). "
          + (f"Training lost what round 0 had: the steps were too large for this data; try --lr {lr / 3:.3g}, "
             "or --loss bce (ASL's gradient vanishes once every probability saturates: docs/choices.md)."
             if collapsed else
             "It never rose above it: check the labels, and the vocabulary warning above if any."),
          file=sys.stderr)
    return True


def warn_if_stalled(history: list, lr: float, last: int = 3, margin: float = 5.0) -> bool:
    """After the last round: a run whose training loss and gradient norm stayed flat over its
    `last` rounds (loss within 2%, gradient norm within half its mean) while its final mAP is
    within `margin` of the label prior stopped learning early; say so, with what to try."""
    rows = [row for row in history[1:] if row.get("loss") is not None and not row.get("failed")][-last:]
    if len(rows) < last or history[-1]["mAP"] > history[0]["label_prior_mAP"] + margin:
        return False
    spread = lambda key: np.ptp([row[key] for row in rows]) / max(abs(np.mean([row[key] for row in rows])), 1e-12)
    if spread("loss") > 0.02 or spread("grad_norm") > 0.5:
        return False
    print(f"warning: training stopped learning: over rounds {rows[0]['round']}-{rows[-1]['round']} the loss stayed at "
          f"{rows[-1]['loss']:.4g} and the gradient norm at {rows[-1]['grad_norm']:.3g}, and the final mAP "
          f"{history[-1]['mAP']:.2f} is within {margin:g} of the label prior {history[0]['label_prior_mAP']:.2f}. "
          f"Try --loss bce (ASL's gradient vanishes once every probability saturates: docs/choices.md), another "
          f"--lr than {lr:g}, or for FedMPT --class-ctx 4; compare the choices on --validation.", file=sys.stderr)
    return True


def main(argv=None):
    """`federate.py [options]` trains (`--count-params`: prints the method's size and exits)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg, model_cfg = parse_config(argv)
    given = given_options(argv, cfg, model_cfg)
    if "--count-params" in argv:
        if "dataset" not in given:
            cfg.dataset = "voc2007"  # Table 5's setting
        return exit_code(lambda: print(json.dumps(count_params(cfg, model_cfg))))
    return exit_code(run, cfg, model_cfg, given)


if __name__ == "__main__":
    sys.exit(main())
