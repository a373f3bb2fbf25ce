"""What every dataset loader shares: an image dataset with targets in {1, 0, -1} and class
names, the check of every image, one message for missing files, and one path rule: every image,
annotation and split path a dataset's files name resolves (links resolved) inside ROOT, or is
refused with the file and line that named it (`inside_root`).
"""
import copy
import os
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from errors import FedMPTError


# what PIL raises for missing or broken files, and for an image too large to decode safely
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def missing_files_error(name, root, missing, how) -> FedMPTError:
    """One message for every loader: what is missing (the first ten) and how to get it."""
    listed = ", ".join(map(str, missing[:10])) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
    return FedMPTError(f"{name} not found under {root}: missing {listed}. To get it, {how}.")


def inside_root(root, path, named_by: str) -> Path:
    """`path` (ROOT-relative or absolute) when it resolves, links resolved, inside ROOT; else
    FedMPTError naming `named_by` (the file and line, or entry, that named it). A path that does
    not exist yet is judged by what it would resolve to: missing files stay the loader's to report."""
    real = Path(os.path.realpath(Path(root) / path))
    if not real.is_relative_to(os.path.realpath(root)):
        raise FedMPTError(f"{named_by} names {path}, which lies outside the dataset root {root} (it resolves to "
                          f"{real}); every image, annotation and split path must lie inside the root: fix the entry, "
                          "or copy the file into the root.")
    return Path(root) / path


class ImageDataset(torch.utils.data.Dataset):
    """What every loader shares: image paths, targets (n_images, C) and class names. With
    `skip_unreadable` every image is decoded once here and unreadable ones are dropped, with a
    printed message (see `check_images`); without it a broken image raises when it is read."""

    def __init__(self, name, split, images, targets, classes, transform=None, skip_unreadable=False):
        self.name, self.split, self.images, self.targets = name, split, list(images), targets
        self.classes, self.transform, self.skipped = list(classes), transform, []
        self.natural_clients = None  # [(site, indices)] where the data names its clients (FolderDataset)
        self.biased_pairs = []  # [(a, b)] class indices trained with a spurious co-occurrence (shapes world)
        if skip_unreadable:
            print(check_images(self, skip_unreadable=True))

    def __len__(self):
        return len(self.images)

    def subset(self, indices):
        """This dataset restricted to `indices`, in that order (one client's images)."""
        part = copy.copy(self)
        indices = list(indices)
        part.images, part.targets = [self.images[i] for i in indices], self.targets[indices]
        if self.natural_clients:  # each site keeps those of its images that stay, renumbered
            position = {old: new for new, old in enumerate(indices)}
            part.natural_clients = [(site, [position[i] for i in members if i in position])
                                    for site, members in self.natural_clients]
        if getattr(self, "scenes", None) is not None:  # MLRSNet: each image's scene
            part.scenes = [self.scenes[i] for i in indices]
        return part

    def __getitem__(self, i):
        try:
            image = Image.open(self.images[i]).convert("RGB")
        except UNREADABLE as error:
            raise FedMPTError(f"cannot read image {self.images[i]} ({error}); replace it, or "
                              "pass --skip-unreadable to leave unreadable images out.") from None
        return (self.transform(image) if self.transform else image), self.targets[i]


def check_images(dataset: ImageDataset, skip_unreadable: bool = False) -> str:
    """Decode every image of the dataset once (JPEGs at 1/8 scale: every byte is still read).
    Without `skip_unreadable` the first unreadable image raises FedMPTError naming it; with it,
    unreadable images and their targets are dropped and the returned message says how many and
    which (also kept in `dataset.skipped`). Returns a one-line summary."""
    readable, unreadable = [], []
    for i, path in enumerate(tqdm(dataset.images, desc=f"check {dataset.name} {dataset.split}", leave=False)):
        try:
            with Image.open(path) as image:
                image.draft("RGB", (64, 64))
                image.load()
            readable.append(i)
        except UNREADABLE as error:
            if not skip_unreadable:
                raise FedMPTError(f"cannot read image {path} ({error}); replace it, or pass "
                                  "--skip-unreadable to leave unreadable images out.") from None
            unreadable.append(path)
    total, dataset.skipped = len(dataset.images), dataset.skipped + unreadable
    dataset.images = [dataset.images[i] for i in readable]
    dataset.targets = dataset.targets[readable]  # (n_readable, C)
    if not unreadable:
        return f"{dataset.name} {dataset.split}: all {total} images are readable."
    names = ", ".join(map(str, unreadable[:5])) + (" ..." if len(unreadable) > 5 else "")
    return (f"{dataset.name} {dataset.split}: skipped {len(unreadable)} of {total} images that "
            f"cannot be read (--skip-unreadable): {names}")
