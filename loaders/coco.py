"""COCO 2014 as multi-label recognition.
"""
import json
from pathlib import Path

import torch

from errors import FedMPTError
from loaders.base import ImageDataset, inside_root, missing_files_error

# COCO's 80 category names in ascending category id (ids run 1..90 with gaps).
COCO_CLASSES = ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
                "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench",
                "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
                "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis",
                "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard",
                "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife",
                "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot",
                "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
                "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
                "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
                "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush"]
CLASSES = COCO_CLASSES  # a fixed class list (data.known_classes)


class COCODataset(ImageDataset):
    """COCO 2014 as multi-label recognition: ROOT/annotations/instances_{train2014,val2014}.json
    and the images ROOT/{train2014,val2014}/<file_name>; split 'train' is train2014 (82,783
    images), 'test' is val2014 (40,504). A class is present (1) when the image has at least one
    instance annotation of it, crowd annotations (iscrowd 1) included, as in the multi-label
    works we compare with (ML-GCN, ASL, DualCoOp); else 0. COCO has no "difficult" flag, so no
    -1. Images without annotations stay, with all-zero targets. Images are in ascending image
    id order (as torchvision's CocoDetection)."""

    def __init__(self, root, split, transform=None, skip_unreadable=False):
        root, folder = Path(root), {"train": "train2014", "test": "val2014"}[split]
        annotation_file, image_dir = root / "annotations" / f"instances_{folder}.json", root / folder
        missing = [p for p in (annotation_file, image_dir) if not p.exists()]
        if missing:
            raise missing_files_error("coco2014", root, missing, (
                f"download {folder}.zip and annotations_trainval2014.zip from "
                f"https://cocodataset.org/#download and unzip both into {root}"))
        try:
            coco = json.loads(annotation_file.read_text())
            categories = sorted(coco["categories"], key=lambda category: category["id"])
            names = [category["name"] for category in categories]
            images = sorted(coco["images"], key=lambda image: image["id"])
            pairs = [(a["image_id"], a["category_id"]) for a in coco["annotations"]]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise FedMPTError(f"{annotation_file} is not a readable COCO instances file "
                              f"({type(error).__name__}: {error}); download it again.") from None
        if names != COCO_CLASSES:
            raise FedMPTError(f"{annotation_file}: its categories in id order are not COCO's 80 "
                              f"classes (got {len(names)}, first {names[:3]}); use the official "
                              f"instances_{folder}.json.")
        row = {image["id"]: i for i, image in enumerate(images)}
        column = {category["id"]: c for c, category in enumerate(categories)}
        targets = torch.zeros(len(images), len(COCO_CLASSES), dtype=torch.long)  # (n_images, C)
        for image_id, category_id in pairs:
            if image_id not in row or category_id not in column:
                raise FedMPTError(f"{annotation_file}: an annotation refers to image {image_id} / "
                                  f"category {category_id}, which the file does not list.")
            targets[row[image_id], column[category_id]] = 1
        paths = [inside_root(image_dir, str(image["file_name"]), f"{annotation_file} (image id {image['id']})")
                 for image in images]
        super().__init__("coco2014", split, paths, targets, COCO_CLASSES, transform, skip_unreadable)
