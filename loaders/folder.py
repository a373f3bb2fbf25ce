"""Your own data: a folder of images and labels.csv (optionally naming each image's site).
"""
import csv
import os
import sys
from pathlib import Path

import torch
from PIL import Image

from errors import FedMPTError
from loaders.base import UNREADABLE, ImageDataset, missing_files_error


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
        try:
            text = classes_path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as error:
            raise FedMPTError(f"{classes_path} is not UTF-8 text (byte {error.start}: {error.reason}); save it as "
                              "UTF-8, one class name a line.") from None
        for number, line in enumerate(text.splitlines(), 1):
            name = line.strip()
            if name in listed:
                problems.append(f"classes.txt line {number}: '{name}' is listed twice")
            elif name_problem(name):
                problems.append(f"classes.txt line {number}: {name_problem(name)}")
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
        for name in labels:
            if name_problem(name):
                here(name_problem(name))
        unknown = [name for name in labels if listed is not None and name not in listed]
        if unknown:
            here(f"label(s) {', '.join(map(repr, unknown))} not in classes.txt")
        if has_clients and split == "train" and not row.get("client"):
            here("no client, but other rows name theirs (every training image needs its site)")
        path = Path(image)
        key = os.path.normpath(image)
        if not image:
            here("no image path")
        elif path.is_absolute() or ".." in path.parts or not Path(os.path.realpath(root / path)).is_relative_to(
                os.path.realpath(root)):  # links resolved
            here(f"image '{image}' is not a path inside {root} (links resolved)")
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


def name_problem(name: str) -> str:
    """Why `name` cannot be a class name ('' when it can): names are written comma-separated
    (--unseen) and one a line (classes.txt), so a comma or a line break would make two of one."""
    if any(mark in name for mark in ",\n\r"):
        return f"the class name {name!r} holds a comma or a line break; rename the class without them"
    return ""


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
