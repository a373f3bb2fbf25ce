"""FedMPT on Flower's Deployment Engine: the federation of federate.py, across machines.

    python flower_app.py [options of federate.py]                      # here: a SuperLink + a SuperNode per client
    python flower_app.py [options] --superlink HOST:PORT               # a SuperLink whose SuperNodes already run

- `client_app` (on each SuperNode, client id = `--node-config partition-id=i`): a query message
  prepares it (experiment.setup, then the model and its own images' frozen features go to a
  node-local cache: one encoding per run); a train message runs federate.local_train with the
  plain loop's generator seed (federate.client_generator) and cosine learning rate.
- `server_app` (beside the SuperLink): FedMPTStrategy, Flower's FedAvg made to follow
  federate.run: the same client sampling (federate.sample_clients), validate_update +
  AGGREGATORS[--aggregate] weighted by num-examples, and the same round record
  (federate.record_round: central evaluation, metrics.json, checkpoint.pt).
- `launch` (in this command's process): processes up, `flwr run --stream`, the real status from
  `flwr ls`, every process stopped again on success, failure and Ctrl-C.

Faults map onto two Flower settings:
  --round-timeout S  Strategy.start(timeout=S) = Grid.send_and_receive(timeout=S): an exchange
                     (the preparation, each round) takes the replies that came within S seconds.
  --min-nodes N      FedAvg(min_available_nodes=N, min_train_nodes=N): a round starts once N
                     SuperNodes are connected (round 1 also waits, up to S, for all clients).
A SuperNode that dies mid-round sends nothing; the round ends at the timeout (or earlier, when
the SuperLink answers "node unavailable" for it ~45 s after its last heartbeat), aggregates the
others, names the missing client in the log and in clients_rejected, and the run goes on.
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

import numpy as np
import torch

import data
import federate
from errors import FedMPTError
from experiment import Config, Experiment, config_from, default_out, save_atomic, setup, validate, write_json_atomic
from federate import AGGREGATORS, validate_update
from fedmpt import ModelConfig
from shapes import model as shapes_clip
from tools.processes import accepts_connections, start, stop_processes

try:
    import tomli_w
    from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg
except ImportError as error:
    missing = f"the Flower engine needs Flower ({error}): pip install -r requirements-flower.txt"
    if __name__ == "__main__":  # python flower_app.py: a message, not a traceback
        print(f"error: {missing}", file=sys.stderr)
        sys.exit(2)
    raise FedMPTError(missing) from None

APP_DIR = Path(__file__).resolve().parent  # the Flower App: pyproject.toml + this repository's code


@dataclass
class FlowerConfig:
    superlink: str = ""  # HOST:PORT (or a Flower connection name) of a running SuperLink; '' = start one here
    round_timeout: float = 3600.0  # seconds an exchange waits for replies (Strategy.start timeout)
    min_nodes: int = 1  # SuperNodes connected before a round starts (FedAvg min_available_nodes)


def run_options(run_config) -> tuple:
    """(Config, ModelConfig, FlowerConfig) from the run config's `options`, one JSON string (see
    pyproject.toml)."""
    options = json.loads(run_config["options"])
    return config_from(Config, options), config_from(ModelConfig, options), config_from(FlowerConfig, options)


def ordered_state(record: ArrayRecord, reference: dict) -> dict:
    """An ArrayRecord as a tunable state: float32 tensors in the reference's key order (missing
    or extra keys are left for validate_update to report)."""
    state = {k: v.clone() for k, v in record.to_torch_state_dict().items()}
    return {**{k: state[k] for k in reference if k in state}, **state}


# ---- ClientApp: one per SuperNode --------------------------------------------------------
client_app = ClientApp()


def client_kit(context):
    """(client id, {model, inputs, y of this client's images in split order}, cache path). Built
    once per run with experiment.setup (the inputs in the feature store), then the model from
    the node's cache and the inputs memory-mapped from the store. Node-config keys for a
    machine laid out differently: data-root, clip-weights, feature-cache (the store; default
    --cache-dir, else the node's $FEDMPT_CACHE), cache-dir (the prepared model)."""
    cfg, model_cfg, _ = run_options(context.run_config)
    node, client = context.node_config, int(context.node_config["partition-id"])
    cache = Path(str(node.get("cache-dir", Path(os.environ.get("FLWR_HOME", "~/.flwr")) / "fedmpt-cache")))
    cache = cache.expanduser() / f"run-{context.run_id}-client-{client}.pt"
    if cache.exists():  # this node wrote it, for this run
        kit = torch.load(cache, weights_only=False)
        return client, {**kit, "inputs": data.open_store(kit["key"], kit["cache_dir"])}, cache
    cfg = dataclasses.replace(cfg, root=str(node.get("data-root", cfg.root)),
                              clip_weights=str(node.get("clip-weights", cfg.clip_weights)),
                              cache_dir=str(node.get("feature-cache", cfg.cache_dir)))
    exp = setup(cfg, model_cfg, write=False, client=client, test=False)  # this client's images only
    if int(node["num-partitions"]) != len(exp.splits):
        raise FedMPTError(f"--node-config partition-id={client} num-partitions={node['num-partitions']} "
                          f"does not fit this run's {len(exp.splits)} clients.")
    inputs, targets = exp.train
    kit = {"model": exp.model, "y": targets, "key": exp.store_keys["train"], "cache_dir": cfg.cache_dir}
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(kit, cache)
    return client, {**kit, "inputs": inputs}, cache


@client_app.query()
def prepare(message, context):
    client, kit, _ = client_kit(context)
    answer = MetricRecord({"partition-id": client, "num-examples": len(kit["y"])})
    return Message(RecordDict({"client": answer}), reply_to=message)


@client_app.train()
def train(message, context):
    cfg, _, _ = run_options(context.run_config)
    client, kit, cache = client_kit(context)
    round_index = int(message.content["config"]["server-round"])
    global_state = dict(message.content["arrays"].to_torch_state_dict())
    generator = federate.client_generator(cfg, round_index, client)
    lr = federate.cosine_lr(cfg.lr, round_index, cfg.rounds)
    indices = torch.arange(len(kit["y"]))  # the kit holds this client's images only, in split order
    state, n, stats = federate.local_train(kit["model"], global_state, kit["inputs"], kit["y"],
                                           indices, cfg, lr, generator)
    if round_index == cfg.rounds:
        cache.unlink(missing_ok=True)  # the last round: give the node its disk back
    metrics = MetricRecord({"num-examples": n, "train-loss": stats["loss"], "partition-id": client, "steps":
                            stats["steps"], "clip-share": stats["clip_share"], "grad-norm": stats["grad_norm"]})
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=message)


# ---- ServerApp: the strategy and the run directory ---------------------------------------
class FedMPTStrategy(FedAvg):
    """Flower's FedAvg, made to follow federate.run round for round."""

    def __init__(self, exp: Experiment, flower_cfg: FlowerConfig):
        cfg, nodes = exp.cfg, flower_cfg.min_nodes
        super().__init__(fraction_evaluate=0.0, min_train_nodes=nodes, min_available_nodes=nodes)
        self.exp, self.cfg, self.timeout = exp, cfg, flower_cfg.round_timeout
        self.rng = np.random.default_rng(cfg.seed)  # samples clients exactly as federate.run
        self.reference = exp.model.tunable_state()  # the keys, shapes and dtypes an update must have
        self.client_of = {}  # SuperNode id -> client id (None: it could not prepare)
        self.global_state, self.history, self.round = self.reference, [], {}

    def connected_clients(self, grid, round_index) -> dict:
        """{client id: SuperNode id}. Waits for min_nodes SuperNodes (round 1: for all clients,
        up to the timeout); every new SuperNode is asked which client it is (and prepares)."""
        deadline, said = time.time() + self.timeout, 0.0
        while len(nodes := list(grid.get_node_ids())) < self.min_available_nodes or (
                round_index == 1 and len(nodes) < self.cfg.clients and time.time() < deadline):
            if time.time() - said > 10:
                print(f"waiting for SuperNodes: {len(nodes)} of {self.cfg.clients} connected", flush=True)
                said = time.time()
            time.sleep(1)
        queries = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY)
                   for node in nodes if node not in self.client_of]
        problems = []
        for reply in grid.send_and_receive(queries, timeout=self.timeout) if queries else []:
            node = reply.metadata.src_node_id
            self.client_of[node] = None if reply.has_error() else int(reply.content["client"]["partition-id"])
            if reply.has_error():
                problems.append(f"SuperNode {node}: {reply.error.reason}")
                print(f"SuperNode {node} could not prepare ({reply.error.reason}); not used", flush=True)
        clients = {self.client_of[node]: node for node in nodes if self.client_of.get(node) is not None}
        if round_index == 1 and not clients:
            raise FedMPTError(f"no SuperNode prepared within {self.timeout:g} s: "
                              f"{'; '.join(problems) or 'no reply'}.")
        return clients

    def configure_train(self, server_round, arrays, config, grid):
        start = time.time()
        nodes = self.connected_clients(grid, server_round)
        sampled = federate.sample_clients(self.rng, self.cfg)
        absent = [client for client in sampled if client not in nodes]
        for client in absent:
            print(f"round {server_round}: client {client} has no SuperNode connected; left out", flush=True)
        self.round = {"start": start, "sent": [c for c in sampled if c in nodes], "rejected": absent}
        config["server-round"] = server_round
        content = RecordDict({"arrays": arrays, "config": config})
        return [Message(content, dst_node_id=nodes[c], message_type=MessageType.TRAIN) for c in self.round["sent"]]

    def aggregate_train(self, server_round, replies):
        """Leave out missing, failed and invalid updates, aggregate the rest (as run_round)."""
        say = lambda text: print(f"round {server_round}: {text}", flush=True)
        by_client = {self.client_of.get(reply.metadata.src_node_id): reply for reply in replies}
        states, sizes, stats, rejected = [], [], [], list(self.round["rejected"])
        for client in self.round["sent"]:
            reply = by_client.get(client)
            if reply is None:
                say(f"client {client} sent no reply within {self.timeout:g} s (SuperNode gone?); left out")
            elif reply.has_error():
                say(f"client {client} failed ({reply.error.reason}); left out")
            else:
                try:
                    state, metrics = ordered_state(reply.content["arrays"], self.reference), reply.content["metrics"]
                    n = int(metrics["num-examples"])
                    numbers = {"loss": float(metrics["train-loss"]), "steps": int(metrics["steps"]),
                               "clip_share": float(metrics["clip-share"]), "grad_norm": float(metrics["grad-norm"])}
                    problem = validate_update(state, self.reference)
                except (KeyError, TypeError, ValueError) as error:
                    problem = f"malformed reply ({type(error).__name__}: {error})"
                if not problem:
                    states.append(state), sizes.append(n), stats.append(numbers)
                    continue
                say(f"client {client} update rejected: {problem}")
            rejected.append(client)
        self.round.update(aggregated=len(states), rejected=sorted(rejected), stats=federate.combine_stats(stats, sizes))
        if not states:
            say("every client failed; the global state stays as it was")
            return None, None
        aggregated = AGGREGATORS[self.cfg.aggregate](states, sizes)
        summary = MetricRecord({"train-loss": self.round["stats"]["loss"], "clients-aggregated": len(states)})
        return ArrayRecord(aggregated), summary

    def evaluate_and_record(self, server_round, arrays):
        """Strategy.start's evaluate_fn: the plain loop's round record (federate.record_round)."""
        exp = self.exp
        self.global_state = ordered_state(arrays, self.reference)
        exp.model.load_tunable_state(self.global_state)
        if server_round == 0:
            loss, seconds, extra = None, 0.0, federate.reference_scores(exp)
        else:
            stats, seconds = self.round["stats"], time.time() - self.round["start"]
            loss, extra = stats["loss"], federate.training_columns(stats, self.round["aggregated"], self.round["rejected"])
        row = federate.record_round(exp, self.history, server_round, loss, seconds, extra, self.rng)
        return MetricRecord({"mAP": row["mAP"], "CF1": row["CF1"], "OF1": row["OF1"]})


server_app = ServerApp()


@server_app.main()
def server_main(grid, context):
    cfg, model_cfg, flower_cfg = run_options(context.run_config)
    exp = setup(cfg, model_cfg, record={"engine": "flower", **dataclasses.asdict(flower_cfg)},
                train=False)  # the server evaluates; it trains no client
    strategy = FedMPTStrategy(exp, flower_cfg)  # launch made every path absolute
    print(f"label prior mAP {exp.prior_mAP:.2f}; client sizes {[len(s) for s in exp.splits]}")
    print(federate.TABLE_HEADER, flush=True)
    strategy.start(grid, ArrayRecord(strategy.reference), num_rounds=cfg.rounds, timeout=flower_cfg.round_timeout,
                   evaluate_fn=strategy.evaluate_and_record)
    save_atomic(strategy.global_state, exp.out / "state.pt")
    print(f"final mAP {strategy.history[-1]['mAP']:.2f}; run saved in {exp.out}", flush=True)
    federate.warn_if_untrained(strategy.history, exp.cfg.lr)


# ---- launch: processes up, flwr run, status, processes down ------------------------------
def launch(cfg: Config, model_cfg: ModelConfig, flower_cfg: FlowerConfig = FlowerConfig()):
    """Run the federation on Flower; returns the rows of metrics.json like federate.run."""
    checks = [(not cfg.resume, "--resume works with the plain engine only; a Flower run's checkpoint.pt is "
                               "the plain loop's, so `python federate.py --resume RUN_DIR` continues it"),
              (not cfg.plot and not cfg.validation, "--plot and --validation: only with the plain loop (python federate.py)"),
              (flower_cfg.round_timeout > 0, f"--round-timeout {flower_cfg.round_timeout}: must be positive"),
              (flower_cfg.min_nodes >= 1, f"--min-nodes {flower_cfg.min_nodes}: must be at least 1")]
    problems = [message for ok, message in checks if not ok]
    if problems:
        raise FedMPTError("; ".join(problems) + ".")
    validate(cfg, model_cfg)
    absolute = lambda path: str(Path(path).expanduser().resolve()) if path and path != "none" else path
    cfg = dataclasses.replace(  # the apps run in other processes, other directories
        cfg, root=absolute(cfg.root or os.path.join("data", cfg.dataset)), conditions=absolute(cfg.conditions),
        cache_dir=absolute(cfg.cache_dir),
        out=absolute(default_out(cfg)),
        clip_weights=absolute(cfg.clip_weights or (str(shapes_clip.WEIGHTS) if cfg.clip == "shapes"
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


def main(argv=None) -> int:
    """`python flower_app.py [options]`: federate.py's options plus FlowerConfig's."""
    parser = federate.build_parser((Config, ModelConfig, FlowerConfig), prog="flower_app.py")
    args = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    try:
        launch(config_from(Config, args), config_from(ModelConfig, args), config_from(FlowerConfig, args))
    except FedMPTError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
