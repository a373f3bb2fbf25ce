"""What a run says around its rounds (store/runs.py's end-of-run checks, experiment's start lines)."""
import types

import experiment
from options import Config
from store import runs


def rounds(shares, norm=223.0):
    """metrics.json rows: round 0, then one trained round per clipped share."""
    return [{"round": 0, "loss": None, "mAP": 12.0}] + [
        {"round": r, "loss": 1.0, "clip_share": share, "grad_norm": norm, "mAP": 70.0}
        for r, share in enumerate(shares, start=1)]


def test_a_run_whose_guard_clipped_most_steps_says_so_with_what_to_try(capsys):
    assert runs.warn_if_clipped(rounds([1.0, 1.0, 0.9]), lr=1e-3, grad_clip=10.0)
    message = capsys.readouterr().err
    assert message.count("warning:") == 1 and "clipped 97% of the local steps" in message
    assert "the clip, not the gradient" in message and "lower --lr" in message and "--grad-clip 0" in message


def test_a_run_whose_guard_clipped_half_or_fewer_steps_or_was_off_says_nothing(capsys):
    assert not runs.warn_if_clipped(rounds([0.6, 0.4, 0.5]), lr=0.1, grad_clip=10.0)  # 50%: not most
    assert not runs.warn_if_clipped(rounds([0.0, 0.0]), lr=0.1, grad_clip=0.0)
    assert not runs.warn_if_clipped(rounds([]), lr=0.1, grad_clip=10.0)  # no trained round
    assert capsys.readouterr().err == ""


def run_directory_lines(method, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(experiment.splits, "plot_client_distributions", lambda *a, **k: None)
    exp = types.SimpleNamespace(cfg=Config(method=method, resume=str(tmp_path)), out=tmp_path, splits=[],
                                conditions={"source": "default", "conditions": ["small", "large"]},
                                train_set=types.SimpleNamespace(targets=None, classes=[]), client_names=None)
    experiment.save_run_directory(exp)
    return capsys.readouterr().out


def test_only_fedmpt_prints_its_condition_list(monkeypatch, capsys, tmp_path):
    assert "'small', 'large'" in run_directory_lines("fedmpt", monkeypatch, capsys, tmp_path)
    for method in ("fed-dualcoop", "fed-poscoop", "fedmvp", "fedtpg", "fed-maple", "fed-ram"):
        printed = run_directory_lines(method, monkeypatch, capsys, tmp_path)
        assert "config.json" in printed and "conditions" not in printed and "small" not in printed, method
