"""Datasets and their frozen features: `load_dataset` by name, CLIP's preprocessing, and
`encode_dataset`. Each on-disk layout has its loader in loaders/ (voc, coco, nuswide, folder);
the offline shapes world (shapes/world.py) is written in the VOC layout. Client splits: splits.py.

Every dataset yields `(image, target)` with `target` (C,) in {1, 0, -1}: present, absent,
ignored (VOC: the class appears only on objects marked "difficult"); `image` is a PIL image, or
`transform(image)` when a transform is set. `classes` lists the names in target order and
`targets` holds all targets, (n_images, C).
"""
import torch
from torchvision import transforms

from errors import FedMPTError
from loaders.base import UNREADABLE, check_images  # noqa: F401 (for callers of data)
from loaders.coco import COCO_CLASSES, COCODataset
from loaders.folder import FolderDataset
from loaders.nuswide import NUSWIDE_CLASSES, NUSWIDEDataset
from loaders.voc import VOC_CLASSES, VOCDataset
from shapes import world

DATASETS = ["shapes", "voc2007", "coco2014", "nuswide", "folder"]
# What the prompts say for a class whose annotation name is not plain English.
PROMPT_NAMES = {"diningtable": "dining table", "pottedplant": "potted plant",
                "tvmonitor": "tv monitor", "aeroplane": "aeroplane"}
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def clip_transform(resolution: int):
    """CLIP's preprocessing: bicubic resize of the short side, centre crop, normalise."""
    return transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(resolution), transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD)])


def known_classes(dataset: str) -> list:
    """The class names of a dataset whose classes are fixed ([] for a folder dataset)."""
    return list({"shapes": world.SHAPES_CLASSES, "voc2007": VOC_CLASSES,
                 "coco2014": COCO_CLASSES, "nuswide": NUSWIDE_CLASSES}.get(dataset, []))


def prompt_name(name: str) -> str:
    return PROMPT_NAMES.get(name, name.replace("_", " "))


def load_dataset(name: str, root, split: str, transform=None, skip_unreadable=False):
    """`name` one of DATASETS, `split` 'train' or 'test' (VOC's 'train' is its trainval list).
    `skip_unreadable`: decode every image now and leave out, with a message, those that fail."""
    if split not in ("train", "test"):
        raise FedMPTError(f"split '{split}': choose train or test.")
    options = {"transform": transform, "skip_unreadable": skip_unreadable}
    voc_split = "trainval" if split == "train" else split
    if name == "shapes":
        world.generate_shapes_dataset(root)
        return VOCDataset(root, voc_split, world.SHAPES_CLASSES, name="shapes", **options)
    if name == "voc2007":
        return VOCDataset(root, voc_split, VOC_CLASSES, **options)
    if name == "coco2014":
        return COCODataset(root, split, **options)
    if name == "nuswide":
        return NUSWIDEDataset(root, split, **options)
    if name == "folder":
        return FolderDataset(root, split, **options)
    raise FedMPTError(f"--dataset {name}: unknown; choose one of {', '.join(DATASETS)}.")


# ---- Frozen features ----------------------------------------------------------------------
@torch.no_grad()
def encode_dataset(encode, dataset, batch_size=64, device="cpu", progress=None):
    """`encode(images)` (a method's frozen inputs, e.g. FedMPT's v (B, D) and P (B, N, D)) of
    every image, computed once and kept in host memory: a tuple of tensors (n_images, ...)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    parts = []
    for images, _ in (progress(loader) if progress else loader):
        outputs = encode(images.to(device))
        parts.append([x.float().cpu() if x.dtype != torch.float16 else x.cpu() for x in outputs])
    return tuple(torch.cat(column) for column in zip(*parts))
