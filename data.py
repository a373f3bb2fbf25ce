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
import re

import torch
from torchvision import transforms

from errors import FedMPTError

DATASETS = ["shapes", "voc2007", "coco2014", "nuswide", "multiscene", "mlrsnet", "folder"]
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
    """The class names of a dataset whose classes are fixed ([] for the others: read them from disk)."""
    if dataset == "shapes":
        from shapes.world import SHAPES_CLASSES as classes
    elif dataset == "voc2007":
        from loaders.voc import VOC_CLASSES as classes
    elif dataset == "coco2014":
        from loaders.coco import COCO_CLASSES as classes
    elif dataset == "nuswide":
        from loaders.nuswide import NUSWIDE_CLASSES as classes
    else:
        classes = []
    return list(classes)


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
    options = {"transform": transform, "skip_unreadable": skip_unreadable}
    if zsl_split:
        from loaders.zsl import ZSLSplitDataset
        return ZSLSplitDataset(name, root, split, zsl_split, **options)
    voc_split = "trainval" if split == "train" else split
    if name == "shapes":  # the loaders are imported when their dataset is named
        from loaders.voc import VOCDataset
        from shapes import world
        world.generate_shapes_dataset(root)
        return VOCDataset(root, voc_split, world.SHAPES_CLASSES, name="shapes", **options)
    if name == "voc2007":
        from loaders.voc import VOC_CLASSES, VOCDataset
        return VOCDataset(root, voc_split, VOC_CLASSES, **options)
    if name == "coco2014":
        from loaders.coco import COCODataset
        return COCODataset(root, split, **options)
    if name == "nuswide":
        from loaders.nuswide import NUSWIDEDataset
        return NUSWIDEDataset(root, split, **options)
    if name == "folder":
        from loaders.folder import FolderDataset
        return FolderDataset(root, split, **options)
    if name == "multiscene":
        from loaders.multiscene import MultiSceneDataset
        return MultiSceneDataset(root, split, **options)
    if name == "mlrsnet":
        from loaders.mlrsnet import MLRSNetDataset
        return MLRSNetDataset(root, split, **options)
    raise FedMPTError(f"--dataset {name}: unknown; choose one of {', '.join(DATASETS)}.")


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
