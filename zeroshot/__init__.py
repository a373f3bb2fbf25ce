"""Classes no client labelled: the class split of `--unseen` and `--zsl-split`.

Training never sees an unseen class. The clients' targets keep the seen classes' columns only
(an image keeps its seen labels; one left with none stays as a negative-only image, counted in
config.json), the client split is made from those targets, and the model that trains is built
on the seen class names only. A second model on the same frozen backbone, built on every class
name, scores the test images with the trained state (`scorer`): the text side is where a
prompt method reaches a class it never trained on (metrics.zsl_metrics).
"""
import copy
from pathlib import Path

import numpy as np
import torch

import baselines
from errors import FedMPTError


def cannot_score_unseen(method: str, class_ctx: int = 0) -> str:
    """Why `method` cannot score a class it was not trained on ('' when it can): a tunable
    tensor of each class's own (the method class's `cannot_score_unseen`, FedMPT's --class-ctx)."""
    known = method in baselines.METHODS  # an unknown method is refused by its option's check
    return (known and getattr(baselines.model_class(method), "cannot_score_unseen", "")) or (
        "contexts of each class's own cannot score a class they were not trained on (give --class-ctx 0)"
        if class_ctx else "")


def unseen_classes(spec: str, classes: list, seed: int, published=None) -> list:
    """Sorted indices of the unseen classes. `spec` (--unseen): class names, comma-separated;
    a file of names, one a line ('#' starts a comment); or random:F, a share F of the classes
    drawn with `seed`. `published`: the unseen names a --zsl-split dataset carries."""
    if published is not None:
        names = list(published)
    elif not spec:
        return []
    elif spec.startswith("random:"):
        try:
            share = float(spec.split(":", 1)[1])
        except ValueError:
            share = -1.0
        n = int(round(share * len(classes))) if 0 < share < 1 else 0
        if not 0 < n < len(classes):
            raise FedMPTError(f"--unseen {spec}: give random:F with 0 < F < 1 that holds out at least one of the "
                              f"{len(classes)} classes and keeps at least one (F = 0.25: {round(0.25 * len(classes))}).")
        return sorted(np.random.default_rng([seed, 11]).choice(len(classes), n, replace=False).tolist())
    elif Path(spec).is_file():
        try:
            text = Path(spec).read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise FedMPTError(f"--unseen {spec}: the file is not UTF-8 text (byte {error.start}: {error.reason}); save "
                              "it as UTF-8, one class name a line.") from None
        names = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    else:
        names = spec.split(",")
    names = sorted({name.strip() for name in names if name.strip()})
    unknown = [name for name in names if name not in classes]
    if unknown or not names or len(names) == len(classes):
        problem = (f"{', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} not a class of this dataset"
                   if unknown else "it names no class" if not names else "it leaves no class to train on")
        raise FedMPTError(f"--unseen {spec}: {problem}; the classes are {', '.join(classes)}.")
    return sorted(classes.index(name) for name in names)


def resumed_unseen(spec: str, saved: dict) -> str:
    """--unseen of a resumed run: the class names it resolved when it started (config.json's
    `unseen_classes`), never its file or its draw again: a file edited since cannot change what
    the rest of the run trains on. A run without unseen classes keeps `spec` as it is."""
    names = saved.get("unseen_classes") or []
    return ",".join(names) if spec and names else spec


def seen_view(train_set, unseen: list):
    """The training split as the clients know it: the seen classes' names and target columns
    (the images and everything else as they are). Without unseen classes, `train_set` itself."""
    if not unseen:
        return train_set
    seen = [c for c in range(len(train_set.classes)) if c not in set(unseen)]
    view = copy.copy(train_set)
    view.classes, view.targets = [train_set.classes[c] for c in seen], train_set.targets[:, seen]
    return view


def negative_only(train_set, unseen: list) -> int:
    """Training images that held a label, all of them unseen: they train as negatives only."""
    if not unseen:
        return 0
    positive = train_set.targets == 1
    seen = torch.ones(positive.shape[1], dtype=torch.bool)
    seen[unseen] = False
    return int((positive.any(1) & ~positive[:, seen].any(1)).sum())


def every_column(values: torch.Tensor, unseen: list, n_classes: int, fill) -> torch.Tensor:
    """(..., C_seen) seen-class values spread to (..., n_classes), `fill` in the unseen columns."""
    if not unseen:
        return values
    seen = torch.ones(n_classes, dtype=torch.bool)
    seen[unseen] = False
    out = torch.full((*values.shape[:-1], n_classes), fill, dtype=values.dtype)
    out[..., seen] = values
    return out
