"""Pretrain the small CLIP of the shapes world (offline, CPU).

    python -m shapes.pretrain [--steps 2400 --seed 0 --out shapes/weights/shapes_clip.pt]

Contrastive (image, caption) training, the symmetric cross-entropy of CLIP, on pairs that
world.pretraining_batch draws fresh for every step from its own seed stream (no federated or
test image is ever seen). What makes the small ResNet tower learn shapes rather than colours
and backgrounds: captions drawn anew each time and naming only some objects, their colour,
size and position words often left out; every other batch drawn from a single scene.

How the weights ship and load: shapes/model.py (no weight decay on the token embedding, so the
rows no caption touched keep their seeded values and need not ship).
"""
import argparse
import dataclasses
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # raised inside clip
import clip  # noqa: E402
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import metrics
from shapes import world
from shapes.model import SHAPES_ARCHITECTURE, load_shapes_clip, new_model, save_weights


@dataclass
class PretrainConfig:
    steps: int = 2400
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1  # on weight matrices only (not the token embedding)
    warmup: int = 100  # linear warm-up steps, then cosine to 0
    one_scene_every: int = 2  # every 2nd batch from a single scene
    eval_every: int = 300
    eval_images: int = 500  # zero-shot mAP on test-stream images of seed `eval_seed`
    eval_seed: int = 1
    seed: int = 0
    threads: int = 0  # torch threads; 0: torch's default (one per core)
    out: str = "shapes/weights/shapes_clip.pt"
    plot: str = "docs/pretrain-curve.png"


def image_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> CLIP-normalised float (B, 3, H, W), as data.clip_transform."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(data.CLIP_MEAN)[:, None, None]) / torch.tensor(data.CLIP_STD)[:, None, None]


# ---- Zero-shot evaluation -----------------------------------------------------------------
@torch.no_grad()
def zero_shot_scores(model: clip.model.CLIP, images: torch.Tensor) -> torch.Tensor:
    """Cosine of each image (B, 3, H, W) with "a photo of a {class}." -> (B, C). Encodes in
    eval mode (BatchNorm statistics) and restores the model's mode."""
    was_training = model.training
    model.eval()
    prompts = clip.tokenize([f"a photo of a {name}." for name in world.SHAPES_CLASSES],
                            context_length=model.context_length)
    text = F.normalize(model.encode_text(prompts), dim=-1)  # (C, D)
    image = F.normalize(torch.cat([model.encode_image(x) for x in images.split(256)]), dim=-1)  # (B, D)
    model.train(was_training)
    return image @ text.T


def held_out_images(n_images: int, seed: int):
    """Images (B, 3, H, W) and targets (B, C) of the test stream of `seed`: the first images
    of the written world's test split for that seed, without JPEG compression."""
    rng = world.seed_stream("test", seed)
    layouts = [world.sample_layout(rng) for _ in range(n_images)]
    images = np.stack([np.asarray(world.render(layout)) for layout in layouts])  # (B, H, W, 3)
    targets = torch.zeros(n_images, len(world.SHAPES_CLASSES), dtype=torch.long)  # (B, C)
    for i, layout in enumerate(layouts):
        targets[i, [world.SHAPES_CLASSES.index(o.kind) for o in layout.objects]] = 1
    return image_tensor(images), targets


def zero_shot_map(model: clip.model.CLIP, n_images: int = 500, seed: int = 1) -> float:
    """Zero-shot class mAP (percent) on `n_images` fresh test-stream images of `seed`."""
    images, targets = held_out_images(n_images, seed)
    return metrics.multilabel_metrics(zero_shot_scores(model, images), targets)["mAP"]


# ---- Training -----------------------------------------------------------------------------
def pretrain(cfg: PretrainConfig):
    """Returns the trained model and its curve {"loss": [per step], "eval": [(step, mAP)]}."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = new_model(cfg.seed).train()
    decayed = {name for name, p in model.named_parameters() if p.ndim >= 2} - {"token_embedding.weight"}
    matrices = [p for name, p in model.named_parameters() if name in decayed]
    others = [p for name, p in model.named_parameters() if name not in decayed]
    optimiser = torch.optim.AdamW([{"params": matrices, "weight_decay": cfg.weight_decay},
                                   {"params": others, "weight_decay": 0.0}], lr=cfg.lr)
    def schedule(step):
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, schedule)
    rng, curve = world.seed_stream("pretraining", cfg.seed), {"loss": [], "eval": []}
    labels = torch.arange(cfg.batch_size)
    progress = tqdm(range(cfg.steps), desc="pretrain", mininterval=5)
    for step in progress:
        scene = rng.randrange(len(world.SCENES)) if step % cfg.one_scene_every == 0 else None
        images, captions = world.pretraining_batch(rng, cfg.batch_size, scene)
        texts = clip.tokenize(captions, context_length=model.context_length, truncate=True)  # (B, M)
        logits_per_image, logits_per_text = model(image_tensor(images), texts)  # (B, B) each
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as CLIP: temperature at most 1/100
        curve["loss"].append(loss.item())
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            curve["eval"].append((step + 1, zero_shot_map(model, cfg.eval_images, cfg.eval_seed)))
            progress.write(f"step {step + 1}: loss {np.mean(curve['loss'][-50:]):.3f}, "
                           f"zero-shot mAP {curve['eval'][-1][1]:.1f}")
    return model.eval(), curve


def plot_curve(curve: dict, path, title: str):
    """Loss per step (and its 50-step mean) beside zero-shot mAP at each evaluation, as PNG."""
    from matplotlib.figure import Figure  # drawn with Agg, no display
    figure = Figure(figsize=(9, 3.4))
    loss_axes, map_axes = figure.subplots(1, 2)
    loss = np.array(curve["loss"])
    smooth = np.convolve(loss, np.ones(50) / 50, mode="valid")
    loss_axes.plot(loss, color="0.8", linewidth=0.6, label="per step")
    loss_axes.plot(np.arange(49, 49 + len(smooth)), smooth, label="50-step mean")
    loss_axes.set(xlabel="step", ylabel="contrastive loss", title="loss")
    loss_axes.legend()
    steps, maps = zip(*curve["eval"])
    map_axes.plot(steps, maps, marker="o")
    map_axes.set(xlabel="step", ylabel="mAP (%)", title="zero-shot class mAP", ylim=(0, 100))
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def record_text(record: dict) -> str:
    """JSON with one key a line."""
    return "{\n" + ",\n".join(f" {json.dumps(key)}: {json.dumps(value)}" for key, value in record.items()) + "\n}\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for field in dataclasses.fields(PretrainConfig):
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default),
                            default=field.default)
    cfg = PretrainConfig(**vars(parser.parse_args(argv)))
    print(json.dumps(dataclasses.asdict(cfg)))
    start = time.time()
    model, curve = pretrain(cfg)
    minutes = (time.time() - start) / 60
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sha256 = save_weights(model, out, cfg.seed)
    out.with_suffix(".json").write_text(json.dumps({"sha256": sha256}))  # so the loader accepts it
    shipped = load_shapes_clip(out)
    record = {
        "sha256": sha256,
        "command": "python -m shapes.pretrain " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": dataclasses.asdict(cfg), "training_minutes": round(minutes, 1), "steps": cfg.steps,
        "architecture": SHAPES_ARCHITECTURE, "region_tokens": (world.SIZE // 32) ** 2,
        "zero_shot_mAP": round(zero_shot_map(shipped, cfg.eval_images, cfg.eval_seed), 2),
        "zero_shot_mAP_test_split_seed0": round(zero_shot_map(shipped, 800, 0), 2),
        "curve_eval": [[step, round(value, 2)] for step, value in curve["eval"]], "torch": torch.__version__}
    out.with_suffix(".json").write_text(record_text(record))
    Path(cfg.plot).parent.mkdir(parents=True, exist_ok=True)
    plot_curve(curve, cfg.plot, f"shapes CLIP, {cfg.steps} steps, {minutes:.1f} min; shipped zero-shot mAP "
                                f"{record['zero_shot_mAP']:.1f} (seed {cfg.eval_seed} test stream)")
    print(json.dumps({k: record[k] for k in ["sha256", "training_minutes", "zero_shot_mAP",
                                             "zero_shot_mAP_test_split_seed0"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
