"""The shapes world v3 and the small CLIP pretrained on it (pretrain.py)."""
import hashlib
import json
import random
import shutil

import numpy as np
import pytest
import torch

import data
import metrics
from backbone import FrozenCLIP
from shapes import model as shapes_clip, pretrain
from shapes import world as shapes
from splits import client_splits
from errors import FedMPTError

C = shapes.SHAPES_CLASSES


def label_matrix(layouts) -> np.ndarray:
    """Multi-hot labels (n, C) of layouts."""
    y = np.zeros((len(layouts), len(C)), dtype=bool)
    for i, layout in enumerate(layouts):
        y[i, [C.index(o.kind) for o in layout.objects]] = True
    return y


def pixel_hash(image) -> str:
    return hashlib.sha256(np.asarray(image).tobytes()).hexdigest()


def world_groups(root) -> dict:
    return json.loads((root / "VOCdevkit/VOC2007/generated.json").read_text())["trainval_groups"]


# ---- The generator ------------------------------------------------------------------------
def test_generator_is_deterministic_for_a_seed(tmp_path):
    first = shapes.generate_shapes_dataset(tmp_path / "a", n_trainval=12, n_test=4, seed=3)
    again = shapes.generate_shapes_dataset(tmp_path / "b", n_trainval=12, n_test=4, seed=3)
    other = shapes.generate_shapes_dataset(tmp_path / "c", n_trainval=12, n_test=4, seed=4)
    for name in ["JPEGImages/000005.jpg", "Annotations/000015.xml", "captions.json", "generated.json",
                 "ImageSets/Main/test.txt"]:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    assert (first / "captions.json").read_text() != (other / "captions.json").read_text()
    batch = shapes.pretraining_batch(shapes.seed_stream("pretraining", 0), 8)
    batch_again = shapes.pretraining_batch(shapes.seed_stream("pretraining", 0), 8)
    assert np.array_equal(batch[0], batch_again[0]) and batch[1] == batch_again[1]


def test_images_hold_one_to_four_objects_in_distinct_cells_with_full_captions():
    rng = shapes.seed_stream("test", 0)
    layouts = [shapes.sample_layout(rng) for _ in range(500)]
    counts = [len(layout.objects) for layout in layouts]
    assert min(counts) == 1 and max(counts) == 4
    assert all(len({o.cell for o in layout.objects}) == len(layout.objects) for layout in layouts)
    y = label_matrix(layouts)
    assert (y.mean(0) > 0.1).all()  # every class is common
    layout = layouts[0]
    caption = shapes.describe(layout)
    for o in layout.objects:
        assert f"{o.size} {o.colour} {o.kind} {shapes.POSITIONS[o.cell]}" in caption
    assert caption.endswith(f"{shapes.SCENES[layout.scene].name} background.")
    assert shapes.render(layout).size == (shapes.SIZE, shapes.SIZE)


def test_pretraining_captions_name_some_objects_and_drop_words():
    rng = random.Random(0)
    layout = shapes.sample_layout(shapes.seed_stream("test", 0), scene=2)
    while len(layout.objects) < 3:
        layout = shapes.sample_layout(rng, scene=2)
    captions = [shapes.sample_caption(layout, rng) for _ in range(300)]
    named = [sum(o.kind in caption for o in layout.objects) for caption in captions]
    assert min(named) == 1 and max(named) == len(layout.objects)
    assert any("background" in c for c in captions) and any("background" not in c for c in captions)
    assert any(c.startswith("a photo of") for c in captions)
    assert len(set(captions)) > 100  # drawn anew each time


def test_scenes_prefer_their_kinds():
    rng = shapes.seed_stream("test", 1)
    for scene, (_, preferred) in enumerate(shapes.SCENES):
        y = label_matrix([shapes.sample_layout(rng, scene) for _ in range(300)])
        shares = y.mean(0)
        assert all(shares[C.index(kind)] > 0.35 for kind in preferred)
        assert np.median(shares) < 0.25


def test_biased_pairs_cooccur_in_their_group_and_not_in_test(shapes_root):
    train = data.load_dataset("shapes", shapes_root, "train")
    test = data.load_dataset("shapes", shapes_root, "test")
    assert set(train.targets.unique().tolist()) <= {0, 1}  # no object is "difficult"
    y, y_test = (train.targets == 1).numpy(), (test.targets == 1).numpy()
    groups = world_groups(shapes_root)
    group = np.array([groups[path.stem] for path in train.images])
    stamp = json.loads((shapes_root / "VOCdevkit/VOC2007/generated.json").read_text())
    assert [tuple(pair) for pair in stamp["biased_pairs"]] == shapes.BIASED_PAIRS
    for g, (a, b) in enumerate(shapes.BIASED_PAIRS):
        a, b, mine = C.index(a), C.index(b), group == g
        assert (y[mine, a] & y[mine, b]).sum() / y[mine, a].sum() > 0.85  # P(b | a) in the group
        assert (y[mine, a] & y[mine, b]).sum() / y[mine, b].sum() > 0.85  # P(a | b)
        assert (y[~mine, a] & y[~mine, b]).mean() < 0.02  # elsewhere they rarely meet
        both, a_only, b_only = (y_test[:, a] & y_test[:, b]).sum(), (y_test[:, a] & ~y_test[:, b]).sum(), \
            (~y_test[:, a] & y_test[:, b]).sum()
        assert both >= 10 and a_only >= 80 and b_only >= 80, (both, a_only, b_only)
        assert both / (both + a_only) < 0.3  # test: P(b | a) near P(b), not 0.9


def test_kmeans_split_puts_each_pair_on_its_own_client(shapes_root):
    train = data.load_dataset("shapes", shapes_root, "train")
    groups = world_groups(shapes_root)
    group = np.array([groups[path.stem] for path in train.images])
    splits = client_splits(train.targets, 4, 1.0, seed=0)
    owner = []
    for g in range(len(shapes.BIASED_PAIRS)):
        per_client = [int((group[split] == g).sum()) for split in splits]
        owner.append(int(np.argmax(per_client)))
        assert max(per_client) > 0.9 * (group == g).sum(), per_client
    assert sorted(owner) == [0, 1, 2, 3]  # different pairs on different clients


def test_pretraining_images_never_equal_federated_or_test_images():
    world = shapes.world_layouts(1500, 800, seed=0)
    federated = {pixel_hash(shapes.render(layout)) for split in world.values() for layout, _ in split}
    rng = shapes.seed_stream("pretraining", 0)
    pretraining = {pixel_hash(image) for _ in range(24) for image in shapes.pretraining_batch(rng, 128)[0]}
    assert len(federated) == 2300 and len(pretraining) == 24 * 128  # all distinct
    assert not federated & pretraining


def test_written_world_draws_outlines_the_pretraining_stream_never():
    """The shift that gives federated tuning room: about OUTLINE_SHARE of the written world's
    objects are outlines (a rim: far fewer pixels in the object's colour than when filled); the
    pretraining stream draws every object filled."""
    written = [layout for split in shapes.world_layouts(300, 200, seed=0).values() for layout, _ in split]
    objects = [o for layout in written for o in layout.objects]
    share = np.mean([o.outline for o in objects])
    assert abs(share - shapes.OUTLINE_SHARE) < 0.05, share
    rng = shapes.seed_stream("pretraining", 0)
    assert not any(o.outline for _ in range(200) for o in shapes.sample_layout(rng).objects)
    layout = next(layout for layout in written if any(o.outline for o in layout.objects))
    o = next(o for o in layout.objects if o.outline)
    def coloured_pixels(placed):
        lone = layout._replace(objects=[placed])
        return int((np.abs(np.asarray(shapes.render(lone), dtype=int) - shapes.COLOURS[o.colour]).sum(-1) == 0).sum())
    assert 0 < coloured_pixels(o) < 0.7 * coloured_pixels(o._replace(outline=False))


# ---- The shipped CLIP ---------------------------------------------------------------------
def test_shipped_weights_match_their_record_and_recognise_shapes_zero_shot():
    record = json.loads(shapes_clip.WEIGHTS.with_suffix(".json").read_text())
    assert hashlib.sha256(shapes_clip.WEIGHTS.read_bytes()).hexdigest() == record["sha256"]
    assert shapes_clip.WEIGHTS.stat().st_size < 20 * 2 ** 20
    assert tuple(record["architecture"][:2]) == shapes_clip.SHAPES_ARCHITECTURE[:2]
    model = shapes_clip.load_shapes_clip()
    assert not model.training and model.token_embedding.weight.dtype == torch.float32
    # A fresh test set: the test stream of seed 2 (pretraining uses only its own stream).
    assert pretrain.zero_shot_map(model, n_images=300, seed=2) > 55


def test_shipped_clip_zero_shot_on_the_written_world_leaves_room_to_learn():
    """On the written (outlined) test split the backbone is well above the label prior and
    well below its own pretraining stream: between 60 and 85 mAP."""
    model = shapes_clip.load_shapes_clip()
    layouts = [layout for layout, _ in shapes.world_layouts(0, 400, seed=0)["test"]]
    images = pretrain.image_tensor(np.stack([np.asarray(shapes.render(layout)) for layout in layouts]))
    targets = torch.as_tensor(label_matrix(layouts)).long()
    score = metrics.multilabel_metrics(pretrain.zero_shot_scores(model, images), targets)["mAP"]
    assert 60 < score < 85, score


def test_shapes_clip_gives_one_region_token_per_grid_cell():
    backbone = FrozenCLIP(shapes_clip.load_shapes_clip())
    images, _ = pretrain.held_out_images(2, seed=2)
    v, P = backbone.encode_image_tokens(images)
    assert v.shape == (2, 128) and P.shape == (2, 9, 128)


def test_loader_refuses_missing_or_damaged_weights(tmp_path):
    with pytest.raises(FedMPTError, match="not found"):
        shapes_clip.load_shapes_clip(tmp_path / "nothing.pt")
    path = tmp_path / "copy.pt"
    shutil.copy(shapes_clip.WEIGHTS, path)
    shutil.copy(shapes_clip.WEIGHTS.with_suffix(".json"), path.with_suffix(".json"))
    damaged = bytearray(path.read_bytes())
    damaged[-100] ^= 1
    path.write_bytes(bytes(damaged))
    with pytest.raises(FedMPTError, match="sha256"):
        shapes_clip.load_shapes_clip(path)


def test_saved_weights_rebuild_untouched_token_rows_from_the_seed(tmp_path):
    model = shapes_clip.new_model(seed=5)
    with torch.no_grad():
        model.token_embedding.weight[[7, 300]] += 1.0  # as if training touched two rows
        model.visual.conv1.weight.mul_(2)
    path = tmp_path / "w.pt"
    sha256 = shapes_clip.save_weights(model, path, seed=5)
    path.with_suffix(".json").write_text(json.dumps({"sha256": sha256}))
    assert torch.load(path)["token_rows"].tolist() == [7, 300]
    loaded = shapes_clip.load_shapes_clip(path).state_dict()
    expected = {name: t.half().float() if t.is_floating_point() else t for name, t in model.state_dict().items()}
    expected["token_embedding.weight"] = shapes_clip.new_model(seed=5).token_embedding.weight.detach().clone()
    expected["token_embedding.weight"][[7, 300]] = model.token_embedding.weight[[7, 300]].detach().half().float()
    for name, tensor in expected.items():  # fp16 everywhere but the untouched rows: the exact seeded values
        assert torch.equal(loaded[name], tensor), name


def test_pretraining_is_deterministic_for_a_seed(tmp_path):
    cfg = pretrain.PretrainConfig(steps=3, batch_size=16, warmup=2, eval_every=3, eval_images=24)
    (first, curve), (second, _) = pretrain.pretrain(cfg), pretrain.pretrain(cfg)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    assert len(curve["loss"]) == 3 and curve["eval"][0][0] == 3
    pretrain.plot_curve(curve, tmp_path / "curve.png", "test")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
