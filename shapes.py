"""The offline shapes world: small images of coloured shapes, written in the VOC layout.

Each image belongs to a hidden scene with its own background and two preferred shapes, so
labels co-occur by scene and K-means on label vectors finds non-IID clients. `data.VOCDataset`
reads the result like real VOC2007 (tiny objects are marked difficult, i.e. target -1).
"""
import json
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


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
