"""FedMPT on Flower's Deployment Engine: the federation of federate.py, across machines.

    python flower_app.py [options of federate.py]                      # here: a SuperLink + a SuperNode per client
    python flower_app.py [options] --superlink HOST:PORT               # a SuperLink whose SuperNodes already run

- `client_app` (on each SuperNode, client id = `--node-config partition-id=i`): a query message
  prepares it (experiment.prepare, then its own images' frozen features: training_inputs, one
  encoding per run; a kit of tensors and plain values goes to a node-local cache, from which each
  later message builds the model again: client_kit); a train message runs
  client.local_train with the plain loop's generator seed (federate.client_generator) and
  cosine learning rate.
- `server_app` (beside the SuperLink): FedMPTStrategy, Flower's FedAvg made to follow
  federate.run: the same client sampling (federate.sample_clients), the same
  federate.accept_and_aggregate (validation, rejection, the --aggregate rule weighted by
  num-examples) and the same round row (federate.evaluate_round: central evaluation; save_round:
  metrics.json, checkpoint.pt). It builds the test side only (experiment.test_side).
- `main` (this command's process): launcher/flower.py's `launch` starts the processes, runs
  `flwr run --stream`, reads the real status and stops every process again.

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
import sys
import time
from pathlib import Path

import numpy as np
import torch

import availability
import evaluation
import experiment
import federate
import zeroshot
from errors import FedMPTError, exit_code
from client import local_train
from experiment import Experiment
from launcher.flower import launch
from options import Config, FlowerConfig, ModelConfig, build_parser, config_from
from store import features, runs
from store.files import save_tensors
from store.runs import load_checkpoint

try:
    from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
    import tomli_w  # noqa: F401 (launch writes Flower's TOML files with it)
except ImportError as error:
    missing = f"the Flower engine needs Flower ({error}): pip install -r requirements-flower.txt"
    if __name__ == "__main__":  # python flower_app.py: a message, not a traceback
        print(f"error: {missing}", file=sys.stderr)
        sys.exit(2)
    raise FedMPTError(missing) from None


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
    """(client id, {model, inputs, y of this client's images in split order}, kit path). The
    run's first message prepares (experiment.prepare, then training_inputs of this client's rows
    into the feature store) and leaves a kit in the node's cache: tensors and plain values only
    (the labels, the store key, the classes, conditions and attributes the model is built from).
    Later messages (each a fresh process) load it with weights_only=True, so a file planted there
    never runs as code (one that does not load, or does not fit, is prepared again), build the
    model again (kit_model) and memory-map the inputs from the store. Node-config keys for a
    machine laid out differently: data-root, clip-weights, feature-cache (the store; default
    --cache-dir, else the node's $FEDMPT_CACHE), cache-dir (the kits)."""
    cfg, model_cfg, _ = run_options(context.run_config)
    node, client = context.node_config, int(context.node_config["partition-id"])
    cfg = dataclasses.replace(cfg, root=str(node.get("data-root", cfg.root)),
                              clip_weights=str(node.get("clip-weights", cfg.clip_weights)),
                              cache_dir=str(node.get("feature-cache", cfg.cache_dir)))
    cache = Path(str(node.get("cache-dir", Path(os.environ.get("FLWR_HOME", "~/.flwr")) / "fedmpt-cache")))
    cache = cache.expanduser() / f"run-{context.run_id}-client-{client}.pt"
    kit = read_kit(cache)
    if kit is not None:
        return client, {**kit, "model": kit_model(cfg, model_cfg, kit),
                        "inputs": features.open_store(kit["key"], kit["cache_dir"])}, cache
    exp = experiment.prepare(*experiment.resolve(cfg, model_cfg))
    client_splits = exp.splits
    if not 0 <= client < len(client_splits) or int(node["num-partitions"]) != len(client_splits):
        raise FedMPTError(f"--node-config partition-id={client} num-partitions={node['num-partitions']} "
                          f"does not fit this run's {len(client_splits)} clients (0 to {len(client_splits) - 1}).")
    inputs, targets = experiment.training_inputs(exp, client_splits[client])  # this client's images only
    kit = {"y": targets, "key": exp.store_keys["train"], "cache_dir": exp.cfg.cache_dir,
           "classes": zeroshot.seen_view(exp.train_set, exp.unseen).classes, "conditions": exp.conditions,
           "attributes": exp.attributes}
    cache.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # the kits: this user's only
    save_tensors(kit, cache)
    return client, {**kit, "model": exp.model, "inputs": inputs}, cache


def read_kit(path: Path):
    """The kit at `path` if it loads as tensors and plain values and has the kit's format,
    else None (absent, planted or damaged: the caller prepares again and overwrites it)."""
    if not path.exists():
        return None
    try:
        kit = load_checkpoint(path, "preparing this node again")  # weights_only=True: nothing is executed
    except FedMPTError as error:
        print(error, flush=True)
        return None
    fits = (isinstance(kit, dict) and set(kit) == {"y", "key", "cache_dir", "classes", "conditions", "attributes"}
            and isinstance(kit["y"], torch.Tensor) and kit["y"].dim() == 2 and isinstance(kit["key"], dict)
            and isinstance(kit["cache_dir"], str) and isinstance(kit["classes"], list)
            and all(isinstance(c, str) for c in kit["classes"]) and isinstance(kit["conditions"], dict)
            and isinstance(kit["attributes"], (dict, type(None))))
    if not fits:
        print(f"{path} is not a kit this code wrote; preparing this node again", flush=True)
    return kit if fits else None


def kit_model(cfg, model_cfg, kit):
    """The model the node prepared, built again from the options and the kit: the same backbone
    (checked by its fingerprint: the cached inputs were encoded with it), classes, conditions and
    attributes; its tunable values come with each train message."""
    cfg, model_cfg, device, _ = experiment.resolve(cfg, model_cfg)
    backbone = experiment.load_backbone(cfg, device)
    if backbone.fingerprint() != kit["key"].get("backbone_sha256"):
        raise FedMPTError(f"the CLIP weights ({cfg.clip_weights or cfg.clip}) changed after this node prepared "
                          "this run's features; restart the run (a new run prepares again).")
    return experiment.build_model(cfg.method, backbone, kit["classes"], kit["conditions"], model_cfg,
                                  kit["attributes"], seed=cfg.seed, device=device, text_encoding=cfg.text_encoding)


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
    lr = federate.cosine_lr(cfg.lr, round_index, cfg.rounds)  # launch resolved the method's own rate
    indices = torch.arange(len(kit["y"]))  # the kit holds this client's images only, in split order
    state, n, stats = local_train(kit["model"], global_state, kit["inputs"], kit["y"],
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
        sampled, dropout = federate.sample_clients(self.rng, self.cfg), None
        if self.cfg.client_dropout:  # sampled clients that fail to report: the plain loop's draw (availability.py)
            sampled, dropout = availability.drop_out(self.cfg, server_round, sampled,
                                                     lambda text: print(text, flush=True))
        absent = [client for client in sampled if client not in nodes]  # left out in aggregate_train
        # nothing aggregated until aggregate_train says otherwise (Flower's DP wrapper skips it when a reply has an error)
        self.round = {"start": start, "sent": [c for c in sampled if c in nodes], "absent": absent, "dropout": dropout,
                      "stats": {"loss": None, "clip_share": None, "grad_norm": None}, "aggregated": 0,
                      "rejected": sampled}
        config["server-round"] = server_round
        content = RecordDict({"arrays": arrays, "config": config})
        return [Message(content, dst_node_id=nodes[c], message_type=MessageType.TRAIN) for c in self.round["sent"]]

    def aggregate_train(self, server_round, replies):
        """Leave out missing, failed and invalid updates, aggregate the rest (as run_round)."""
        by_client = {self.client_of.get(reply.metadata.src_node_id): reply for reply in replies}
        updates = [(client, None, 0, None, "has no SuperNode connected") for client in self.round["absent"]]
        for client in self.round["sent"]:
            reply, state, n, numbers, problem = by_client.get(client), None, 0, None, ""
            if reply is None:
                problem = f"sent no reply within {self.timeout:g} s (SuperNode gone?)"
            elif reply.has_error():
                problem = f"failed ({reply.error.reason})"
            else:
                try:
                    state, metrics = ordered_state(reply.content["arrays"], self.reference), reply.content["metrics"]
                    n = int(metrics["num-examples"])
                    numbers = {"loss": float(metrics["train-loss"]), "steps": int(metrics["steps"]),
                               "clip_share": float(metrics["clip-share"]), "grad_norm": float(metrics["grad-norm"])}
                except (KeyError, TypeError, ValueError) as error:
                    problem = f"sent a malformed reply ({type(error).__name__}: {error})"
            updates.append((client, state, n, numbers, problem))
        combine = None
        if self.cfg.dp_clip:  # Flower's DP wrapper clipped the replies and adds the noise: equal weights here
            import privacy  # only with DP on: each message's fresh client process imports this file
            combine = privacy.equal_mean
            np.random.seed(privacy.noise_seed(self.cfg.seed, server_round))  # its noise: the plain loop's draw
        aggregated, stats, n_aggregated, rejected = federate.accept_and_aggregate(
            server_round, updates, self.reference, self.cfg.aggregate, lambda text: print(text, flush=True), combine)
        self.round.update(aggregated=n_aggregated, rejected=rejected, stats=stats)
        if aggregated is None:
            return None, None
        summary = MetricRecord({"train-loss": stats["loss"], "clients-aggregated": n_aggregated})
        return ArrayRecord(aggregated), summary

    def evaluate_and_record(self, server_round, arrays):
        """Strategy.start's evaluate_fn: the plain loop's round row, saved (federate.evaluate_round, save_round)."""
        exp = self.exp
        self.global_state = ordered_state(arrays, self.reference)
        exp.model.load_tunable_state(self.global_state)
        if server_round == 0:
            row = federate.evaluate_round(exp, 0, 0.0)
        else:
            row = federate.evaluate_round(exp, server_round, time.time() - self.round["start"], self.round["stats"],
                                          self.round["aggregated"], self.round["rejected"], self.round["dropout"])
        federate.save_round(exp, self.history, row, self.rng if server_round else None)
        return MetricRecord({"mAP": row["mAP"], "CF1": row["CF1"], "OF1": row["OF1"]})


server_app = ServerApp()


@server_app.main()
def server_main(grid, context):
    cfg, model_cfg, flower_cfg = run_options(context.run_config)
    cfg, model_cfg, device, root = experiment.resolve(cfg, model_cfg)
    out = runs.run_directory(cfg)
    exp = experiment.prepare(cfg, model_cfg, device, root)
    experiment.test_side(exp)  # the server evaluates; it trains no client
    experiment.save_run_directory(exp, out, {"engine": "flower", **dataclasses.asdict(flower_cfg)})
    strategy = FedMPTStrategy(exp, flower_cfg)  # launch made every path absolute
    print(f"label prior mAP {exp.prior_mAP:.2f}; client sizes {[len(s) for s in exp.splits]}")
    print(federate.TABLE_HEADER, flush=True)
    runner = strategy
    if cfg.dp_clip:  # client-level DP: Flower's own wrapper clips each update and adds the noise (docs/flower.md)
        import privacy
        runner = DifferentialPrivacyServerSideFixedClipping(strategy, cfg.dp_noise, cfg.dp_clip,
                                                            privacy.clients_per_round(cfg))
    runner.start(grid, ArrayRecord(strategy.reference), num_rounds=cfg.rounds, timeout=flower_cfg.round_timeout,
                 evaluate_fn=strategy.evaluate_and_record)
    save_tensors(strategy.global_state, exp.out / "state.pt")
    print(f"final mAP {strategy.history[-1]['mAP']:.2f}; run saved in {exp.out}", flush=True)
    runs.warn_after_run(strategy.history, exp.cfg.lr, exp.cfg.grad_clip)


def main(argv=None) -> int:
    """`python flower_app.py [options]`: federate.py's options plus FlowerConfig's."""
    parser = build_parser((Config, ModelConfig, FlowerConfig), prog="flower_app.py",
                          description="FedMPT's federation on Flower's Deployment Engine.")
    args = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    return exit_code(launch, config_from(Config, args), config_from(ModelConfig, args),
                     config_from(FlowerConfig, args))


if __name__ == "__main__":
    sys.exit(main())
