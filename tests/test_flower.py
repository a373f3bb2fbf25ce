"""`python flower_app.py`: the federation on Flower's Deployment Engine (SuperLink + SuperNodes on
127.0.0.1) equals the plain loop, survives a SuperNode that dies, fails whole when a SuperNode
cannot start or the SuperLink dies, and leaves no process behind (none with the launch's token).

Each exchange costs 3-6 s of Flower's polling, so the runs are tiny (batch 128, 2-3 rounds).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # whole federations in subprocesses

REPO = Path(__file__).resolve().parents[1]


def without_flower(code):
    """Run `code` in a fresh interpreter in which `import flwr` fails."""
    blocker = "import sys; sys.modules['flwr'] = None; sys.path.insert(0, %r)\n" % str(REPO)
    return subprocess.run([sys.executable, "-c", blocker + code], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_plain_loop_never_imports_flower_and_a_missing_flower_says_what_to_install(tmp_path):
    result = without_flower("import federate, sys\n"
                            "federate.parse_config(['--rounds', '1'])\n"
                            "assert not [m for m, module in sys.modules.items() if m.startswith('flwr') and module]\n"
                            "sys.exit(federate.main(['--engine', 'flower', '--out', %r]))" % str(tmp_path / "run"))
    assert result.returncode == 2 and "unrecognized arguments: --engine" in result.stderr, result.stderr[-2000:]
    result = without_flower("import runpy, sys\nsys.argv = ['flower_app.py', '--out', %r]\n"
                            "runpy.run_path('flower_app.py', run_name='__main__')" % str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "pip install -r requirements-flower.txt" in result.stderr and "Traceback" not in result.stderr


flwr = pytest.importorskip("flwr", reason="flwr is not installed: pip install -r requirements-flower.txt")
import federate  # noqa: E402
import flower_app  # noqa: E402,F401
from launcher.processes import alive, process_tree, tagged  # noqa: E402

TINY = ["--batch-size", "128"]
# On a busy machine torch's second thread turns every small op into a wait for a time slice
# (a 0.2 s evaluation took 30 s): the processes of a test use one thread each.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


# flower_app.py, but where the launcher chooses free ports (a bind to port 0 per component: the
# SuperLink, SuperNode 0, SuperNode 1), SuperNode 1 gets the port this test holds (argv[1]) on the
# first argv[2] tries: the race in which another process takes a chosen port before it is used.
HOLDS_PORT = """import socket, sys
sys.path.insert(0, %r)
held, tries, chosen = int(sys.argv[1]), int(sys.argv[2]), []
class Chooser(socket.socket):
    def bind(self, address):
        super().bind(address)
        if address == ("127.0.0.1", 0):
            chosen.append(self)
            self.given = held if len(chosen) %% 3 == 0 and len(chosen) <= 3 * tries else None
    def getsockname(self):
        return ("127.0.0.1", self.given) if getattr(self, "given", None) else super().getsockname()
socket.socket = Chooser
import flower_app
sys.exit(flower_app.main(sys.argv[3:]))
""" % str(REPO)


def command_line(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


class FlowerRun:
    """`python flower_app.py ...` in a subprocess, watching every process it starts."""

    def __init__(self, out: Path, *options, env=None, program=(str(REPO / "flower_app.py"),)):
        self.out, self.log_path, self.seen = out, out.with_suffix(".log"), set()
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, *program, "--out", str(out), *options],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **ONE_THREAD, **(env or {})},
                # a shell that started the tests in the background ignores SIGINT, and children
                # inherit that; Ctrl-C must reach this run as it does in a terminal
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def watch(self, until=lambda: False, seconds=240) -> bool:
        """Poll until `until()` holds, the run ends or `seconds` pass, noting the pids of all
        its descendants; returns whether `until()` held."""
        deadline = time.time() + seconds
        while time.time() < deadline and self.process.poll() is None:
            self.seen.update(process_tree([self.process.pid]))
            if until():
                return True
            time.sleep(0.2)
        return until()

    def finish(self, seconds=240) -> int:
        self.watch(seconds=seconds)
        return self.process.wait(timeout=30)

    def output(self) -> str:
        return self.log_path.read_text()

    def history(self) -> list:
        path = self.out / "metrics.json"
        return json.loads(path.read_text()) if path.exists() else []

    def error(self) -> str:
        """What the run said after `error:` (a message may end with a log's tail)."""
        output = self.output()
        return output[output.rindex("error: "):]

    def tagged(self) -> list:
        """Running processes whose environment holds this launch's token, wherever their parent is."""
        token = json.loads((self.out / "flower" / "processes.json").read_text())["token"]
        return [pid for pid in tagged(token) if alive(pid)]

    def assert_no_process_left(self):
        started = json.loads((self.out / "flower" / "processes.json").read_text())
        pids = {started["superlink"], *started["supernodes"]}
        assert pids < self.seen  # the watch saw them, and their children (superexecs, apps)
        assert not [pid for pid in self.seen if alive(pid)], "processes left running"
        assert not self.tagged(), "processes of this launch left running (re-parented away from it)"

    def stop(self):
        if self.process.poll() is None:  # a failed test: let launch clean up as on Ctrl-C
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


@pytest.fixture
def flower_run():
    runs = []

    def start(out, *options, **how):
        runs.append(FlowerRun(out, *options, **how))
        return runs[-1]
    yield start
    for run in runs:
        run.stop()


def both_engines(flower_run, tmp_path, options):
    """The same options on Flower (tmp_path/flower) and, meanwhile, in the plain loop here
    (tmp_path/plain, one thread): (the finished Flower run, the plain loop's history)."""
    flower = flower_run(tmp_path / "flower", *options, "--round-timeout", "300")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the plain loop runs meanwhile, here
        plain = federate.run(*federate.parse_config([*options, "--out", str(tmp_path / "plain")]))
    finally:
        torch.set_num_threads(threads)
    assert flower.finish() == 0, flower.output()[-3000:]
    return flower, plain


def test_flower_run_equals_the_plain_loop(shapes_root, tmp_path, flower_run):
    options = ["--root", str(shapes_root), "--clients", "2", "--rounds", "2", "--seed", "3", *TINY]
    flower, plain = both_engines(flower_run, tmp_path, options)

    a = torch.load(tmp_path / "flower" / "state.pt", weights_only=True)
    b = torch.load(tmp_path / "plain" / "state.pt", weights_only=True)
    assert list(a) == list(b) and all(a[k].dtype == b[k].dtype == torch.float32 for k in b)
    largest = max(float((a[k] - b[k].cpu()).abs().max()) for k in b)
    history = flower.history()
    metric_gap = max(abs(x[k] - y[k]) for x, y in zip(history, plain) for k in ("mAP", "CF1", "OF1", "OP", "OR"))
    loss_gap = max(abs(x["loss"] - y["loss"]) for x, y in zip(history[1:], plain[1:]))
    clip_gap = max(abs(x[k] - y[k]) / max(1.0, abs(y[k])) for x, y in zip(history[1:], plain[1:])
                   for k in ("clip_share", "grad_norm"))  # the clients' local-step numbers came back
    print(f"largest difference flower - plain: state {largest:.2e}, metrics {metric_gap:.2e}, loss {loss_gap:.2e}, "
          f"clip share and gradient norm {clip_gap:.2e}")
    assert largest <= 1e-5 and metric_gap <= 1e-3 and loss_gap <= 1e-5 and clip_gap <= 1e-5
    assert [list(row) for row in history] == [list(row) for row in plain]  # the same keys, in order
    assert [row.get("clients_aggregated") for row in history] == [None, 2, 2]
    saved = torch.load(tmp_path / "flower" / "checkpoint.pt", weights_only=True)
    assert saved["round"] == 2 and json.loads((tmp_path / "flower" / "config.json").read_text())["engine"] == "flower"
    flower.assert_no_process_left()


def test_a_supernode_killed_mid_run_is_left_out_and_the_run_goes_on(shapes_root, tmp_path, flower_run):
    run = flower_run(tmp_path / "fault", "--root", str(shapes_root), "--clients", "2", "--rounds", "2",
                     "--round-timeout", "25", *TINY)
    assert run.watch(until=lambda: len(run.history()) >= 2), run.output()[-3000:]  # round 2 has begun
    victim = json.loads((tmp_path / "fault" / "flower" / "processes.json").read_text())["supernodes"][1]
    os.killpg(victim, signal.SIGKILL)  # the SuperNode of client 1 and its children
    assert run.finish() == 0, run.output()[-3000:]

    history = run.history()
    print("seconds per round:", [round(row["seconds"], 1) for row in history[1:]])
    assert [row["round"] for row in history] == [0, 1, 2]  # the run finished without it
    assert history[1]["clients_aggregated"] == 2 and history[1]["clients_rejected"] == []
    assert history[2]["clients_aggregated"] == 1 and history[2]["clients_rejected"] == [1]
    assert [line for line in run.output().splitlines() if line.startswith("round 2: client 1 ")]
    assert (tmp_path / "fault" / "state.pt").exists()
    run.assert_no_process_left()


def test_a_failed_server_app_exits_2_with_flowers_status(shapes_root, tmp_path, flower_run):
    # launch cannot see that the condition file is missing; the ServerApp's setup fails on it
    # started as from a virtual environment that is not activated: Flower's commands are not on
    # PATH, only beside the interpreter (launch puts that directory first for its processes)
    bare = {"PATH": os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                    if not (Path(p) / "flower-superexec").exists())}
    run = flower_run(tmp_path / "failed", "--root", str(shapes_root), "--clients", "1", "--rounds", "1",
                     "--conditions", str(tmp_path / "missing.json"), env=bare)
    assert run.finish() == 2
    error = run.output().splitlines()[-1]
    assert error.startswith("error: the Flower run") and "finished:failed" in error and "missing.json" in error
    assert "takes commands from every user of this machine" in run.output()  # said at start
    run.assert_no_process_left()


def test_ctrl_c_stops_every_process(shapes_root, tmp_path, flower_run):
    # 50 rounds: far from done when interrupted, however slow or fast the machine
    run = flower_run(tmp_path / "interrupted", "--root", str(shapes_root), "--clients", "2", "--rounds", "50")
    assert run.watch(until=lambda: len(run.history()) >= 1), run.output()[-3000:]  # round 0 is recorded
    run.process.send_signal(signal.SIGINT)
    assert run.finish(seconds=60) == 2
    assert "interrupted" in run.output().splitlines()[-1]
    run.assert_no_process_left()


def test_a_supernode_that_cannot_start_fails_the_run_with_its_log(shapes_root, tmp_path, flower_run):
    with socket.socket() as held:  # SuperNode 1's port, taken on every try
        held.bind(("127.0.0.1", 0))
        held.listen()
        run = flower_run(tmp_path / "taken", "--root", str(shapes_root), "--clients", "2", "--rounds", "1",
                         "--round-timeout", "20", program=("-c", HOLDS_PORT, str(held.getsockname()[1]), "99"))
        assert run.finish(seconds=120) == 2, run.output()[-3000:]  # before: exit 0, client 1 left out
    error = run.error()
    assert error.startswith("error: SuperNode 1 exited at start") and "taken on each of 3 tries" in error
    assert "address already in use" in error and "supernode-1.log" in error  # the tail of its log
    assert not (tmp_path / "taken" / "metrics.json").exists()  # no run started with one client
    run.assert_no_process_left()


def test_a_taken_port_is_retried_and_a_superlink_killed_mid_run_fails_it_leaving_no_process(
        shapes_root, tmp_path, flower_run):
    with socket.socket() as held:  # SuperNode 1's port on the first try only
        held.bind(("127.0.0.1", 0))
        held.listen()
        run = flower_run(tmp_path / "orphans", "--root", str(shapes_root), "--clients", "2", "--rounds", "50",
                         program=("-c", HOLDS_PORT, str(held.getsockname()[1]), "1"))
        assert run.watch(until=lambda: len(run.history()) >= 1), run.output()[-3000:]  # round 0 is recorded
    assert [pid for pid in run.seen if b"flwr-serverapp" in command_line(pid)]  # which the SuperLink's death orphans
    started = json.loads((tmp_path / "orphans" / "flower" / "processes.json").read_text())
    os.kill(started["superlink"], signal.SIGKILL)
    assert run.finish(seconds=60) == 2, run.output()[-3000:]
    run.assert_no_process_left()  # before: flwr-serverapp (about 940 MB) ran on under PID 1
    assert run.error().startswith("error: the SuperLink exited mid-run (code -9)")
    assert "SuperNode 1: port taken before it was bound; starting the federation again" in run.output()


def test_an_out_that_holds_a_run_is_refused_before_any_flower_process_starts(tmp_path, capsys, monkeypatch):
    """Refused in one error line before any process starts (not after Flower's start-up, in a
    streamed ServerApp traceback)."""
    import hashlib
    import launcher.flower
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text("[]")
    (run / "config.json").write_text("{}")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.iterdir()}
    started = []
    monkeypatch.setattr(launcher.flower, "start_local_federation", lambda *a, **k: started.append(1))
    start = time.time()
    assert flower_app.main(["--out", str(run), "--clip", "tiny", "--threads", "1"]) == 2
    error = capsys.readouterr().err
    assert f"--out {run} already holds a run" in error and "Traceback" not in error
    assert time.time() - start < 10 and not started
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.iterdir()} == before
