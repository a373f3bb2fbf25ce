"""PASCAL VOC2007 (and the offline shapes world, written in its layout).
"""
import json
from pathlib import Path
import xml.etree.ElementTree as ElementTree

import torch

from errors import FedMPTError
from loaders.base import ImageDataset, inside_root, missing_files_error

VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor"]
CLASSES = VOC_CLASSES  # a fixed class list (data.known_classes)
VOC_URLS = {"trainval": "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtrainval_06-Nov-2007.tar",
            "test": "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtest_06-Nov-2007.tar"}
VOC_MD5S = {"trainval": "c52e279531787c972589f7e41ab4ae64", "test": "b6e924de25625d8de591ea690078ad9f"}


def parse_voc_annotation(path: Path, classes) -> torch.Tensor:
    """1 if the class has a non-difficult object, -1 if only difficult ones, else 0."""
    try:
        objects = ElementTree.parse(path).getroot().findall("object")
        found = [(o.findtext("name").strip(), o.findtext("difficult", "0").strip() == "1")
                 for o in objects]
    except (OSError, ElementTree.ParseError, AttributeError) as error:
        raise FedMPTError(f"annotation {path} is missing or malformed ({error}).") from None
    target = torch.zeros(len(classes), dtype=torch.long)
    for name, difficult in found:
        if name not in classes:
            raise FedMPTError(f"annotation {path} names class '{name}', not one of this "
                              "dataset's classes.")
        c = classes.index(name)
        target[c] = max(target[c].item(), 1) if not difficult else (1 if target[c] == 1 else -1)
    return target


def load_split(root, split, transform=None, skip_unreadable=False) -> "VOCDataset":
    """VOC2007's `split` (train: its trainval list) at `root` (data.DATASETS' loader of voc2007)."""
    return VOCDataset(root, "trainval" if split == "train" else split, VOC_CLASSES, transform=transform,
                      skip_unreadable=skip_unreadable)


class VOCDataset(ImageDataset):
    """PASCAL VOC layout: JPEGImages/, Annotations/*.xml, ImageSets/Main/{split}.txt (the image
    ids, each checked: its annotation and image lie inside the dataset's folder, loaders/base.py's
    path rule, else an error naming the line)."""

    def __init__(self, root, split, classes=VOC_CLASSES, transform=None, name="voc2007",
                 skip_unreadable=False):
        self.dir, classes = find_voc_dir(Path(root), split, name), list(classes)
        path, ids = self.dir / "ImageSets" / "Main" / f"{split}.txt", []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as error:
            raise FedMPTError(f"{path} is not UTF-8 text (byte {error.start}: {error.reason}); it lists one image id "
                              "a line: restore it from the dataset's archive.") from None
        for number, line in enumerate(lines, 1):
            for image_id in line.split():
                for part in (f"Annotations/{image_id}.xml", f"JPEGImages/{image_id}.jpg"):
                    inside_root(self.dir, part, f"{path} line {number}")
                ids.append(image_id)
        targets = torch.stack([parse_voc_annotation(self.dir / "Annotations" / f"{i}.xml", classes)
                               for i in ids])  # (n_images, C)
        images = [self.dir / "JPEGImages" / f"{image_id}.jpg" for image_id in ids]
        super().__init__(name, split, images, targets, classes, transform, skip_unreadable)
        stamp = self.dir / "generated.json"  # the shapes world's record: its biased class pairs
        try:
            pairs = json.loads(stamp.read_text(encoding="utf-8")).get("biased_pairs", []) if stamp.exists() else []
            self.biased_pairs = [(classes.index(a), classes.index(b)) for a, b in pairs if a in classes and b in classes]
        except (UnicodeDecodeError, ValueError, AttributeError, TypeError) as error:
            raise FedMPTError(f"{stamp} is not the shapes world's record ({type(error).__name__}: {error}); delete the "
                              "generated folder and run again to generate it anew.") from None


def find_voc_dir(root: Path, split: str, name: str) -> Path:
    """Accept ROOT, ROOT/VOC2007 or ROOT/VOCdevkit/VOC2007; say exactly what is missing."""
    candidates = [root / "VOCdevkit" / "VOC2007", root / "VOC2007", root]
    needed = ["JPEGImages", "Annotations", f"ImageSets/Main/{split}.txt"]
    for directory in candidates:
        if all((directory / part).exists() for part in needed):
            return directory
    best = next((d for d in candidates if d.is_dir() and any((d / p).exists() for p in needed)),
                candidates[0])
    how = ("run `python federate.py` without --dataset to generate it"
           if name == "shapes" else
           "pass --download, or download VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar "
           f"({VOC_URLS['trainval']}, {VOC_URLS['test']}) and extract both into {root}; the paper's setting is "
           f"python federate.py --dataset voc2007 --root {root} --clip ViT-B/16 --device cuda (with --download "
           "to fetch it)")
    raise missing_files_error(name, root, [best / p for p in needed if not (best / p).exists()], how)
