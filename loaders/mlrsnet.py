"""MLRSNet (Qi et al., 2020) as published: 46 scenes, 109,161 images, 60 classes.

    ROOT/Images/<scene>/<file>.jpg
    ROOT/labels/<scene>.csv       (or ROOT/Labels/) header `image,<60 class names>`, then 0/1

Class names and scenes are read from the files, never from a list here; every label file must
have the same header. MLRSNet has no official split: the first use writes a seeded 80/20 split
per scene to ROOT/splits/split-seed<seed>.json and every later use reads it back (write your
own file there, in the same form, to override it). A line's image may be given with or without
its scene folder.
"""
import json
import random
from pathlib import Path

import torch

from errors import FedMPTError
from loaders.base import ImageDataset, missing_files_error
from loaders.multiscene import read_label_table

HOW = "download MLRSNet and extract it so that ROOT holds Images/<scene>/ and labels/<scene>.csv"


def read_mlrsnet(root: Path):
    """(classes, {scene: [(image path, [0/1, ...])]}) from every label file."""
    labels = next((root / name for name in ("labels", "Labels") if (root / name).is_dir()), None)
    if labels is None or not (root / "Images").is_dir():
        raise missing_files_error("mlrsnet", root, [p for p in (root / "labels", root / "Images")
                                                    if not p.is_dir()], HOW)
    files = sorted(labels.glob("*.csv"))
    if not files:
        raise missing_files_error("mlrsnet", root, [labels / "<scene>.csv"], HOW)
    classes, scenes = None, {}
    for path in files:
        header, table = read_label_table(path, HOW)
        if classes is None:
            classes = header
        elif header != classes:
            raise FedMPTError(f"{path}: its header's classes differ from {files[0].name}'s; every label "
                              "file of MLRSNet has the same 60 columns.")
        folder = root / "Images" / path.stem
        scenes[path.stem] = [(folder / Path(name).name, values) for name, values in table]
    return classes, scenes


def scene_split(root: Path, scenes: dict, seed: int = 0, share: float = 0.8) -> dict:
    """{"train": [image names], "test": [...]}: ROOT/splits/split-seed<seed>.json, written on
    first use (each scene shuffled with the seed, its first 80% train) and then reused."""
    path = root / "splits" / f"split-seed{seed}.json"
    if path.exists():
        try:
            split = json.loads(path.read_text())
            return {"train": list(split["train"]), "test": list(split["test"])}
        except (ValueError, KeyError, TypeError) as error:
            raise FedMPTError(f"{path} is not a split file ({error!r}); it must hold "
                              '{"train": [image, ...], "test": [image, ...]}. Delete it to make a new one.') from None
    rng, split = random.Random(seed), {"train": [], "test": []}
    for scene in sorted(scenes):
        names = sorted(image.name for image, _ in scenes[scene])
        rng.shuffle(names)
        cut = int(round(share * len(names)))
        split["train"] += names[:cut]
        split["test"] += names[cut:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(split, indent=0))
    return split


class MLRSNetDataset(ImageDataset):
    def __init__(self, root, split, transform=None, skip_unreadable=False, seed=0):
        root = Path(root)
        classes, scenes = read_mlrsnet(root)
        chosen = set(scene_split(root, scenes, seed)[split])
        rows = [(image, values, scene) for scene in sorted(scenes) for image, values in scenes[scene]
                if image.name in chosen]
        if not rows:
            raise FedMPTError(f"mlrsnet at {root}: no image of the {split} split; check ROOT/splits/.")
        targets = torch.tensor([values for _, values, _ in rows], dtype=torch.long)
        super().__init__("mlrsnet", split, [image for image, _, _ in rows], targets, classes, transform,
                         skip_unreadable)
        self.scenes = [scene for _, _, scene in rows]  # each image's scene (natural clients, by scene)
