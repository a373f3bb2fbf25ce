"""The VOC loader, the generated shapes world and the clustering-based client split."""
import json

import numpy as np
import pytest
import torch

from loaders.voc import VOC_CLASSES
import data
from shapes import world as shapes
from splits import client_splits, kmeans
from errors import FedMPTError

XML = """<annotation><filename>{i}.jpg</filename>{objects}</annotation>"""
OBJECT = "<object><name>{name}</name><difficult>{difficult}</difficult></object>"


def write_voc(root, annotations, split="trainval"):
    """A tiny VOCdevkit: one grey JPEG and one XML per image id."""
    from PIL import Image
    base = root / "VOCdevkit" / "VOC2007"
    for sub in ["JPEGImages", "Annotations", "ImageSets/Main"]:
        (base / sub).mkdir(parents=True, exist_ok=True)
    for image_id, objects in annotations.items():
        Image.new("RGB", (40, 30), (128, 128, 128)).save(base / "JPEGImages" / f"{image_id}.jpg")
        body = "".join(OBJECT.format(name=n, difficult=d) for n, d in objects)
        (base / "Annotations" / f"{image_id}.xml").write_text(XML.format(i=image_id, objects=body))
    (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(annotations) + "\n")
    return base


def test_voc_targets_mark_difficult_only_classes_as_ignored(tmp_path):
    write_voc(tmp_path, {
        "000001": [("dog", 0), ("person", 0), ("person", 1)],  # multi-object, person also difficult
        "000002": [("cat", 1)],  # difficult only -> -1
        "000003": [("cat", 1), ("cat", 0), ("tvmonitor", 0)],  # one clear cat is enough -> 1
    })
    ds = data.load_dataset("voc2007", tmp_path, "train")
    index = VOC_CLASSES.index
    expected = torch.zeros(3, 20, dtype=torch.long)
    expected[0, index("dog")] = expected[0, index("person")] = 1
    expected[1, index("cat")] = -1
    expected[2, index("cat")] = expected[2, index("tvmonitor")] = 1
    assert torch.equal(ds.targets, expected)
    image, target = ds[1]
    assert image.size == (40, 30) and torch.equal(target, expected[1])


def test_voc_missing_parts_are_named(tmp_path):
    write_voc(tmp_path, {"000001": [("dog", 0)]}, split="trainval")
    with pytest.raises(FedMPTError, match=r"test\.txt.*VOCtest_06-Nov-2007"):
        data.load_dataset("voc2007", tmp_path, "test")
    with pytest.raises(FedMPTError, match="JPEGImages"):
        data.load_dataset("voc2007", tmp_path / "nowhere", "train")


def test_voc_malformed_annotation_names_the_file(tmp_path):
    base = write_voc(tmp_path, {"000001": [("dog", 0)], "000002": [("unicorn", 0)]})
    with pytest.raises(FedMPTError, match=r"000002\.xml.*unicorn"):
        data.load_dataset("voc2007", tmp_path, "train")
    (base / "Annotations" / "000002.xml").write_text("<annotation><object>")
    with pytest.raises(FedMPTError, match=r"000002\.xml.*malformed"):
        data.load_dataset("voc2007", tmp_path, "train")


def test_unreadable_image_names_the_file(tmp_path):
    base = write_voc(tmp_path, {"000001": [("dog", 0)]})
    (base / "JPEGImages" / "000001.jpg").write_bytes(b"not a jpeg")
    ds = data.load_dataset("voc2007", tmp_path, "train")
    with pytest.raises(FedMPTError, match=r"000001\.jpg"):
        ds[0]


def test_shapes_world_is_read_by_the_voc_loader_and_deterministic(shapes_root, tmp_path):
    train = data.load_dataset("shapes", shapes_root, "train")
    test = data.load_dataset("shapes", shapes_root, "test")
    assert (len(train), len(test)) == (1500, 800) and train.classes == shapes.SHAPES_CLASSES
    positives = (train.targets == 1).sum(1)
    assert positives.min() >= 1 and positives.max() >= 3  # several objects an image
    image, _ = train[0]
    assert image.size == (shapes.SIZE, shapes.SIZE)
    again = shapes.generate_shapes_dataset(tmp_path, n_trainval=20, n_test=5, seed=0)
    first = (shapes_root / "VOCdevkit/VOC2007/Annotations/000007.xml").read_text()
    assert (again / "Annotations/000007.xml").read_text() == first
    captions = json.loads((shapes_root / "VOCdevkit/VOC2007/captions.json").read_text())
    assert len(captions) == 2300 and captions["000007"] in captions.values()


def test_shapes_scenes_make_label_cooccurrence_skewed(shapes_root):
    y = (data.load_dataset("shapes", shapes_root, "test").targets == 1).float()
    together = (y.T @ y) / len(y)  # P(a and b)
    independent = torch.outer(y.mean(0), y.mean(0))
    pairs = [tuple(shapes.SHAPES_CLASSES.index(n) for n in scene.preferred) for scene in shapes.SCENES]
    lift_pairs = np.mean([float(together[a, b] / independent[a, b]) for a, b in pairs])
    assert lift_pairs > 1.5  # scene partners occur together far more than chance


def test_client_split_conserves_samples_and_t1_keeps_clusters(shapes_root):
    targets = data.load_dataset("shapes", shapes_root, "train").targets
    labels = kmeans((targets == 1).float().numpy(), 4, seed=0)
    for t in [1.0, 0.5, 0.1]:
        splits = client_splits(targets, 4, t, seed=0)
        flat = sorted(i for s in splits for i in s)
        assert flat == list(range(len(targets)))  # each sample in exactly one client
    for client, split in enumerate(client_splits(targets, 4, 1.0, seed=0)):
        assert len(set(labels[split])) == 1  # t = 1: a client is one cluster


def test_client_split_rejects_bad_options(shapes_root):
    targets = data.load_dataset("shapes", shapes_root, "train").targets
    with pytest.raises(FedMPTError, match="heterogeneity"):
        client_splits(targets, 4, 0.0)
    with pytest.raises(FedMPTError, match="clients"):
        client_splits(targets, 10_000, 1.0)
