"""Datasets and client splits (the offline shapes world: shapes.py; the VOC2007 download: download.py).

Every dataset yields `(image, target)` with `target` (C,) in {1, 0, -1}: present, absent,
ignored (VOC: the class appears only on objects marked "difficult"); `image` is a PIL image, or
`transform(image)` when a transform is set. `classes` lists the names in target order and
`targets` holds all targets, (n_images, C).
"""
import csv
import json
import os
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path, PureWindowsPath

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from tqdm import tqdm

import shapes
from errors import FedMPTError

DATASETS = ["shapes", "voc2007", "coco2014", "nuswide", "folder"]
VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor"]
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
# What the prompts say for a class whose annotation name is not plain English.
PROMPT_NAMES = {"diningtable": "dining table", "pottedplant": "potted plant",
                "tvmonitor": "tv monitor", "aeroplane": "aeroplane"}
VOC_URLS = {"trainval": "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtrainval_06-Nov-2007.tar",
            "test": "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtest_06-Nov-2007.tar"}
VOC_MD5S = {"trainval": "c52e279531787c972589f7e41ab4ae64", "test": "b6e924de25625d8de591ea690078ad9f"}
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
UNREADABLE = (OSError, SyntaxError, ValueError)  # what PIL raises for missing or broken files


def clip_transform(resolution: int):
    """CLIP's preprocessing: bicubic resize of the short side, centre crop, normalise."""
    return transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(resolution), transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD)])


def prompt_name(name: str) -> str:
    return PROMPT_NAMES.get(name, name.replace("_", " "))


def missing_files_error(name, root, missing, how) -> FedMPTError:
    """One message for every loader: what is missing (the first ten) and how to get it."""
    listed = ", ".join(map(str, missing[:10])) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
    return FedMPTError(f"{name} not found under {root}: missing {listed}. To get it, {how}.")


# ---- Image datasets -----------------------------------------------------------------------
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


class VOCDataset(ImageDataset):
    """PASCAL VOC layout: JPEGImages/, Annotations/*.xml, ImageSets/Main/{split}.txt."""

    def __init__(self, root, split, classes=VOC_CLASSES, transform=None, name="voc2007",
                 skip_unreadable=False):
        self.dir, classes = find_voc_dir(Path(root), split, name), list(classes)
        ids = (self.dir / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
        targets = torch.stack([parse_voc_annotation(self.dir / "Annotations" / f"{i}.xml", classes)
                               for i in ids])  # (n_images, C)
        images = [self.dir / "JPEGImages" / f"{image_id}.jpg" for image_id in ids]
        super().__init__(name, split, images, targets, classes, transform, skip_unreadable)
        stamp = self.dir / "generated.json"  # the shapes world names its biased pairs
        if stamp.exists():
            pairs = json.loads(stamp.read_text()).get("biased_pairs", [])
            self.biased_pairs = [(classes.index(a), classes.index(b)) for a, b in pairs
                                 if a in classes and b in classes]


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
           f"({VOC_URLS['trainval']}, {VOC_URLS['test']}) and extract both into {root}")
    raise missing_files_error(name, root, [best / p for p in needed if not (best / p).exists()], how)


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
        paths = [image_dir / image["file_name"] for image in images]
        super().__init__("coco2014", split, paths, targets, COCO_CLASSES, transform, skip_unreadable)


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
                "images as images/) and lay it out as in data.NUSWIDEDataset's docstring / the README"))
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


# ---- Your own data: a folder of images and labels.csv -------------------------------------
FOLDER_COLUMNS = ["image", "labels", "split"]  # required; an optional "client" column names sites
FOLDER_FORMAT = ("labels.csv starts with the header image,labels,split (optionally ,client); one "
                 "row per image: its path relative to the folder, its class names separated by "
                 "'|' (empty: none), train or test, and optionally the site it comes from")
MAX_LISTED_PROBLEMS = 20


class FolderDataset(ImageDataset):
    """Your own multi-label data: images anywhere under ROOT, listed in ROOT/labels.csv:

        image,labels,split,client
        hospital-a/2021/0001.png,cat|dog,train,hospital-a
        hospital-b/0002.png,,train,hospital-b        (no label: targets all 0)
        held-out/0003.png,dog,test,

    Class order: ROOT/classes.txt (one name a line) if present, otherwise the sorted names the
    file uses. Targets are 0/1 (no -1). With a `client` column every site is one client, its
    images in `natural_clients` (site, indices) sorted by site, instead of the K-means split of
    `client_splits`; every training row needs a site, test rows may leave it empty. The whole
    file is checked first (`read_folder_labels`) and every problem reported in one error."""

    def __init__(self, root, split, transform=None, skip_unreadable=False):
        root = Path(root)
        classes, rows, has_clients = read_folder_labels(root, check_images=not skip_unreadable)
        rows = [row for row in rows if row["split"] == split]
        column = {name: c for c, name in enumerate(classes)}
        targets = torch.zeros(len(rows), len(classes), dtype=torch.long)  # (n_images, C)
        for i, row in enumerate(rows):
            targets[i, [column[name] for name in row["labels"]]] = 1
        images = [root / row["image"] for row in rows]
        super().__init__("folder", split, images, targets, classes, transform, skip_unreadable)
        if has_clients:  # after skip_unreadable: indices count the images that are left
            site_of = {root / row["image"]: row["client"] for row in rows}
            sites = sorted({site_of[path] for path in self.images} - {""})
            self.natural_clients = [(site, [i for i, path in enumerate(self.images) if site_of[path] == site])
                                    for site in sites]
        positives = (self.targets == 1).sum(0)  # (C,)
        unlearnable = [name for name, n in zip(self.classes, positives.tolist()) if n == 0]
        if split == "train" and unlearnable:
            print(f"warning: {root / 'labels.csv'}: no training image has the label "
                  f"{', '.join(map(repr, unlearnable))}; the model cannot learn it. Add training "
                  "images with it, or leave it out of classes.txt.", file=sys.stderr)


def read_folder_labels(root: Path, check_images: bool = True):
    """Read and check ROOT/labels.csv (and ROOT/classes.txt if present). Returns (classes,
    rows, has_clients), each row a dict with image (relative path), labels (list of names),
    split and client ('' if none). Every problem (a header column missing, a missing or
    unreadable image, an unknown split or label, a duplicate image, a training row without a
    site) is collected with its line number and raised in one FedMPTError. `check_images`
    False (--skip-unreadable) leaves missing and unreadable images to `check_images`."""
    csv_path, classes_path = root / "labels.csv", root / "classes.txt"
    if not csv_path.is_file():
        raise missing_files_error("folder dataset", root, [csv_path],
                                  f"pass --root with your folder, or write the file: {FOLDER_FORMAT}")
    problems, listed = [], None
    if classes_path.is_file():
        listed = []
        for number, line in enumerate(classes_path.read_text(encoding="utf-8-sig").splitlines(), 1):
            name = line.strip()
            if name in listed:
                problems.append(f"classes.txt line {number}: '{name}' is listed twice")
            elif name:
                listed.append(name)
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [name.strip() for name in next(reader, [])]
            table, line = [], reader.line_num
            for values in reader:  # a quoted field may span lines: a row starts after the last one
                table.append((line + 1, values))
                line = reader.line_num
    except (UnicodeDecodeError, csv.Error) as error:
        raise FedMPTError(f"{csv_path} is not a readable UTF-8 CSV file ({error}); {FOLDER_FORMAT}.") from None
    missing = [name for name in FOLDER_COLUMNS if name not in header]
    if missing:
        raise FedMPTError(f"{csv_path} line 1: the header lacks the column(s) {', '.join(missing)} "
                          f"(it reads '{','.join(header)}'); {FOLDER_FORMAT}.")
    has_clients = "client" in header and any(
        len(values) > header.index("client") and values[header.index("client")].strip() for _, values in table)
    rows, first_line_of = [], {}
    for line, values in table:
        if not any(value.strip() for value in values):
            continue  # a blank line
        row = {name: value.strip() for name, value in zip(header, values)}
        image, split = row.get("image", ""), row.get("split", "")
        labels = [name.strip() for name in row.get("labels", "").split("|") if name.strip()]
        here = lambda problem: problems.append(f"line {line}: {problem}")
        if len(values) > len(header) and any(value.strip() for value in values[len(header):]):
            here(f"{len(values)} fields, but the header has {len(header)} (separate labels with '|')")
        if split not in ("train", "test"):
            here(f"split '{split}' is neither train nor test")
        unknown = [name for name in labels if listed is not None and name not in listed]
        if unknown:
            here(f"label(s) {', '.join(map(repr, unknown))} not in classes.txt")
        if has_clients and split == "train" and not row.get("client"):
            here("no client, but other rows name theirs (every training image needs its site)")
        path = Path(image)
        key = os.path.normpath(image)
        if not image:
            here("no image path")
        elif path.is_absolute() or ".." in path.parts:
            here(f"image '{image}' is not a path inside {root}")
        elif key in first_line_of:
            here(f"image {image} is listed twice (also on line {first_line_of[key]})")
        elif check_images:
            problem = image_problem(root / path)
            if problem:
                here(f"image {image} {problem}")
        first_line_of.setdefault(key, line)
        rows.append({"image": key, "labels": labels, "split": split, "client": row.get("client", "")})
    for split in ("train", "test"):
        if not any(row["split"] == split for row in rows):
            problems.append(f"no row has the split {split}")
    classes = listed if listed is not None else sorted({name for row in rows for name in row["labels"]})
    if not classes:
        problems.append("no row has a label and there is no classes.txt: no class to learn")
    if problems:
        shown = problems[:MAX_LISTED_PROBLEMS] + ([f"... and {len(problems) - MAX_LISTED_PROBLEMS} more"]
                                                 if len(problems) > MAX_LISTED_PROBLEMS else [])
        raise FedMPTError(f"{csv_path} has {len(problems)} problem(s):\n  " + "\n  ".join(shown)
                          + f"\nFix them and run again ({FOLDER_FORMAT}).")
    return classes, rows, has_clients


def image_problem(path: Path) -> str:
    """'' if PIL can open and verify the image file, else what is wrong with it."""
    if not path.is_file():
        return "not found"
    try:
        with Image.open(path) as image:
            image.verify()
    except UNREADABLE as error:
        return f"cannot be read ({error})"
    return ""


def load_dataset(name: str, root, split: str, transform=None, skip_unreadable=False):
    """`name` one of DATASETS, `split` 'train' or 'test' (VOC's 'train' is its trainval list).
    `skip_unreadable`: decode every image now and leave out, with a message, those that fail."""
    if split not in ("train", "test"):
        raise FedMPTError(f"split '{split}': choose train or test.")
    options = {"transform": transform, "skip_unreadable": skip_unreadable}
    voc_split = "trainval" if split == "train" else split
    if name == "shapes":
        shapes.generate_shapes_dataset(root)
        return VOCDataset(root, voc_split, shapes.SHAPES_CLASSES, name="shapes", **options)
    if name == "voc2007":
        return VOCDataset(root, voc_split, VOC_CLASSES, **options)
    if name == "coco2014":
        return COCODataset(root, split, **options)
    if name == "nuswide":
        return NUSWIDEDataset(root, split, **options)
    if name == "folder":
        return FolderDataset(root, split, **options)
    raise FedMPTError(f"--dataset {name}: unknown; choose one of {', '.join(DATASETS)}.")


# ---- Frozen features and client splits ----------------------------------------------------
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


# ---- Looking at a split -------------------------------------------------------------------
def label_shares(targets: torch.Tensor, indices) -> torch.Tensor:
    """Share of the given images that carry each label, (C,)."""
    return (targets[torch.as_tensor(list(indices), dtype=torch.long)] == 1).float().mean(0)


def label_skew(targets: torch.Tensor, splits) -> float:
    """Mean over clients of the total variation distance between a client's label distribution
    and the whole set's: 0.5 * sum_c |p_i(c) - p(c)|, p(c) = label counts normalised to sum 1.
    0 for IID clients; it grows with the heterogeneity t."""
    def distribution(indices):
        shares = label_shares(targets, indices)  # (C,)
        return shares / shares.sum().clamp_min(1e-12)
    overall = distribution(range(len(targets)))
    return float(np.mean([0.5 * (distribution(s) - overall).abs().sum().item() for s in splits]))


def split_report(targets: torch.Tensor, splits, classes, top: int = 3, names=None) -> str:
    """Per client: image count and its most frequent labels with the share of its images that
    carry each; the whole training set first for comparison, and the label skew. `names`: the
    clients' names (default client 0, client 1, ...)."""
    names = names or [f"client {i}" for i in range(len(splits))]
    def row(name, indices):
        shares = label_shares(targets, indices)  # (C,)
        labels = ", ".join(f"{classes[c]} {shares[c]:.0%}" for c in shares.argsort(descending=True)[:top].tolist())
        return f"{name:>10} {len(indices):>7} images   {labels}"
    rows = [row("all", range(len(targets)))] + [row(name, s) for name, s in zip(names, splits)]
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
    figure.savefig(path, dpi=120)
    return Path(path)
