"""NUS-WIDE with its 81 concepts and the official train/test split.
"""
from pathlib import Path, PureWindowsPath

import torch

from errors import FedMPTError
from loaders.base import ImageDataset, missing_files_error

# NUS-WIDE's 81 concepts in the official (alphabetical) order of Concepts81.txt.
NUSWIDE_CLASSES = ["airport", "animal", "beach", "bear", "birds", "boats", "book", "bridge",
                   "buildings", "cars", "castle", "cat", "cityscape", "clouds", "computer",
                   "coral", "cow", "dancing", "dog", "earthquake", "elk", "fire", "fish", "flags",
                   "flowers", "food", "fox", "frost", "garden", "glacier", "grass", "harbor",
                   "horses", "house", "lake", "leaf", "map", "military", "moon", "mountain",
                   "nighttime", "ocean", "person", "plane", "plants", "police", "protest",
                   "railroad", "rainbow", "reflection", "road", "rocks", "running", "sand",
                   "sign", "sky", "snow", "soccer", "sports", "statue", "street", "sun", "sunset",
                   "surf", "swimmers", "tattoo", "temple", "tiger", "tower", "town", "toy",
                   "train", "tree", "valley", "vehicle", "water", "waterfall", "wedding",
                   "whales", "window", "zebra"]
CLASSES = NUSWIDE_CLASSES  # a fixed class list (data.known_classes)


class NUSWIDEDataset(ImageDataset):
    """NUS-WIDE with its 81 concepts and the official train/test split (161,789 / 107,859
    images), in the layout of the official release (NUS-WIDE's site: Concepts81.txt,
    ImageList.zip, Groundtruth.zip -> TrainTestLabels, the Flickr image archive):

        ROOT/Concepts81.txt                              the 81 concepts, one a line, target order
        ROOT/ImageList/TrainImagelist.txt                one image path a line ('train')
        ROOT/ImageList/TestImagelist.txt                 one image path a line ('test')
        ROOT/TrainTestLabels/Labels_<concept>_Train.txt  one 0/1 a line, line i = image i
        ROOT/TrainTestLabels/Labels_<concept>_Test.txt
        ROOT/images/<path from the list>                 e.g. images/actor/0001_2124494179.jpg

    Image paths are relative to ROOT/images; Windows backslashes (`actor\\0001_2124494179.jpg`,
    as the official lists have them) are read as '/', so the official Flickr folder (one
    sub-folder per Flickr tag) extracted or renamed as ROOT/images fits. Concepts81.txt must
    list NUSWIDE_CLASSES in this order. Targets are 0/1 (no -1); images without a concept stay,
    with all-zero targets (works following ML-GCN drop them: 125,449 / 83,898 images). Copies of NUS-WIDE often lack some images (deleted from Flickr): a
    missing image is unreadable, so --skip-unreadable leaves it out and says so."""

    def __init__(self, root, split, transform=None, skip_unreadable=False):
        root, part = Path(root), {"train": "Train", "test": "Test"}[split]
        concepts_file, list_file = root / "Concepts81.txt", root / "ImageList" / f"{part}Imagelist.txt"
        label_files = [root / "TrainTestLabels" / f"Labels_{c}_{part}.txt" for c in NUSWIDE_CLASSES]
        missing = [p for p in [concepts_file, list_file, *label_files, root / "images"] if not p.exists()]
        if missing:
            raise missing_files_error("nuswide", root, missing, (
                "get the NUS-WIDE release (Concepts81.txt, ImageList, TrainTestLabels, the Flickr "
                "images as images/) and lay it out as in loaders/nuswide.py (NUSWIDEDataset) or docs/datasets.md"))
        concepts = concepts_file.read_text().split()
        if concepts != NUSWIDE_CLASSES:
            first = next((f"line {i + 1}: '{a}' where '{b}' is expected" for i, (a, b)
                          in enumerate(zip(concepts, NUSWIDE_CLASSES)) if a != b), f"{len(concepts)} lines")
            raise FedMPTError(f"{concepts_file} does not list NUS-WIDE's 81 concepts in the official "
                              f"order ({first}); use the official Concepts81.txt.")
        lines = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
        images = [root / "images" / relative_image_path(line, list_file) for line in lines]
        targets = torch.stack([read_labels(path, len(images)) for path in label_files], dim=1)  # (n_images, C)
        super().__init__("nuswide", split, images, targets, NUSWIDE_CLASSES, transform, skip_unreadable)


def relative_image_path(line: str, list_file: Path) -> Path:
    """'actor\\0001.jpg' or 'actor/0001.jpg' -> Path('actor/0001.jpg'); nothing may leave ROOT/images."""
    path = PureWindowsPath(line)  # accepts both separators
    if path.drive or path.root or ".." in path.parts:
        raise FedMPTError(f"{list_file}: '{line}' is not a path relative to the images folder; "
                          "fix the list (paths like actor\\0001_2124494179.jpg).")
    return Path(*path.parts)


def read_labels(path: Path, n_images: int) -> torch.Tensor:
    """One NUS-WIDE label file: n_images lines of 0 or 1."""
    values = path.read_text().split()
    if len(values) != n_images or not set(values) <= {"0", "1"}:
        raise FedMPTError(f"{path} must hold one 0 or 1 per image of the image list ({n_images} "
                          f"lines), but has {len(values)} values {sorted(set(values))[:4]}; use the "
                          "label file that belongs to this list.")
    return torch.tensor([int(v) for v in values], dtype=torch.long)  # (n_images,)
