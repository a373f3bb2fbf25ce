"""Launching a Flower run: processes up, `flwr run`, the real status, processes down.

`launch` (in the command's process, `python flower_app.py`): a SuperLink and a SuperNode per
client on this machine (or a running SuperLink's, `--superlink`), `flwr run --stream` of this
repository as a Flower App (pyproject.toml), the run's real status from `flwr ls`, and every
process it started stopped again on success, failure, Ctrl-C and SIGTERM (processes.py).

A local federation fails whole or finishes whole: the run starts once every SuperNode started
here is alive and online at the SuperLink (a component that cannot bind its port is started
again on new ports, up to ATTEMPTS tries; any other start failure is an error with the log's
tail), and a SuperLink that dies, or the last SuperNode, ends the run with exit 2. One SuperNode
that dies mid-run is a fault the run survives (flower_app.py leaves its client out).
"""
import dataclasses
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from errors import FedMPTError
from experiment import resolve
from options import Config, FlowerConfig, ModelConfig, field_problems
from launcher.processes import (TOKEN_VARIABLE, accepts_connections, free_ports, log_tail, new_token, start,
                                stop_processes)
from shapes.model import WEIGHTS
from store.files import write_json
from store.runs import run_directory

APP_DIR = Path(__file__).resolve().parents[1]  # the Flower App: pyproject.toml + this repository's code
ATTEMPTS = 3  # tries at starting the local federation when a port was taken meanwhile
PORT_TAKEN = "address already in use"  # what a component's log says when it cannot bind
CONNECT_SECONDS = 90  # for every local SuperNode to come online


def launch(cfg: Config, model_cfg: ModelConfig, flower_cfg: FlowerConfig = FlowerConfig()):
    """Run the federation on Flower; returns the rows of metrics.json like federate.run."""
    checks = [(not cfg.resume, "--resume works with the plain engine only; a Flower run's checkpoint.pt is "
                               "the plain loop's, so `python federate.py --resume RUN_DIR` continues it"),
              (not cfg.plot and not cfg.validation, "--plot and --validation: only with the plain loop (python federate.py)"),
              (not cfg.personalize, "--personalize: only with the plain loop (python federate.py): a Flower server "
                                    "holds no client's training images to fine-tune on")]
    problems = [message for ok, message in checks if not ok] + field_problems(flower_cfg)
    if problems:
        raise FedMPTError("; ".join(problems) + ".")
    cfg, model_cfg, _, root = resolve(cfg, model_cfg)  # checked; the method's own --lr; the dataset's root
    out = run_directory(cfg)  # at once: before any Flower process starts (it took ~26 s to say so)
    import tomli_w  # requirements-flower.txt (flower_app.py checks it is there)
    superlink = flower_cfg.superlink
    connection = superlink if superlink and ":" not in superlink else "fedmpt"
    if connection == "fedmpt" and superlink and not is_loopback(superlink):
        print(f"WARNING: --superlink {superlink} is not on this machine and HOST:PORT connects without TLS: "
              "the run's code, options and model updates cross the network unencrypted, to whoever answers "
              "at that address, and anyone who reaches it can list and stop runs. Across machines, give the "
              "SuperLink certificates and pass a connection name instead (docs/flower.md, Security).",
              file=sys.stderr, flush=True)
    absolute = lambda path: str(Path(path).expanduser().resolve()) if path and path != "none" else path
    cfg = dataclasses.replace(  # the apps run in other processes, other directories
        cfg, root=absolute(root), conditions=absolute(cfg.conditions),
        cache_dir=absolute(cfg.cache_dir),
        out=absolute(str(out)),
        clip_weights=absolute(cfg.clip_weights or (str(WEIGHTS) if cfg.clip == "shapes"
                                                    and not cfg.random_init else "")),
        attributes=absolute(cfg.attributes))  # app bundles carry no .pt
    flower_dir = Path(cfg.out) / "flower"  # logs, Flower's home, the SuperNodes' caches
    flower_dir.mkdir(parents=True, exist_ok=True)
    token = new_token()  # in every process this launch starts: stop_processes finds them all by it
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "TQDM_DISABLE": "1",
           TOKEN_VARIABLE: token,
           # the components start each other by name (flower-superexec): this interpreter's bin
           # directory first, so a virtual environment works without being activated
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    if connection == "fedmpt":  # a private Flower home; a connection name uses the user's (TLS settings)
        env["FLWR_HOME"] = str(flower_dir / "home")
    run_config = flower_dir / "run-config.toml"
    options = json.dumps({**dataclasses.asdict(cfg), **dataclasses.asdict(model_cfg), **dataclasses.asdict(flower_cfg)})
    run_config.write_text(tomli_w.dumps({"options": options}))

    processes, in_main_thread = [], threading.current_thread() is threading.main_thread()
    # SIGTERM ends a run like Ctrl-C (KeyboardInterrupt), through the clean-up below
    previous_handler = signal.signal(signal.SIGTERM, signal.default_int_handler) if in_main_thread else None
    try:
        if not superlink:
            start_local_federation(cfg.clients, flower_dir, env, processes, token)
        elif connection == "fedmpt":
            write_connection(env, connection, superlink)
        local = list(processes)  # the SuperLink and SuperNodes started here, watched while the run runs
        run_id = flwr_run(connection, run_config, env, processes, local, flower_dir)
        status, details = run_status(connection, run_id, env, local, flower_dir)
        if status != "finished:completed":
            raise FedMPTError(f"the Flower run {run_id} ended {status}: {details or 'no details'} "
                              f"(logs in {flower_dir}).")
    except KeyboardInterrupt:
        raise FedMPTError("interrupted; every Flower process this run started was stopped.") from None
    finally:
        stop_processes(processes, token)
        shutil.rmtree(flower_dir / "cache", ignore_errors=True)  # the local SuperNodes' caches
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)
    metrics = Path(cfg.out) / "metrics.json"  # absent here when the SuperLink runs on another machine
    return json.loads(metrics.read_text()) if metrics.exists() else []


def is_loopback(address: str) -> bool:
    """Whether HOST:PORT (IPv6 as [::1]:PORT) names this machine's loopback interface."""
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: another machine, as far as we can tell
        return False


def write_connection(env, connection, address):
    """The private Flower home's one connection: `address`, without TLS."""
    import tomli_w
    home = Path(env["FLWR_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(tomli_w.dumps(
        {"superlink": {"default": connection, connection: {"address": address, "insecure": True}}}))


def executable(name: str) -> str:
    found = shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if not found:
        raise FedMPTError(f"{name} not found: pip install -r requirements-flower.txt")
    return found


def start_local_federation(n_clients, flower_dir: Path, env, processes, token):
    """One SuperLink and one SuperNode per client on 127.0.0.1, on free ports; returns once every
    SuperNode is online. `processes` gets the SuperLink first, then SuperNode 0, 1, ..."""
    logs = [flower_dir / "superlink.log", *(flower_dir / f"supernode-{c}.log" for c in range(n_clients))]
    names = ["the SuperLink", *(f"SuperNode {c}" for c in range(n_clients))]
    for attempt in range(1, ATTEMPTS + 1):
        address, dead = start_components(n_clients, flower_dir, env, processes, logs, token)
        if not dead:
            print(f"note: the SuperLink's control API ({address}) takes commands from every user of this "
                  "machine: `flwr ls` and `flwr stop` need no login (Flower's open-source SuperLink has no "
                  "control-API authentication). On a shared machine, run this in a network namespace of "
                  "your own (docs/flower.md, Security).", flush=True)
            return
        taken = [i for i in dead if PORT_TAKEN in logs[i].read_text(errors="replace").lower()]
        failed = next((i for i in dead if i not in taken), None)  # a failure a new port does not fix
        if failed is not None or attempt == ATTEMPTS:
            i = dead[0] if failed is None else failed
            tries = f" (its port was taken on each of {ATTEMPTS} tries)" if i in taken else ""
            raise FedMPTError(f"{names[i]} exited at start with code {processes[i].returncode}{tries}, so the "
                              f"run would miss it. The tail of {logs[i]}:\n{log_tail(logs[i])}")
        print(f"{', '.join(names[i] for i in taken)}: port taken before it was bound; starting the federation "
              f"again on new ports (try {attempt + 1} of {ATTEMPTS})", flush=True)
        stop_processes(processes, token)
        processes.clear()


def start_components(n_clients, flower_dir: Path, env, processes, logs, token) -> tuple:
    """The SuperLink, then the SuperNodes, on ports free a moment ago: (address, the indices
    of the processes that exited before all were online, 0 the SuperLink; [] when all run)."""
    link_port, *node_ports = free_ports(1 + n_clients)
    address = f"127.0.0.1:{link_port}"
    write_connection(env, "fedmpt", address)
    start([executable("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
           "--host", "127.0.0.1", "--port", str(link_port)], logs[0], env, processes)
    deadline = time.time() + 60
    while not accepts_connections(link_port):
        if processes[0].poll() is not None:
            return address, [0]
        if time.time() > deadline:
            raise FedMPTError(f"the SuperLink did not open its port within 60 s; see {logs[0]}.")
        time.sleep(0.2)
    # The SuperNodes share this machine's cores: more threads than cores // clients only contend.
    node_env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n_clients)), **env}
    for client, port in enumerate(node_ports):
        node_config = f'partition-id={client} num-partitions={n_clients} cache-dir="{flower_dir / "cache"}"'
        start([executable("flower-supernode"), "--insecure", "--superlink", address,
               "--host", "127.0.0.1", "--port", str(port), "--node-config", node_config],
              logs[1 + client], node_env, processes)
    write_json(flower_dir / "processes.json", {
        "superlink": processes[0].pid, "supernodes": [p.pid for p in processes[1:]], "token": token})
    return address, wait_until_online(n_clients, env, processes, logs)


def wait_until_online(n_nodes, env, processes, logs) -> list:
    """Waits until `flwr supernode list` shows n_nodes SuperNodes online while every started
    process still runs; returns the indices of those that exited ([] once all are online)."""
    deadline, online = time.time() + CONNECT_SECONDS, 0
    while True:
        dead = [i for i, process in enumerate(processes) if process.poll() is not None]
        if dead or online >= n_nodes:
            return dead
        if time.time() > deadline:
            raise FedMPTError(f"{online} of the {n_nodes} SuperNodes started here came online within "
                              f"{CONNECT_SECONDS} s; see {', '.join(str(log) for log in logs)}.")
        time.sleep(0.5)
        online = online_nodes(env)


def online_nodes(env) -> int:
    """How many SuperNodes the local SuperLink lists as online (0 while it cannot tell)."""
    try:
        listing = subprocess.run([executable("flwr"), "supernode", "list", "fedmpt", "--format", "json"],
                                 capture_output=True, text=True, env=env, timeout=30)
        return sum(node.get("status") == "online" for node in json.loads(listing.stdout).get("nodes", []))
    except (subprocess.TimeoutExpired, json.JSONDecodeError, AttributeError):
        return 0


def check_federation(local, flower_dir: Path):
    """Raises when the local SuperLink has exited, or every local SuperNode has: the run cannot
    go on (one SuperNode gone is a fault it survives). `local`: the SuperLink first; [] when the
    SuperLink is not ours (--superlink)."""
    if not local:
        return
    superlink, nodes, log = local[0], local[1:], flower_dir / "superlink.log"
    if superlink.poll() is not None:
        raise FedMPTError(f"the SuperLink exited mid-run (code {superlink.returncode}); the run cannot go on and "
                          f"every Flower process it left was stopped. The tail of {log}:\n{log_tail(log)}")
    if all(node.poll() is not None for node in nodes):
        tails = "\n".join(f"{flower_dir / f'supernode-{c}.log'}:\n{log_tail(flower_dir / f'supernode-{c}.log', 4)}"
                          for c in range(len(nodes)))
        raise FedMPTError(f"every SuperNode started here has exited; no client is left to train. Their logs' "
                          f"tails:\n{tails}")


def flwr_run(connection, run_config: Path, env, processes, local, flower_dir) -> int:
    """`flwr run APP_DIR CONNECTION --stream`, its output passed through; returns the run id.
    Meanwhile the local federation is watched (check_federation)."""
    command = [executable("flwr"), "run", str(APP_DIR), connection, "--stream", "--run-config", str(run_config)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)
    processes.append(process)
    run_ids = []
    reader = threading.Thread(target=pass_through, args=(process.stdout, run_ids, flower_dir / "flwr-run.log"),
                              daemon=True)
    reader.start()
    while process.poll() is None:
        check_federation(local, flower_dir)
        time.sleep(0.5)
    reader.join(timeout=30)
    check_federation(local, flower_dir)  # `flwr run` ends when the SuperLink dies: that is the cause to name
    if process.returncode != 0 or not run_ids:
        raise FedMPTError(f"flwr run failed (exit {process.returncode}); see its output above and {flower_dir}.")
    return run_ids[0]


# Flower's own log lines ("INFO :      Starting FedAvg strategy", coloured): the level, an optional time, ": "
FLOWER_LOG_LINE = re.compile(r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) (\d{4}-\d\d-\d\d [\d:,.]+)?\s*: ")
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
# Flower's warnings that say what our strategy does by design: the server evaluates (evaluate_fn)
EXPECTED_WARNINGS = ("fraction_evaluate is set to 0.0",)


def shown(line: str) -> bool:
    """Whether a line of `flwr run`'s output reaches the console: every line of ours, and of
    Flower's own log lines only its warnings and errors, less the EXPECTED_WARNINGS."""
    found = FLOWER_LOG_LINE.match(ANSI_COLOUR.sub("", line))
    if found is None:
        return True
    return found.group(1) not in ("DEBUG", "INFO") and not any(text in line for text in EXPECTED_WARNINGS)


def pass_through(stream, run_ids: list, log: Path):
    """`flwr run`'s output to ours, Flower's own INFO lines and expected warnings left out (`shown`);
    every line kept in `log` (the run directory's flower/flwr-run.log). Notes the run id it announces."""
    with open(log, "a", encoding="utf-8") as kept:
        for line in stream:
            kept.write(line)
            kept.flush()
            if shown(line):
                sys.stdout.write(line)
                sys.stdout.flush()
            if found := re.search(r"Successfully started run (\d+)", line):
                run_ids.append(int(found.group(1)))


def run_status(connection, run_id, env, local, flower_dir) -> tuple:
    """The run's real status ('finished:completed', 'finished:failed', ...) and its details:
    `flwr run --stream` exits 0 even when the ServerApp failed (and when its stream broke)."""
    while True:
        check_federation(local, flower_dir)
        try:
            listing = subprocess.run([executable("flwr"), "ls", connection, "--run-id", str(run_id), "--format",
                                      "json"], capture_output=True, text=True, env=env, timeout=60)
            run = json.loads(listing.stdout)["runs"][0]
        except subprocess.TimeoutExpired:
            raise FedMPTError(f"flwr ls gave no status of run {run_id} within 60 s: is the SuperLink reachable?") from None
        except (json.JSONDecodeError, KeyError, IndexError):
            raise FedMPTError(f"flwr ls cannot tell the status of run {run_id}: "
                              f"{(listing.stdout + listing.stderr)[-500:]}") from None
        if run["status"].startswith("finished"):
            return run["status"], run.get("status-details", "")
        time.sleep(2)
