"""A finished run in use: `predict` on new images and `evaluate` of the saved global model."""
import json

import pytest
import torch

import evaluation
import federate
import predict
from conftest import build_experiment

pytestmark = pytest.mark.slow  # every test uses a finished run, trained once


@pytest.fixture(scope="module")
def finished_run(shapes_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg, model_cfg = federate.parse_config(["--root", str(shapes_root), "--out", str(out),
                                            "--rounds", "2", "--clients", "2", "--batch-size", "128"])
    history = federate.run(cfg, model_cfg)
    return out, cfg, model_cfg, history


def test_predict_gives_the_evaluation_probabilities(finished_run, shapes_root, tmp_path, capsys):
    out, cfg, model_cfg, _ = finished_run
    exp = build_experiment(cfg, model_cfg)
    exp.model.load_tunable_state(torch.load(out / "state.pt", weights_only=True))
    inputs, _ = exp.test
    expected = evaluation.predict_scores(exp.model, [x[:12] for x in inputs])
    images = shapes_root / "VOCdevkit/VOC2007/JPEGImages"
    test_ids = (shapes_root / "VOCdevkit/VOC2007/ImageSets/Main/test.txt").read_text().split()[:12]
    files = [str(images / f"{i}.jpg") for i in test_ids]
    assert predict.main(["--run", str(out), *files, "--out", str(tmp_path / "p.json")]) == 0
    rows = json.loads((tmp_path / "p.json").read_text())
    got = torch.tensor([[row["probabilities"][c] for c in exp.train_set.classes] for row in rows])
    assert [row["image"] for row in rows] == files
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith(str(images))]
    assert len(lines) == 12


def test_predict_writes_csv_with_top_k_and_reads_folders(finished_run, shapes_root, tmp_path):
    out, *_ = finished_run
    folder = tmp_path / "new"
    folder.mkdir()
    for i in ["000001", "000002", "000003"]:
        (folder / f"{i}.jpg").write_bytes((shapes_root / f"VOCdevkit/VOC2007/JPEGImages/{i}.jpg").read_bytes())
    assert predict.main(["--run", str(out), str(folder), "--top-k", "2", "--out", str(tmp_path / "p.csv")]) == 0
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0].startswith("image,labels,circle,square") and len(lines) == 4
    assert all(len(line.split(",")[1].split("|")) == 2 for line in lines[1:])


def test_evaluate_reproduces_the_last_metrics_row(finished_run, capsys):
    out, _, _, history = finished_run
    assert predict.main(["--run", str(out), "--evaluate"]) == 0
    result = json.loads((out / "evaluation-shapes.json").read_text())
    for key in ["mAP", "CF1", "OF1", "CF1_top3", "OP", "OR"]:
        assert result[key] == pytest.approx(history[-1][key], abs=1e-6)


def test_predict_refuses_missing_runs_and_images(finished_run, tmp_path, capsys):
    out, *_ = finished_run
    assert predict.main(["--run", str(tmp_path / "none"), "x.jpg"]) == 2
    assert "config.json" in capsys.readouterr().err
    assert predict.main(["--run", str(out), str(tmp_path / "missing.jpg")]) == 2
    assert "missing.jpg" in capsys.readouterr().err


def test_predict_refuses_a_run_on_another_backbone(finished_run, tmp_path, capsys):
    out, *_ = finished_run
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((out / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "backbone_sha256": "0" * 64}))
    (other / "state.pt").write_bytes((out / "state.pt").read_bytes())
    assert predict.main(["--run", str(other), str(out / "config.json")]) == 2
    assert "another backbone" in capsys.readouterr().err


def test_predicting_is_predict_pys_own_command_and_federate_refuses_it(capsys):
    for argv in (["predict", "--run", "DIR", "x.jpg"], ["evaluate", "--run", "DIR"]):
        with pytest.raises(SystemExit) as stop:
            federate.main(argv)
        assert stop.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


# ---- predict.py checks what it reads and where it writes before it writes -----------------
def copy_run(finished_run, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(finished_run[0], run)
    return run


def hashes(folder) -> dict:
    import hashlib
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def an_image(shapes_root) -> str:
    return str(shapes_root / "VOCdevkit/VOC2007/JPEGImages/000001.jpg")


@pytest.mark.parametrize("value", ["NaN", "Infinity", "true", "-5", "1.5", '"0.5"'])
def test_thresholds_json_values_outside_0_1_are_refused(finished_run, shapes_root, tmp_path, capsys, value):
    """NaN, Infinity or true would switch a class off, -5 would label every image: each refused."""
    run = copy_run(finished_run, tmp_path)
    classes = json.loads((run / "config.json").read_text())["classes"]
    thresholds = {c: 0.5 for c in classes}
    (run / "thresholds.json").write_text(json.dumps({"thresholds": thresholds}).replace(
        f'"{classes[1]}": 0.5', f'"{classes[1]}": {value}'))
    assert predict.main(["--run", str(run), an_image(shapes_root)]) == 2
    error = capsys.readouterr().err
    assert "thresholds.json: thresholds must be numbers in [0, 1]" in error and classes[1] in error


@pytest.mark.parametrize("options, message", [
    (["--threshold", "nan"], "--threshold nan: give a number in [0, 1]"),
    (["--threshold", "-5"], "--threshold -5.0: give a number in [0, 1]"),
    (["--batch-size", "0"], "--batch-size 0: give 1 or more"),
])
def test_predict_options_out_of_range_are_refused(finished_run, shapes_root, capsys, options, message):
    """--threshold outside [0, 1] and --batch-size below 1 end in one error line naming the option."""
    assert predict.main(["--run", str(finished_run[0]), an_image(shapes_root), *options]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("classes"), "lacks the run record classes"),
    (lambda c: c.pop("condition_set"), "lacks the run record condition_set"),
    (lambda c: c.update(classes="circlesquare"), "classes must be a list of distinct class names"),
    (lambda c: c.update(condition_set={"conditions": "colour"}), "condition_set must be"),
])
def test_a_run_record_of_the_wrong_shape_is_refused(finished_run, shapes_root, tmp_path, capsys, change, message):
    """A config.json whose run record lacks a field or has the wrong type is refused by name (no
    KeyError traceback, no one-letter labels from a string where a list belongs)."""
    run = copy_run(finished_run, tmp_path)
    config = json.loads((run / "config.json").read_text())
    change(config)
    (run / "config.json").write_text(json.dumps(config))
    assert predict.main(["--run", str(run), an_image(shapes_root)]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


def test_predict_never_overwrites_the_runs_own_files_or_writes_under_a_file(finished_run, shapes_root, tmp_path,
                                                                            capsys):
    """--out RUN/config.json (which would leave the run unusable) and --out under a file are refused."""
    run = copy_run(finished_run, tmp_path)
    before = hashes(run)
    for out in (run / "config.json", run / "metrics.json", run / "config.json" / "p.csv"):
        assert predict.main(["--run", str(run), an_image(shapes_root), "--out", str(out)]) == 2
        error = capsys.readouterr().err
        assert str(out) in error and "Traceback" not in error
    assert hashes(run) == before


def test_evaluate_with_a_root_but_no_dataset_never_generates_the_world_there(finished_run, tmp_path, capsys):
    """A shapes run evaluated with --root DIR writes nothing there (no 2,300 generated images)."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "photo.jpg").write_bytes(b"not really")
    assert predict.main(["--run", str(finished_run[0]), "--evaluate", "--root", str(mine)]) == 2
    assert "holds no generated shapes world" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["photo.jpg"]


def test_evaluate_against_a_store_it_cannot_write_names_cache_dir(finished_run, tmp_path, capsys):
    """An unusable feature store is an error line naming --cache-dir."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert predict.main(["--run", str(finished_run[0]), "--evaluate", "--cache-dir", str(blocker / "cache")]) == 2
    error = capsys.readouterr().err
    assert "cannot use the feature store" in error and "--cache-dir" in error and "Traceback" not in error
