"""The protocol switches, off by default: --clients-by scene, --min-labels, --label-mask, --validation."""
import dataclasses
import json

import pytest
import torch

import data
import evaluation
import experiment
import federate
import metrics
import options
import predict
import splits
from conftest import build_experiment
from errors import FedMPTError
from options import ModelConfig
from tests.test_remote_sensing import write_mlrsnet, write_multiscene


def test_scene_splits_deal_whole_scenes_largest_first_to_the_smallest_site():
    scenes = ["a"] * 6 + ["b"] * 5 + ["c"] * 3 + ["d"] * 2
    sites, names = splits.scene_splits(scenes, 2)
    assert [sorted({scenes[i] for i in site}) for site in sites] == [["a", "d"], ["b", "c"]]
    assert sorted(i for site in sites for i in site) == list(range(len(scenes)))
    assert names == ["a +1", "b +1"]
    with pytest.raises(FedMPTError, match="4 scenes"):
        splits.scene_splits(scenes, 5)


def test_keep_min_labels_filters_and_names_the_option(tmp_path):
    dataset = data.load_dataset("mlrsnet", write_mlrsnet(tmp_path), "train")
    counts = (dataset.targets == 1).sum(1)
    kept = data.keep_min_labels(dataset, 2)
    assert len(kept) == int((counts >= 2).sum()) and ((kept.targets == 1).sum(1) >= 2).all()
    assert kept.scenes == [s for s, c in zip(dataset.scenes, counts) if c >= 2]
    assert data.keep_min_labels(dataset, 0) is dataset
    with pytest.raises(FedMPTError, match="--min-labels 3"):
        data.keep_min_labels(dataset, 3)


def test_mask_positives_drops_only_positives_at_the_rate_and_by_the_seed():
    targets = torch.randint(-1, 2, (400, 30))
    masked = data.mask_positives(targets, 0.3, seed=4)
    changed = masked != targets
    assert (targets[changed] == 1).all() and (masked[changed] == -1).all()
    assert abs(changed.sum().item() / (targets == 1).sum().item() - 0.3) < 0.03
    assert torch.equal(masked, data.mask_positives(targets, 0.3, seed=4))
    assert not torch.equal(masked, data.mask_positives(targets, 0.3, seed=5))
    assert data.mask_positives(targets, 0.0, seed=4) is targets


def test_label_mask_reaches_training_only_and_every_engine_alike(tmp_path):
    root = write_mlrsnet(tmp_path / "mlrsnet", per_scene=20)
    cfg = options.Config(dataset="mlrsnet", root=str(root), clients=2, label_mask=0.5, seed=3,
                            cache_dir=str(tmp_path / "cache"), workers=0)
    whole = build_experiment(cfg, ModelConfig())
    train, test = (data.load_dataset("mlrsnet", root, split) for split in ("train", "test"))
    assert torch.equal(whole.test[1], test.targets)  # test labels are never masked
    masked = whole.train[1] != train.targets
    assert masked.any() and (train.targets[masked] == 1).all() and (whole.train[1][masked] == -1).all()
    experiment.save_run_directory(whole, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["masked_positives"] == int(masked.sum())
    node = experiment.prepare(*experiment.resolve(cfg, ModelConfig()))
    _, node_targets = experiment.training_inputs(node, node.splits[1])  # what a Flower SuperNode trains on
    assert torch.equal(node_targets, whole.train[1][whole.splits[1]])


def test_clients_by_scene_runs_end_to_end_and_is_refused_without_scenes(tmp_path, capsys):
    root = write_mlrsnet(tmp_path / "mlrsnet")
    out = tmp_path / "run"
    assert federate.main(["--dataset", "mlrsnet", "--root", str(root), "--clients-by", "scene", "--clients", "2",
                          "--rounds", "1", "--batch-size", "8", "--out", str(out), "--workers", "0"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert sorted(config["client_names"]) == ["airport", "harbor"] and config["client_sizes"] == [8, 8]
    assert config["clients_by"] == "scene"
    lines = [(f"m{i}", "1,0,1") for i in range(4)]
    multiscene = write_multiscene(tmp_path / "ms", {"Tra.csv": lines, "Test.csv": lines})
    assert federate.main(["--dataset", "multiscene", "--root", str(multiscene), "--clients-by", "scene",
                          "--out", str(tmp_path / "refused")]) == 2
    assert "--clients-by scene: multiscene does not name each image's scene" in capsys.readouterr().err
    assert federate.main(["--label-mask", "1.0", "--out", str(tmp_path / "bad")]) == 2


def test_validation_holds_out_training_images_from_every_client_and_is_scored_each_round(tmp_path):
    root = write_mlrsnet(tmp_path / "mlrsnet", per_scene=20)  # 32 training images
    cfg = options.Config(dataset="mlrsnet", root=str(root), clients=2, validation=0.25, seed=1,
                            cache_dir=str(tmp_path / "cache"), workers=0)
    exp = build_experiment(cfg, ModelConfig())
    held_out = set(exp.validation)
    assert len(held_out) == 8 and (len(exp.train_set) - 8, len(exp.test_set)) == (24, 8)
    assert sorted(i for s in exp.splits for i in s) == sorted(set(range(32)) - held_out)
    assert build_experiment(cfg, ModelConfig()).validation == exp.validation  # seeded
    assert splits.hold_out(32, 0.25, 2)[0] != exp.validation
    row = evaluation.evaluate_global(exp)
    assert {"val_mAP", "val_CF1", "val_OF1"} <= set(row) and 0 <= row["val_mAP"] <= 100
    assert "val_mAP" not in evaluation.evaluate_global(
        build_experiment(dataclasses.replace(cfg, validation=0.0), ModelConfig()))
    out = tmp_path / "run"
    assert federate.main(["--dataset", "mlrsnet", "--root", str(root), "--clients", "2", "--rounds", "1",
                          "--validation", "0.25", "--batch-size", "8", "--workers", "0", "--out", str(out)]) == 0
    assert all("val_mAP" in r for r in json.loads((out / "metrics.json").read_text()))
    assert federate.main(["--validation", "1.0", "--out", str(tmp_path / "bad")]) == 2


def test_thresholds_are_chosen_on_validation_only_stored_with_the_run_and_used_by_predict(tmp_path, monkeypatch,
                                                                                          capsys):
    root = write_mlrsnet(tmp_path / "mlrsnet", per_scene=20)  # 32 training images, 8 test images
    seen, real = [], metrics.f1_thresholds
    monkeypatch.setattr(metrics, "f1_thresholds", lambda s, t: seen.append((s, torch.as_tensor(t))) or real(s, t))
    out = tmp_path / "run"
    assert federate.main(["--dataset", "mlrsnet", "--root", str(root), "--clients", "2", "--rounds", "2",
                          "--validation", "0.25", "--batch-size", "8", "--workers", "0", "--out", str(out)]) == 0
    train = data.load_dataset("mlrsnet", str(root), "train").targets
    held_out, _ = splits.hold_out(len(train), 0.25, 0)
    assert len(seen) == 4 and all(torch.equal(t, train[held_out]) for _, t in seen)  # each round's row, then the run's
    rows = json.loads((out / "metrics.json").read_text())
    assert all({"CF1_val_thresholds", "OF1_val_thresholds", "CF1", "OF1"} <= set(row) for row in rows)
    stored = json.loads((out / "thresholds.json").read_text())
    classes = json.loads((out / "config.json").read_text())["classes"]
    assert stored["round"] == 2 and list(stored["thresholds"]) == classes
    assert list(stored["thresholds"].values()) == real(*seen[-1]).tolist() != [0.5] * len(classes)

    assert predict.main(["--run", str(out), "--evaluate"]) == 0  # the same thresholds on the same state
    evaluated = json.loads((out / "evaluation-mlrsnet.json").read_text())
    assert evaluated["CF1_val_thresholds"] == pytest.approx(rows[-1]["CF1_val_thresholds"], abs=1e-9)
    thresholds = [stored["thresholds"][c] for c in classes]
    for options, expected, said in [([], thresholds, "per-class thresholds of"),
                                    (["--threshold", "0.5"], [0.5] * len(classes), "threshold 0.5 for every class")]:
        labels = tmp_path / "labels.json"
        capsys.readouterr()
        assert predict.main(["--run", str(out), str(root / "Images"), "--out", str(labels), *options]) == 0
        assert said in capsys.readouterr().out
        for row in json.loads(labels.read_text()):
            p = row["probabilities"]
            assert sorted(row["labels"]) == sorted(c for c, t in zip(classes, expected) if p[c] >= t)


def test_flower_refuses_validation_before_starting_anything():
    from launcher.flower import launch  # needs no Flower to refuse
    with pytest.raises(FedMPTError, match="--validation: only with the plain loop"):
        launch(options.Config(validation=0.2), ModelConfig())
