"""The offline shapes world (v3): captioned images of coloured shapes, written in the VOC layout.

An image is a 3x3 grid of cells holding 1-4 objects, each a shape kind (the 12 classes), one of
8 colours and 2 sizes, on the background texture of one of 6 hidden scenes; a scene prefers two
kinds. At 96 px a cell is 32 px, exactly one region token of CLIP's ResNet tower (stride 32).

The written world is shifted from the pretraining stream: there every shape is filled, here each
object is drawn as a thin outline with OUTLINE_SHARE (line drawings the small CLIP never saw),
so its zero-shot mAP drops from about 97 to about 70 and federated tuning has room to learn.

Three uses, from three seed streams that never meet:
  - federated training (trainval): 4 groups of images, one future client each; in group g the
    classes of BIASED_PAIRS[g] appear together (a spurious co-occurrence), so K-means on label
    vectors (data.client_splits) finds the groups;
  - the test split: no pair preferences, so every biased pair has images with one class alone;
  - pretraining a small CLIP (pretrain.py): (image, caption) pairs made in memory.
`data.VOCDataset` reads the written world like real VOC2007 (dataset name "shapes").
"""
import json
import math
import random
from collections import namedtuple
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from errors import FedMPTError

SIZE = 96  # pixels; 3 x 32 px cells
SHAPES_CLASSES = ["circle", "square", "triangle", "star", "cross", "diamond", "ring", "hexagon",
                  "crescent", "heart", "chevron", "bowtie"]
CLASSES = SHAPES_CLASSES  # a fixed class list (data.known_classes)
COLOURS = {"red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 225, 40),
           "green": (40, 180, 70), "blue": (40, 90, 230), "purple": (150, 60, 200),
           "pink": (250, 130, 200), "white": (250, 250, 250)}
SIZES = {"small": (0.24, 0.30), "large": (0.40, 0.45)}  # radius range, in cells
POSITIONS = ["at the top left", "at the top", "at the top right", "on the left", "in the center",
             "on the right", "at the bottom left", "at the bottom", "at the bottom right"]
Scene = namedtuple("Scene", "name preferred")
SCENES = [Scene("sandy", ("crescent", "star")), Scene("grassy", ("circle", "heart")),
          Scene("striped", ("triangle", "chevron")), Scene("dotted", ("ring", "cross")),
          Scene("cloudy", ("diamond", "bowtie")), Scene("wooden", ("square", "hexagon"))]
SCENE_PREFERENCE = 0.5  # chance that an object is one of its scene's two preferred kinds
# Federated trainval group g (client g) favours BIASED_PAIRS[g]: its first object is one of the
# pair, each other object with PAIR_SHARE, and an image with one of them gets the other with
# PAIR_COMPLETION (else that one stays alone: the rare exclusive images of the group).
BIASED_PAIRS = [("circle", "square"), ("triangle", "star"), ("cross", "diamond"), ("ring", "hexagon")]
PAIR_SHARE, PAIR_COMPLETION = 0.3, 0.85
OUTLINE_SHARE = 0.6  # written world only: chance that an object is drawn as an outline
OUTLINE_WIDTH = 2  # pixels

# One object: kind, colour, size names; cell 0-8 (row-major); centre and radius in cell units.
Placed = namedtuple("Placed", "kind colour size cell cx cy r outline", defaults=(False,))
# One image: scene index, background offset (fractions of the image), objects in cell order.
Layout = namedtuple("Layout", "scene offset objects")


def seed_stream(purpose: str, seed: int) -> random.Random:
    """Independent random streams: 'trainval', 'test' (the written world), 'pretraining'."""
    return random.Random(f"shapes-v2 {purpose} {seed}")


# ---- Sampling what an image holds ---------------------------------------------------------
def sample_layout(rng: random.Random, scene: int = None, biased_pair=None, outline_share=0.0) -> Layout:
    """A scene (random unless given), 1-4 objects in distinct cells; with `biased_pair` (a, b)
    the spurious co-occurrence of a federated group (see BIASED_PAIRS); each object an outline
    with `outline_share` (0: the pretraining stream, whose draws stay as they were)."""
    scene = rng.randrange(len(SCENES)) if scene is None else scene
    cells = sorted(rng.sample(range(9), rng.randint(1, 4)))
    kinds = [rng.choice(SCENES[scene].preferred) if rng.random() < SCENE_PREFERENCE
             else rng.choice(SHAPES_CLASSES) for _ in cells]
    if biased_pair:
        kinds = [rng.choice(biased_pair) if i == 0 or rng.random() < PAIR_SHARE else kind
                 for i, kind in enumerate(kinds)]
        for have, missing in [biased_pair, biased_pair[::-1]]:
            if have in kinds and missing not in kinds and rng.random() < PAIR_COMPLETION:
                if len(cells) < 4:  # add the partner in a free cell, else it replaces another kind
                    cells.append(rng.choice([c for c in range(9) if c not in cells]))
                    kinds.append(missing)
                else:
                    kinds[rng.choice([i for i in range(len(kinds)) if i != kinds.index(have)])] = missing
    objects = []
    for cell, kind in sorted(zip(cells, kinds)):
        size = rng.choice(list(SIZES))
        cx = cell % 3 + 0.5 + rng.uniform(-0.05, 0.05)
        cy = cell // 3 + 0.5 + rng.uniform(-0.05, 0.05)
        placed = Placed(kind, rng.choice(list(COLOURS)), size, cell, cx, cy, rng.uniform(*SIZES[size]))
        objects.append(placed._replace(outline=rng.random() < outline_share) if outline_share else placed)
    return Layout(scene, (rng.random(), rng.random()), objects)


# ---- Drawing ------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def background_tile(scene: int, size: int) -> Image.Image:
    """The scene's texture on a (2 size)^2 tile, the same every time; images crop from it."""
    rng, n = np.random.default_rng(scene), 2 * size
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    grain = rng.normal(0, 1, (n, n, 1))
    name = SCENES[scene].name
    if name == "sandy":
        pixels = np.array([190, 165, 115]) + 16 * grain
    elif name == "grassy":  # vertical blades: noise stretched along y
        blades = np.repeat(rng.normal(0, 1, (n // 6 + 1, n, 1)), 6, axis=0)[:n]
        pixels = np.array([70, 115, 55]) + 22 * blades + 6 * grain
    elif name == "striped":
        pixels = np.where((((x + y) // 8) % 2 == 0)[..., None], [105, 105, 125], [150, 150, 170]) + 5 * grain
    elif name == "dotted":
        dots = ((x % 12 - 6) ** 2 + (y % 12 - 6) ** 2 < 5)[..., None]
        pixels = np.where(dots, [160, 140, 180], [80, 60, 100]) + 5 * grain
    elif name == "cloudy":  # low-frequency noise, smoothly upsampled
        coarse = Image.fromarray(rng.integers(0, 256, (n // 16, n // 16), dtype=np.uint8))
        clouds = np.asarray(coarse.resize((n, n), Image.BICUBIC), dtype=np.float32)[..., None] / 255 - 0.5
        pixels = np.array([150, 170, 200]) + 60 * clouds + 4 * grain
    else:  # wooden: horizontal grain rings
        wave = np.sin(y * 0.6 + 2.5 * np.sin(x * 0.05 + y * 0.02))[..., None]
        pixels = np.array([130, 88, 52]) + 18 * wave + 5 * grain
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def polygon(cx, cy, r, radii, start=-math.pi / 2):
    """Points at angles start + 2 pi i / n, distance r * radii[i] from (cx, cy)."""
    n = len(radii)
    return [(cx + r * radii[i] * math.cos(start + 2 * math.pi * i / n),
             cy + r * radii[i] * math.sin(start + 2 * math.pi * i / n)) for i in range(n)]


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, colour):
    """One filled shape of radius r (pixels) centred on (cx, cy)."""
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(2, round(r / 3)))
    elif kind == "square":
        draw.rectangle([cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r], fill=colour)
    elif kind == "cross":
        draw.rectangle([cx - r, cy - r / 3, cx + r, cy + r / 3], fill=colour)
        draw.rectangle([cx - r / 3, cy - r, cx + r / 3, cy + r], fill=colour)
    elif kind == "crescent":  # outer circle minus a circle shifted right: outer arc, inner arc back
        outer = [math.radians(a) for a in range(51, 310, 15)] + [math.radians(309)]
        inner = [math.radians(a) for a in range(283, 76, -15)] + [math.radians(77)]
        draw.polygon([(cx + r * math.cos(a), cy + r * math.sin(a)) for a in outer]
                     + [(cx + 0.45 * r + 0.8 * r * math.cos(a), cy + 0.8 * r * math.sin(a)) for a in inner],
                     fill=colour)
    elif kind == "heart":  # the classic parametric heart, 16 sin^3 t and 13 cos t - 5 cos 2t - ...
        points = []
        for a in (2 * math.pi * i / 24 for i in range(24)):
            height = 13 * math.cos(a) - 5 * math.cos(2 * a) - 2 * math.cos(3 * a) - math.cos(4 * a) + 2.5
            points.append((cx + r * 16 * math.sin(a) ** 3 / 17, cy - r * height / 17))
        draw.polygon(points, fill=colour)
    elif kind == "chevron":  # a thick arrowhead pointing right
        points = [(-0.9, -0.9), (-0.2, -0.9), (0.9, 0), (-0.2, 0.9), (-0.9, 0.9), (0.2, 0)]
        draw.polygon([(cx + r * u, cy + r * v) for u, v in points], fill=colour)
    elif kind == "bowtie":  # two triangles meeting at the centre
        points = [(-1, -0.8), (0, 0), (1, -0.8), (1, 0.8), (0, 0), (-1, 0.8)]
        draw.polygon([(cx + r * u, cy + r * v) for u, v in points], fill=colour)
    else:
        radii = {"triangle": (1.0,) * 3, "star": (1.0, 0.45) * 5, "diamond": (1.0, 0.6) * 2,
                 "hexagon": (1.0,) * 6}[kind]
        draw.polygon(polygon(cx, cy, r, radii), fill=colour)


def render(layout: Layout, size: int = SIZE) -> Image.Image:
    """The image of a layout: a crop of its scene's texture, then each object, filled or as an
    outline (the shape's mask minus the mask eroded by OUTLINE_WIDTH pixels)."""
    left, top = (round(f * size) for f in layout.offset)
    image = background_tile(layout.scene, size).crop((left, top, left + size, top + size))
    draw, cell = ImageDraw.Draw(image), size / 3
    for o in layout.objects:
        if o.outline:
            mask = Image.new("L", image.size, 0)
            draw_shape(ImageDraw.Draw(mask), o.kind, o.cx * cell, o.cy * cell, o.r * cell, 255)
            rim = ImageChops.subtract(mask, mask.filter(ImageFilter.MinFilter(2 * OUTLINE_WIDTH + 1)))
            image.paste(COLOURS[o.colour], mask=rim)
        else:
            draw_shape(draw, o.kind, o.cx * cell, o.cy * cell, o.r * cell, COLOURS[o.colour])
    return image


def voc_objects(layout: Layout, size: int = SIZE):
    """(name, box, difficult) per object; every object is large enough to see: none difficult."""
    cell = size / 3
    return [(o.kind, [(o.cx - o.r) * cell, (o.cy - o.r) * cell, (o.cx + o.r) * cell, (o.cy + o.r) * cell],
             False) for o in layout.objects]


def generate_shapes_image(rng: random.Random, size: int = SIZE):
    """A random image of the world (no pair preference) and its (name, box, difficult) objects."""
    layout = sample_layout(rng)
    return render(layout, size), voc_objects(layout, size)


# ---- Captions -----------------------------------------------------------------------------
def with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def describe(layout: Layout) -> str:
    """The full caption: every object with size, colour and position, then the background."""
    parts = [with_article(f"{o.size} {o.colour} {'outlined ' * o.outline}{o.kind} {POSITIONS[o.cell]}")
             for o in layout.objects]
    return f"{' and '.join(parts)} on {with_article(SCENES[layout.scene].name)} background."


def sample_caption(layout: Layout, rng: random.Random) -> str:
    """A pretraining caption, drawn anew each time an image is used: SOME of the objects, each
    with its size, colour and position words often left out, the background sometimes, and
    sometimes the zero-shot prompt's "a photo of" in front."""
    named = rng.sample(layout.objects, rng.randint(1, len(layout.objects)))
    parts = []
    for o in named:
        words = [o.size] * (rng.random() < 0.3) + [o.colour] * (rng.random() < 0.5) + [o.kind]
        parts.append(with_article(" ".join(words)) + (" " + POSITIONS[o.cell]) * (rng.random() < 0.3))
    caption = " and ".join(parts)
    if rng.random() < 0.3:
        caption += f" on {with_article(SCENES[layout.scene].name)} background"
    return ("a photo of " if rng.random() < 0.3 else "") + caption + "."


def pretraining_batch(rng: random.Random, batch_size: int, scene: int = None, size: int = SIZE):
    """`batch_size` fresh (image, caption) pairs, all from `scene` if given; images as a uint8
    array (B, size, size, 3). Draw `rng` from seed_stream('pretraining', seed)."""
    layouts = [sample_layout(rng, scene) for _ in range(batch_size)]
    images = np.stack([np.asarray(render(layout, size)) for layout in layouts])  # (B, H, W, 3)
    return images, [sample_caption(layout, rng) for layout in layouts]


# ---- The written world (VOC layout) -------------------------------------------------------
def write_voc_annotation(path: Path, filename: str, size: int, objects):
    """A minimal VOC XML file: size and one <object> per (name, box, difficult)."""
    lines = [f"<annotation><filename>{filename}</filename>",
             f"<size><width>{size}</width><height>{size}</height><depth>3</depth></size>"]
    for name, box, difficult in objects:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        lines.append(f"<object><name>{name}</name><difficult>{int(difficult)}</difficult><bndbox><xmin>{x0}"
                     f"</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")
    path.write_text("\n".join(lines + ["</annotation>"]) + "\n")


def world_layouts(n_trainval: int, n_test: int, seed: int):
    """Layouts of the written world: trainval image i in group i % 4 with BIASED_PAIRS[group];
    test without pair preferences; both with OUTLINE_SHARE. Returns {split: [(layout, group or None)]}."""
    trainval, test = seed_stream("trainval", seed), seed_stream("test", seed)
    groups = [i % len(BIASED_PAIRS) for i in range(n_trainval)]
    return {"trainval": [(sample_layout(trainval, biased_pair=BIASED_PAIRS[g], outline_share=OUTLINE_SHARE), g)
                         for g in groups],
            "test": [(sample_layout(test, outline_share=OUTLINE_SHARE), None) for _ in range(n_test)]}


def generate_shapes_dataset(root, n_trainval=1500, n_test=800, size=SIZE, seed=0):
    """Write the world under ROOT/VOCdevkit/VOC2007 (once per setting): JPEGImages, Annotations,
    ImageSets/Main/{trainval,test}.txt, captions.json ({image id: caption}) and generated.json
    (settings, biased pairs, scenes, each trainval image's group), the last written."""
    directory = Path(root) / "VOCdevkit" / "VOC2007"
    settings = {"version": 3, "n_trainval": n_trainval, "n_test": n_test, "size": size, "seed": seed}
    stamp = directory / "generated.json"  # the record a generated world ends with
    if stamp.exists():  # one that does not read is an error naming it: a world of other code is not overwritten
        try:
            record = json.loads(stamp.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise FedMPTError(f"{stamp} is not a generated world's record ({type(error).__name__}: {error}); delete "
                              "it (or the whole generated folder) and run again to generate the world anew.") from None
        if not isinstance(record, dict):
            raise FedMPTError(f"{stamp} holds a JSON {type(record).__name__}, not a generated world's record; delete "
                              "it and run again to generate the world anew.")
        if record.get("settings") == settings:
            return directory
    for sub in ["JPEGImages", "Annotations", "ImageSets/Main"]:
        (directory / sub).mkdir(parents=True, exist_ok=True)
    captions, groups, index = {}, {}, 0
    for split, drawn in world_layouts(n_trainval, n_test, seed).items():
        ids = []
        for layout, group in drawn:
            index += 1
            image_id = f"{index:06d}"
            render(layout, size).save(directory / "JPEGImages" / f"{image_id}.jpg", quality=95)
            write_voc_annotation(directory / "Annotations" / f"{image_id}.xml", f"{image_id}.jpg", size,
                                 voc_objects(layout, size))
            captions[image_id] = describe(layout)
            if group is not None:
                groups[image_id] = group
            ids.append(image_id)
        (directory / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + ("\n" if ids else ""))
    (directory / "captions.json").write_text(json.dumps(captions, indent=0))
    stamp.write_text(json.dumps({  # written last: a half-written world is regenerated
        "settings": settings, "classes": SHAPES_CLASSES, "biased_pairs": BIASED_PAIRS,
        "pair_share": PAIR_SHARE, "pair_completion": PAIR_COMPLETION,
        "outline_share": OUTLINE_SHARE, "outline_width": OUTLINE_WIDTH,
        "scenes": [scene._asdict() for scene in SCENES], "scene_preference": SCENE_PREFERENCE,
        "trainval_groups": groups}))
    return directory


def picture(path, n: int = 8, seed: int = 5):
    """docs/world.png: n pretraining-stream images above n images of the written world."""
    size, pad, label = SIZE, 4, 16
    canvas = Image.new("RGB", (n * (size + pad) + pad, 2 * (size + label) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    rows = [("pretraining stream (what the shapes CLIP saw): filled shapes",
             lambda rng, i: sample_layout(rng), seed_stream("pretraining", seed)),
            (f"the written federated world: each object an outline with share {OUTLINE_SHARE}",
             lambda rng, i: sample_layout(rng, biased_pair=BIASED_PAIRS[i % len(BIASED_PAIRS)],
                                          outline_share=OUTLINE_SHARE), seed_stream("trainval", seed))]
    for row, (title, draw_layout, rng) in enumerate(rows):
        top = row * (size + label)
        draw.text((pad, top + 2), title, fill="black")
        for i in range(n):
            canvas.paste(render(draw_layout(rng, i), size), (pad + i * (size + pad), top + label))
    canvas.save(path)


if __name__ == "__main__":  # python -m shapes.world [PATH]: the picture of the world in the docs
    import sys
    picture(sys.argv[1] if len(sys.argv) > 1 else "docs/world.png")


def load_split(root, split, transform=None, skip_unreadable=False):
    """The offline world's `split` (train: its trainval list), generated into `root` on first use
    (data.DATASETS' loader of shapes): the VOC layout, read by loaders/voc.py."""
    from loaders.voc import VOCDataset
    generate_shapes_dataset(root)
    return VOCDataset(root, "trainval" if split == "train" else split, SHAPES_CLASSES, name="shapes",
                      transform=transform, skip_unreadable=skip_unreadable)
