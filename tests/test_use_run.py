"""A finished run in use: `predict` on new images and `evaluate` of the saved global model."""
import json

import pytest
import torch

import evaluation
import experiment
import federate
import predict

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
    exp = experiment.build(cfg, model_cfg)
    exp.model.load_tunable_state(torch.load(out / "state.pt", weights_only=True))
    inputs, _ = exp.test
    expected = evaluation.predict_scores(exp.model, [x[:12] for x in inputs])
    images = shapes_root / "VOCdevkit/VOC2007/JPEGImages"
    test_ids = (shapes_root / "VOCdevkit/VOC2007/ImageSets/Main/test.txt").read_text().split()[:12]
    files = [str(images / f"{i}.jpg") for i in test_ids]
    assert predict.main(["--run", str(out), *files, "--out", str(tmp_path / "p.json")]) == 0
    rows = json.loads((tmp_path / "p.json").read_text())
    got = torch.tensor([[row["probabilities"][c] for c in exp.resolved["classes"]] for row in rows])
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
