"""Client splits: who holds which training images, and how unlike the whole set each client is.

The paper's split (docs/method.md): K-means on the multi-hot label vectors gives one cluster per
client; the heterogeneity t in (0, 1] is the share of a client's images taken from its own
cluster, the rest is drawn from a pool all clients released (t = 1: each client is its cluster;
small t approaches IID). `make_clients` picks a run's split: the dataset's own sites, MLRSNet's
scenes (`scene_splits`) or K-means. `label_skew` measures the result, `split_report` and
`plot_client_distributions` show it.
"""
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

from errors import FedMPTError
from store.files import save_figure


def kmeans(points: np.ndarray, k: int, seed: int = 0, n_iters: int = 100, n_init: int = 10) -> np.ndarray:
    """Lloyd's K-means with k-means++ seeding, best of `n_init` starts by inertia (one start
    can merge two clear clusters); returns a cluster index per point."""
    rng = np.random.default_rng(seed)
    best, best_inertia = None, np.inf
    for _ in range(n_init):
        centres = [points[rng.integers(len(points))]]
        for _ in range(1, k):
            distance = np.min([((points - c) ** 2).sum(1) for c in centres], axis=0)
            centres.append(points[rng.choice(len(points), p=distance / distance.sum())]
                           if distance.sum() > 0 else points[rng.integers(len(points))])
        centres = np.stack(centres)
        for _ in range(n_iters):
            labels = ((points[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
            new = np.stack([points[labels == j].mean(0) if (labels == j).any() else centres[j] for j in range(k)])
            if np.allclose(new, centres):
                break
            centres = new
        inertia = ((points - centres[labels]) ** 2).sum()
        if inertia < best_inertia - 1e-9:
            best, best_inertia = labels, inertia
    return best


def client_splits(targets: torch.Tensor, n_clients: int, heterogeneity: float, seed: int = 0):
    """Clustering-based split (method.md). K-means on the multi-hot label vectors gives one
    cluster per client; client i keeps a fraction t of its cluster and fills the rest of its
    share with samples drawn at random from the pool that all clients released (its own
    released samples included, so its own-cluster share is a little above t: every client
    then draws from the same mixture, and small t approaches IID exactly).
    t = 1: each client holds exactly its cluster. Client sizes equal cluster sizes. Returns index lists."""
    if not 0 < heterogeneity <= 1:
        raise FedMPTError(f"--heterogeneity {heterogeneity}: must lie in (0, 1].")
    if n_clients < 1 or n_clients > len(targets):
        raise FedMPTError(f"--clients {n_clients}: must lie between 1 and the {len(targets)} training images.")
    labels = kmeans((targets == 1).float().numpy(), n_clients, seed)
    rng = np.random.default_rng(seed)
    clusters = [rng.permutation(np.flatnonzero(labels == j)) for j in range(n_clients)]
    if any(len(c) == 0 for c in clusters):
        raise FedMPTError(f"--clients {n_clients}: K-means left a client without data; use fewer clients.")
    keep = [int(round(heterogeneity * len(c))) for c in clusters]
    pool = rng.permutation(np.concatenate([c[n:] for c, n in zip(clusters, keep)]))
    splits, start = [], 0
    for cluster, n in zip(clusters, keep):
        fill = len(cluster) - n
        splits.append(sorted(cluster[:n].tolist() + pool[start:start + fill].tolist()))
        start += fill
    return splits


def scene_splits(scenes, n_clients: int):
    """Natural clients from each image's scene (MLRSNet's folders): scenes are dealt, largest
    first, to the site holding the fewest images so far. Returns (index lists, site names)."""
    members = {}
    for i, scene in enumerate(scenes):
        members.setdefault(scene, []).append(i)
    if not 1 <= n_clients <= len(members):
        raise FedMPTError(f"--clients {n_clients}: --clients-by scene needs between 1 and the "
                          f"{len(members)} scenes of the training images.")
    sites = [[] for _ in range(n_clients)]
    for scene in sorted(members, key=lambda s: (-len(members[s]), s)):
        smallest = min(range(n_clients), key=lambda j: (sum(len(members[s]) for s in sites[j]), j))
        sites[smallest].append(scene)
    names = [f"{site[0]}" + (f" +{len(site) - 1}" if len(site) > 1 else "") for site in sites]
    return [sorted(i for s in site for i in members[s]) for site in sites], names


def hold_out(n_images: int, share: float, seed: int):
    """(held-out rows, the rest), both sorted: a seeded `share` of the training images kept
    apart for choosing settings (--validation); share 0 holds out nothing."""
    if share <= 0:
        return [], list(range(n_images))
    order = np.random.default_rng([seed, 7]).permutation(n_images)
    n = int(round(share * n_images))
    if not 0 < n < n_images:
        raise FedMPTError(f"--validation {share}: holds out {n} of {n_images} training images; choose a share "
                          "that leaves some on both sides.")
    return sorted(order[:n].tolist()), sorted(order[n:].tolist())


def make_clients(cfg, train_set):
    """(cfg, splits, client names) of a run (`cfg`: options.Config): the dataset's own sites
    where it names them (labels.csv's client column; the returned cfg then says how many), with
    --clients-by scene the scenes grouped into --clients sites, else the K-means split with t."""
    if cfg.clients_by == "scene":
        if getattr(train_set, "scenes", None) is None:
            raise FedMPTError(f"--clients-by scene: {cfg.dataset} does not name each image's scene "
                              "(mlrsnet does); use --clients-by kmeans.")
        if cfg.heterogeneity != type(cfg)().heterogeneity:
            print(f"note: --heterogeneity {cfg.heterogeneity} not used: --clients-by scene.", file=sys.stderr)
        return (cfg, *scene_splits(train_set.scenes, cfg.clients))
    if not train_set.natural_clients:
        return cfg, client_splits(train_set.targets, cfg.clients, cfg.heterogeneity, cfg.seed), None
    names = [site for site, _ in train_set.natural_clients]
    sites = [indices for _, indices in train_set.natural_clients]
    if not all(sites):
        raise FedMPTError(f"--min-labels {cfg.min_labels}: site {names[sites.index([])]} keeps no image; "
                          "choose a smaller --min-labels.")
    defaults, unused = type(cfg)(), []
    if cfg.clients not in (defaults.clients, len(sites)):  # len(sites): what a resumed run saved
        unused.append(f"--clients {cfg.clients}")
    if cfg.heterogeneity != defaults.heterogeneity:
        unused.append(f"--heterogeneity {cfg.heterogeneity}")
    if unused:
        print(f"note: {' and '.join(unused)} not used: the dataset names its clients "
              f"({len(sites)} sites: {', '.join(names)}).", file=sys.stderr)
    return dataclasses.replace(cfg, clients=len(sites)), sites, names


# ---- Looking at a split -------------------------------------------------------------------
def label_shares(targets: torch.Tensor, indices) -> torch.Tensor:
    """Share of the given images that carry each label, (C,)."""
    return (targets[torch.as_tensor(list(indices), dtype=torch.long)] == 1).float().mean(0)


def label_skew(targets: torch.Tensor, splits) -> float:
    """Mean over clients of the total variation distance between a client's label distribution
    and the whole set's: 0.5 * sum_c |p_i(c) - p(c)|, p(c) = label counts normalised to sum 1.
    0 for IID clients; it grows with the heterogeneity t."""
    shares = [label_shares(targets, indices) for indices in [range(len(targets)), *splits]]  # each (C,)
    overall, *clients = [s / s.sum().clamp_min(1e-12) for s in shares]
    return float(np.mean([0.5 * (client - overall).abs().sum().item() for client in clients]))


def split_report(targets: torch.Tensor, splits, classes, top: int = 3, names=None) -> str:
    """Per client: image count and its most frequent labels with the share of its images that
    carry each; the whole training set first for comparison, and the label skew. `names`: the
    clients' names (default client 0, client 1, ...)."""
    groups = [("all", range(len(targets)))] + list(zip(names or [f"client {i}" for i in range(len(splits))], splits))
    shares = [label_shares(targets, indices) for _, indices in groups]  # each (C,)
    rows = [f"{name:>10} {len(indices):>7} images   "
            + ", ".join(f"{classes[c]} {share[c]:.0%}" for c in share.argsort(descending=True)[:top].tolist())
            for (name, indices), share in zip(groups, shares)]
    return "\n".join(rows + [f"label skew (mean total variation to all): {label_skew(targets, splits):.3f}"])


def plot_client_distributions(targets: torch.Tensor, splits, classes, path, names=None) -> Path:
    """A heat map saved as PNG: rows = the whole set then each client (named by `names`),
    columns = classes, colour = share of the row's images that carry the label."""
    names = names or [f"client {i}" for i in range(len(splits))]
    from matplotlib.figure import Figure  # drawn with Agg, no display and no global backend change
    shares = torch.stack([label_shares(targets, range(len(targets)))]
                         + [label_shares(targets, s) for s in splits]).numpy()  # (1 + clients, C)
    names = ["all"] + [f"{name} ({len(s)})" for name, s in zip(names, splits)]
    figure = Figure(figsize=(2.5 + 0.22 * len(classes), 1.8 + 0.35 * len(names)))
    axes = figure.add_subplot()
    picture = axes.imshow(shares, cmap="viridis", vmin=0, vmax=max(shares.max(), 1e-6), aspect="auto")
    axes.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
    axes.set_yticks(range(len(names)), names, fontsize=8)
    axes.axhline(0.5, color="white", linewidth=2)  # the whole set above, clients below
    axes.set_title(f"label distribution per client (label skew {label_skew(targets, splits):.3f})")
    figure.colorbar(picture, ax=axes, label="share of images with the label")
    figure.tight_layout()
    save_figure(figure, path, dpi=120)
    return Path(path)
