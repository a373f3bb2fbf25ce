"""Launching a Flower run: processes up, `flwr run`, the real status, processes down.

`launch` (in the command's process, `python flower_app.py`): a SuperLink and a SuperNode per
client on this machine (or a running SuperLink's, `--superlink`), `flwr run --stream` of this
repository as a Flower App (pyproject.toml), the run's real status from `flwr ls`, and every
process it started stopped again on success, failure, Ctrl-C and SIGTERM (processes.py).
"""
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from errors import FedMPTError
from experiment import Config, validate
from fedmpt import ModelConfig, option
from launcher.processes import accepts_connections, start, stop_processes
from shapes.model import WEIGHTS
from store.runs import default_out, write_json_atomic
from tools.options import field_problems

APP_DIR = Path(__file__).resolve().parents[1]  # the Flower App: pyproject.toml + this repository's code


@dataclass
class FlowerConfig:
    superlink: str = option("", "HOST:PORT (or a Flower connection name) of a running SuperLink",
                            shown="start one here")
    round_timeout: float = option(3600.0, "seconds an exchange (the preparation, each round) waits for replies",
                                  range="(0, inf)")
    min_nodes: int = option(1, "SuperNodes connected before a round starts", range="[1, inf)")


def launch(cfg: Config, model_cfg: ModelConfig, flower_cfg: FlowerConfig = FlowerConfig()):
    """Run the federation on Flower; returns the rows of metrics.json like federate.run."""
    checks = [(not cfg.resume, "--resume works with the plain engine only; a Flower run's checkpoint.pt is "
                               "the plain loop's, so `python federate.py --resume RUN_DIR` continues it"),
              (not cfg.plot and not cfg.validation, "--plot and --validation: only with the plain loop (python federate.py)")]
    problems = [message for ok, message in checks if not ok] + field_problems(flower_cfg)
    if problems:
        raise FedMPTError("; ".join(problems) + ".")
    validate(cfg, model_cfg)
    import tomli_w  # requirements-flower.txt (flower_app.py checks it is there)
    absolute = lambda path: str(Path(path).expanduser().resolve()) if path and path != "none" else path
    cfg = dataclasses.replace(  # the apps run in other processes, other directories
        cfg, root=absolute(cfg.root or os.path.join("data", cfg.dataset)), conditions=absolute(cfg.conditions),
        cache_dir=absolute(cfg.cache_dir),
        out=absolute(default_out(cfg)),
        clip_weights=absolute(cfg.clip_weights or (str(WEIGHTS) if cfg.clip == "shapes"
                                                    and not cfg.random_init else "")),
        attributes=absolute(cfg.attributes))  # app bundles carry no .pt
    flower_dir = Path(cfg.out) / "flower"  # logs, Flower's home, the SuperNodes' caches
    flower_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "TQDM_DISABLE": "1",
           # the components start each other by name (flower-superexec): this interpreter's bin
           # directory first, so a virtual environment works without being activated
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    superlink = flower_cfg.superlink
    connection = superlink if superlink and ":" not in superlink else "fedmpt"
    if connection == "fedmpt":  # a private Flower home; a connection name uses the user's (TLS settings)
        env["FLWR_HOME"] = str(flower_dir / "home")
    run_config = flower_dir / "run-config.toml"
    options = json.dumps({**dataclasses.asdict(cfg), **dataclasses.asdict(model_cfg), **dataclasses.asdict(flower_cfg)})
    run_config.write_text(tomli_w.dumps({"options": options}))

    processes, in_main_thread = [], threading.current_thread() is threading.main_thread()
    # SIGTERM ends a run like Ctrl-C (KeyboardInterrupt), through the clean-up below
    previous_handler = signal.signal(signal.SIGTERM, signal.default_int_handler) if in_main_thread else None
    try:
        address = superlink or start_local_federation(cfg.clients, flower_dir, env, processes)
        if connection == "fedmpt":
            Path(env["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
            (Path(env["FLWR_HOME"]) / "config.toml").write_text(tomli_w.dumps(
                {"superlink": {"default": connection, connection: {"address": address, "insecure": True}}}))
        run_id = flwr_run(connection, run_config, env, processes, flower_dir)
        status, details = run_status(connection, run_id, env)
        if status != "finished:completed":
            raise FedMPTError(f"the Flower run {run_id} ended {status}: {details or 'no details'} "
                              f"(logs in {flower_dir}).")
    except KeyboardInterrupt:
        raise FedMPTError("interrupted; every Flower process this run started was stopped.") from None
    finally:
        stop_processes(processes)
        shutil.rmtree(flower_dir / "cache", ignore_errors=True)  # the local SuperNodes' caches
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)
    metrics = Path(cfg.out) / "metrics.json"  # absent here when the SuperLink runs on another machine
    return json.loads(metrics.read_text()) if metrics.exists() else []


def executable(name: str) -> str:
    found = shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if not found:
        raise FedMPTError(f"{name} not found: pip install -r requirements-flower.txt")
    return found


def start_local_federation(n_clients, flower_dir: Path, env, processes) -> str:
    """One SuperLink and one SuperNode per client on 127.0.0.1 on free ports; returns the address."""
    sockets = [socket.socket() for _ in range(1 + n_clients)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    link_port, *node_ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    start([executable("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
           "--host", "127.0.0.1", "--port", str(link_port)], flower_dir / "superlink.log", env, processes)
    deadline = time.time() + 60
    while not accepts_connections(link_port):
        if processes[0].poll() is not None or time.time() > deadline:
            raise FedMPTError(f"the SuperLink did not start; see {flower_dir / 'superlink.log'}.")
        time.sleep(0.2)
    # The SuperNodes share this machine's cores: more threads than cores // clients only contend.
    node_env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n_clients)), **env}
    for client, port in enumerate(node_ports):
        node_config = f'partition-id={client} num-partitions={n_clients} cache-dir="{flower_dir / "cache"}"'
        start([executable("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
               "--host", "127.0.0.1", "--port", str(port), "--node-config", node_config],
              flower_dir / f"supernode-{client}.log", node_env, processes)
    write_json_atomic(flower_dir / "processes.json", {
        "superlink": processes[0].pid, "supernodes": [p.pid for p in processes[1:]]})
    return f"127.0.0.1:{link_port}"


def flwr_run(connection, run_config: Path, env, processes, flower_dir) -> int:
    """`flwr run APP_DIR CONNECTION --stream`, its output passed through; returns the run id."""
    command = [executable("flwr"), "run", str(APP_DIR), connection, "--stream", "--run-config", str(run_config)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)
    processes.append(process)
    run_id = None
    for line in process.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        found = re.search(r"Successfully started run (\d+)", line)
        run_id = run_id or (int(found.group(1)) if found else None)
    if process.wait() != 0 or run_id is None:
        raise FedMPTError(f"flwr run failed (exit {process.returncode}); see its output above and {flower_dir}.")
    return run_id


def run_status(connection, run_id, env) -> tuple:
    """The run's real status ('finished:completed', 'finished:failed', ...) and its details:
    `flwr run --stream` exits 0 even when the ServerApp failed (and when its stream broke)."""
    while True:
        listing = subprocess.run([executable("flwr"), "ls", connection, "--run-id", str(run_id), "--format", "json"],
                                 capture_output=True, text=True, env=env, timeout=60)
        try:
            run = json.loads(listing.stdout)["runs"][0]
        except (json.JSONDecodeError, KeyError, IndexError):
            raise FedMPTError(f"flwr ls cannot tell the status of run {run_id}: "
                              f"{(listing.stdout + listing.stderr)[-500:]}") from None
        if run["status"].startswith("finished"):
            return run["status"], run.get("status-details", "")
        time.sleep(2)
