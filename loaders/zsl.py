"""The published zero-shot splits of COCO2014 (48 seen / 17 unseen classes) and NUS-WIDE (925
seen tags / 81 unseen concepts): the filtered JSON files of DualCoOp and RAM (`--zsl-split`).

    ROOT/annotations/train_48_filtered.json    training images, labelled with the 48 seen classes
    ROOT/annotations/test_17_filtered.json     test images holding an unseen class (the ZSL setting)
    ROOT/annotations/test_65_filtered.json     every test image, all 65 classes (the GZSL setting)
    (NUS-WIDE: train_925_filtered.json, test_81_filtered.json, test_1006_filtered.json)

Each file is {"classes": [names], "images": [[image path, [label names]], ...]}. They come with
DualCoOp's release (github.com/sunxm2357/DualCoOp, its data instructions for the zero-shot
setting); the COCO images are COCO 2014's, the NUS-WIDE images the release's Flickr images.
Classes are the sorted seen names, then the sorted unseen names; a label outside them is
dropped (as those projects do). Image paths in the files are their authors' own: a path is
looked up as written under ROOT, then under ROOT/images, then by its last two parts
(folder/file) under both; COCO's `trainval2014/` folder becomes train2014/ or val2014/ by the
file name. The split 'test' is the GZSL file; the unseen figures use its images that hold an
unseen class.
"""
import json
from pathlib import Path

import torch

from errors import FedMPTError
from loaders.base import ImageDataset, inside_root, missing_files_error

SPLITS = {("coco2014", "48/17"): ("train_48_filtered.json", "test_17_filtered.json", "test_65_filtered.json"),
          ("nuswide", "925/81"): ("train_925_filtered.json", "test_81_filtered.json", "test_1006_filtered.json")}


def read_split_file(path: Path, expected: int) -> tuple:
    """(classes, [(path, labels)]) of one filtered JSON file, its class count checked."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        classes = [str(c) for c in content["classes"]]
        images = [(str(image), [str(label) for label in labels]) for image, labels in content["images"]]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise FedMPTError(f"{path} is not a filtered zero-shot split file ({type(error).__name__}: {error}); it "
                          'holds {"classes": [...], "images": [[path, [labels]], ...]}: download it again.') from None
    if len(set(classes)) != expected:
        raise FedMPTError(f"{path} lists {len(set(classes))} distinct classes where the published split has "
                          f"{expected}; use the published file.")
    return classes, images


def find_image(root: Path, written: str, named_by: str = "a split file") -> Path:
    """Where an image a split file names lies under ROOT (see the module's docstring); a path
    that resolves outside ROOT (`..`, a link) is refused naming `named_by` (loaders/base.py)."""
    path = Path(written.replace("\\", "/"))
    tail = Path(*path.parts[-2:]) if len(path.parts) >= 2 else path
    if tail.parts[0] == "trainval2014":  # COCO: the file name says which 2014 folder holds it
        tail = Path("train2014" if "train2014" in tail.name else "val2014", tail.name)
    relative = [] if path.is_absolute() else [path]
    candidates = [root / p for p in relative] + [root / "images" / p for p in relative] + [root / tail,
                                                                                           root / "images" / tail]
    return inside_root(root, next((c for c in candidates if c.exists()), candidates[0]), named_by)


class ZSLSplitDataset(ImageDataset):
    """One split of a published zero-shot split: every class (seen, then unseen) as columns,
    `unseen_names` the unseen ones."""

    def __init__(self, dataset, root, split, zsl_split, transform=None, skip_unreadable=False):
        root = Path(root)
        if (dataset, zsl_split) not in SPLITS:
            raise FedMPTError(f"--zsl-split {zsl_split} with --dataset {dataset}: the published splits are "
                              + ", ".join(f"--dataset {d} --zsl-split {s}" for d, s in SPLITS) + ".")
        files = [root / "annotations" / name for name in SPLITS[dataset, zsl_split]]
        missing = [f for f in files if not f.exists()]
        if missing:
            raise missing_files_error(f"{dataset} --zsl-split {zsl_split}", root, missing, (
                "download the filtered zero-shot split files from DualCoOp's release (github.com/sunxm2357/DualCoOp, "
                f"its data instructions) into {root / 'annotations'}"))
        n_seen, n_unseen = map(int, zsl_split.split("/"))
        seen, train_images = read_split_file(files[0], n_seen)
        unseen, _ = read_split_file(files[1], n_unseen)
        every, test_images = read_split_file(files[2], n_seen + n_unseen)
        if set(seen) & set(unseen) or set(every) != set(seen) | set(unseen):
            raise FedMPTError(f"{files[2]}'s classes are not those of {files[0].name} and {files[1].name} together "
                              f"(or these overlap: {sorted(set(seen) & set(unseen))[:5]}); use the published files.")
        classes = sorted(set(seen)) + sorted(set(unseen))
        self.check_vocabulary(root, dataset, sorted(set(seen)), sorted(set(unseen)))
        column = {name: c for c, name in enumerate(classes)}
        listed = train_images if split == "train" else test_images
        listing = files[0] if split == "train" else files[2]
        paths = [find_image(root, image, f"{listing} entry {number}") for number, (image, _) in enumerate(listed, 1)]
        targets = torch.zeros(len(listed), len(classes), dtype=torch.long)  # (n_images, C)
        for row, (_, labels) in enumerate(listed):
            targets[row, [column[label] for label in labels if label in column]] = 1
        absent = [p for p in paths if not p.exists()]
        if absent and not skip_unreadable:
            raise missing_files_error(f"{dataset} {split} images of --zsl-split {zsl_split}", root, absent, (
                "put the dataset's images under ROOT as the split files name them (or pass --skip-unreadable "
                "to leave the missing ones out)"))
        self.unseen_names = sorted(set(unseen))
        super().__init__(dataset, split, paths, targets, classes, transform, skip_unreadable)

    @staticmethod
    def check_vocabulary(root: Path, dataset, seen, unseen):
        """NUS-WIDE: the 81 unseen classes are its 81 concepts, and the 925 seen tags come from
        its 1,000-tag vocabulary (NUS_WID_Tags/TagList1k.txt, checked when it is there)."""
        if dataset != "nuswide":
            return
        from loaders.nuswide import NUSWIDE_CLASSES
        vocabulary = root / "NUS_WID_Tags" / "TagList1k.txt"
        outside = [c for c in unseen if c not in NUSWIDE_CLASSES]
        if vocabulary.exists():
            tags = set(vocabulary.read_text(encoding="utf-8", errors="replace").split())
            outside += [c for c in seen if c not in tags]
        if outside:
            raise FedMPTError(f"nuswide --zsl-split 925/81: {', '.join(outside[:5])} "
                              f"{'is' if len(outside) == 1 else 'are'} neither one of the 81 concepts (unseen) nor "
                              f"a tag of {vocabulary} (seen); use the published files.")
