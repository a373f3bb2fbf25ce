"""Every client's own score (`--client-eval`) and a model of each client's own (`--personalize`).

A client's test images are those that the rule which split the training images gives it:

    K-means clients (the paper's split)   the nearest centroid of the image's label vector: the
                                          clustering of the training labels is made again (the
                                          same rows, the same seed: splits.kmeans is seeded), a
                                          centroid is the mean label vector of its cluster, and
                                          client j holds cluster j (splits.client_splits)
    the dataset's sites (labels.csv)      the row's client column; a test row without a site, or
                                          with a site no client trains at, belongs to no client
    --clients-by scene                    the site that trains on the image's scene

Each round (--client-eval) the global model's test scores give every client its mAP on its own
images (metrics.multilabel_metrics on its rows: the mean AP over the classes with a positive
there), and over the clients that have one: their mean, standard deviation (population, ddof 0),
the worst and the best.

--personalize E: after the last round each client copies the final global state, trains E local
epochs on its own training images (client.local_train at the run's base rate --lr, in an order
seeded as a round after the last) and is scored on its own test images; personalized.json in the
run directory holds each client's global and personalized mAP side by side.
"""
import dataclasses

import numpy as np
import torch

import metrics
import splits
from client import local_train
from evaluation import predict_scores
from store.files import write_json


# ---- Which test images are whose ---------------------------------------------------------
def kmeans_test_clients(train_targets, n_clients: int, seed: int, test_targets) -> list:
    """Test rows per client: the nearest centroid (squared distance of the 0/1 label vectors,
    as splits.kmeans measures it; a tie goes to the lower client) of the clustering that
    splits.client_splits made of `train_targets` with this seed."""
    points = (train_targets == 1).float().numpy()  # (n_train, C), what client_splits clusters
    clusters = splits.kmeans(points, n_clients, seed)
    centres = [points[clusters == j].mean(0) for j in range(n_clients)]  # each (C,)
    test_points = (test_targets == 1).float().numpy()  # (n_test, C)
    distances = np.stack([((test_points - centre) ** 2).sum(1) for centre in centres], axis=1)  # (n_test, clients)
    nearest = distances.argmin(1)
    return [np.flatnonzero(nearest == j).tolist() for j in range(n_clients)]


def site_test_clients(client_names: list, test_sites) -> list:
    """Test rows per client from the test split's sites (`natural_clients`: [(site, rows)])."""
    rows = dict(test_sites or [])
    return [sorted(rows.get(name, [])) for name in client_names]


def scene_test_clients(train_scenes: list, client_splits: list, test_scenes: list) -> list:
    """Test rows per client: the client whose training images hold the test image's scene."""
    site_of = {train_scenes[i]: j for j, rows in enumerate(client_splits) for i in rows}
    clients = [[] for _ in client_splits]
    for i, scene in enumerate(test_scenes):
        if scene in site_of:
            clients[site_of[scene]].append(i)
    return clients


def test_clients(exp) -> list:
    """Each client's test rows by the rule of the run's split (printed once with their sizes)."""
    cfg, train_set, test_set = exp.cfg, exp.train_set, exp.test_set
    if cfg.clients_by == "scene":
        rows, rule = scene_test_clients(train_set.scenes, exp.splits, test_set.scenes), "the site of their scene"
    elif exp.client_names:  # the dataset names its sites
        rows, rule = site_test_clients(exp.client_names, test_set.natural_clients), "their client column"
    else:  # K-means ran on the seen classes of the rows left after --validation
        seen = [c for c in range(len(train_set.classes)) if c not in set(exp.unseen)]
        rows = kmeans_test_clients(train_set.targets[exp.pool][:, seen], len(exp.splits), cfg.seed,
                                   test_set.targets[:, seen])
        rule = "the nearest K-means centroid of their labels"
    left = len(test_set) - sum(map(len, rows))
    print(f"client test images ({rule}): {[len(r) for r in rows]}" + (f"; {left} belong to no client" if left else ""))
    return rows


# ---- Scores --------------------------------------------------------------------------------
def client_mAP(scores, targets, rows):
    """mAP (percent) of one client's test rows; None without a row or a positive label there."""
    if not rows:
        return None
    rows = torch.as_tensor(rows, dtype=torch.long)
    return metrics.multilabel_metrics(scores[rows], targets[rows], top_k=1)["mAP"]


def spread(per_client: list) -> dict:
    """Mean, std (ddof 0), worst, best over the clients with a score, and the worst one's id."""
    scored = [(value, client) for client, value in enumerate(per_client) if value is not None]
    if not scored:
        return {"mean": None, "std": None, "worst": None, "best": None, "worst_client": None}
    values = [value for value, _ in scored]
    worst, worst_client = min(scored)  # a tie: the lower client id
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "worst": worst, "best": max(values),
            "worst_client": worst_client}


def test_scores(exp, state, rows=None):
    """Test probabilities (n, C) of a tunable state on the test images (or their `rows`), every
    class scored (with unseen classes, by exp.scorer)."""
    exp.model.load_tunable_state(state)
    if exp.unseen:
        exp.scorer.load_tunable_state(state)
    return predict_scores(exp.scorer or exp.model, exp.test[0], rows=rows)


def client_metrics(exp) -> dict:
    """A round's per-client figures (--client-eval): the model's current state on each client's
    test images (a second pass over the test images, beside evaluation.evaluate_global's)."""
    if exp.client_test is None:
        exp.client_test = test_clients(exp)
    scores, targets = test_scores(exp, exp.model.tunable_state()), exp.test[1]
    per_client = [client_mAP(scores, targets, rows) for rows in exp.client_test]
    summary = spread(per_client)
    return {"client_mAP": per_client, **{f"client_mAP_{k}": summary[k] for k in ("mean", "std", "worst", "best")},
            "worst_client": summary["worst_client"], "client_test_images": [len(rows) for rows in exp.client_test]}


# ---- Personalization -----------------------------------------------------------------------
def own_mAP(exp, state, rows):
    """mAP of a tunable state on one client's test `rows`; None without a row."""
    if not rows:
        return None
    return metrics.multilabel_metrics(test_scores(exp, state, rows), exp.test[1][rows], top_k=1)["mAP"]


def personalize(exp, global_state, generators) -> dict:
    """--personalize E: every client fine-tunes `global_state` for E local epochs on its own
    training images (client j's order drawn from generators[j]) and is scored on its own test
    images; writes personalized.json, prints a table, and leaves the model holding `global_state`."""
    cfg, (inputs, targets) = exp.cfg, exp.train
    if exp.client_test is None:
        exp.client_test = test_clients(exp)
    tuning = dataclasses.replace(cfg, local_epochs=cfg.personalize)
    clients = []
    for client, (train_rows, test_rows) in enumerate(zip(exp.splits, exp.client_test)):
        state, n, stats = local_train(exp.model, global_state, inputs, targets, train_rows, tuning, cfg.lr,
                                      generators[client])
        clients.append({"client": client, "name": (exp.client_names or [None] * len(exp.splits))[client],
                        "train_images": n, "test_images": len(test_rows), "train_loss": stats["loss"],
                        "global_mAP": own_mAP(exp, global_state, test_rows),
                        "personalized_mAP": own_mAP(exp, state, test_rows)})
    exp.model.load_tunable_state(global_state)  # the model (and the scorer) hold the global state again
    if exp.unseen:
        exp.scorer.load_tunable_state(global_state)
    summary = {kind: spread([c[f"{kind}_mAP"] for c in clients]) for kind in ("global", "personalized")}
    record = {"epochs": cfg.personalize, "lr": cfg.lr, "after_round": cfg.rounds,
              "rule": "each client: local_train from the final global state, --personalize epochs at --lr, "
                      "scored on its own test images (clients_eval.test_clients)",
              "clients": clients, **{f"{kind}_{k}": v for kind, s in summary.items() for k, v in s.items()}}
    write_json(exp.out / "personalized.json", record)
    print(personalized_table(record))
    return record


def personalized_table(record: dict) -> str:
    """The printed table of personalized.json: per client, global and personalized mAP."""
    cell = lambda value: f"{'-':>12}" if value is None else f"{value:>12.2f}"
    lines = [f"personalized ({record['epochs']} local epoch(s) at lr {record['lr']:g} from the final global state):",
             f"{'client':>8} {'test images':>11} {'global mAP':>12} {'personalized':>12}"]
    lines += [f"{c['client']:>8} {c['test_images']:>11} {cell(c['global_mAP'])} {cell(c['personalized_mAP'])}"
              for c in record["clients"]]
    for name in ("mean", "worst"):
        lines.append(f"{name:>8} {'':>11} {cell(record[f'global_{name}'])} {cell(record[f'personalized_{name}'])}")
    return "\n".join(lines)
