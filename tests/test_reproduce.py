"""benchmarks/reproduce.py: a table's grid through federate.py, into a result store that a
stopped grid continues from (Ctrl-C here), a dry run with time estimates, table 5's join."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import reproduce  # noqa: E402
from tests.test_folder import write_folder  # noqa: E402
from tests.test_probe import ROWS  # noqa: E402


def grid(out, data_dir, *more):
    return [sys.executable, str(ROOT / "benchmarks" / "reproduce.py"), "table1", "--dataset", "folder",
            "--methods", "fed-poscoop", "--t", "0.5,1.0", "--seeds", "0", "--rounds", "20", "--clients", "2",
            "--data-dir", str(data_dir), "--out", str(out), *more, "--", "--batch-size", "4", "--workers", "0"]


def rows(out):
    with open(out / "results.csv", newline="") as file:
        return list(csv.DictReader(file))


@pytest.mark.slow
def test_a_grid_stopped_by_ctrl_c_continues_where_it_stopped(tmp_path):
    data_dir, out = tmp_path / "data", tmp_path / "grid"
    write_folder(data_dir / "folder", rows=ROWS, header="image,labels,split")  # 24 training images, 6 test
    # paths relative to the caller's directory; the second run names the same grid from elsewhere
    first = subprocess.Popen(grid("grid", "data"), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not list(out.glob("runs/*/checkpoint.pt")) and time.time() < deadline and first.poll() is None:
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground group
    output = first.communicate(timeout=120)[0]
    assert first.returncode == 130, output
    assert "run the same command again" in output and not (out / "results.csv").exists()
    stopped = next(out.glob("runs/*/checkpoint.pt")).parent

    again = subprocess.run(grid(out, data_dir), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 cells, 0 finished, 2 to run" in again.stdout
    assert "--resume" in (out / "logs" / f"{stopped.name}.log").read_text()  # continued, not restarted
    assert len(json.loads((stopped / "launches.json").read_text())) == 2
    results = rows(out)
    assert sorted(r["t"] for r in results) == ["0.5", "1.0"] and all(r["rounds"] == "20" for r in results)
    for row in results:  # the row is the run's final round
        final = json.loads((Path(row["run_dir"]) / "metrics.json").read_text())[-1]
        assert final["round"] == 20 and abs(float(row["mAP"]) - final["mAP"]) < 1e-3
    table = (out / "table1.md").read_text()
    mean = (float(results[0]["mAP"]) + float(results[1]["mAP"])) / 2
    assert f"| Fed-PosCoOp | {mean:.2f} |" in table and (out / "table1.png").stat().st_size > 1000

    third = subprocess.run(grid(out, data_dir), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert "2 cells, 2 finished, 0 to run" in third.stdout and len(rows(out)) == 2

    dry = subprocess.run(grid(out, data_dir, "--dry-run", "--seeds", "0,1"), cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert "4 cells, 2 finished, 2 to run" in dry.stdout and "(finished cells)" in dry.stdout
    assert len(list((out / "runs").iterdir())) == 2  # a dry run starts nothing
    per_round = sorted(float(r["seconds"]) / 20 for r in results)
    assert f"{sum(per_round) / 2 * 20 * 2 / 60:.1f} min" in dry.stdout  # 2 cells x 20 rounds x the median

    reproduce.main(["table5", "--out", str(out), "--dataset", "folder", "--methods", "fed-poscoop",
                    "--clip", "tiny", "--steps", "1"])
    table5 = (out / "table5.md").read_text()
    assert f"| {mean:.2f} ± " in table5 and "| 2 |" in table5 and "ms/iter" in table5


@pytest.mark.slow
def test_a_failing_cell_stops_the_grid_with_its_log_and_bad_options_exit_2(tmp_path, capsys):
    out = tmp_path / "grid"
    assert reproduce.main(["table1", "--dataset", "shapes", "--methods", "fed-poscoop", "--t", "1", "--seeds", "0",
                           "--out", str(out), "--", "--lr", "-1"]) == 2
    error = capsys.readouterr().err
    assert "failed (exit 2)" in error and "--lr -1.0: must lie in [0, inf)" in error and "logs" in error
    assert not (out / "results.csv").exists()
    assert reproduce.main(["table1", "--methods", "fedmpt,nope", "--out", str(out)]) == 2
    assert "--methods nope" in capsys.readouterr().err
    assert reproduce.main(["table3", "--out", str(out), "--", "--seed", "3"]) == 2
    with pytest.raises(SystemExit):
        reproduce.main(["table9", "--out", str(out)])


def test_tables_average_t_per_seed_then_seeds_and_stand_beside_the_published(tmp_path):
    args = reproduce.parse(["table3", "--out", str(tmp_path), "--methods", "fedmpt", "--seeds", "0,1"])
    assert args.dataset == ["multiscene", "mlrsnet"] and args.t == [1.0]
    cells = reproduce.make_cells(args)
    assert [(c["dataset"], c["clients"], c["rounds"]) for c in cells] == [("multiscene", 2, 50)] * 2 + [("mlrsnet", 4, 50)] * 2
    values = {("multiscene", 0): 50.0, ("multiscene", 1): 54.0, ("mlrsnet", 0): 60.0}  # mlrsnet seed 1 not run
    rows = {reproduce.cell_key(c): {**c, "mAP": v, "CF1": v - 10, "OF1": v + 5}
            for c in cells if (v := values.get((c["dataset"], c["seed"]))) is not None}
    table = reproduce.table3(cells, rows, args)
    assert "| FedMPT | 52.00 ± 2.83 / 42.00 ± 2.83 / 57.00 ± 2.83 | 60.00 / 50.00 / 65.00 |" in table
    assert "| FedMPT | 53.68 / 43.97 / 57.83 | 58.76 / 50.86 / 71.22 |" in table  # published

    args = reproduce.parse(["table1", "--out", str(tmp_path), "--dataset", "voc2007", "--methods", "fedmpt",
                            "--t", "0.5,1", "--seeds", "0,1", "--rounds", "3"])
    cells = reproduce.make_cells(args)
    values = {(0.5, 0): 80.0, (1.0, 0): 90.0, (0.5, 1): 84.0}  # seed 1 lacks t = 1: not yet averaged
    rows = {reproduce.cell_key(c): {**c, "mAP": v} for c in cells if (v := values.get((c["t"], c["seed"]))) is not None}
    table = reproduce.table1(cells, rows, args)
    assert "| FedMPT | 85.00 |" in table and "| FedMPT | voc2007 | 82.00 ± 2.83 | 90.00 |" in table
    assert "| FedMPT | 89.51 |" in table and all(c["rounds"] == 3 and c["clients"] == 2 for c in cells)


@pytest.mark.slow
def test_cells_run_side_by_side_give_the_results_of_one_at_a_time(tmp_path):
    data_dir = tmp_path / "data"
    write_folder(data_dir / "folder", rows=ROWS, header="image,labels,split")
    keep = lambda out: sorted((r["t"], r["mAP"], r["CF1"], r["OF1"]) for r in rows(out))
    for jobs in ("1", "2"):
        done = subprocess.run([*grid(tmp_path / f"jobs{jobs}", data_dir, "--jobs", jobs)[:-5], "--rounds", "3", "--",
                               "--batch-size", "4", "--workers", "0"], cwd=ROOT, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
    assert keep(tmp_path / "jobs1") == keep(tmp_path / "jobs2") and len(keep(tmp_path / "jobs2")) == 2
    assert reproduce.main(["table1", "--out", str(tmp_path / "x"), "--jobs", "0"]) == 2


def test_the_dry_run_prices_a_cell_by_its_class_count_from_the_measured_step_times():
    step_times = {("fedmpt", 20): 100.0, ("fedmpt", 80): 400.0}
    cell = {"method": "fedmpt", "dataset": "nuswide", "clients": 4}
    seconds, source = reproduce.seconds_per_round(cell, [], step_times)
    steps = -(-reproduce.TRAIN_IMAGES["nuswide"] // 32) + 4
    assert source == "step_time.json" and seconds == pytest.approx((100 + 300 * 61 / 60) * steps / 1000)
    voc = reproduce.seconds_per_round({**cell, "dataset": "voc2007"}, [], step_times)[0]
    assert voc == pytest.approx(100 * (-(-5011 // 32) + 4) / 1000)
    assert reproduce.ms_at([(20, 50.0)], 80) == 50.0


# ---- Rows whole or absent, one checked reader, one grid per --out ---------------------------
def a_row(seed, mAP="20.8275"):
    return {"method": "fedmpt", "dataset": "shapes", "t": "1.0", "seed": str(seed), "rounds": "1", "clients": "2",
            "options": "", "mAP": mAP, "CF1": "10.0", "OF1": "11.0", "seconds": "3.0", "run_dir": "x",
            "code_version": "abc"}


def test_a_torn_last_row_is_dropped_with_a_note_and_the_next_row_is_whole(tmp_path, capsys):
    path = tmp_path / "results.csv"
    reproduce.append_result(path, a_row(0))
    reproduce.append_result(path, a_row(1))
    whole = path.read_text()
    path.write_text(whole[:-12])  # torn inside the second row: "... 20.8" and no line end
    found = reproduce.read_results(path)
    assert [r["seed"] for r in found] == ["0"] and "last row was torn" in capsys.readouterr().err
    reproduce.append_result(path, a_row(2))
    assert [r["seed"] for r in reproduce.read_results(path)] == ["0", "2"]
    assert path.read_text().endswith("\n") and len(path.read_text().splitlines()) == 3


@pytest.mark.parametrize("mAP, message", [("20.8x", "mAP '20.8x' is not a number"), ("nan", "not a finite number")])
def test_an_edited_value_in_results_csv_names_its_line(tmp_path, capsys, mAP, message):
    out = tmp_path / "grid"
    out.mkdir()
    reproduce.append_result(out / "results.csv", a_row(0))
    reproduce.append_result(out / "results.csv", a_row(1, mAP))
    assert reproduce.main(["table1", "--dataset", "shapes", "--out", str(out), "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert "results.csv line 3" in error and message in error and "Traceback" not in error


def test_a_second_grid_on_the_same_out_is_refused(tmp_path, capsys):
    out = tmp_path / "grid"
    out.mkdir()
    held = reproduce.lock_grid(out)  # as a first grid that runs
    try:
        assert reproduce.main(["table1", "--dataset", "shapes", "--methods", "fed-poscoop", "--t", "1", "--seeds",
                               "0", "--out", str(out)]) == 2
        assert "another grid is running on --out" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == [".grid.lock"]  # nothing ran
    finally:
        os.close(held)


def test_a_seed_named_twice_is_one_cell_and_options_after_dashes_are_checked_in_both_spellings(tmp_path, capsys):
    args = reproduce.parse(["table1", "--out", str(tmp_path), "--dataset", "shapes", "--methods", "fedmpt",
                            "--t", "1,1", "--seeds", "0,0"])
    assert len(reproduce.make_cells(args)) == 1
    for extra in (["--seed=5"], ["--out=elsewhere"], ["--seed", "5"]):
        assert reproduce.main(["table1", "--out", str(tmp_path / "g"), "--dry-run", "--", *extra]) == 2
        assert "may not set --out" in capsys.readouterr().err


def test_an_out_at_or_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    for out in (tmp_path / "file", tmp_path / "file" / "grid"):
        assert reproduce.main(["table1", "--dataset", "shapes", "--out", str(out)]) == 2
        assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.slow
def test_a_torn_results_csv_resumes_to_the_same_table(tmp_path):
    """The grid run again after its last row was torn gives the untorn table."""
    data_dir, out = tmp_path / "data", tmp_path / "grid"
    write_folder(data_dir / "folder", rows=ROWS, header="image,labels,split")
    command = [*grid(out, data_dir)[:-5], "--rounds", "1", "--", "--batch-size", "4", "--workers", "0",
               "--clip", "tiny", "--threads", "1"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    table = (out / "table1.md").read_text()
    text = (out / "results.csv").read_text()
    (out / "results.csv").write_text(text[:-20])
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "last row was torn" in done.stderr
    assert (out / "table1.md").read_text() == table and (out / "results.csv").read_text() == text
