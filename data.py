"""Datasets, the offline shapes world, and client splits.

Every dataset yields `(image_tensor, target)` with `target` (C,) in {1, 0, -1}: present, absent,
ignored (VOC: the class appears only on objects marked "difficult"). `classes` lists the names
in target order and `targets` holds all targets, (n_images, C).
"""
import json
import math
import random
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision import transforms

from errors import FedMPTError

VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor"]
# What the prompts say for a class whose annotation name is not plain English.
PROMPT_NAMES = {"diningtable": "dining table", "pottedplant": "potted plant",
                "tvmonitor": "tv monitor", "aeroplane": "aeroplane"}
VOC_URLS = {"trainval": "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtrainval_06-Nov-2007.tar",
            "test": "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtest_06-Nov-2007.tar"}
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def clip_transform(resolution: int):
    """CLIP's preprocessing: bicubic resize of the short side, centre crop, normalise."""
    return transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(resolution), transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD)])


def prompt_name(name: str) -> str:
    return PROMPT_NAMES.get(name, name.replace("_", " "))


class VOCDataset(torch.utils.data.Dataset):
    """PASCAL VOC layout: JPEGImages/, Annotations/*.xml, ImageSets/Main/{split}.txt."""

    def __init__(self, root, split, classes=VOC_CLASSES, transform=None, name="voc2007"):
        self.dir = find_voc_dir(Path(root), split, name)
        self.classes, self.transform = list(classes), transform
        ids = (self.dir / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
        self.images = [self.dir / "JPEGImages" / f"{image_id}.jpg" for image_id in ids]
        self.targets = torch.stack([self.parse_annotation(self.dir / "Annotations" / f"{i}.xml")
                                    for i in ids])  # (n_images, C)

    def parse_annotation(self, path: Path) -> torch.Tensor:
        """1 if the class has a non-difficult object, -1 if only difficult ones, else 0."""
        try:
            objects = ElementTree.parse(path).getroot().findall("object")
            found = [(o.findtext("name").strip(), o.findtext("difficult", "0").strip() == "1")
                     for o in objects]
        except (OSError, ElementTree.ParseError, AttributeError) as error:
            raise FedMPTError(f"annotation {path} is missing or malformed ({error}).") from None
        target = torch.zeros(len(self.classes), dtype=torch.long)
        for name, difficult in found:
            if name not in self.classes:
                raise FedMPTError(f"annotation {path} names class '{name}', not one of this "
                                  "dataset's classes.")
            c = self.classes.index(name)
            target[c] = max(target[c].item(), 1) if not difficult else (1 if target[c] == 1 else -1)
        return target

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        try:
            image = Image.open(self.images[i]).convert("RGB")
        except OSError as error:
            raise FedMPTError(f"cannot read image {self.images[i]} ({error}).") from None
        return (self.transform(image) if self.transform else image), self.targets[i]


def find_voc_dir(root: Path, split: str, name: str) -> Path:
    """Accept ROOT, ROOT/VOC2007 or ROOT/VOCdevkit/VOC2007; say exactly what is missing."""
    candidates = [root / "VOCdevkit" / "VOC2007", root / "VOC2007", root]
    needed = ["JPEGImages", "Annotations", f"ImageSets/Main/{split}.txt"]
    for directory in candidates:
        if all((directory / part).exists() for part in needed):
            return directory
    best = next((d for d in candidates if d.is_dir() and any((d / p).exists() for p in needed)),
                candidates[0])
    missing = [str(best / part) for part in needed if not (best / part).exists()]
    how = ("run `python federate.py` without --dataset to generate it"
           if name == "shapes" else
           "download VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar "
           f"({VOC_URLS['trainval']}, {VOC_URLS['test']}) and extract both into {root}")
    raise FedMPTError(f"{name} not found under {root}: missing {', '.join(missing)}. To get it, {how}.")


# ---- The offline shapes world -------------------------------------------------------------
SHAPES_CLASSES = ["circle", "square", "triangle", "star", "cross", "diamond", "ring", "hexagon"]
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 210, 40), "purple": (150, 60, 190), "white": (245, 245, 245)}
# Hidden scenes: a background and object preferences. Within a scene two classes co-occur far
# more often than elsewhere, so K-means on label vectors finds the scenes: non-IID clients.
SCENES = [((90, 120, 90), ("circle", "square")), ((70, 70, 110), ("triangle", "star")),
          ((120, 100, 70), ("cross", "diamond")), ((60, 100, 120), ("ring", "hexagon"))]


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, colour):
    """One filled shape of radius r centred on (cx, cy)."""
    def polygon(n, start=-math.pi / 2, radii=(1.0,)):
        return [(cx + r * radii[i % len(radii)] * math.cos(start + 2 * math.pi * i / n),
                 cy + r * radii[i % len(radii)] * math.sin(start + 2 * math.pi * i / n)) for i in range(n)]
    box = [cx - r, cy - r, cx + r, cy + r]
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(r / 3)))
    elif kind == "square":
        draw.rectangle([cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r], fill=colour)
    elif kind == "cross":
        draw.rectangle([cx - r, cy - r / 3, cx + r, cy + r / 3], fill=colour)
        draw.rectangle([cx - r / 3, cy - r, cx + r / 3, cy + r], fill=colour)
    else:
        shape = {"triangle": (3, (1.0,)), "star": (10, (1.0, 0.45)), "diamond": (4, (1.0, 0.6)),
                 "hexagon": (6, (1.0,))}[kind]
        draw.polygon(polygon(shape[0], radii=shape[1]), fill=colour)


def generate_shapes_image(rng: random.Random, size: int = 64):
    """A scene, 1-4 shapes in distinct cells of a 3x3 grid; returns image and (name, box, difficult)."""
    background, preferred = rng.choice(SCENES)
    image = Image.new("RGB", (size, size), background)
    noise = np.random.default_rng(rng.randrange(2 ** 32)).integers(-12, 13, (size, size, 3))
    image = Image.fromarray((np.asarray(image) + noise).clip(0, 255).astype(np.uint8))
    draw, cell, objects = ImageDraw.Draw(image), size / 3, []
    for slot in rng.sample(range(9), rng.randint(1, 4)):
        kind = rng.choice(preferred) if rng.random() < 0.7 else rng.choice(SHAPES_CLASSES)
        r = rng.uniform(0.3, 0.5) * cell
        cx = (slot % 3 + 0.5) * cell + rng.uniform(-0.1, 0.1) * cell
        cy = (slot // 3 + 0.5) * cell + rng.uniform(-0.1, 0.1) * cell
        draw_shape(draw, kind, cx, cy, r, rng.choice(list(COLOURS.values())))
        objects.append((kind, [cx - r, cy - r, cx + r, cy + r], r < 0.32 * cell))  # tiny = difficult
    return image, objects


def write_voc_annotation(path: Path, filename: str, size: int, objects):
    """A minimal VOC XML file: size and one <object> per (name, box, difficult)."""
    lines = [f"<annotation><filename>{filename}</filename>",
             f"<size><width>{size}</width><height>{size}</height><depth>3</depth></size>"]
    for name, box, difficult in objects:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        lines.append(f"<object><name>{name}</name><difficult>{int(difficult)}</difficult><bndbox>"
                     f"<xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")
    path.write_text("\n".join(lines + ["</annotation>"]) + "\n")


def generate_shapes_dataset(root, n_trainval=1500, n_test=800, size=64, seed=0):
    """Write the shapes world in the VOC layout under ROOT/VOCdevkit/VOC2007 (once per setting)."""
    directory = Path(root) / "VOCdevkit" / "VOC2007"
    settings = {"n_trainval": n_trainval, "n_test": n_test, "size": size, "seed": seed,
                "classes": SHAPES_CLASSES}
    stamp = directory / "generated.json"
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        return directory
    for sub in ["JPEGImages", "Annotations", "ImageSets/Main"]:
        (directory / sub).mkdir(parents=True, exist_ok=True)
    rng, ids = random.Random(seed), {"trainval": [], "test": []}
    for index in range(n_trainval + n_test):
        image_id = f"{index + 1:06d}"
        image, objects = generate_shapes_image(rng, size)
        image.save(directory / "JPEGImages" / f"{image_id}.jpg", quality=95)
        write_voc_annotation(directory / "Annotations" / f"{image_id}.xml", f"{image_id}.jpg", size, objects)
        ids["trainval" if index < n_trainval else "test"].append(image_id)
    for split, split_ids in ids.items():
        (directory / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(split_ids) + "\n")
    stamp.write_text(json.dumps(settings))  # written last: a half-written world is regenerated
    return directory


def load_dataset(name: str, root, split: str, transform=None):
    """`split` is 'train' or 'test'; VOC's 'train' is its trainval list."""
    voc_split = "trainval" if split == "train" else split
    if name == "shapes":
        generate_shapes_dataset(root)
        return VOCDataset(root, voc_split, SHAPES_CLASSES, transform, name="shapes")
    if name == "voc2007":
        return VOCDataset(root, voc_split, VOC_CLASSES, transform)
    raise FedMPTError(f"--dataset {name}: unknown; choose shapes or voc2007.")


# ---- Frozen features and client splits ----------------------------------------------------
@torch.no_grad()
def encode_dataset(backbone, dataset, batch_size=64, device="cpu", progress=None):
    """Frozen CLIP features of every image: v (n, D) and P (n, N, D), computed once."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    globals_, patches = [], []
    for images, _ in (progress(loader) if progress else loader):
        v, P = backbone.encode_image_tokens(images.to(device))
        globals_.append(v.float().cpu())
        patches.append(P.float().cpu())
    return torch.cat(globals_), torch.cat(patches)


def kmeans(points: np.ndarray, k: int, seed: int = 0, n_iters: int = 100) -> np.ndarray:
    """Lloyd's K-means with k-means++ seeding; returns a cluster index per point."""
    rng = np.random.default_rng(seed)
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
    return labels


def client_splits(targets: torch.Tensor, n_clients: int, heterogeneity: float, seed: int = 0):
    """Clustering-based split (method.md). K-means on the multi-hot label vectors gives one
    cluster per client; client i keeps a fraction t of its cluster and fills the rest of its
    share with samples drawn at random from the pool the other clients released.
    t = 1: each client holds exactly its cluster; small t approaches IID. Returns index lists."""
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
