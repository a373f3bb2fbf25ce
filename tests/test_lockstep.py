"""Cells side by side (speed/lockstep.py, `reproduce.py --lockstep N`) and grids spread over GPUs
and a Slurm array (`--gpus`, `--slurm`): each cell equal to it run alone, results.csv whole
whatever the number of writers."""
import csv
import json
import math
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import client  # noqa: E402
import federate  # noqa: E402
import ot  # noqa: E402
import reproduce  # noqa: E402
from backbone import FrozenCLIP, load_clip  # noqa: E402
from options import Config  # noqa: E402
from speed import lockstep  # noqa: E402
from tests.test_folder import write_folder  # noqa: E402
from tests.test_probe import ROWS as FOLDER_ROWS  # noqa: E402
from tests.test_speed import CLASSES, build  # noqa: E402
from store import features  # noqa: E402


# ---- The pass: lanes equal to each client trained alone ------------------------------------
@pytest.mark.parametrize("rho", [0.1, math.inf])
def test_each_lane_of_the_batched_sinkhorn_stops_where_it_would_alone(rho):
    torch.manual_seed(0)
    # three lanes whose costs differ in scale: they settle after different numbers of iterations
    scale = torch.tensor([0.05, 0.5, 10.0], dtype=torch.float64).view(3, 1, 1, 1)
    cost = torch.rand(3, 4, 9, 5, dtype=torch.float64) * scale
    together = lockstep.lane_sinkhorn(cost, 0.1, 100, rho, tol=1e-3)  # a loose tol: early stops
    for lane in range(3):
        alone = ot.sinkhorn(cost[lane], 0.1, n_iters=100, tol=1e-3, rho=rho)
        assert torch.allclose(together[lane], alone, rtol=0, atol=1e-13)
    # the test has teeth: one solve of the whole batch (stopping at the slowest lane) differs
    batched = ot.sinkhorn(cost, 0.1, n_iters=100, tol=1e-3, rho=rho)
    assert float((batched - together).abs().max()) > 1e-9


def lanes_setup(method="fedmpt"):
    """Two cells' worth of lanes on the tiny CLIP (4 classes): two global states, two label sets,
    clients of 13, 7 and 4 images (partial batches), a tight gradient-norm guard."""
    torch.manual_seed(0)
    backbone = FrozenCLIP(load_clip("tiny"))
    model = build(method, backbone, CLASSES[:4])
    images = torch.randn(24, 3, backbone.resolution, backbone.resolution)
    with torch.no_grad():
        stored = tuple(torch.from_numpy(x) for x in features.as_stored(model.encode_images(images)))
    targets = [(torch.rand(24, 4) < 0.3).float() for _ in range(2)]
    targets[1][0, 1] = -1  # a masked label
    start = model.tunable_state()
    states = [start, {name: t + 0.02 * torch.randn_like(t) for name, t in start.items()}]
    cfg = Config(method=method, batch_size=5, local_epochs=2, grad_clip=2.0)
    rows = [list(range(0, 13)), list(range(13, 20)), list(range(20, 24))]
    lanes = [(states[cell], stored, targets[cell], rows[k], federate.client_generator(cfg, 1, 10 * cell + k))
             for cell, k in [(0, 0), (0, 1), (1, 2), (1, 0)]]
    return model, lanes, cfg


def fresh(lanes):
    return [(*lane[:4], torch.Generator().manual_seed(lane[4].initial_seed())) for lane in lanes]


@pytest.mark.slow  # ~5 s: every lane trained twice
@pytest.mark.parametrize("method", ["fedmpt", "fed-dualcoop"])  # stacked; one encoder call (speed.parallel_clients)
def test_lanes_of_two_cells_equal_each_client_trained_alone(method):
    model, lanes, cfg = lanes_setup(method)
    alone = [client.local_train(model, *lane[:4], cfg, 0.05, lane[4]) for lane in fresh(lanes)]
    together = lockstep.train_lanes(model, fresh(lanes), cfg, 0.05)
    for (state, n, stats), (state1, n1, stats1), lane in zip(together, alone, lanes):
        assert n == n1 == len(lane[3]) and stats["steps"] == stats1["steps"]
        assert stats["clip_share"] == stats1["clip_share"]
        for key in ("loss", "grad_norm"):
            assert stats[key] == pytest.approx(stats1[key], rel=1e-5)
        for name in state:
            assert torch.allclose(state[name], state1[name], rtol=0, atol=1e-6), name
        assert any(not torch.equal(state[name], lane[0][name]) for name in state)  # it trained
    assert any(0 < result[2]["clip_share"] < 1 for result in alone)  # the guard clipped some steps, per lane


# ---- Cells through reproduce.py: side by side, over GPUs, as a Slurm array ------------------
GRID = ["table1", "--dataset", "folder", "--methods", "fedmpt", "--t", "0.5,1.0", "--seeds", "0,1", "--rounds", "2",
        "--clients", "2", "--threads", "1"]
CELL_OPTIONS = ["--", "--batch-size", "4", "--workers", "0", "--lr", "0.01"]


@pytest.fixture(scope="module")
def plain_grid(tmp_path_factory):
    """The four cells run plainly, one federate.py after another: the reference."""
    base = tmp_path_factory.mktemp("grid")
    write_folder(base / "data" / "folder", rows=FOLDER_ROWS, header="image,labels,split")
    assert reproduce.main([*GRID, "--data-dir", str(base / "data"), "--out", str(base / "plain"), *CELL_OPTIONS]) == 0
    return base


def results(out) -> dict:
    with open(out / "results.csv", newline="") as file:
        return {(row["t"], row["seed"]): row for row in csv.DictReader(file)}


def assert_cells_equal(out, reference):
    got, expected = results(out), results(reference)
    assert set(got) == set(expected) and len(expected) == 4
    for key, row in expected.items():
        for metric in ("mAP", "CF1", "OF1"):
            assert abs(float(got[key][metric]) - float(row[metric])) <= 1e-4, (key, metric)
        history = json.loads((Path(got[key]["run_dir"]) / "metrics.json").read_text())
        reference_history = json.loads((Path(row["run_dir"]) / "metrics.json").read_text())
        assert history[-1]["grad_norm"] > 0  # still training in its last round: the comparison has teeth
        for mine, theirs in zip(history, reference_history):
            assert mine["mAP"] == pytest.approx(theirs["mAP"], abs=1e-4)
        state = torch.load(Path(got[key]["run_dir"]) / "state.pt")
        reference_state = torch.load(Path(row["run_dir"]) / "state.pt")
        for name, tensor in reference_state.items():
            assert torch.allclose(state[name], tensor, rtol=0, atol=1e-5), (key, name)


@pytest.mark.slow
def test_cells_side_by_side_equal_each_cell_run_alone(plain_grid):
    out = plain_grid / "lockstep"
    assert reproduce.main([*GRID, "--data-dir", str(plain_grid / "data"), "--out", str(out), "--lockstep", "2",
                           *CELL_OPTIONS]) == 0
    assert_cells_equal(out, plain_grid / "plain")
    launches = [json.loads(p.read_text()) for p in out.glob("runs/*/launches.json")]
    assert len(launches) == 4 and all(x[-1]["lockstep"] == 2 for x in launches)
    assert len(list(out.glob("logs/lockstep-*.log"))) == 2  # two processes of two cells


@pytest.mark.slow
def test_a_cell_resumes_on_its_own_beside_a_fresh_one(plain_grid, tmp_path):
    """One cell stopped after round 1 (its checkpoint), one new: side by side each ends as alone."""
    data = plain_grid / "data" / "folder"
    common = ["--dataset", "folder", "--root", str(data), "--clients", "2", "--batch-size", "4", "--workers", "0",
              "--lr", "0.01", "--threads", "1"]
    assert federate.main([*common, "--rounds", "1", "--seed", "1", "--out", str(tmp_path / "stopped")]) == 0
    shutil.copytree(tmp_path / "stopped", tmp_path / "stopped-alone")
    assert federate.main(["--resume", str(tmp_path / "stopped-alone"), "--rounds", "2"]) == 0  # extended alone
    assert federate.main([*common, "--rounds", "2", "--out", str(tmp_path / "fresh-alone")]) == 0
    requests = lockstep.parse_cells(["--cell", "--resume", str(tmp_path / "stopped"), "--rounds", "2",
                                     "--cell", *common, "--rounds", "2", "--out", str(tmp_path / "fresh")])
    lockstep.run_cells(requests)
    for name in ("stopped", "fresh"):
        state, alone = (torch.load(tmp_path / run / "state.pt") for run in (name, f"{name}-alone"))
        assert all(torch.allclose(state[k], alone[k], rtol=0, atol=1e-5) for k in alone)
        history, alone_history = (json.loads((tmp_path / run / "metrics.json").read_text())
                                  for run in (name, f"{name}-alone"))
        assert [r["mAP"] for r in history] == pytest.approx([r["mAP"] for r in alone_history], abs=1e-4)


@pytest.mark.slow
def test_cells_spread_over_gpus_say_which_gpu_each_got_and_equal_a_plain_run(plain_grid):
    out = plain_grid / "gpus"
    assert reproduce.main([*GRID, "--data-dir", str(plain_grid / "data"), "--out", str(out), "--gpus", "3,5",
                           "--lockstep", "2", *CELL_OPTIONS]) == 0
    assert_cells_equal(out, plain_grid / "plain")
    gpus = {p.parent.name: json.loads(p.read_text())[-1]["gpu"] for p in out.glob("runs/*/launches.json")}
    assert sorted(gpus.values()) == ["3", "3", "5", "5"]  # each of the two processes on its own GPU
    for log in out.glob("logs/lockstep-*.log"):  # the worker saw its id (on this CPU machine it ran on the CPU)
        names = [line.split("/runs/")[1].split()[0] for line in log.read_text().split("--out")[1:]]
        assert f"lockstep: CUDA_VISIBLE_DEVICES={gpus[names[0]]}" in log.read_text()
        assert gpus[names[0]] == gpus[names[1]]


@pytest.mark.slow
def test_a_slurm_array_on_submitits_local_executor_equals_a_plain_run(plain_grid):
    pytest.importorskip("submitit")
    out = plain_grid / "slurm"
    assert reproduce.main([*GRID, "--data-dir", str(plain_grid / "data"), "--out", str(out), "--slurm",
                           "--slurm-cluster", "local", "--lockstep", "2", "--slurm-time", "20", *CELL_OPTIONS]) == 0
    assert_cells_equal(out, plain_grid / "plain")
    assert len(list(out.glob("units/*.json"))) == 2 and (out / "table1.md").exists()
    again = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reproduce.py"), *GRID, "--data-dir",
                            str(plain_grid / "data"), "--out", str(out), "--slurm", "--slurm-cluster", "local",
                            *CELL_OPTIONS], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "4 cells, 4 finished, 0 to run" in again.stdout and len(results(out)) == 4


def test_grid_options_are_checked(tmp_path, capsys):
    for bad, message in [(["--lockstep", "0"], "--lockstep 0"), (["--gpus", "0,x"], "--gpus 0,x"),
                         (["--gpus", "0,0"], "each id once"), (["--gpus", "0", "--jobs", "2"], "leave out --jobs"),
                         (["--slurm", "--slurm-time", "0"], "--slurm-time")]:
        assert reproduce.main(["table1", "--out", str(tmp_path / "grid"), *bad]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "grid").exists()


def test_units_group_cells_that_may_share_a_process():
    args = reproduce.parse(["table1", "--out", "x", "--dataset", "voc2007,coco2014", "--methods", "fedmpt,fed-ram",
                            "--t", "0.5,1", "--seeds", "0,1"])
    cells = reproduce.make_cells(args)
    units = reproduce.make_units(cells, 3)
    assert sorted(map(len, units)) == [1, 1, 1, 1, 3, 3, 3, 3] and sum(map(len, units)) == len(cells) == 16
    for unit in units:
        assert len({(c["method"], c["dataset"], c["rounds"], c["clients"], c["options"]) for c in unit}) == 1


# ---- results.csv: one whole file however many writers ---------------------------------------
def append_rows(path, writer, n):
    for i in range(n):
        row = {"method": "fedmpt", "dataset": "shapes", "t": "1.0", "seed": str(100 * writer + i), "rounds": "1",
               "clients": "2", "options": "", "mAP": "50.0", "CF1": "1.0", "OF1": "1.0", "seconds": "1.0",
               "run_dir": "x", "code_version": "abc"}
        reproduce.append_result(Path(path), row)


def test_concurrent_writers_leave_every_row_whole_and_none_twice(tmp_path):
    """Writers in threads: each opens the lock file itself, so they exclude each other as
    processes do (flock holds per open file)."""
    path = tmp_path / "results.csv"
    writers = [threading.Thread(target=append_rows, args=(path, w, 15)) for w in range(4)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
    rows = reproduce.read_results(path)
    assert sorted(int(r["seed"]) for r in rows) == sorted(100 * w + i for w in range(4) for i in range(15))
    append_rows(path, 0, 1)  # a cell already there (a task run again) is not added twice
    assert len(reproduce.read_results(path)) == 60


@pytest.mark.slow  # four interpreters that import torch
def test_concurrent_writer_processes_leave_every_row_whole(tmp_path):
    path = tmp_path / "results.csv"
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/benchmarks', sys.argv[1] + '/tests']; "
            "from tests.test_lockstep import append_rows; append_rows(sys.argv[2], int(sys.argv[3]), 15)")
    writers = [subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(path), str(w)]) for w in range(4)]
    assert all(writer.wait(timeout=300) == 0 for writer in writers)
    rows = reproduce.read_results(path)
    assert sorted(int(r["seed"]) for r in rows) == sorted(100 * w + i for w in range(4) for i in range(15))
