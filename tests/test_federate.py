"""The federated loop: FedAvg math, learning, determinism, clipping and the learning rate (bad options: test_faults.py)."""
import json
import math

import numpy as np
import pytest
import torch

import aggregation
import federate
from store import runs


def test_fedavg_weights_by_samples():
    states = [{"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(3.0)},
              {"w": torch.tensor([5.0, -2.0]), "b": torch.tensor(0.0)},
              {"w": torch.tensor([0.0, 0.0]), "b": torch.tensor(-6.0)}]
    sizes = [10, 30, 60]  # unequal clients: weights 0.1, 0.3, 0.6
    result = aggregation.aggregate_weighted(states, sizes)
    assert torch.allclose(result["w"], torch.tensor([0.1 * 1 + 0.3 * 5, 0.1 * 2 - 0.3 * 2]))
    assert torch.allclose(result["b"], torch.tensor(0.1 * 3 - 0.6 * 6))


def test_cosine_schedule_starts_at_lr_and_decays():
    lrs = [federate.cosine_lr(1.0, r, 4) for r in range(1, 5)]
    assert lrs[0] == 1.0 and all(a > b for a, b in zip(lrs, lrs[1:]))
    assert math.isclose(lrs[2], 0.5, abs_tol=1e-12)


def run(root, out, *extra):
    cfg, model_cfg = federate.parse_config(["--root", str(root), "--out", str(out), *extra])
    return federate.run(cfg, model_cfg)


@pytest.mark.slow
def test_fedmpt_learns_across_clients(shapes_root, tmp_path):
    history = run(shapes_root, tmp_path / "run", "--rounds", "4", "--clients", "3")
    maps = [row["mAP"] for row in history]
    assert maps[-1] > maps[0] + 5, maps  # at least 5 mAP points over 4 rounds
    assert maps[-1] > history[0]["label_prior_mAP"] + 5
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [row["round"] for row in saved] == [0, 1, 2, 3, 4]
    assert {"mAP", "CF1", "OF1", "loss", "seconds", "clip_share", "grad_norm"} <= set(saved[-1])
    assert all(0 <= row["clip_share"] <= 1 and row["grad_norm"] > 0 for row in saved[1:])
    assert "clip_share" not in saved[0]  # round 0 trains nothing
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert set(state) >= {"prompts.context", "gate.mlp.2.weight"}
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["tunable_params"] == sum(t.numel() for t in state.values())


@pytest.mark.slow
def test_runs_are_deterministic_for_a_seed(shapes_root, tmp_path):
    first = run(shapes_root, tmp_path / "a", "--rounds", "2", "--clients", "2", "--client-fraction", "0.5", "--batch-size", "128")
    second = run(shapes_root, tmp_path / "b", "--rounds", "2", "--clients", "2", "--client-fraction", "0.5", "--batch-size", "128")
    strip = lambda h: [{k: v for k, v in row.items() if k != "seconds"} for row in h]
    assert strip(first) == strip(second)
    a = torch.load(tmp_path / "a" / "state.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "state.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_round_numbers_weigh_clients_by_samples_and_steps():
    stats = [{"loss": 1.0, "steps": 1, "clip_share": 1.0, "grad_norm": 2.0},
             {"loss": 3.0, "steps": 3, "clip_share": 0.0, "grad_norm": 6.0}]
    states = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([5.0])}]
    updates = [(client, state, n, s, "") for client, state, n, s in zip([0, 1], states, [10, 30], stats)]
    state, combined, n_aggregated, left_out = federate.accept_and_aggregate(1, updates, states[0], "mean", print)
    assert combined == {"loss": 2.5, "clip_share": 0.25, "grad_norm": 5.0} and n_aggregated == 2 and left_out == []
    assert torch.equal(state["w"], torch.tensor([4.0]))  # weighted by samples: (10 * 1 + 30 * 5) / 40
    failed = [(client, None, 0, None, "sent nothing") for client in (0, 1)]
    assert federate.accept_and_aggregate(1, failed, states[0], "mean", print)[1:] == (
        {"loss": None, "clip_share": None, "grad_norm": None}, 0, [0, 1])


@pytest.mark.slow
def test_the_share_of_clipped_steps_follows_the_threshold(shapes_root, tmp_path):
    """--grad-clip 1e-6 clips every step, a huge one none, and 0 (off) still measures the norm:
    huge and off train identically (clipping scales by 1)."""
    options = ["--rounds", "1", "--clients", "2", "--batch-size", "128"]
    histories = {clip: run(shapes_root, tmp_path / clip, *options, "--grad-clip", clip)[1:]
                 for clip in ("1e-6", "1e9", "0")}
    assert all(row["clip_share"] == 1 and row["grad_norm"] > 1e-6 for row in histories["1e-6"])
    assert all(row["clip_share"] == 0 and row["grad_norm"] > 0 for row in histories["1e9"])
    strip = lambda h: [{k: v for k, v in row.items() if k != "seconds"} for row in h]
    assert strip(histories["0"]) == strip(histories["1e9"])


@pytest.mark.slow
def test_the_seed_decides_the_starting_model(shapes_root, tmp_path):
    """Round 0 of metrics.json evaluates the initial global model (beside the seed-free
    reference scores): --seed 0 and --seed 1 start from different contexts, so it differs."""
    options = ["--rounds", "1", "--clients", "2", "--batch-size", "128"]
    first = run(shapes_root, tmp_path / "seed0", *options, "--seed", "0")[0]
    second = run(shapes_root, tmp_path / "seed1", *options, "--seed", "1")[0]
    assert first["zero_shot_mAP"] == second["zero_shot_mAP"] and first["label_prior_mAP"] == second["label_prior_mAP"]
    assert first["mAP"] != second["mAP"], (first["mAP"], second["mAP"])


@pytest.mark.slow  # builds every method's model (~5 s): the fast tier stays under 90 s
def test_lr_defaults_to_the_methods_own_rate_and_an_explicit_one_is_kept():
    import baselines
    import experiment
    from options import validate
    rates = {"fedmpt": 1e-1, "fedmvp": 1e-3, "fed-dualcoop": 1e-3, "fed-poscoop": 3.0, "fedtpg": 1e-2,
             "fed-maple": 3e-3, "fed-ram": 3e-2}  # docs/sweeps.md's choices, stated on each class
    for method, rate in rates.items():
        cfg, model_cfg = federate.parse_config(["--method", method])
        validate(cfg, model_cfg)
        assert cfg.lr == 0  # validation reports and changes nothing
        resolved, *_ = experiment.resolve(cfg, model_cfg)
        assert resolved.lr == rate == baselines.model_class(method).learning_rate and cfg.lr == 0
    cfg, model_cfg = federate.parse_config(["--method", "fedtpg", "--lr", "0.5"])
    assert experiment.resolve(cfg, model_cfg)[0].lr == 0.5
    assert set(rates) == set(baselines.METHODS)


def test_a_run_that_ends_at_the_label_prior_says_so(capsys):
    """The end of every run: a final model within 1 mAP of the label prior learned nothing usable;
    the warning tells a collapse (round 0 was better: lower --lr) from a task never learned."""
    def history(start, final, prior=25.0):
        return [{"round": 0, "mAP": start, "label_prior_mAP": prior}, {"round": 1, "mAP": final}]
    assert runs.warn_after_run(history(30.0, 40.0), lr=0.1, grad_clip=10.0) == []
    assert capsys.readouterr().err == ""
    assert runs.warn_after_run(history(30.0, 25.5), lr=0.03, grad_clip=10.0) == ["untrained"]
    assert "lost what round 0 had" in (err := capsys.readouterr().err) and "--lr 0.01" in err and "--loss bce" in err
    assert runs.warn_after_run(history(25.2, 24.1), lr=0.1, grad_clip=10.0) == ["untrained"]
    assert "never rose above it" in capsys.readouterr().err


def test_a_run_whose_loss_and_gradient_went_flat_near_the_label_prior_says_it_stopped_learning(capsys):
    """A run whose loss stays constant from round 2, gradient norm about 0.1, a few mAP above the
    prior (as real-image runs with a saturated ASL do): the untrained warning (prior + 1) stays
    quiet, this one speaks."""
    def history(losses, grads, final, prior=25.0):
        rows = [{"round": r + 1, "loss": loss, "grad_norm": g, "mAP": final} for r, (loss, g) in
                enumerate(zip(losses, grads))]
        return [{"round": 0, "mAP": prior, "label_prior_mAP": prior}] + rows
    flat = history([3.9, 3.21, 3.205, 3.2], [0.4, 0.09, 0.11, 0.1], final=28.0)
    assert runs.warn_after_run(flat, lr=0.1, grad_clip=10.0) == ["stalled"]
    error = capsys.readouterr().err
    assert "stopped learning: over rounds 2-4 the loss stayed at 3.2" in error and "--loss bce" in error
    assert runs.warn_after_run(history([3.9, 3.21, 3.205, 3.2], [0.4, 0.09, 0.11, 0.1], final=45.0), 0.1, 10.0) == []
    assert runs.warn_after_run(history([3.9, 3.5, 3.2, 2.9], [0.4, 0.3, 0.3, 0.3], final=28.0), 0.1, 10.0) == []
    assert runs.warn_after_run(history([3.9, 3.2, 3.2, 3.2], [0.4, 0.3, 0.05, 0.01], final=28.0), 0.1, 10.0) == []
    assert runs.warn_after_run(history([3.2, 3.2], [0.1, 0.1], final=28.0), 0.1, 10.0) == []  # too few rounds to say
    assert capsys.readouterr().err == ""


# ---- A run that cannot train, a refused resume, what a resumed run keeps --------------------
def test_a_run_whose_updates_were_never_aggregated_or_never_moved_the_state_failed():
    from errors import RunFailed
    from store.runs import check_trained
    state, moved = {"w": torch.zeros(3)}, {"w": torch.ones(3)}
    rows = lambda *failed: [{"round": 0}] + [{"round": r, "failed": f} for r, f in enumerate(failed, 1)]
    with pytest.raises(RunFailed, match="no client update was aggregated in any of its 2 rounds"):
        check_trained(rows(True, True), 1, state, state)
    with pytest.raises(RunFailed, match="the global state did not change in rounds 1-2"):
        check_trained(rows(False, False), 1, state, {"w": torch.zeros(3)})
    check_trained(rows(True, False), 1, state, moved)  # one round aggregated: it trained
    check_trained(rows(False, False), 3, state, state)  # resumed after its last round: nothing ran here


@pytest.mark.slow
def test_a_run_that_cannot_train_exits_1_and_saves_no_state(shapes_root, tmp_path):
    """--lr 1e30 --grad-clip 0: every update is non-finite, every round rejected: exit 1, no state.pt."""
    import subprocess
    import sys
    from pathlib import Path
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "federate.py", "--root", str(shapes_root), "--out", str(out), "--clip",
                           "tiny", "--threads", "1", "--rounds", "2", "--clients", "2", "--batch-size", "512", "--lr", "1e30",
                           "--grad-clip", "0", "--workers", "0"], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not train" in errors[0] and "--lr" in errors[0]
    assert "Traceback" not in done.stderr and "final mAP" not in done.stdout and not (out / "state.pt").exists()


@pytest.fixture(scope="module")
def unseen_run(shapes_root, tmp_path_factory):
    """A 1-round tiny run with two unseen classes named in a file."""
    base = tmp_path_factory.mktemp("unseen")
    names = base / "unseen.txt"
    names.write_text("ring\nstar\n")
    out = base / "run"
    assert federate.main(["--root", str(shapes_root), "--out", str(out), "--clip", "tiny", "--threads", "1",
                          "--rounds", "1", "--clients", "2", "--workers", "0", "--unseen", str(names)]) == 0
    return out, names


def file_hashes(folder) -> dict:
    import hashlib
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.slow
def test_a_refused_resume_leaves_config_json_as_it_was(unseen_run, tmp_path, capsys):
    """--rounds beside --resume is recorded only once every check passed."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(unseen_run[0], run)
    before = file_hashes(run)
    assert federate.main(["--resume", str(run), "--rounds", "3", "--threads", "-1"]) == 2
    assert "--threads" in capsys.readouterr().err
    assert file_hashes(run) == before
    assert json.loads((run / "config.json").read_text())["rounds"] == 1


@pytest.mark.slow
def test_resume_keeps_the_unseen_classes_it_resolved_not_the_file(unseen_run, tmp_path, monkeypatch):
    """An --unseen file edited between rounds does not change what the run trains."""
    import shutil
    import experiment
    run = tmp_path / "run"
    shutil.copytree(unseen_run[0], run)
    unseen_run[1].write_text("circle\n")  # edited after the run started
    try:
        cfg, _ = runs.resume_config(str(run))
        assert sorted(cfg.unseen.split(",")) == ["ring", "star"]
        seen = {}
        real = experiment.build_model
        monkeypatch.setattr(experiment, "build_model", lambda method, backbone, classes, *a, **k: seen.setdefault(
            "classes", list(classes)) and real(method, backbone, classes, *a, **k))
        assert federate.main(["--resume", str(run), "--rounds", "2", "--threads", "1"]) == 0
        assert "ring" not in seen["classes"] and "star" not in seen["classes"] and "circle" in seen["classes"]
    finally:
        unseen_run[1].write_text("ring\nstar\n")


@pytest.mark.parametrize("under", ["", "run"])
def test_an_out_at_or_under_an_existing_file_is_refused_before_setup(tmp_path, capsys, monkeypatch, under):
    """--out at (or under) a file ends in one error line at once, the file untouched."""
    def reached(*args, **kwargs):
        raise AssertionError("the run was built")
    import experiment
    monkeypatch.setattr(experiment, "prepare", reached)
    file = tmp_path / "notes.txt"
    file.write_text("mine\n")
    assert federate.main(["--out", str(file / under if under else file), "--threads", "1"]) == 2
    error = capsys.readouterr().err
    assert f"{file} is a file, not a folder" in error and "Traceback" not in error and file.read_text() == "mine\n"


def test_round_zero_shows_dashes_not_nan_and_says_what_it_is(tmp_path, capsys):
    """Round 0's row has no training numbers: they print as "-", and a line after it says round
    0 is the untuned model and where zero-shot and the label prior stand."""
    model = type("Model", (), {"tunable_state": lambda self: {}})()
    exp = type("Exp", (), {"out": tmp_path, "model": model})()
    row = {"round": 0, "loss": None, "seconds": 0.0, "mAP": 12.46, "CF1": 23.62, "OF1": 24.23,
           "label_prior_mAP": 17.42, "zero_shot_mAP": 69.55}
    federate.save_round(exp, [], row)
    printed = capsys.readouterr().out
    first, note = printed.splitlines()[:2]
    assert "nan" not in printed.lower() and first.split() == ["0", "-", "-", "-", "12.46", "23.62", "24.23", "0.0"]
    assert "round 0 is the untuned model" in note and "69.55" in note and "17.42" in note
    federate.save_round(exp, [row], {**row, "round": 1, "loss": 1.5, "clip_share": 0.25, "grad_norm": 3.0},
                        np.random.default_rng(0))
    assert capsys.readouterr().out.split() == ["1", "1.5000", "25%", "3.00", "12.46", "23.62", "24.23", "0.0"]


def test_a_finished_run_is_one_whose_last_round_is_its_rounds_and_whose_state_is_saved(tmp_path, capsys):
    rows = [{"round": r, "mAP": 40.0 + r} for r in range(3)]
    (tmp_path / "metrics.json").write_text(json.dumps(rows))
    assert runs.finished_history(tmp_path, 2) is None  # no state.pt: stopped before it was written
    (tmp_path / "state.pt").write_bytes(b"state")
    assert runs.finished_history(tmp_path, 3) is None  # a round left (or extended by --rounds)
    assert capsys.readouterr().out == ""
    assert runs.finished_history(tmp_path, 2) == rows
    said = capsys.readouterr().out
    assert "the run is finished (2 of 2 rounds" in said and str(tmp_path / "state.pt") in said


@pytest.mark.slow
def test_resuming_a_finished_run_says_so_exits_0_and_writes_nothing(shapes_root, tmp_path, capsys):
    out = tmp_path / "run"
    run(shapes_root, out, "--rounds", "1", "--clients", "2", "--plot")
    assert capsys.readouterr().out.count("feature store: ") == 1  # said once, at the start
    before = {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in out.iterdir()}
    assert "plans.png" in before and "state.pt" in before
    capsys.readouterr()
    assert federate.main(["--resume", str(out), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "the run is finished (1 of 1 rounds" in printed and federate.TABLE_HEADER not in printed
    assert {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in out.iterdir()} == before
