"""Datasets and CLIP's preprocessing: `load_dataset` by name, `clip_transform`, `prompt_name`.

Each on-disk layout has its loader in loaders/, imported when its dataset is named: voc
(VOC2007, and the offline shapes world of shapes/world.py, written in the VOC layout), coco,
nuswide, multiscene, mlrsnet and folder (your own labels.csv). Every dataset yields
`(image, target)` with `target` (C,) in {1, 0, -1}: present, absent, ignored (VOC: the class
appears only on objects marked "difficult"); `image` is a PIL image, or `transform(image)` when
a transform is set. `classes` lists the names in target order and `targets` holds all targets,
(n_images, C). The frozen features of a split live in the feature store (store/features.py),
the client split in splits.py.
"""
import importlib
import re

import torch
from torchvision import transforms

from errors import FedMPTError

# The datasets by name: "module:loader", imported when the dataset is named. A loader takes (root,
# split "train" or "test", transform=None, skip_unreadable=False) and returns a dataset of
# loaders/base.py; a module that defines CLASSES has a fixed class list (data.known_classes).
# A new dataset is one line here and its loader (loaders/).
DATASETS = {"shapes": "shapes.world:load_split", "voc2007": "loaders.voc:load_split",
            "coco2014": "loaders.coco:COCODataset", "nuswide": "loaders.nuswide:NUSWIDEDataset",
            "multiscene": "loaders.multiscene:MultiSceneDataset", "mlrsnet": "loaders.mlrsnet:MLRSNetDataset",
            "folder": "loaders.folder:FolderDataset"}
# What the prompts say for a class whose annotation name is not plain English.
PROMPT_NAMES = {"diningtable": "dining table", "pottedplant": "potted plant",
                "tvmonitor": "tv monitor", "aeroplane": "aeroplane",
                "habor": "harbor", "OilFiled": "oil field", "SolarPannel": "solar panel",
                "WindTrubine": "wind turbine"}  # MLRSNet's and Multi-Scene's typos
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def clip_transform(resolution: int):
    """CLIP's preprocessing: bicubic resize of the short side, centre crop, normalise."""
    return transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(resolution), transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD)])


def known_classes(dataset: str) -> list:
    """The class names of a dataset whose classes are fixed (its loader's module defines CLASSES);
    [] for the others: read them from disk."""
    return list(getattr(importlib.import_module(DATASETS[dataset].split(":")[0]), "CLASSES", []))


def prompt_name(name: str) -> str:
    """What a prompt says for a class: 'BaseballField' -> 'baseball field', 'potted_plant' ->
    'potted plant' (annotations keep their own spelling)."""
    if name in PROMPT_NAMES:
        return PROMPT_NAMES[name]
    if re.fullmatch(r"(?:[A-Z][a-z]+)+", name):  # CamelCase words
        name = " ".join(re.findall(r"[A-Z][a-z]+", name)).lower()
    return name.replace("_", " ")


def load_dataset(name: str, root, split: str, transform=None, skip_unreadable=False, zsl_split=""):
    """`name` one of DATASETS, `split` 'train' or 'test' (VOC's 'train' is its trainval list).
    `skip_unreadable`: decode every image now and leave out, with a message, those that fail.
    `zsl_split`: a published zero-shot split of coco2014 or nuswide (loaders/zsl.py)."""
    if split not in ("train", "test"):
        raise FedMPTError(f"split '{split}': choose train or test.")
    if name not in DATASETS:
        raise FedMPTError(f"--dataset {name}: unknown; choose one of {', '.join(DATASETS)}.")
    options = {"transform": transform, "skip_unreadable": skip_unreadable}
    if zsl_split:
        from loaders.zsl import ZSLSplitDataset
        return ZSLSplitDataset(name, root, split, zsl_split, **options)
    module, loader = DATASETS[name].split(":")  # the loader is imported when its dataset is named
    return getattr(importlib.import_module(module), loader)(root, split, **options)


# ---- Protocol switches of the authors' code (off by default: not the standard benchmarks) ----
def keep_min_labels(dataset, n: int):
    """The dataset restricted to images with at least `n` labels (the authors keep >= 5 on
    COCO/NUS-WIDE and >= 7 on MLRSNet); n = 0 returns it unchanged."""
    if n <= 0:
        return dataset
    keep = ((dataset.targets == 1).sum(1) >= n).nonzero().flatten().tolist()
    if not keep:
        raise FedMPTError(f"--min-labels {n}: no image of {dataset.name} {dataset.split} has {n} labels "
                          f"(the most is {int((dataset.targets == 1).sum(1).max())}); choose a smaller --min-labels.")
    print(f"--min-labels {n}: kept {len(keep)} of {len(dataset)} {dataset.name} {dataset.split} images.")
    return dataset.subset(keep)


def mask_positives(targets: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Partial annotation: each positive (1) becomes unknown (-1, ignored by the losses) with
    probability p, drawn from `seed` (the same images lose the same labels on every engine)."""
    if p <= 0:
        return targets
    drop = torch.rand(targets.shape, generator=torch.Generator().manual_seed(seed)) < p
    return torch.where((targets == 1) & drop, torch.full_like(targets, -1), targets)
