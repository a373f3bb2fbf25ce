"""Cells of a grid trained side by side in one process (`reproduce.py --lockstep N`).

Cells that share a method, dataset, backbone and every option but --seed and --heterogeneity
(what benchmarks/reproduce.py varies within a table) run as one process: one frozen backbone and
one copy of the frozen features, and each round every sampled client of every cell is a *lane*
of one pass. Each lane keeps what it has alone: its cell's global state, client split, data order
(client_generator), its own optimizer and gradient-norm guard. Each cell still samples its
clients, aggregates, evaluates and writes its own run directory (metrics.json, checkpoint.pt,
state.pt), so it resumes on its own, with `federate.py --resume` too.

FedMPT's lanes are stacked (`train_stacked`): every tunable tensor gets a lane axis (L, ...), the
lanes' prompts go through CLIP's text encoder in one call, their transports through one batched
Sinkhorn (`lane_sinkhorn`: each lane stops where it would alone), and one SGD step moves every
lane (SGD is elementwise, so a stacked step is each lane's own). A step's operators are shared by
its lanes instead of repeated per lane. Other methods with a split text side run as
speed.parallel_clients does (one encoder call, a loss per lane); those that change tokens inside
the encoder (fed-maple, fed-ram) train their lanes one after another. Every path equals each cell
run alone up to float rounding (tests/test_lockstep.py).

    python speed/lockstep.py --cell [federate.py options] --cell [federate.py options] ...
"""
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

if __name__ == "__main__":  # run as a script: the repository's modules
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ot  # noqa: E402
from client import batches, client_order, local_optimizer, local_train, step_stats  # noqa: E402
from errors import FedMPTError, RunFailed, exit_code  # noqa: E402
from evaluation import thresholds_record  # noqa: E402
from experiment import load_backbone, resolve, setup  # noqa: E402
from federate import (accept_and_aggregate, client_generator, cosine_lr, evaluate_round, parse_config,  # noqa: E402
                      sample_clients, save_round)
from fedmpt import LOSSES, FedMPT  # noqa: E402
from options import flag  # noqa: E402
from speed.parallel_clients import MethodCall, train_together  # noqa: E402
from speed.shared_prefix import SharedPrefixText  # noqa: E402
from store import runs  # noqa: E402
from store.files import save_tensors, write_json  # noqa: E402
from tqdm import tqdm  # noqa: E402


# ---- One pass over every lane of a round --------------------------------------------------
def train_lanes(model, lanes, cfg, lr) -> list:
    """client.local_train for every lane, side by side: lanes [(global_state, inputs, targets,
    rows, generator)] -> [(state, n_samples, stats)] in their order. `model`: any cell's model of
    the group (they differ only in their tunable values, which each lane brings)."""
    base = model.model if isinstance(model, SharedPrefixText) else model
    if isinstance(base, FedMPT):
        return train_stacked(model, lanes, cfg, lr)
    if hasattr(base, "text_from"):
        columns = [list(column) for column in zip(*lanes)]
        return train_together(model, *columns[:4], columns[4], cfg, lr)
    return [local_train(model, *lane[:4], cfg, lr, lane[4]) for lane in lanes]


def train_stacked(model, lanes, cfg, lr) -> list:
    """FedMPT's lanes as one stacked model: each tunable tensor (L, ...); per step the active
    lanes' losses in one forward (`stacked_loss`), one backward, each lane's gradient-norm guard
    (`clip_lanes`) and one SGD step. A lane's state is taken after its own last step."""
    base = model.model if isinstance(model, SharedPrefixText) else model
    encode = model.encode_prompts if isinstance(model, SharedPrefixText) else model.backbone.encode_prompts  # as alone
    device, loss_fn, L = base.device, LOSSES[cfg.loss], len(lanes)
    names = list(lanes[0][0])
    params = {name: torch.stack([lane[0][name] for lane in lanes]).to(device).requires_grad_() for name in names}
    optimizer = local_optimizer(list(params.values()), lr)
    orders = [client_order(rows, cfg, generator) for _, _, _, rows, generator in lanes]
    loaders = [batches(inputs, targets, order, device) for (_, inputs, targets, _, _), order in zip(lanes, orders)]
    totals, results = LaneTotals(L, device), [None] * L
    for step in range(max(map(len, orders))):
        active = [i for i in range(L) if step < len(orders[i])]
        index = torch.tensor(active, device=device)
        lane_params = params if len(active) == L else {n: p.index_select(0, index) for n, p in params.items()}
        batch = [next(loaders[i]) for i in active]
        losses = stacked_loss(base, encode, lane_params, batch, loss_fn)  # (A,)
        optimizer.zero_grad()
        losses.sum().backward()
        norms = clip_lanes(list(params.values()), cfg.grad_clip)  # (L,) before clipping
        optimizer.step()
        totals.add(index, losses.detach(), norms.index_select(0, index), [len(y) for _, y in batch], cfg.grad_clip)
        for i in active:
            if step == len(orders[i]) - 1:  # the lane's last step: its state as local_train returns it
                results[i] = {name: p[i].detach().clone() for name, p in params.items()}
    stats = totals.stats()
    return [(state, len(lane[3]), lane_stats) for state, lane, lane_stats in zip(results, lanes, stats)]


def lane_call(module, prefix, lane_params, *args):
    """`module` (a part of the model named `prefix`) on each lane with the lane's own tensors:
    args with a lane axis in front -> outputs with a lane axis in front."""
    own = {name[len(prefix):]: p for name, p in lane_params.items() if name.startswith(prefix)}
    return vmap(lambda tensors, *xs: functional_call(module, tensors, xs))(own, *args)


def stacked_loss(model, encode, lane_params, batch, loss_fn) -> torch.Tensor:
    """FedMPT.loss of each active lane (A,), its tensors `lane_params` (A, ...) and its batch
    ((v, P), targets): FedMPT.forward with a lane axis in front. Shorter batches are padded with
    unknown labels (-1: no loss, no gradient) and their loss rescaled to their own mean."""
    A, prompts = len(batch), model.prompts
    embeddings, eot = vmap(lambda tensors: functional_call(prompts, tensors, ()), out_dims=(0, None))(
        {name[len("prompts."):]: p for name, p in lane_params.items() if name.startswith("prompts.")})
    whole = encode == model.backbone.encode_prompts  # whole prompts (not speed.shared_prefix's layout)
    per_lane = len(eot) if whole else None
    encoded = encode_lanes(encode, embeddings.flatten(0, 1), eot.repeat(A), per_lane)  # (A*2*K*C, D)
    T = vmap(lambda tensors, x: functional_call(MethodCall(model, "text_from"), tensors, (x,)))(
        {f"model.{name}": p for name, p in lane_params.items()}, encoded.unflatten(0, (A, -1)))  # (A, 2, K, C, D)
    B = max(len(y) for _, y in batch)
    v, P = (pad([inputs[j] for inputs, _ in batch], B) for j in range(2))  # (A, B, D), (A, B, N, D)
    targets = pad([y for _, y in batch], B, unknown=True)  # (A, B, C)
    K = T.shape[2]
    P = F.normalize(lane_call(model.patch_adapter, "patch_adapter.", lane_params, P), dim=-1)  # (A, B, N, D)
    S = torch.einsum("abnd,askcd->abscnk", P, T)  # (A, B, 2, C, N, K)
    cfg = model.cfg  # the transport as FedMPT.forward's: on a detached cost, one batched solve
    if cfg.ot == "uniform":
        Q = ot.uniform_plan(S)
    else:
        Q = lane_sinkhorn(1 - S.detach(), cfg.ot_eps, cfg.ot_iters, cfg.ot_rho)  # (A, B, 2, C, N, K)
    z = K * (Q * S).sum(dim=-2)  # (A, B, 2, C, K)
    g = (lane_call(model.gate, "gate.", lane_params, v) if not model.gate.uniform
         else model.gate(v.flatten(0, 1)).unflatten(0, v.shape[:2]))  # (A, B, K)
    logits = model.backbone.logit_scale * torch.einsum("abk,abck->abc", g, z[:, :, 0] - z[:, :, 1])
    sizes = torch.tensor([len(y) for _, y in batch], dtype=logits.dtype, device=logits.device)
    return vmap(loss_fn)(logits, targets.to(logits.dtype)) * (targets.shape[1] / sizes)  # each lane's own mean


CPU_TEXT_BATCH = 256  # prompts per text-encoder call on the CPU (see encode_lanes)


def encode_lanes(encode, embeddings, eot, per_lane) -> torch.Tensor:
    """The lanes' prompts through the text encoder: on a GPU (or with shared prefixes, whose
    activations are a quarter of the whole prompts': per_lane None) in one call; whole prompts on
    the CPU in calls of whole lanes, about CPU_TEXT_BATCH prompts each, where the activations still
    fit the caches (one call over 32 lanes of the offline world ran 1.5x slower than one by one)."""
    if embeddings.device.type != "cpu" or per_lane is None:
        return encode(embeddings, eot)
    step = per_lane * max(1, CPU_TEXT_BATCH // per_lane)
    return torch.cat([encode(embeddings[i:i + step], eot[i:i + step]) for i in range(0, len(embeddings), step)])


def pad(tensors, size, unknown=False) -> torch.Tensor:
    """Batches (b, ...) stacked to (A, size, ...): a shorter one is filled with copies of its first
    image (finite features), or with `unknown` labels -1 (no loss, no gradient)."""
    fill = lambda x: (torch.full_like(x[:1], -1) if unknown else x[:1]).expand(size - len(x), *x.shape[1:])
    return torch.stack([x if len(x) == size else torch.cat([x, fill(x)]) for x in tensors])


def lane_sinkhorn(cost, eps, n_iters, rho, tol=None, check_every=10) -> torch.Tensor:
    """ot.sinkhorn on costs (A, ..., N, K) with uniform marginals, its updates and stopping test
    as there, but each lane (the first axis) stops at the check where it would stop alone: its
    potentials stay as they were from then on, while lanes not yet settled go on. Equal to
    ot.sinkhorn of each lane (tests/test_lockstep.py)."""
    C = cost
    tol = (0.0 if C.is_cuda else 1e-6) if tol is None else tol
    N, K, A = C.shape[-2], C.shape[-1], C.shape[0]
    kw = dict(dtype=C.dtype, device=C.device)
    a, b = torch.full((N,), 1.0 / N, **kw), torch.full((K,), 1.0 / K, **kw)
    log_a, log_b = a.log(), b.log()
    Ct = (C / eps).transpose(-1, -2).contiguous()  # (A, ..., K, N)
    f, g = torch.zeros(C.shape[:-1], **kw), torch.zeros(C.shape[:-2] + (K,), **kw)
    neg_inf = torch.tensor(float("-inf"), **kw)
    exact = math.isinf(rho)
    scale = 1.0 if exact else rho / (rho + eps)
    settled = torch.zeros(A, dtype=torch.bool, device=C.device)
    lane = lambda flags: flags.view(A, *[1] * (f.dim() - 1))
    for it in range(1, n_iters + 1):
        previous, previous_g = f, g
        f = torch.where(a > 0, log_a - scale * torch.logsumexp(g.unsqueeze(-1) - Ct, dim=-2), neg_inf)
        g = torch.where(b > 0, log_b - torch.logsumexp(f.unsqueeze(-2) - Ct, dim=-1), neg_inf)
        f, g = torch.where(lane(settled), previous, f), torch.where(lane(settled), previous_g, g)
        if tol > 0 and it % check_every == 0:
            if exact:
                rows = torch.exp(f.unsqueeze(-2) + g.unsqueeze(-1) - Ct).sum(-2)  # (A, ..., N) = Q 1
                err = (rows - a).abs().sum(-1).flatten(1).amax(1)
            else:
                err = torch.where(a > 0, f - previous, 0.0).abs().flatten(1).amax(1)  # (A,)
            settled = settled | (err < tol)
            if bool(settled.all()):  # the host sync ot.sinkhorn has too, once per check
                break
    return torch.exp(f.unsqueeze(-1) + g.unsqueeze(-2) - C / eps)  # (A, ..., N, K)


def clip_lanes(params, grad_clip) -> torch.Tensor:
    """Each lane's gradient-norm guard (client.clip_and_step's clip_grad_norm_, per lane) on
    stacked tensors (L, ...); returns each lane's norm before clipping (L,)."""
    per_tensor = torch.stack([torch.linalg.vector_norm(p.grad.flatten(1), dim=1) for p in params], dim=1)
    norms = torch.linalg.vector_norm(per_tensor, dim=1)  # (L,)
    if grad_clip > 0:
        scale = (grad_clip / (norms + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad.mul_(scale.view(-1, *[1] * (p.dim() - 1)))
    return norms


class LaneTotals:
    """Every lane's client.clip_and_step numbers summed at once, (lanes, 3) on the device in float64,
    read once at the end by client.step_stats, lane by lane."""

    def __init__(self, lanes, device):
        self.sums = torch.zeros(lanes, 3, dtype=torch.float64, device=device)
        self.seen, self.steps = [0] * lanes, [0] * lanes

    def add(self, index, losses, norms, sizes, grad_clip):
        n, norms = torch.tensor(sizes, dtype=torch.float64, device=losses.device), norms.double()
        self.sums.index_add_(0, index, torch.stack([losses.double() * n, norms,
                                                    (norms > grad_clip).double() * (grad_clip > 0)], dim=1))
        for i, size in zip(index.tolist(), sizes):
            self.seen[i], self.steps[i] = self.seen[i] + size, self.steps[i] + 1

    def stats(self) -> list:
        return [step_stats(sums, steps, seen) for sums, steps, seen in zip(self.sums, self.steps, self.seen)]


# ---- Cells: federate.run for several runs at once ------------------------------------------
@dataclass
class Cell:
    """One run of the group: its experiment, history, client-sampling generator and states."""
    exp: object
    history: list
    rng: np.random.Generator
    next_round: int
    global_state: dict
    start_state: dict
    first_round: int = 1


def group_key(cfg, model_cfg) -> tuple:
    """What cells side by side must share: every training option but --seed, --heterogeneity and
    --out. Left out too: where a process reads and runs (threads, workers, the store, the data
    root), and the files a resumed run reads back from its own directory (its conditions, unseen
    classes, attributes): cells whose models differ in more than their tunable values train in
    passes of their own (run_round_together)."""
    varying = {"seed", "heterogeneity", "out", "resume", "threads", "workers", "cache_dir", "root", "download",
               "plot", "conditions", "unseen", "attributes"}
    return tuple((f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name not in varying) + tuple(
        dataclasses.astuple(model_cfg))


def start_cells(requests) -> list:
    """Each requested run (cfg, model_cfg, given) set up as federate.run sets one up, on one
    shared backbone and one copy of the frozen features; finished runs (--resume) are left out.
    Every cell's options are checked (and resumed ones read back) before anything is written."""
    planned = []
    for cfg, model_cfg, given in requests:
        checkpoint = None
        if cfg.resume:
            cfg, model_cfg, checkpoint = runs.resume(cfg.resume, given)
            if runs.finished_history(cfg.resume, cfg.rounds) is not None:
                continue
        planned.append((cfg, model_cfg, given, checkpoint))
    if len({group_key(*resolve(cfg, model_cfg)[:2]) for cfg, model_cfg, _, _ in planned}) > 1:
        raise FedMPTError("cells side by side must share every option but --seed, --heterogeneity and --out; "
                          "run the others in another group.")
    cells, shared = [], {}
    for cfg, model_cfg, given, checkpoint in planned:
        resolved, _, device, _ = resolve(cfg, model_cfg)
        where = (cfg.clip, cfg.clip_weights, cfg.random_init and cfg.seed, cfg.precision, device)
        if where not in shared:
            shared[where] = load_backbone(resolved, device)
        elif cfg.resume and runs.read_saved_config(cfg.resume).get("backbone_sha256") not in (
                None, shared[where].fingerprint()):
            raise FedMPTError(f"--resume {cfg.resume}: the run was trained on other {cfg.clip} weights than the "
                              "ones found now; resume it with the same backbone file.")
        cells.append(start_cell(cfg, model_cfg, given, checkpoint, shared[where]))
    share_features(cells)
    return cells


def start_cell(cfg, model_cfg, given, checkpoint, backbone) -> Cell:
    """federate.run's start for one run, on a backbone already loaded: setup, round 0 (or the
    resumed history and client-sampling generator)."""
    exp = setup(cfg, model_cfg, record={"engine": "lockstep"}, state=checkpoint and checkpoint["global_state"],
                backbone=backbone)
    if cfg.resume and "rounds" in given:
        runs.extend_rounds(cfg.resume, exp.cfg.rounds, checkpoint["round"] if checkpoint else 0)
    state = exp.model.tunable_state()
    cell = Cell(exp, [], np.random.default_rng(exp.cfg.seed), 1, state, state)
    if checkpoint is not None:
        cell.history, cell.next_round = runs.continue_from(checkpoint, cell.rng, exp.out)
        cell.first_round = cell.next_round
    if not cell.history:
        save_round(exp, cell.history, evaluate_round(exp, 0, 0.0))
    return cell


def share_features(cells):
    """Cells that read the same frozen features (the same feature-store keys) hold one copy."""
    seen = {}
    for cell in cells:
        exp = cell.exp
        for side in ("train", "test"):
            key = (side, json.dumps(exp.store_keys.get(side), sort_keys=True))
            inputs, targets = getattr(exp, side)
            setattr(exp, side, (seen.setdefault(key, inputs), targets))


def run_round_together(cells, round_index, log) -> None:
    """One round of every cell in `cells` (all at `round_index`): each samples its clients, every
    lane trains in one pass (train_lanes), each cell accepts, aggregates, evaluates and saves."""
    lanes, owners, start = [], [], time.time()
    for cell in cells:
        cfg, exp = cell.exp.cfg, cell.exp
        for client in sample_clients(cell.rng, cfg):
            lanes.append((cell.global_state, exp.train[0], exp.train[1], exp.splits[client],
                          client_generator(cfg, round_index, client)))
            owners.append((cell, client))
    cfg, results = cells[0].exp.cfg, [None] * len(lanes)
    kinds = {}  # lanes whose models differ in more than their tunable values (--unseen random:F) train apart
    for i, (cell, _) in enumerate(owners):
        classes = cell.exp.train_set.classes
        kinds.setdefault(json.dumps([classes, [classes[c] for c in cell.exp.unseen], cell.exp.conditions]), []).append(i)
    with contextlib.ExitStack() as stack:
        for cell in cells:
            stack.enter_context(runs.round_failure(cell.exp.out, round_index))
        try:
            for members in kinds.values():
                trained = train_lanes(owners[members[0]][0].exp.model, [lanes[i] for i in members], cfg,
                                      cosine_lr(cfg.lr, round_index, cfg.rounds))
                for i, result in zip(members, trained):
                    results[i] = result
        except Exception as error:  # as in federate.run_round: the run stops (RunFailed)
            raise runs.client_failed(round_index, [f"{Path(c.exp.out).name}:{k}" for c, k in owners], error) from error
    seconds = (time.time() - start) / len(cells)  # each cell's share of the pass (metrics.json's seconds)
    for cell in cells:
        updates = [(client, *result, "") for (owner, client), result in zip(owners, results) if owner is cell]
        new_state, stats, n_aggregated, rejected = accept_and_aggregate(round_index, updates, cell.global_state,
                                                                        cfg.aggregate, log)
        cell.global_state = cell.global_state if new_state is None else new_state
        cell.exp.model.load_tunable_state(cell.global_state)
        row = evaluate_round(cell.exp, round_index, seconds, stats, n_aggregated, rejected)
        save_round(cell.exp, cell.history, row, cell.rng)
        cell.next_round = round_index + 1


def finish(cell) -> None:
    """After a cell's last round: what federate.run does after its loop (state.pt, thresholds,
    the checks and warnings)."""
    exp, history, out = cell.exp, cell.history, cell.exp.out
    runs.check_trained(history, cell.first_round, cell.start_state, cell.global_state)
    save_tensors(cell.global_state, out / "state.pt", f"python federate.py --resume {out} writes it from checkpoint.pt")
    if exp.validation:
        write_json(out / "thresholds.json", thresholds_record(exp, history[-1]["round"]))
    print(f"{out}: final mAP {history[-1]['mAP']:.2f} (round 0: {history[0]['mAP']:.2f}, zero-shot "
          f"{exp.zero_shot['mAP']:.2f}, label prior {exp.prior_mAP:.2f})")
    runs.warn_after_run(history, exp.cfg.lr, exp.cfg.grad_clip)


def run_cells(requests) -> list:
    """Train (or continue) several runs side by side: requests [(cfg, model_cfg, given)], each as
    `federate.py` would take it. Returns each unfinished run's history (finished ones: skipped)."""
    cells = start_cells(requests)
    failures = []
    while pending := [cell for cell in cells if cell.next_round <= cell.exp.cfg.rounds]:
        round_index = min(cell.next_round for cell in pending)  # cells resumed at other rounds: their own passes
        run_round_together([cell for cell in pending if cell.next_round == round_index], round_index, tqdm.write)
        for cell in pending:
            if cell.next_round > cell.exp.cfg.rounds:
                try:
                    finish(cell)
                except RunFailed as failure:  # the others still finish; the process exits 1 after them
                    failures.append(failure)
    if failures:
        raise failures[0]
    return [cell.history for cell in cells]


def parse_cells(argv) -> list:
    """`--cell [federate.py options] --cell ...` -> [(cfg, model_cfg, given)]."""
    if not argv or argv[0] != "--cell":
        raise FedMPTError("give each cell as --cell followed by its federate.py options.")
    groups, requests = [], []
    for argument in argv:
        if argument == "--cell":
            groups.append([])
        else:
            groups[-1].append(argument)
    for group in groups:
        cfg, model_cfg = parse_config(group)
        named = {argument.split("=")[0] for argument in group if argument.startswith("--")}  # as federate.main
        requests.append((cfg, model_cfg, {f.name: getattr(c, f.name) for c in (cfg, model_cfg)
                                          for f in dataclasses.fields(c) if flag(f.name) in named}))
    return requests


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    print(f"lockstep: CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}", flush=True)
    return exit_code(lambda: run_cells(parse_cells(argv)))


if __name__ == "__main__":
    sys.exit(main())
