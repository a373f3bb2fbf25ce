"""Multi-Scene-Clean (the real-world federated benchmark of Table 3), as its authors publish it:

    ROOT/MultiScene-Clean/Tra.csv        header row, then: image name, 36 columns of 0/1
    ROOT/MultiScene-Clean/Test.csv       the same for the test images (7,000 each)
    ROOT/MultiScene-Clean/images/<name>.jpg

The class names are read from the header, in its order and spelling (typos such as "OilFiled"
included: prompts say them in plain words, data.prompt_name). A name without a suffix gets
.jpg. Targets are 0/1.
"""
import csv
from pathlib import Path

import torch

from errors import FedMPTError
from loaders.base import ImageDataset, missing_files_error


def read_label_table(path: Path, how: str):
    """(class names from the header, [(image name, [0/1, ...])]) of a CSV `image,<classes>`;
    every problem names the file and the line."""
    if not path.is_file():
        raise missing_files_error("label table", path.parent, [path], how)
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.reader(handle))
    if not rows or len(rows[0]) < 2:
        raise FedMPTError(f"{path} line 1: expected a header 'image,<class>,...'; got {rows[0] if rows else 'nothing'}.")
    classes, table = [name.strip() for name in rows[0][1:]], []
    for number, row in enumerate(rows[1:], 2):
        if not any(cell.strip() for cell in row):
            continue
        values = [cell.strip() for cell in row[1:]]
        if len(values) != len(classes) or not set(values) <= {"0", "1"}:
            raise FedMPTError(f"{path} line {number}: expected {len(classes)} columns of 0 or 1 after the "
                              f"image name (the header's classes), got {len(values)}: {values[:5]}...")
        table.append((row[0].strip(), [int(v) for v in values]))
    return classes, table


class MultiSceneDataset(ImageDataset):
    def __init__(self, root, split, transform=None, skip_unreadable=False):
        directory = Path(root) / "MultiScene-Clean"
        how = ("download Multi-Scene-Clean from its authors' release and extract it so that "
               f"{directory} holds Tra.csv, Test.csv and images/")
        classes, table = read_label_table(directory / {"train": "Tra.csv", "test": "Test.csv"}[split], how)
        if not (directory / "images").is_dir():
            raise missing_files_error("multiscene", root, [directory / "images"], how)
        images = [directory / "images" / (name if Path(name).suffix else f"{name}.jpg") for name, _ in table]
        targets = torch.tensor([values for _, values in table], dtype=torch.long).reshape(len(table), len(classes))
        super().__init__("multiscene", split, images, targets, classes, transform, skip_unreadable)
