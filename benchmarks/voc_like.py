"""A VOC-sized stand-in for the GPU dress rehearsal: random 500 x 375 JPEGs with VOC2007's
classes, in the VOC layout (JPEGImages, Annotations, ImageSets/Main/{trainval,test}.txt).

    python benchmarks/voc_like.py DIR [--trainval 1000 --test 1000 --seed 0]

The pixels are noise with a few coloured boxes: the point is the cost of real-size images
through the real pipeline (decoding, CLIP's preprocessing, the feature store), not accuracy.
"""
import argparse
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loaders.voc import VOC_CLASSES  # noqa: E402
from shapes.world import write_voc_annotation  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("--trainval", type=int, default=1000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    directory = Path(args.root) / "VOCdevkit" / "VOC2007"
    for sub in ["JPEGImages", "Annotations", "ImageSets/Main"]:
        (directory / sub).mkdir(parents=True, exist_ok=True)
    rng, index = random.Random(args.seed), 0
    noise = np.random.default_rng(args.seed)
    for split, count in [("trainval", args.trainval), ("test", args.test)]:
        ids = []
        for _ in range(count):
            index += 1
            image_id = f"{index:06d}"
            image = Image.fromarray(noise.integers(0, 256, (375, 500, 3), dtype=np.uint8))
            draw, objects = ImageDraw.Draw(image), []
            for name in rng.sample(VOC_CLASSES, rng.randint(1, 3)):
                x0, y0 = rng.randint(0, 350), rng.randint(0, 225)
                box = (x0, y0, x0 + rng.randint(50, 150), y0 + rng.randint(50, 150))
                draw.rectangle(box, fill=tuple(rng.randint(0, 255) for _ in range(3)))
                objects.append((name, box, False))
            image.save(directory / "JPEGImages" / f"{image_id}.jpg", quality=90)
            write_voc_annotation(directory / "Annotations" / f"{image_id}.xml", f"{image_id}.jpg", 500, objects)
            ids.append(image_id)
        (directory / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    print(f"wrote {args.trainval} + {args.test} images under {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
