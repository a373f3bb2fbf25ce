"""A folder dataset of real photographs: regions of the three photos scikit-learn and matplotlib ship.

    python benchmarks/photos.py [--out data/photos] [--seed 0] [--train 600] [--test 300]
    python federate.py --dataset folder --root data/photos     # then train on it like your own data
    python benchmarks/photos.py --picture docs/photos.png       # the boxes and a few images

Three photographs come with packages this project installs: a pagoda above a lake and a dahlia
(`sklearn.datasets.load_sample_image`), and a portrait of Grace Hopper (matplotlib's sample data).
Nine classes are boxes drawn by hand on them (REGIONS). Each 96 px image holds 2-3 different
classes, each a random square crop of its box (48-80 px, mirrored at random) resized to one
32 px cell of a 3 x 3 grid on grey. Training crops come only from the left half of every box,
test crops only from the right half, so no test pixel was seen. Three sites, one photograph each:
an image of site s always holds a class of its photograph. With the shapes CLIP every class name
lies outside its vocabulary (the vocabulary check warns). This world is for measuring, never for
choosing settings: nothing is tuned on it.
"""
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import world_parser, write_world  # noqa: E402

# class -> (photograph, box (left, top, right, bottom) in its pixels)
REGIONS = {"sky": ("china", (350, 0, 640, 170)), "water": ("china", (340, 235, 550, 320)),
           "tree": ("china", (400, 330, 640, 427)), "tower": ("china", (105, 95, 325, 385)),
           "flower": ("flower", (185, 95, 440, 345)), "leaf": ("flower", (0, 0, 170, 330)),
           "face": ("hopper", (190, 140, 360, 330)), "flag": ("hopper", (0, 0, 140, 330)),
           "uniform": ("hopper", (40, 430, 500, 600))}
NAMES = list(REGIONS)
PHOTOS = ["china", "flower", "hopper"]
SITE_CLASSES = [tuple(NAMES.index(c) for c in NAMES if REGIONS[c][0] == photo) for photo in PHOTOS]
SIZE, CELL, CROP = 96, 32, (48, 80)


def load_photos() -> dict:
    """The three photographs as RGB arrays, read from the installed packages (no download)."""
    import matplotlib
    from sklearn.datasets import load_sample_image
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return {"china": load_sample_image("china.jpg"), "flower": load_sample_image("flower.jpg"),
            "hopper": np.asarray(Image.open(hopper).convert("RGB"))}


def half_box(name: str, split: str) -> tuple:
    """The part of a class's box its crops come from: the left half trains, the right half tests."""
    left, top, right, bottom = REGIONS[name][1]
    middle = (left + right) // 2
    return (left, top, middle, bottom) if split == "train" else (middle, top, right, bottom)


def compose(rng, photos, split, classes) -> Image.Image:
    """One image: each class a random crop of its half box, in distinct random cells, on grey."""
    canvas = Image.new("RGB", (SIZE, SIZE), (128, 128, 128))
    for c, cell in zip(classes, rng.choice(9, len(classes), replace=False)):
        left, top, right, bottom = half_box(NAMES[c], split)
        side = int(rng.integers(CROP[0], min(CROP[1], right - left, bottom - top) + 1))
        x, y = int(rng.integers(left, right - side + 1)), int(rng.integers(top, bottom - side + 1))
        crop = Image.fromarray(photos[REGIONS[NAMES[c]][0]][y:y + side, x:x + side]).resize((CELL, CELL), Image.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        canvas.paste(crop, (cell % 3 * CELL, cell // 3 * CELL))
    return canvas


def write(out: Path, seed: int = 0, n_train: int = 600, n_test: int = 300) -> Path:
    photos = load_photos()
    return write_world(out, NAMES, SITE_CLASSES, lambda rng, split, classes: compose(rng, photos, split, classes),
                       seed, n_train, n_test)


def picture(path, seed: int = 0, n: int = 6):
    """docs/photos.png: the three photographs with their boxes (training half blue, test half
    orange), and n training and n test images of the world."""
    photos, rng, height = load_photos(), np.random.default_rng(seed), 180
    shown = []
    for photo in PHOTOS:
        image = Image.fromarray(photos[photo])
        draw = ImageDraw.Draw(image)
        for name in (c for c in NAMES if REGIONS[c][0] == photo):
            for split, colour in (("train", (40, 90, 230)), ("test", (245, 140, 20))):
                draw.rectangle(half_box(name, split), outline=colour, width=4)
            draw.text((REGIONS[name][1][0] + 6, REGIONS[name][1][1] + 6), name, fill=(255, 255, 255))
        shown.append(image.resize((image.width * height // image.height, height)))
    samples = [compose(rng, photos, split, rng.choice(len(NAMES), 3, replace=False))
               for split in ("train", "test") for _ in range(n)]
    width = max(sum(s.width + 4 for s in shown), n * 100) + 4
    canvas = Image.new("RGB", (width, height + 2 * 100 + 12), "white")
    left = 4
    for image in shown:
        canvas.paste(image, (left, 4))
        left += image.width + 4
    for i, sample in enumerate(samples):
        canvas.paste(sample, (4 + i % n * 100, height + 8 + i // n * 100))
    canvas.save(path)


def main(argv=None) -> int:
    parser = world_parser(__doc__, "data/photos")
    parser.add_argument("--picture", metavar="PNG", help="draw the boxes and a few images there instead (docs/photos.png)")
    args = parser.parse_args(argv)
    if args.picture:
        picture(args.picture, args.seed)
        print(f"wrote {args.picture}")
        return 0
    out = write(Path(args.out), args.seed, args.train, args.test)
    print(f"wrote {args.train} training and {args.test} test images to {out} (labels.csv, classes.txt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
