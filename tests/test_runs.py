"""Run directories (store/runs.py): what --resume reads back is checked before the long setup
(config.json against the options' own definitions, checkpoint.pt's format and shapes), options
that would change the trained rounds are refused beside --resume while --rounds extends a run,
a write that fails in a round leaves metrics.json never ahead of checkpoint.pt, and what a run
says around its rounds (the end-of-run checks, the run directory's lines)."""
import dataclasses
import json
import os
import shutil
import types

import pytest
import torch

import experiment
import federate
import options
import predict
from errors import FedMPTError
from options import Config, ModelConfig
from store import runs
from tests.test_store import FullDisk


def valid_config() -> dict:
    return {**dataclasses.asdict(options.Config()), **dataclasses.asdict(ModelConfig())}


@pytest.fixture
def no_setup(monkeypatch):
    """Fail the test if a run gets as far as its setup."""
    def reached(*args, **kwargs):
        raise AssertionError("setup was reached")
    monkeypatch.setattr(federate, "setup", reached)
    monkeypatch.setattr(experiment, "training_inputs", reached)


@pytest.mark.parametrize("saved, message", [
    ({}, "it lacks --dataset, --root, --method"),
    ([], "holds a JSON list, not a run's configuration"),
    ({**valid_config(), "rounds": "3"}, "--rounds '3': must be a number"),
    ({**valid_config(), "ot_rho": 0.0}, "--ot-rho 0.0: must lie in (0, inf]"),
    ({**valid_config(), "learning_rate": 0.1}, "no option or run record is called learning_rate"),
])
def test_a_config_json_that_is_not_a_runs_configuration_is_refused_before_setup(tmp_path, capsys, no_setup, saved,
                                                                                message):
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert federate.main(["--resume", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert message in error and str(tmp_path / "config.json") in error and "Traceback" not in error
    assert predict.main(["--run", str(tmp_path), "x.jpg"]) == 2
    assert message in capsys.readouterr().err


def test_execution_fields_may_be_missing_and_the_run_record_is_known(tmp_path):
    saved = {k: v for k, v in valid_config().items() if k not in ("threads", "workers")}
    (tmp_path / "config.json").write_text(json.dumps({**saved, "engine": "plain", "classes": ["a"]}))
    cfg, _, _ = runs.read_config(str(tmp_path))
    assert cfg.threads == 0 and cfg.workers == -1


def test_options_that_would_change_the_trained_rounds_are_refused_beside_resume(tmp_path, capsys, no_setup):
    (tmp_path / "config.json").write_text(json.dumps(valid_config()))
    assert federate.main(["--resume", str(tmp_path), "--method", "fedtpg", "--lr=0.5", "--threads", "1"]) == 2
    error = capsys.readouterr().err
    refused = error.split("own options; ", 1)[1].split(" would change", 1)[0]
    assert refused == "--method, --lr"  # --threads applies
    with pytest.raises(SystemExit):  # no abbreviation can slip past the check as another option
        federate.main(["--resume", str(tmp_path), "--round", "3"])


@pytest.fixture(scope="module")
def finished(shapes_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("trust") / "run"
    assert federate.main(["--root", str(shapes_root), "--out", str(out), "--rounds", "1", "--clients", "2",
                          "--batch-size", "128"]) == 0
    return out


@pytest.mark.slow
def test_rounds_beside_resume_extend_a_run_and_execution_options_apply(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    threads = torch.get_num_threads()
    try:
        assert federate.main(["--resume", str(run), "--rounds", "2", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert "extends the run from 1 rounds" in capsys.readouterr().err
    assert [row["round"] for row in json.loads((run / "metrics.json").read_text())] == [0, 1, 2]
    config = json.loads((run / "config.json").read_text())
    assert config["rounds"] == 2 and config["extended"] == [{"after_round": 1, "rounds_before": 1, "rounds": 2}]
    assert federate.main(["--resume", str(run), "--rounds", "1"]) == 2  # fewer than the run has done
    assert "--rounds 1 beside --resume extends a run" in capsys.readouterr().err
    assert runs.read_config(str(run))[0].rounds == 2  # resumable again, with its new length


@pytest.mark.slow
def test_a_checkpoint_of_another_format_or_shape_is_refused_before_any_image_is_encoded(finished, tmp_path, capsys,
                                                                                        monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    torch.save({"round": 1}, run / "checkpoint.pt")
    assert federate.main(["--resume", str(run)]) == 2
    assert "checkpoint.pt is not a checkpoint this code wrote" in capsys.readouterr().err

    name = next(iter(checkpoint["global_state"]))
    checkpoint["global_state"][name] = torch.zeros(3)
    torch.save(checkpoint, run / "checkpoint.pt")
    torch.save(checkpoint["global_state"], run / "state.pt")
    encoded = []
    real = experiment.training_inputs
    monkeypatch.setattr(experiment, "training_inputs", lambda *a: encoded.append(1) or real(*a))
    # extended by a round: a finished run that is only resumed has nothing to train and says so
    assert federate.main(["--resume", str(run), "--rounds", "2"]) == 2
    error = capsys.readouterr().err
    assert f"{name} has shape (3,)" in error and "does not fit the model" in error and not encoded
    assert predict.main(["--run", str(run), "--evaluate"]) == 2
    assert f"{name} has shape (3,)" in capsys.readouterr().err


def test_a_run_saved_before_an_option_was_added_reads_with_its_default(tmp_path):
    """Options marked `added` (newer than saved runs) may be missing and take their default,
    which is what every run before them did; any other missing option is still refused."""
    added = [f.name for config in (options.Config, ModelConfig) for f in dataclasses.fields(config)
             if f.metadata.get("added")]
    assert {"unseen", "zsl_split", "precision"} <= set(added)
    old = {k: v for k, v in valid_config().items() if k not in added}
    (tmp_path / "config.json").write_text(json.dumps(old))
    cfg, _, _ = runs.read_config(str(tmp_path))
    assert cfg.unseen == "" and cfg.zsl_split == "" and cfg.precision == "fp32"
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in old.items() if k != "rounds"}))
    with pytest.raises(FedMPTError, match="it lacks --rounds"):
        runs.read_config(str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("failing", ["checkpoint.pt", "metrics.json"])
def test_a_full_disk_in_a_round_stops_the_run_with_metrics_never_ahead_of_the_checkpoint(
        shapes_root, tmp_path, monkeypatch, capsys, failing):
    from store import files
    out = tmp_path / "run"
    skip = 1 if failing == "checkpoint.pt" else 2  # round 2's checkpoint; round 2's metrics (0 and 1 written)
    monkeypatch.setattr(files, "os", FullDisk(failing, skip=skip))
    options = ["--root", str(shapes_root), "--out", str(out), "--rounds", "2", "--clients", "2", "--batch-size", "128"]
    assert federate.main(options) == 2
    error = capsys.readouterr().err
    assert f"cannot write {out / failing}: No space left on device" in error and "MiB free" in error
    assert f"--resume {out}" in error and "Traceback" not in error
    rows = [row["round"] for row in json.loads((out / "metrics.json").read_text())]
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert rows == [0, 1] and checkpoint["round"] == (1 if failing == "checkpoint.pt" else 2)
    assert not list(out.rglob("*.tmp")) and not (out / "state.pt").exists()
    monkeypatch.setattr(files, "os", os)
    assert federate.main(["--resume", str(out)]) == 0
    assert [row["round"] for row in json.loads((out / "metrics.json").read_text())] == [0, 1, 2]


def rounds(shares, norm=223.0):
    """metrics.json rows: round 0, then one trained round per clipped share."""
    return [{"round": 0, "loss": None, "mAP": 12.0, "label_prior_mAP": 5.0}] + [
        {"round": r, "loss": 1.0, "clip_share": share, "grad_norm": norm, "mAP": 70.0}
        for r, share in enumerate(shares, start=1)]


def test_a_run_whose_guard_clipped_most_steps_says_so_with_what_to_try(capsys):
    assert runs.warn_after_run(rounds([1.0, 1.0, 0.9]), lr=1e-3, grad_clip=10.0) == ["clipped"]
    message = capsys.readouterr().err
    assert message.count("warning:") == 1 and "clipped 97% of the local steps" in message
    assert "the clip, not the gradient" in message and "lower --lr" in message and "--grad-clip 0" in message


def test_a_run_whose_guard_clipped_half_or_fewer_steps_or_was_off_says_nothing(capsys):
    assert runs.warn_after_run(rounds([0.6, 0.4, 0.5]), lr=0.1, grad_clip=10.0) == []  # 50%: not most
    assert runs.warn_after_run(rounds([0.0, 0.0]), lr=0.1, grad_clip=0.0) == []
    assert runs.warn_after_run(rounds([]), lr=0.1, grad_clip=10.0) == []  # no trained round
    assert capsys.readouterr().err == ""


def run_directory_lines(method, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(experiment.splits, "plot_client_distributions", lambda *a, **k: None)
    exp = types.SimpleNamespace(cfg=Config(method=method, resume=str(tmp_path)), out=tmp_path, splits=[],
                                conditions={"source": "default", "conditions": ["small", "large"]},
                                train_set=types.SimpleNamespace(targets=None, classes=[]), test_set=None, client_names=None)
    experiment.save_run_directory(exp, tmp_path)
    return capsys.readouterr().out


def test_only_fedmpt_prints_its_condition_list(monkeypatch, capsys, tmp_path):
    assert "'small', 'large'" in run_directory_lines("fedmpt", monkeypatch, capsys, tmp_path)
    for method in ("fed-dualcoop", "fed-poscoop", "fedmvp", "fedtpg", "fed-maple", "fed-ram"):
        printed = run_directory_lines(method, monkeypatch, capsys, tmp_path)
        assert "config.json" in printed and "conditions" not in printed and "small" not in printed, method
