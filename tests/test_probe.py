"""benchmarks/probe.py: the linear-probe reference, C chosen on validation images only."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import probe  # noqa: E402
from tests.test_folder import write_folder  # noqa: E402

ROWS = [(f"site/{i}.png", labels, "train" if i < 24 else "test", "") for i, labels in
        enumerate(["red", "green", "blue", "red|green", "green|blue", "red|blue"] * 5)]


def test_probe_chooses_c_on_validation_and_reads_the_test_split_once(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "colours", rows=ROWS, header="image,labels,split")
    evaluated = []
    fit = probe.fit_scores

    def spy(x_train, y_train, x_eval, C, seed):
        evaluated.append(len(x_eval))
        return fit(x_train, y_train, x_eval, C, seed)
    monkeypatch.setattr(probe, "fit_scores", spy)
    assert probe.main(["--dataset", "folder", "--root", str(root), "--out", str(tmp_path / "out"), "--val", "0.25"]) == 0
    result = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert evaluated == [6] * len(probe.C_GRID) + [6]  # the sweep on 6 validation images, then the test once
    sweep = {float(C): m for C, m in result["validation_mAP"].items()}
    assert result["C"] == max(sweep, key=lambda C: (sweep[C], -C))
    assert result["probe"]["mAP"] > result["label_prior_mAP"] + 20  # stripes of colour: the features hold them

    compare = tmp_path / "compare"
    compare.mkdir()
    (compare / "compare.json").write_text(json.dumps({"fedmpt": {"final": [{"mAP": 80.0}, {"mAP": 90.0}]}}))
    shares = probe.gain_shares(result, compare)
    prior, best = result["label_prior_mAP"], result["probe"]["mAP"]
    assert np.isclose(shares["fedmpt"]["share"], (85.0 - prior) / (best - prior))
    assert probe.main(["--dataset", "folder", "--root", str(root), "--val", "1.5", "--out", str(tmp_path / "x")]) == 2

    # the same probe on the region features, concatenated: N times the width, the same prior and zero-shot
    assert probe.main(["--dataset", "folder", "--root", str(root), "--out", str(tmp_path / "patches"), "--val", "0.25",
                       "--features", "patches"]) == 0
    patches = json.loads((tmp_path / "patches" / "probe.json").read_text())
    assert patches["features"] == "patches" and patches["probe"]["mAP"] > patches["label_prior_mAP"] + 20
    assert (patches["zero_shot_mAP"], patches["label_prior_mAP"]) == (result["zero_shot_mAP"], result["label_prior_mAP"])


@pytest.mark.parametrize("world", ["digits", "photos"])
def test_real_image_worlds_read_as_folder_datasets_with_skewed_sites_and_unseen_test_pixels(tmp_path, world):
    """benchmarks/digits.py and photos.py: real images a package ships, 2-3 different classes an
    image, three sites whose images always hold one of their classes, and test images composed
    only from held-out scans (digits) or the held-out half of every box (photos)."""
    import digits
    import photos
    from loaders.folder import FolderDataset
    module, site_classes = {"digits": (digits, digits.SITE_DIGITS), "photos": (photos, photos.SITE_CLASSES)}[world]
    root = module.write(tmp_path / world, seed=0, n_train=60, n_test=30)
    train, test = FolderDataset(root, "train"), FolderDataset(root, "test")
    assert train.classes == module.NAMES and len(train) == 60 and len(test) == 30
    counts = np.asarray(train.targets).sum(1)
    assert counts.min() >= 2 and counts.max() <= 3
    for site, indices in train.natural_clients:
        held = np.asarray(train.targets)[indices][:, list(site_classes[int(site.split("-")[1])])]
        assert held.any(1).all(), site
    assert len(train.natural_clients) == 3
    assert train[0][0].size == (96, 96)
    if world == "digits":
        halves = digits.scan_halves(1797, seed=0)
        assert not set(halves["train"]) & set(halves["test"]) and len(halves["train"]) + len(halves["test"]) == 1797
        return
    pictures = photos.load_photos()
    for name, (photo, (left, top, right, bottom)) in photos.REGIONS.items():
        height, width = pictures[photo].shape[:2]
        assert 0 <= left < right <= width and 0 <= top < bottom <= height, name
        train_box, test_box = photos.half_box(name, "train"), photos.half_box(name, "test")
        assert train_box[2] <= test_box[0], name  # the halves share no pixel column
        for box in (train_box, test_box):  # every crop size the composer may draw fits
            assert min(box[2] - box[0], box[3] - box[1]) >= photos.CROP[0], name


def test_sweep_chooses_on_validation_and_never_shows_the_test_split(tmp_path, monkeypatch):
    """benchmarks/sweep.py: the value with the best final validation mAP (mean over seeds) wins,
    even where another has the better test mAP; the table shows validation and clipping only."""
    import sweep
    def fake_run(name, options, seed, out, env=None):
        value = float(options[options.index("--lr") + 1])
        val, test = {0.01: (70.0, 90.0), 0.1: (80.0 + seed, 60.0)}[value]
        row = {"round": 1, "val_mAP": val, "mAP": test, "clip_share": 0.5 if value == 0.01 else 0.0, "grad_norm": 3.0}
        return [{"round": 0, "mAP": 10.0}, row]
    monkeypatch.setattr(sweep, "run_once", fake_run)
    assert sweep.main(["--option", "lr", "--values", "0.01", "0.1", "--seeds", "0", "1", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "sweep.md").read_text()
    assert "chosen: 0.1" in table and "| 0.1 **←** | 80.50 ± 0.50 |" in table and "| 50% |" in table
    assert "90.00" not in table and "60.00" not in table
    assert json.loads((tmp_path / "sweep.json").read_text())["fedmpt"]["0.1"]["val_mAP"] == [80.0, 81.0]


def test_compare_counts_vit_parameters_with_the_model_options_it_was_given():
    """compare.py's ViT-B/16 column: the model options after -- (e.g. --class-ctx) reach the
    count, the data and training options do not (it counts for VOC's classes)."""
    import compare
    extra = ["--dataset", "folder", "--root", "data/photos", "--class-ctx", "4", "--lr=0.03", "--n-ctx=8", "--loss", "bce"]
    assert compare.model_options(extra) == ["--class-ctx", "4", "--n-ctx=8"]
