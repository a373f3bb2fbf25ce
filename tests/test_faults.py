"""Runs that survive faults: kill and resume, failing and malicious clients, bad input."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import aggregation
import client
import federate
import predict
import splits as client_splitting
from conditions import load_conditions
from errors import RunFailed
from store import runs

REPO = Path(__file__).resolve().parents[1]


def run(root, out, *extra):
    cfg, model_cfg = federate.parse_config(["--root", str(root), "--out", str(out), *extra])
    return federate.run(cfg, model_cfg)


def without_seconds(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(shapes_root, tmp_path, capsys):
    options = ["--root", str(shapes_root), "--rounds", "3", "--clients", "3", "--batch-size", "128"]
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, str(REPO / "federate.py"), *options, "--out", str(killed)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        checkpoint = killed / "checkpoint.pt"
        if checkpoint.exists() and torch.load(checkpoint, weights_only=True)["round"] >= 1:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    # What a killed run leaves is valid: JSON parses, the last checkpoint loads.
    partial = json.loads((killed / "metrics.json").read_text())
    last = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert 1 <= last["round"] < 3 and partial[-1]["round"] >= last["round"]

    assert federate.main(["--resume", str(killed)]) == 0  # here: the process that was killed was another
    assert f"resuming {killed} after round {last['round']}" in capsys.readouterr().out
    straight = run(shapes_root, tmp_path / "straight", "--rounds", "3", "--clients", "3", "--batch-size", "128")
    assert without_seconds(json.loads((killed / "metrics.json").read_text())) == without_seconds(straight)
    a = torch.load(killed / "state.pt", weights_only=True)
    b = torch.load(tmp_path / "straight" / "state.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in b)  # bit for bit on CPU


def faulty(behaviour):
    """Wrap client.local_train so that client 1 misbehaves as `behaviour` says."""
    honest = client.local_train

    def local_train(model, global_state, inputs, targets, indices, cfg, lr, generator):
        state, n, stats = honest(model, global_state, inputs, targets, indices, cfg, lr, generator)
        if indices is not faulty.splits[1]:
            return state, n, stats
        return behaviour(state), n, stats
    return local_train


@pytest.mark.parametrize("name, behaviour, reason", [
    ("nan", lambda s: {**s, "prompts.context": s["prompts.context"] * float("nan")}, "non-finite"),
    ("shape", lambda s: {**s, "prompts.context": s["prompts.context"][:, :1]}, "shape"),
    ("keys", lambda s: {k: v for k, v in s.items() if k != "gate.mlp.0.bias"}, "keys differ"),
])
@pytest.mark.slow
def test_bad_client_is_left_out_and_the_rest_aggregate(shapes_root, tmp_path, monkeypatch, capsys, name, behaviour, reason):
    import data
    faulty.splits = client_splitting.client_splits(data.load_dataset("shapes", shapes_root, "train").targets, 3, 1.0, 0)
    monkeypatch.setattr(client_splitting, "client_splits", lambda *a, **k: faulty.splits)
    monkeypatch.setattr(federate, "local_train", faulty(behaviour))
    history = run(shapes_root, tmp_path / name, "--rounds", "2", "--clients", "3", "--batch-size", "128")
    assert [row["clients_aggregated"] for row in history[1:]] == [2, 2]
    assert [row["clients_rejected"] for row in history[1:]] == [[1], [1]]
    assert history[-1]["mAP"] > history[0]["mAP"]  # the honest clients still taught the model
    log = [line for line in capsys.readouterr().out.splitlines() if line.startswith("round") and "client 1" in line]
    assert len(log) == 2 and all(reason in line for line in log), log  # one line per round, with the reason


@pytest.mark.slow
def test_round_where_every_update_is_rejected_keeps_the_global_state(shapes_root, tmp_path, monkeypatch):
    honest = client.local_train

    def broken(*args):
        state, n, stats = honest(*args)
        return {k: v * float("nan") for k, v in state.items()}, n, stats
    monkeypatch.setattr(federate, "local_train", broken)
    with pytest.raises(RunFailed, match="no client update was aggregated in any of its 1 rounds"):
        run(shapes_root, tmp_path / "all", "--rounds", "1", "--clients", "2", "--batch-size", "128")
    history = json.loads((tmp_path / "all" / "metrics.json").read_text())  # the rows are kept, the run failed
    assert history[1]["failed"] is True and history[1]["clients_aggregated"] == 0
    assert history[1]["loss"] is None and history[1]["clip_share"] is None and history[1]["grad_norm"] is None
    assert history[1]["mAP"] == history[0]["mAP"]
    assert not (tmp_path / "all" / "state.pt").exists()


@pytest.mark.slow
def test_a_client_that_raises_stops_the_run_and_resume_continues(shapes_root, tmp_path, monkeypatch, capsys):
    """Out of memory (or a bug) in local training is not a remote fault: the run stops with
    exit 1 naming the round and the client, writes no row for that round, keeps the last
    checkpoint, and --resume continues once the cause is gone."""
    honest, calls = client.local_train, []

    def out_of_memory_in_round_2(*args):
        calls.append(1)
        if len(calls) == 5:  # 3 clients a round: round 2, its second client
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return honest(*args)
    monkeypatch.setattr(federate, "local_train", out_of_memory_in_round_2)
    out = tmp_path / "crash"
    options = ["--root", str(shapes_root), "--rounds", "3", "--clients", "3", "--batch-size", "128"]
    assert federate.main([*options, "--out", str(out)]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: round 2, client 1: RuntimeError") and "--batch-size" in error and "--resume" in error
    assert [row["round"] for row in json.loads((out / "metrics.json").read_text())] == [0, 1]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["round"] == 1
    assert "CUDA out of memory" in (out / "error.log").read_text()

    monkeypatch.setattr(federate, "local_train", honest)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "device": "cuda"}))  # as if trained on a GPU
    assert federate.main(["--resume", str(out)]) == 0
    history = json.loads((out / "metrics.json").read_text())
    assert [row["round"] for row in history] == [0, 1, 2, 3] and not any(row.get("failed") for row in history)
    if not torch.cuda.is_available():
        assert "continues on the CPU" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_a_cuda_run_resumes_and_evaluates_on_a_machine_without_cuda(shapes_root, tmp_path):
    out = tmp_path / "gpu"
    trained = cli("--root", str(shapes_root), "--rounds", "1", "--clients", "2", "--batch-size", "128",
                  "--device", "cuda", "--out", str(out))
    assert trained.returncode == 0, trained.stderr[-2000:]
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "rounds": 2}))  # one more round to train
    cpu_only = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    results = [subprocess.run([sys.executable, str(REPO / command[0]), *command[1:]], capture_output=True,
                              text=True, timeout=300, cwd=REPO, env=cpu_only)
               for command in (["federate.py", "--resume", str(out)], ["predict.py", "--run", str(out), "--evaluate"])]
    assert all(result.returncode == 0 for result in results), [r.stderr[-2000:] for r in results]
    assert "continues on the CPU" in results[0].stderr
    assert [row["round"] for row in json.loads((out / "metrics.json").read_text())] == [0, 1, 2]


@pytest.mark.slow
def test_a_damaged_checkpoint_is_a_clear_error(shapes_root, tmp_path, capsys):
    finished = tmp_path / "run"
    run(shapes_root, finished, "--rounds", "1", "--clients", "2", "--batch-size", "128")
    for damage in ["garbage", "truncated", "empty"]:
        out = tmp_path / damage
        shutil.copytree(finished, out)
        for name in ["checkpoint.pt", "state.pt"]:
            data = (out / name).read_bytes()
            (out / name).write_bytes({"garbage": b"not a checkpoint" * 40, "truncated": data[:len(data) // 2],
                                      "empty": b""}[damage])
        capsys.readouterr()
        assert federate.main(["--resume", str(out)]) == 2
        error = capsys.readouterr().err
        assert "checkpoint.pt" in error and "--resume" in error and "weights_only" not in error
        assert predict.main(["--run", str(out), "x.jpg"]) == 2
        error = capsys.readouterr().err
        assert "state.pt" in error and "weights_only" not in error


def client_states(n=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = {"context": torch.randn(2, 5, 16, generator=generator), "bias": torch.randn(7, generator=generator)}
    return [{k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in base.items()} for _ in range(n)]


@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
def test_robust_rules_resist_a_poisoned_client(rule):
    clean = client_states()
    poisoned = [{k: v * 1000 for k, v in clean[0].items()}] + clean[1:]
    combine = aggregation.AGGREGATORS[rule]
    reference, attacked = combine(clean, [1] * 5), combine(poisoned, [1] * 5)
    mean_attacked = aggregation.aggregate_weighted(poisoned, [1] * 5)
    for key in reference:
        scale = reference[key].norm()
        assert (attacked[key] - reference[key]).norm() < 0.05 * scale  # stays close to the clean one
        assert (mean_attacked[key] - reference[key]).norm() > 10 * scale  # while FedAvg is dragged off


def test_trimmed_mean_and_median_by_hand():
    states = [{"w": torch.tensor([1.0, 10.0])}, {"w": torch.tensor([2.0, 20.0])},
              {"w": torch.tensor([3.0, 30.0])}, {"w": torch.tensor([100.0, -100.0])}]
    assert torch.equal(aggregation.aggregate_median(states)["w"], torch.tensor([2.5, 15.0]))
    assert torch.equal(aggregation.aggregate_trimmed_mean(states, trim=0.25)["w"], torch.tensor([2.5, 15.0]))


def cli(*args):
    return subprocess.run([sys.executable, str(REPO / "federate.py"), *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO)


def tiny_voc(root, labels):
    from tests.test_data import write_voc
    write_voc(root, {f"{i:06d}": [(name, 0) for name in names] for i, names in enumerate(labels, 1)})
    write_voc(root, {f"{i:06d}": [(name, 0) for name in names] for i, names in enumerate(labels, 1)}, split="test")


def in_process(capsys, *args):
    """federate.py's main in this process: (exit code, stderr). The subprocess tests around
    (an existing run, resume) show the same code leaves the real process."""
    code = federate.main(list(args))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case, args, message", [
    ("method", ["--method", "fedsgd"], "--method fedsgd"),
    ("aggregate", ["--aggregate", "max"], "--aggregate max"),
    ("clients", ["--clients", "0"], "--clients 0"),
    ("fraction", ["--client-fraction", "0"], "--client-fraction 0"),
    ("too many clients", ["--clients", "5000"], "--clients 5000"),
    ("resume", ["--resume", "{tmp}/no-run"], "config.json"),
    ("n-ctx", ["--n-ctx", "0"], "--n-ctx 0"),
    ("class-ctx", ["--class-ctx", "2", "--method", "fed-dualcoop"], "--class-ctx 2"),
    ("adapter", ["--adapter-reduction", "0"], "--adapter-reduction 0"),
    ("ot-iters", ["--ot-iters", "0"], "--ot-iters 0"),
    ("missing voc", ["--dataset", "voc2007", "--root", "{tmp}/missing"], "VOCtrainval_06-Nov-2007.tar"),
    ("dataset", ["--dataset", "imagenet"], "--dataset imagenet"),
    ("heterogeneity", ["--heterogeneity", "1.5"], "--heterogeneity 1.5"),
    ("rounds", ["--rounds", "0"], "--rounds 0"),
    ("clip", ["--clip", "ViT-Z/99"], "--clip ViT-Z/99"),
])
def test_bad_options_exit_2_naming_the_option(tmp_path, capsys, monkeypatch, case, args, message):
    monkeypatch.chdir(REPO)  # where a user runs it: the default --root data/shapes
    code, stderr = in_process(capsys, *[a.format(tmp=tmp_path) for a in args], "--out", str(tmp_path / "out"))
    assert code == 2 and message in stderr, stderr
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.slow
def test_an_existing_run_is_never_overwritten(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.json").write_text("[]")
    result = cli("--out", str(tmp_path / "old"))
    assert result.returncode == 2 and "--resume" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "old" / "metrics.json").read_text() == "[]"


def test_bad_files_exit_2_naming_the_file(tmp_path, capsys):
    tiny_voc(tmp_path / "same", [["dog"], ["dog"], ["dog"]])  # one label vector: K-means finds 1 cluster
    code, stderr = in_process(capsys, "--dataset", "voc2007", "--root", str(tmp_path / "same"), "--clients", "2",
                              "--out", str(tmp_path / "o1"))
    assert code == 2 and "without data" in stderr, stderr

    tiny_voc(tmp_path / "bad", [["dog"], ["cat"], ["dog", "cat"]])
    annotation = tmp_path / "bad" / "VOCdevkit/VOC2007/Annotations/000002.xml"
    annotation.write_text("<annotation><object><name>cat")
    code, stderr = in_process(capsys, "--dataset", "voc2007", "--root", str(tmp_path / "bad"), "--clients", "2",
                              "--out", str(tmp_path / "o2"))
    assert code == 2 and "000002.xml" in stderr, stderr

    tiny_voc(tmp_path / "image", [["dog"], ["cat"], ["dog", "cat"]])
    (tmp_path / "image" / "VOCdevkit/VOC2007/JPEGImages/000003.jpg").write_bytes(b"\x00garbage")
    code, stderr = in_process(capsys, "--dataset", "voc2007", "--root", str(tmp_path / "image"), "--clients", "2",
                              "--out", str(tmp_path / "o3"))
    assert code == 2 and "000003.jpg" in stderr, stderr


@pytest.mark.slow
def test_resume_keeps_the_saved_conditions_and_refuses_another_backbone(shapes_root, tmp_path):
    conditions = tmp_path / "mine.json"
    conditions.write_text(json.dumps({"dataset": "shapes", "conditions": ["color", "background"], "source": "default"}))
    run(shapes_root, tmp_path / "a", "--rounds", "1", "--clients", "2", "--batch-size", "128", "--conditions", str(conditions))
    conditions.write_text(json.dumps({"dataset": "shapes", "conditions": ["pose"], "source": "default"}))
    cfg, model_cfg = runs.resume_config(tmp_path / "a")
    assert load_conditions(cfg.conditions, "shapes")["conditions"] == ["color", "background"]
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "a" / "config.json").write_text(json.dumps({**config, "backbone_sha256": "0" * 64}))
    result = cli("--resume", str(tmp_path / "a"), "--rounds", "2")  # more rounds: the run must build its model again
    assert result.returncode == 2 and "other shapes weights" in result.stderr and "Traceback" not in result.stderr
