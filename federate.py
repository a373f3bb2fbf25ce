"""Federated training of FedMPT with a plain Python FedAvg loop, and the command line.

    python federate.py                                   # offline shapes world, tiny CLIP
    python federate.py --dataset voc2007 --root DIR --clip ViT-B/16 --device cuda

Round r: every sampled client copies the global tunable state, trains E local epochs on its own
images (SGD, cosine learning rate over rounds) and returns its state and sample count n_i; the
server sets theta = sum_i n_i theta_i / sum_i n_i and evaluates theta on the test set.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import baselines
import data
import download
import metrics
from errors import FedMPTError
from aggregation import AGGREGATORS, aggregate_weighted, validate_update  # noqa: F401 (aggregate_weighted: for readers and tests)
from fedmpt import ARCHITECTURES, FrozenCLIP, ModelConfig, PromptModel, asymmetric_loss, bce_loss, load_clip
from prompts import known_class_names, load_attributes, load_conditions

METHODS = list(baselines.METHODS)  # fedmpt and the paper's comparison methods (baselines.py)


@dataclass
class Config:
    dataset: str = "shapes"  # shapes (generated offline) | voc2007 | coco2014 | nuswide | folder (labels.csv)
    root: str = ""  # dataset directory; default data/<dataset>
    method: str = "fedmpt"  # fedmpt | fedmvp | fed-dualcoop | fed-poscoop | fedtpg | fed-maple | fed-ram
    clip: str = "shapes"  # shapes (pretrained offline, weights/) | tiny (random) | a clip.available_models() name
    clip_weights: str = ""  # a local CLIP .pt file instead of the download
    random_init: bool = False  # random weights for a named architecture (no download)
    conditions: str = ""  # condition file; default the dataset's shipped one; 'none' = ablation
    attributes: str = ""  # fedmvp: class attribute descriptions; default attributes/<dataset>.json, else templates
    clients: int = 4
    rounds: int = 10
    local_epochs: int = 1
    client_fraction: float = 1.0
    lr: float = 1e-3
    grad_clip: float = 10.0  # clip each local step's gradient norm to this (0 = off)
    batch_size: int = 32
    heterogeneity: float = 1.0  # t in (0, 1]: fraction of a client's data from its own cluster
    loss: str = "asl"  # asl | bce
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    out: str = ""  # run directory; default runs/<dataset>-<method>-<timestamp>
    aggregate: str = "mean"  # mean (FedAvg) | median | trimmed-mean
    resume: str = ""  # a run directory to continue from its last checkpoint
    download: bool = False  # download and extract VOC2007 into --root first
    skip_unreadable: bool = False  # decode every image first; leave out and list unreadable ones
    engine: str = "plain"  # plain | flower (Flower's Deployment Engine, flower_app.py)
    superlink: str = ""  # flower: HOST:PORT (or a Flower connection name) of a running SuperLink; '' = start one here
    round_timeout: float = 3600.0  # flower: seconds an exchange waits for replies (Strategy.start timeout)
    min_nodes: int = 1  # flower: SuperNodes connected before a round starts (FedAvg min_available_nodes)
    plot: bool = False  # fedmpt: save plans.png, the transport plans and gate of a few test images


HELP = {"heterogeneity": "t in (0, 1]: 1 = each client holds its own K-means cluster, small t ~ IID",
        "conditions": "condition JSON file (default: conditions/<dataset>.json) or 'none'",
        "clip": "shapes (small CLIP pretrained on the shapes world, shipped), tiny (random weights), "
                "or one of RN50 RN101 ViT-B/32 ViT-B/16 ViT-L/14 (real weights)",
        "download": "download and extract VOC2007 into --root first (voc2007 only)",
        "skip_unreadable": "decode every image first; leave out (and list) the unreadable ones",
        "ot_rho": "0: every image region is transported (exact marginal, the spec); > 0: its KL weight "
                  "(semi-relaxed OT: a condition may leave background regions out)",
        "plot": "fedmpt: after training save plans.png (each condition's transport plan over the "
                "regions of a few test images, and the gate's weights)"}


def build_parser():
    parser = argparse.ArgumentParser(description="Federated multi-label prompt tuning (FedMPT).")
    for config_class in (Config, ModelConfig):
        for field in dataclasses.fields(config_class):
            flag = "--" + field.name.replace("_", "-")
            if field.type is bool or isinstance(field.default, bool):
                parser.add_argument(flag, action="store_true", help=HELP.get(field.name))
            else:
                parser.add_argument(flag, type=type(field.default), default=field.default,
                                    help=HELP.get(field.name, f"default {field.default}"))
    parser.add_argument("--count-params", action="store_true",
                        help="print {method, tunable, total} as one JSON line and exit; builds the "
                             "model on seeded random weights (no download), for the classes of "
                             "--dataset (voc2007, Table 5's setting, when --dataset is not given)")
    return parser


def parse_config(argv):
    args = vars(build_parser().parse_args(argv))
    pick = lambda cls: cls(**{f.name: args[f.name] for f in dataclasses.fields(cls)})
    return pick(Config), pick(ModelConfig)


def validate(cfg: Config, model_cfg: ModelConfig):
    checks = [(cfg.dataset in data.DATASETS, f"--dataset {cfg.dataset}: choose one of {', '.join(data.DATASETS)}"),
              (not cfg.download or cfg.dataset == "voc2007",
               "--download: only voc2007 can be downloaded; see the README for coco2014 and nuswide"),
              (cfg.method in METHODS, f"--method {cfg.method}: choose one of {', '.join(METHODS)}"),
              (cfg.rounds > 0, f"--rounds {cfg.rounds}: must be positive"),
              (cfg.clients > 0, f"--clients {cfg.clients}: must be positive"),
              (cfg.local_epochs > 0, f"--local-epochs {cfg.local_epochs}: must be positive"),
              (0 < cfg.client_fraction <= 1, f"--client-fraction {cfg.client_fraction}: must lie in (0, 1]"),
              (0 < cfg.heterogeneity <= 1, f"--heterogeneity {cfg.heterogeneity}: must lie in (0, 1]"),
              (cfg.lr > 0 and cfg.batch_size > 0, "--lr and --batch-size must be positive"),
              (cfg.grad_clip >= 0, f"--grad-clip {cfg.grad_clip}: must be 0 (off) or positive"),
              (cfg.loss in ("asl", "bce"), f"--loss {cfg.loss}: choose asl or bce"),
              (cfg.aggregate in AGGREGATORS, f"--aggregate {cfg.aggregate}: choose {', '.join(AGGREGATORS)}"),
              (cfg.device in ("auto", "cpu", "cuda"), f"--device {cfg.device}: choose auto, cpu or cuda"),
              (model_cfg.ot in ("sinkhorn", "uniform"), f"--ot {model_cfg.ot}: choose sinkhorn or uniform"),
              (model_cfg.gate in ("mlp", "uniform"), f"--gate {model_cfg.gate}: choose mlp or uniform"),
              (model_cfg.ot_eps > 0, f"--ot-eps {model_cfg.ot_eps}: must be positive"),
              (model_cfg.ot_iters > 0, f"--ot-iters {model_cfg.ot_iters}: must be positive"),
              (model_cfg.ot_rho >= 0, f"--ot-rho {model_cfg.ot_rho}: must be 0 (exact) or positive"),
              (model_cfg.n_ctx > 0, f"--n-ctx {model_cfg.n_ctx}: must be positive"),
              (model_cfg.adapter_reduction >= 1, f"--adapter-reduction {model_cfg.adapter_reduction}: must be at least 1"),
              (0 <= model_cfg.adapter_alpha <= 1, f"--adapter-alpha {model_cfg.adapter_alpha}: must lie in [0, 1]"),
              (cfg.engine in ("plain", "flower"), f"--engine {cfg.engine}: choose plain or flower"),
              (cfg.round_timeout > 0, f"--round-timeout {cfg.round_timeout}: must be positive"),
              (cfg.min_nodes >= 1, f"--min-nodes {cfg.min_nodes}: must be at least 1"),
              (not cfg.plot or cfg.method == "fedmpt", "--plot: draws FedMPT's transport plans; use it with --method fedmpt"),
              (not cfg.plot or cfg.engine == "plain", "--plot: only with --engine plain (or `federate.py evaluate` later)")]
    problems = [message for ok, message in checks if not ok]
    if problems:
        raise FedMPTError("; ".join(problems) + ".")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise FedMPTError("--device cuda: no CUDA device is visible; use --device cpu.")


# ---- The federated pieces: local training, evaluation, the learning rate ------------------
def local_train(model, global_state, inputs, targets, indices, cfg: Config, lr, generator):
    """One client's update: copy the global state, E epochs of SGD on the client's images
    (`inputs`: the tuple of cached tensors `model.encode_images` made, e.g. (v, P)).
    Returns (state, n_samples, mean loss per image). The optimizer starts fresh every round,
    so nothing of it outlives the round (nor needs a checkpoint)."""
    model.load_tunable_state(global_state)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-5)
    loss_fn = asymmetric_loss if cfg.loss == "asl" else bce_loss
    indices = torch.as_tensor(indices)
    total, seen = 0.0, 0
    for _ in range(cfg.local_epochs):
        order = indices[torch.randperm(len(indices), generator=generator)]
        for batch in order.split(cfg.batch_size):
            batch_inputs = [x[batch].to(model.device) for x in inputs]  # features live in host memory
            loss = model.loss(batch_inputs, targets[batch].to(model.device), loss_fn)
            optimizer.zero_grad()
            loss.backward()
            if cfg.grad_clip > 0:  # the summed loss can kick a small text encoder out of its range
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            total, seen = total + loss.item(), seen + len(batch)
    return model.tunable_state(), len(indices), total / max(seen, 1)


@torch.no_grad()
def predict(model, inputs, batch_size=256):
    """Probabilities (n, C) for cached inputs; the text side is encoded once."""
    T = model.text_features()
    return torch.cat([torch.sigmoid(model(*[x[i:i + batch_size].to(model.device) for x in inputs], T=T)).cpu()
                      for i in range(0, len(inputs[0]), batch_size)])


def cosine_lr(base_lr, round_index, n_rounds):
    """Learning rate of round r (1-based): cosine from base_lr towards 0 over the rounds."""
    return 0.5 * base_lr * (1 + math.cos(math.pi * (round_index - 1) / n_rounds))


def write_json_atomic(path: Path, obj):
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(obj, indent=1))
    os.replace(temporary, path)


def save_atomic(obj, path: Path):
    temporary = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)


def load_checkpoint(path: Path, map_location=None):
    """torch.load of a checkpoint or state file (tensors only), with an error that names it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (OSError, RuntimeError, EOFError) as error:
        raise FedMPTError(f"cannot load {path} ({error}).") from None


# ---- The model ----------------------------------------------------------------------------
def build_model(method, backbone, classes, conditions, model_cfg, attributes=None) -> PromptModel:
    """The method's model on the frozen backbone; prompts say `data.prompt_name` of each class."""
    names = [data.prompt_name(c) for c in classes]
    sentences = [t for c in classes for t in attributes["attributes"][c]] if attributes else ()
    return baselines.build(method, backbone, names, conditions["conditions"], model_cfg, sentences)


def method_attributes(cfg: Config, classes):
    """FedMVP's class descriptions (prompts.load_attributes); None for every other method."""
    return load_attributes(cfg.dataset, classes, cfg.attributes) if cfg.method == "fedmvp" else None


def count_params(cfg: Config, model_cfg: ModelConfig) -> dict:
    """Tunable and total parameters of a method, from the class list alone (no data, no
    download: counts do not depend on weight values, so named architectures get random ones)."""
    validate(cfg, model_cfg)
    classes = known_class_names(cfg.dataset)
    if not classes:  # a folder dataset: read its class list
        classes = data.load_dataset(cfg.dataset, cfg.root or os.path.join("data", cfg.dataset), "train").classes
    random_init = not cfg.clip_weights and cfg.clip in ARCHITECTURES
    backbone = FrozenCLIP(load_clip(cfg.clip, cfg.clip_weights or None, random_init, cfg.seed))
    attributes = method_attributes(cfg, classes)
    model = build_model(cfg.method, backbone, classes, load_conditions(cfg.conditions, cfg.dataset),
                        model_cfg, attributes)
    tunable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"method": cfg.method, "dataset": cfg.dataset, "classes": len(classes), "clip": cfg.clip,
            "tunable": tunable, "total": sum(p.numel() for p in model.parameters())}


# ---- The run ------------------------------------------------------------------------------
def read_config(run_dir: str):
    """The configuration a run was started with (from its config.json) and the whole file."""
    path = Path(run_dir) / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise FedMPTError(f"run {run_dir}: cannot read {path} ({error}).") from None
    pick = lambda cls: cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})
    return pick(Config), pick(ModelConfig), saved


def resume_config(run_dir: str):
    """The run's own options; its conditions from the copy it saved (an edited source file
    must not change a resumed model)."""
    cfg, model_cfg, _ = read_config(run_dir)
    cfg.out, cfg.resume = str(run_dir), str(run_dir)
    if cfg.conditions != "none" and (Path(run_dir) / "conditions.json").exists():
        cfg.conditions = str(Path(run_dir) / "conditions.json")
    if (Path(run_dir) / "attributes.json").exists():
        cfg.attributes = str(Path(run_dir) / "attributes.json")
    return cfg, model_cfg


def run_round(round_index, model, global_state, features, splits, sampled, cfg, log):
    """Train the sampled clients, drop the ones that fail or send a bad update, aggregate the
    rest. Returns (new global state, mean loss, number aggregated, rejected client ids)."""
    inputs, targets = features
    lr = cosine_lr(cfg.lr, round_index, cfg.rounds)
    states, sizes, losses, rejected = [], [], [], []
    for client in tqdm(sampled, desc=f"round {round_index}", leave=False):
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + round_index * 1_009 + client)
        try:
            state, n, loss = local_train(model, global_state, inputs, targets, splits[client], cfg, lr, generator)
        except Exception as error:  # a crashing client must not end the federation
            log(f"round {round_index}: client {client} failed ({type(error).__name__}: {error}); left out")
            rejected.append(client)
            continue
        problem = validate_update(state, global_state)
        if problem:
            log(f"round {round_index}: client {client} update rejected: {problem}")
            rejected.append(client)
            continue
        states.append(state), sizes.append(n), losses.append(loss)
    if not states:
        log(f"round {round_index}: every client failed; the global state stays as it was")
        return global_state, None, 0, rejected
    new_state = AGGREGATORS[cfg.aggregate](states, sizes)
    return new_state, float(np.average(losses, weights=sizes)), len(states), rejected


@dataclass
class Experiment:
    """Everything a run needs, built once by `setup`: the plain loop, the Flower app and
    `evaluate` share it."""
    cfg: Config
    model_cfg: ModelConfig
    out: Path
    model: PromptModel
    splits: list
    train: tuple  # (inputs, targets) of the training images: inputs = model.encode_images' tuple
    test: tuple  # the same for the test images
    prior_mAP: float
    resolved: dict
    zero_shot: dict  # metrics of the frozen backbone alone, "a photo of a <class>."
    biased_pairs: list  # class index pairs for the bias metrics (the shapes world); [] elsewhere


def setup(cfg: Config, model_cfg: ModelConfig, write: bool = True) -> Experiment:
    """Validate options, load data and backbone, split clients, build the model, encode the
    frozen features of every image once, and (with `write`) save config.json."""
    validate(cfg, model_cfg)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    root = cfg.root or os.path.join("data", cfg.dataset)
    out = Path(cfg.out or f"runs/{cfg.dataset}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    if write and not cfg.resume and (out / "metrics.json").exists():  # never overwrite a run
        raise FedMPTError(f"--out {out} already holds a run; continue it with --resume {out} "
                          "or choose another --out.")
    conditions = load_conditions(cfg.conditions, cfg.dataset)

    if cfg.download:
        download.download_voc2007(root)
    train_set = data.load_dataset(cfg.dataset, root, "train", skip_unreadable=cfg.skip_unreadable)
    test_set = data.load_dataset(cfg.dataset, root, "test", skip_unreadable=cfg.skip_unreadable)
    backbone = FrozenCLIP(load_clip(cfg.clip, cfg.clip_weights or None, cfg.random_init, cfg.seed)).to(device)
    if cfg.resume and read_config(cfg.resume)[2].get("backbone_sha256") not in (None, backbone.fingerprint()):
        raise FedMPTError(f"--resume {cfg.resume}: the run was trained on other {cfg.clip} weights "
                          "than the ones found now; resume it with the same backbone file.")
    train_set.transform = test_set.transform = data.clip_transform(backbone.resolution)
    if train_set.natural_clients:  # the data names its sites (labels.csv's client column): one client each
        client_names = [site for site, _ in train_set.natural_clients]
        splits = [indices for _, indices in train_set.natural_clients]
        defaults, unused = Config(), []
        if cfg.clients not in (defaults.clients, len(splits)):  # len(splits): what a resumed run saved
            unused.append(f"--clients {cfg.clients}")
        if cfg.heterogeneity != defaults.heterogeneity:
            unused.append(f"--heterogeneity {cfg.heterogeneity}")
        if unused:
            print(f"note: {' and '.join(unused)} not used: the dataset names its clients "
                  f"({len(splits)} sites: {', '.join(client_names)}).", file=sys.stderr)
        cfg = dataclasses.replace(cfg, clients=len(splits))
    else:
        client_names = None
        splits = data.client_splits(train_set.targets, cfg.clients, cfg.heterogeneity, cfg.seed)
    print(data.split_report(train_set.targets, splits, train_set.classes, names=client_names))

    torch.manual_seed(cfg.seed)
    class_names = [data.prompt_name(c) for c in train_set.classes]
    attributes = method_attributes(cfg, train_set.classes)
    model = build_model(cfg.method, backbone, train_set.classes, conditions, model_cfg, attributes).to(device)
    n_tunable = sum(t.numel() for t in model.tunable_state().values())
    resolved = {**dataclasses.asdict(cfg), **dataclasses.asdict(model_cfg), "root": root,
                "device_used": device, "out": str(out), "classes": train_set.classes,
                "condition_set": conditions, "attribute_source": (attributes or {}).get("source"),
                "tunable_params": n_tunable,
                "backbone_sha256": backbone.fingerprint(),
                "client_sizes": [len(s) for s in splits], "client_names": client_names,
                "label_skew": data.label_skew(train_set.targets, splits),
                "skipped_images": [str(p) for p in train_set.skipped + test_set.skipped]}
    print(json.dumps({k: v for k, v in resolved.items() if k != "classes"}, indent=1))
    print(f"conditions ({conditions['source']}): {', '.join(map(repr, conditions['conditions']))}")
    if write:
        out.mkdir(parents=True, exist_ok=True)
        if not cfg.resume:
            write_json_atomic(out / "config.json", resolved)
            write_json_atomic(out / "conditions.json", conditions)  # what --resume reads back
            if attributes:
                write_json_atomic(out / "attributes.json", attributes)
        data.plot_client_distributions(train_set.targets, splits, train_set.classes, out / "clients.png",
                                       names=client_names)

    bar = lambda name: (lambda it: tqdm(it, desc=f"encode {name}", leave=False))
    train = data.encode_dataset(model.encode_images, train_set, device=device, progress=bar("train"))
    test = data.encode_dataset(model.encode_images, test_set, device=device, progress=bar("test"))
    prior = metrics.multilabel_metrics(metrics.label_prior_scores(train_set.targets, len(test_set)),
                                       test_set.targets, top_k=min(3, len(train_set.classes)))
    v = test[0] if model.inputs_start_with_v else data.encode_dataset(
        lambda x: backbone.encode_image_tokens(x)[:1], test_set, device=device, progress=bar("zero-shot"))[0]
    zero_shot_scores = torch.nn.functional.normalize(v, dim=-1) @ backbone.encode_texts(
        [f"a photo of a {name}." for name in class_names]).cpu().T  # cosines: a ranking, not probabilities
    zero_shot = {"mAP": metrics.multilabel_metrics(zero_shot_scores, test_set.targets,
                                                   top_k=min(3, len(class_names)))["mAP"]}
    if test_set.biased_pairs:
        bias = metrics.bias_metrics(zero_shot_scores, test_set.targets, test_set.biased_pairs)
        zero_shot.update(exclusive_mAP=bias["exclusive_mAP"], cooccur_mAP=bias["cooccur_mAP"])
    return Experiment(cfg, model_cfg, out, model, splits, (train, train_set.targets), (test, test_set.targets),
                      prior["mAP"], resolved, zero_shot, test_set.biased_pairs)


def evaluate_global(exp: Experiment) -> dict:
    """Metrics of the model's current state on the test images."""
    inputs, y = exp.test
    scores = predict(exp.model, inputs)
    result = metrics.multilabel_metrics(scores, y, top_k=min(3, y.shape[1]))
    if exp.biased_pairs:  # how much the spurious companions of training still drive predictions
        bias = metrics.bias_metrics(scores, y, exp.biased_pairs)
        result.update({k: bias[k] for k in ("exclusive_mAP", "cooccur_mAP", "irrelevant_rate")})
    return result


def reference_scores(exp: Experiment) -> dict:
    """What round 0 of metrics.json also carries: the label prior and the zero-shot backbone."""
    return {"label_prior_mAP": exp.prior_mAP, "zero_shot_mAP": exp.zero_shot["mAP"],
            **{f"zero_shot_{k}": v for k, v in exp.zero_shot.items() if k != "mAP"}}


def run(cfg: Config, model_cfg: ModelConfig):
    if cfg.engine == "flower":  # the same federation on Flower's Deployment Engine; imports flwr
        import flower_app
        return flower_app.launch(cfg, model_cfg)
    if cfg.resume:
        cfg, model_cfg = resume_config(cfg.resume)
    exp = setup(cfg, model_cfg)
    cfg, model, out = exp.cfg, exp.model, exp.out  # exp.cfg.clients: the sites of a dataset that names them
    global_state, history, first_round = model.tunable_state(), [], 1
    rng = np.random.default_rng(cfg.seed)
    if cfg.resume and (out / "checkpoint.pt").exists():
        checkpoint = load_checkpoint(out / "checkpoint.pt")
        model.load_tunable_state(checkpoint["global_state"])
        global_state, history = model.tunable_state(), checkpoint["history"]
        rng.bit_generator.state = checkpoint["rng_state"]
        first_round = checkpoint["round"] + 1
        print(f"resuming {out} after round {checkpoint['round']}")

    def record(round_index, loss, seconds, extra):
        row = {"round": round_index, "loss": loss, "seconds": seconds, **evaluate_global(exp), **extra}
        history.append(row)
        write_json_atomic(out / "metrics.json", history)
        tqdm.write(f"{round_index:>5} {loss if loss is not None else float('nan'):>10.4f} "
                   f"{row['mAP']:>7.2f} {row['CF1']:>7.2f} {row['OF1']:>7.2f} {seconds:>8.1f}")

    print(f"label prior mAP {exp.prior_mAP:.2f}; zero-shot mAP {exp.zero_shot['mAP']:.2f}; "
          f"client sizes {[len(s) for s in exp.splits]}")
    tqdm.write(f"{'round':>5} {'train loss':>10} {'mAP':>7} {'CF1':>7} {'OF1':>7} {'seconds':>8}")
    if not history:
        record(0, None, 0.0, reference_scores(exp))
    for round_index in range(first_round, cfg.rounds + 1):
        start = time.time()
        n_sampled = max(1, round(cfg.client_fraction * cfg.clients))
        sampled = sorted(rng.choice(cfg.clients, n_sampled, replace=False).tolist())
        global_state, loss, n_aggregated, rejected = run_round(
            round_index, model, global_state, exp.train, exp.splits, sampled, cfg, tqdm.write)
        model.load_tunable_state(global_state)
        record(round_index, loss, time.time() - start,
               {"clients_aggregated": n_aggregated, "clients_rejected": rejected, "failed": n_aggregated == 0})
        save_atomic({"global_state": global_state, "round": round_index, "history": history,
                     "rng_state": rng.bit_generator.state}, out / "checkpoint.pt")
    save_atomic(global_state, out / "state.pt")
    if cfg.plot:
        import explain
        test_set = data.load_dataset(cfg.dataset, exp.resolved["root"], "test", skip_unreadable=cfg.skip_unreadable)
        explain.plot_transport(model, test_set, exp.test[0], exp.resolved["condition_set"]["conditions"],
                               test_set.classes, out / "plans.png")
        print(f"wrote {out / 'plans.png'}")
    print(f"final mAP {history[-1]['mAP']:.2f} (round 0: {history[0]['mAP']:.2f}, zero-shot "
          f"{exp.zero_shot['mAP']:.2f}, label prior {exp.prior_mAP:.2f}); run saved in {out}")
    return history


def main(argv=None):
    """`federate.py [options]` trains; `federate.py predict|evaluate ...` uses a finished run."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] in (["predict"], ["evaluate"]):
            import predict as use_run
            command = use_run.predict_command if argv[0] == "predict" else use_run.evaluate_command
            return command(argv[1:])
        cfg, model_cfg = parse_config(argv)
        if "--count-params" in argv:
            if "--dataset" not in argv and not any(a.startswith("--dataset=") for a in argv):
                cfg = dataclasses.replace(cfg, dataset="voc2007")  # Table 5's setting
            print(json.dumps(count_params(cfg, model_cfg)))
            return 0
        run(cfg, model_cfg)
    except FedMPTError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
