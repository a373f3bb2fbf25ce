"""An experiment: its options (`Config`), and `setup`, which builds a run as a pipeline:

    data -> clients -> backbone -> model -> frozen features -> reference scores -> run directory

The plain FedAvg loop (federate.py), the Flower app (flower_app.py) and the finished-run tools
(predict.py) all start from it. A run directory holds config.json (every resolved option),
conditions.json, clients.png, metrics.json (a row per round), checkpoint.pt and state.pt.
"""
import dataclasses
import json
import os
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import baselines
import data
import metrics
import splits
from backbone import ARCHITECTURES, FrozenCLIP, load_clip
from baselines.fedmvp import load_attributes
from conditions import load_conditions
from errors import FedMPTError
from fedmpt import ModelConfig, PromptModel
from shapes import model as shapes_clip
from tools import download

METHODS = list(baselines.METHODS)  # fedmpt and the paper's comparison methods (baselines/)
AGGREGATE_RULES = ["mean", "median", "trimmed-mean"]  # federate.AGGREGATORS


@dataclass
class Config:
    dataset: str = "shapes"  # shapes (offline) | voc2007 | coco2014 | nuswide | multiscene | mlrsnet | folder
    root: str = ""  # dataset directory; default data/<dataset>
    method: str = "fedmpt"  # fedmpt | fedmvp | fed-dualcoop | fed-poscoop | fedtpg | fed-maple | fed-ram
    clip: str = "shapes"  # shapes (pretrained offline, shapes/weights/) | tiny (random) | a clip.available_models() name
    clip_weights: str = ""  # a local CLIP .pt file instead of the download
    random_init: bool = False  # random weights for a named architecture (no download)
    conditions: str = ""  # condition file; default the dataset's shipped one; 'none' = ablation
    attributes: str = ""  # fedmvp: class descriptions; default baselines/attributes/<dataset>.json, else templates
    clients: int = 4
    rounds: int = 10
    local_epochs: int = 1
    client_fraction: float = 1.0
    lr: float = 0.0  # 0: the method's own, baselines.LEARNING_RATES (chosen on a validation split)
    grad_clip: float = 10.0  # a guard: clip a local step's gradient norm above this (0 = off)
    batch_size: int = 32
    heterogeneity: float = 1.0  # t in (0, 1]: fraction of a client's data from its own cluster
    clients_by: str = "kmeans"  # kmeans (the paper's label clusters, with t) | scene (mlrsnet: scene folders grouped into sites)
    min_labels: int = 0  # keep only images with at least this many labels, both splits (0 = every image)
    label_mask: float = 0.0  # partial annotation: each training positive becomes unknown with this probability
    validation: float = 0.0  # share of the training images held out (seeded) to choose settings on; 0 = none
    loss: str = "asl"  # asl | bce
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    out: str = ""  # run directory; default runs/<dataset>-<method>-<timestamp>
    aggregate: str = "mean"  # mean (FedAvg) | median | trimmed-mean
    resume: str = ""  # a run directory to continue from its last checkpoint
    download: bool = False  # download and extract VOC2007 into --root first
    skip_unreadable: bool = False  # decode every image first; leave out and list unreadable ones
    plot: bool = False  # fedmpt: save plans.png, the transport plans and gate of a few test images
    cache_dir: str = ""  # the feature store; default $FEDMPT_CACHE, else ~/.cache/fedmpt
    workers: int = -1  # DataLoader workers that decode images while encoding; -1: the CPU count, at most 8


def config_from(config_class, values: dict):
    """A config dataclass from a dict that may hold more (parsed options, a saved config.json)."""
    return config_class(**{f.name: values[f.name] for f in dataclasses.fields(config_class) if f.name in values})


def validate(cfg: Config, model_cfg: ModelConfig):
    """Raises FedMPTError naming every bad option; fills in --lr 0 with the method's own rate."""
    cfg.lr = cfg.lr or baselines.LEARNING_RATES.get(cfg.method, 0)
    checks = [(cfg.dataset in data.DATASETS, f"--dataset {cfg.dataset}: choose one of {', '.join(data.DATASETS)}"),
              (not cfg.download or cfg.dataset == "voc2007",
               "--download: only voc2007 can be downloaded; see docs/datasets.md for coco2014 and nuswide"),
              (cfg.method in METHODS, f"--method {cfg.method}: choose one of {', '.join(METHODS)}"),
              (cfg.rounds > 0, f"--rounds {cfg.rounds}: must be positive"),
              (cfg.clients > 0, f"--clients {cfg.clients}: must be positive"),
              (cfg.local_epochs > 0, f"--local-epochs {cfg.local_epochs}: must be positive"),
              (0 < cfg.client_fraction <= 1, f"--client-fraction {cfg.client_fraction}: must lie in (0, 1]"),
              (0 < cfg.heterogeneity <= 1, f"--heterogeneity {cfg.heterogeneity}: must lie in (0, 1]"),
              (cfg.clients_by in ("kmeans", "scene"), f"--clients-by {cfg.clients_by}: choose kmeans or scene"),
              (cfg.min_labels >= 0, f"--min-labels {cfg.min_labels}: must be 0 (off) or positive"),
              (0 <= cfg.label_mask < 1, f"--label-mask {cfg.label_mask}: must lie in [0, 1)"),
              (0 <= cfg.validation < 1, f"--validation {cfg.validation}: must lie in [0, 1)"),
              (cfg.lr > 0 and cfg.batch_size > 0, "--lr and --batch-size must be positive"),
              (cfg.workers >= -1, f"--workers {cfg.workers}: -1 (automatic), 0 or more"),
              (cfg.grad_clip >= 0, f"--grad-clip {cfg.grad_clip}: must be 0 (off) or positive"),
              (cfg.loss in ("asl", "bce"), f"--loss {cfg.loss}: choose asl or bce"),
              (cfg.aggregate in AGGREGATE_RULES, f"--aggregate {cfg.aggregate}: choose {', '.join(AGGREGATE_RULES)}"),
              (cfg.device in ("auto", "cpu", "cuda"), f"--device {cfg.device}: choose auto, cpu or cuda"),
              (model_cfg.ot in ("sinkhorn", "uniform"), f"--ot {model_cfg.ot}: choose sinkhorn or uniform"),
              (model_cfg.gate in ("mlp", "uniform"), f"--gate {model_cfg.gate}: choose mlp or uniform"),
              (model_cfg.pooling in ("regions", "global"), f"--pooling {model_cfg.pooling}: choose regions or global"),
              (model_cfg.ot_eps > 0, f"--ot-eps {model_cfg.ot_eps}: must be positive"),
              (model_cfg.ot_iters > 0, f"--ot-iters {model_cfg.ot_iters}: must be positive"),
              (model_cfg.ot_rho >= 0, f"--ot-rho {model_cfg.ot_rho}: must be 0 (exact) or positive"),
              (model_cfg.n_ctx > 0, f"--n-ctx {model_cfg.n_ctx}: must be positive"),
              (model_cfg.class_ctx >= 0 and (model_cfg.class_ctx == 0 or cfg.method == "fedmpt"),
               f"--class-ctx {model_cfg.class_ctx}: FedMPT's option (--method fedmpt), 0 or positive"),
              (model_cfg.adapter_reduction >= 1, f"--adapter-reduction {model_cfg.adapter_reduction}: must be at least 1"),
              (0 <= model_cfg.adapter_alpha <= 1, f"--adapter-alpha {model_cfg.adapter_alpha}: must lie in [0, 1]"),
              (not cfg.plot or cfg.method == "fedmpt", "--plot: draws FedMPT's transport plans; use it with --method fedmpt")]
    problems = [message for ok, message in checks if not ok]
    if problems:
        raise FedMPTError("; ".join(problems) + ".")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise FedMPTError("--device cuda: no CUDA device is visible; use --device cpu.")


# ---- Run directories ----------------------------------------------------------------------
def default_out(cfg: Config) -> str:
    return cfg.out or f"runs/{cfg.dataset}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"


def write_json_atomic(path: Path, obj):
    """Write a temporary file beside `path`, then rename it: `path` is never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one per writer process
    temporary.write_text(json.dumps(obj, indent=1))
    os.replace(temporary, path)


def save_atomic(obj, path: Path):
    temporary = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)


def load_checkpoint(path: Path, map_location=None, fix="restore it from a copy"):
    """torch.load of a checkpoint or state file (tensors only, onto `map_location`: a run
    trained on a GPU loads on a CPU), with an error that names the file and `fix`."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        # torch's own message advises weights_only=False, which would run code from the file
        reason = "missing" if isinstance(error, FileNotFoundError) else "truncated or damaged"
        raise FedMPTError(f"cannot load {path}: the file is {reason} ({type(error).__name__}); {fix}.") from None


def read_config(run_dir: str):
    """The configuration a run was started with (from its config.json) and the whole file."""
    path = Path(run_dir) / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise FedMPTError(f"run {run_dir}: cannot read {path} ({error}).") from None
    return config_from(Config, saved), config_from(ModelConfig, saved), saved


def resume_config(run_dir: str):
    """The run's own options; its conditions from the copy it saved (an edited source file
    must not change a resumed model)."""
    cfg, model_cfg, saved = read_config(run_dir)
    cfg.out, cfg.resume = str(run_dir), str(run_dir)
    if "loss_over_images" not in saved:  # begun before the loss became a mean over images: say so
        print("note: this run began with the loss summed over images; it continues with their mean.", file=sys.stderr)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        print("note: the run was trained with --device cuda; no CUDA device is visible here, so it "
              "continues on the CPU.", file=sys.stderr)
        cfg.device = "cpu"
    if cfg.conditions != "none" and (Path(run_dir) / "conditions.json").exists():
        cfg.conditions = str(Path(run_dir) / "conditions.json")
    if (Path(run_dir) / "attributes.json").exists():
        cfg.attributes = str(Path(run_dir) / "attributes.json")
    return cfg, model_cfg


# ---- The model ----------------------------------------------------------------------------
def load_backbone(cfg: Config, device="cpu", random_init=None) -> FrozenCLIP:
    """The frozen CLIP a run names: the shipped shapes CLIP, or `backbone.load_clip`."""
    random_init = cfg.random_init if random_init is None else random_init
    if cfg.clip == "shapes":
        model = shapes_clip.new_model(cfg.seed) if random_init else shapes_clip.load_shapes_clip(cfg.clip_weights or None)
    else:
        model = load_clip(cfg.clip, cfg.clip_weights or None, random_init, cfg.seed)
    return FrozenCLIP(model).to(device)


def method_attributes(cfg: Config, classes):
    """FedMVP's class descriptions (baselines.fedmvp.load_attributes); None for every other method."""
    return load_attributes(cfg.dataset, classes, cfg.attributes) if cfg.method == "fedmvp" else None


def build_model(method, backbone, classes, conditions, model_cfg, attributes=None, *, seed: int) -> PromptModel:
    """The method's model on the frozen backbone; prompts say `data.prompt_name` of each class.
    `seed` (a run's --seed) decides every initial value of its tunable tensors."""
    names = [data.prompt_name(c) for c in classes]
    sentences = [t for c in classes for t in attributes["attributes"][c]] if attributes else ()
    return baselines.build(method, backbone, names, conditions["conditions"], model_cfg, sentences, seed=seed)


def count_params(cfg: Config, model_cfg: ModelConfig) -> dict:
    """Tunable and total parameters of a method, from the class list alone (no data, no
    download: counts do not depend on weight values, so named architectures get random ones)."""
    validate(cfg, model_cfg)
    classes = data.known_classes(cfg.dataset)
    if not classes:  # a folder dataset: read its class list
        classes = data.load_dataset(cfg.dataset, cfg.root or os.path.join("data", cfg.dataset), "train").classes
    random_init = not cfg.clip_weights and (cfg.clip in ARCHITECTURES or cfg.clip == "shapes")
    backbone = load_backbone(cfg, random_init=random_init)
    model = build_model(cfg.method, backbone, classes, load_conditions(cfg.conditions, cfg.dataset),
                        model_cfg, method_attributes(cfg, classes), seed=cfg.seed)
    tunable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"method": cfg.method, "dataset": cfg.dataset, "classes": len(classes), "clip": cfg.clip,
            "tunable": tunable, "total": sum(p.numel() for p in model.parameters())}


# ---- Setup: data -> clients -> backbone -> model -> frozen features -> references -> run dir
@dataclass
class Experiment:
    """Everything a run needs, built once by `setup`: the plain loop, the Flower app and
    `predict.py --evaluate` share it."""
    cfg: Config  # as resolved: `clients` is the number of sites where the dataset names them
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
    store_keys: dict  # {"train"/"test"/"zero-shot": key} of the frozen inputs in the feature store
    validation: list = dataclasses.field(default_factory=list)  # rows of exp.train held out (--validation)


def load_data(cfg: Config, root: str):
    """(train, test) datasets; with --min-labels both keep only images with that many labels."""
    if cfg.download:
        download.download_voc2007(root)
    return tuple(data.keep_min_labels(data.load_dataset(cfg.dataset, root, split, skip_unreadable=cfg.skip_unreadable),
                                      cfg.min_labels) for split in ("train", "test"))


def zero_shot_scores(backbone: FrozenCLIP, v: torch.Tensor, classes) -> torch.Tensor:
    """Cosines (n, C) of global features v with "a photo of a <class>.": a ranking, not probabilities."""
    text = backbone.encode_texts([f"a photo of a {data.prompt_name(c)}." for c in classes]).cpu()
    return torch.nn.functional.normalize(v, dim=-1) @ text.T


SIMILAR_TEXT = 0.97  # the shapes CLIP: its own 12 shape words reach 0.85, words it never saw 0.977-0.999


def similar_classes(backbone: FrozenCLIP, classes, threshold=SIMILAR_TEXT) -> list:
    """Class pairs the backbone's text side hardly tells apart, [(a, b, cosine)] of "a photo of a
    <class>." above `threshold`, with a printed warning: prompt tuning starts each such class
    alike (real CLIP: misspelled or exotic names; the shapes CLIP: any word outside its captions)."""
    pairs = [(classes[i], classes[j], c) for i, j, c in
             backbone.similar_texts([f"a photo of a {data.prompt_name(c)}." for c in classes], threshold)]
    if pairs:
        shown = ", ".join(f"{a}/{b} {c:.3f}" for a, b, c in pairs[:8]) + (" ..." if len(pairs) > 8 else "")
        print(f"warning: the backbone's text side hardly tells {len(pairs)} of the {len(classes) * (len(classes) - 1) // 2} "
              f"class pairs apart (cosine of 'a photo of a <class>.' above {threshold}): {shown}. Prompt tuning "
              "starts each such class alike; check the class names, use a backbone that knows them, or give "
              "FedMPT contexts of each class's own (--class-ctx 4; docs/choices.md).", file=sys.stderr)
    return pairs


def setup(cfg: Config, model_cfg: ModelConfig, write: bool = True, record: dict = None,
          client: int = None, train: bool = True, test: bool = True) -> Experiment:
    """Validate the options, then build the run as a pipeline; with `write`, save the run
    directory (config.json, with `record` added, conditions.json, clients.png). The frozen
    inputs come from the feature store: every training image's, or with `client` only that
    client's (a Flower SuperNode; exp.train then holds its images alone); without `train` or
    `test` none of that split's (the Flower server trains no client, a SuperNode needs no test
    set nor reference scores)."""
    validate(cfg, model_cfg)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    root, out = cfg.root or os.path.join("data", cfg.dataset), Path(default_out(cfg))
    if write and not cfg.resume and (out / "metrics.json").exists():  # never overwrite a run
        raise FedMPTError(f"--out {out} already holds a run; continue it with --resume {out} "
                          "or choose another --out.")
    conditions = load_conditions(cfg.conditions, cfg.dataset)

    train_set, test_set = load_data(cfg, root)
    validation, pool = splits.hold_out(len(train_set), cfg.validation, cfg.seed)
    cfg, client_splits, client_names = splits.make_clients(cfg, train_set.subset(pool) if validation else train_set)
    if validation:  # back to rows of the whole training set
        client_splits = [[pool[i] for i in s] for s in client_splits]
    print(splits.split_report(train_set.targets, client_splits, train_set.classes, names=client_names))
    if client is not None and not 0 <= client < len(client_splits):
        raise FedMPTError(f"client {client}: this run has {len(client_splits)} clients, 0 to {len(client_splits) - 1}.")

    backbone = load_backbone(cfg, device)
    sha256 = backbone.fingerprint()
    if cfg.resume and read_config(cfg.resume)[2].get("backbone_sha256") not in (None, sha256):
        raise FedMPTError(f"--resume {cfg.resume}: the run was trained on other {cfg.clip} weights "
                          "than the ones found now; resume it with the same backbone file.")
    train_set.transform = test_set.transform = data.clip_transform(backbone.resolution)
    similar = similar_classes(backbone, train_set.classes)

    attributes = method_attributes(cfg, train_set.classes)
    model = build_model(cfg.method, backbone, train_set.classes, conditions, model_cfg, attributes,
                        seed=cfg.seed).to(device)  # its initial values follow --seed

    workers = min(os.cpu_count() or 1, 8) if cfg.workers < 0 else cfg.workers
    encoded, store_keys = [], {}

    def store(name, encode, split_set, kind):
        store_keys[name] = data.store_key(sha256, split_set, kind)
        inputs, n = data.encode_dataset(encode, split_set, store_keys[name], cfg.cache_dir, device=device,
                                        workers=workers)
        encoded.append(n)
        return inputs
    train_part = train_set if client is None else train_set.subset(client_splits[client])
    train = store("train", model.encode_images, train_part, model.input_kind()) if train else None
    # --label-mask: what the clients' annotators left out (after the split and the store key:
    # neither depends on it); the test labels stay whole
    train_targets = data.mask_positives(train_set.targets, cfg.label_mask, cfg.seed)
    part_targets = train_targets if client is None else train_targets[client_splits[client]]

    top_k = min(3, len(train_set.classes))
    prior = metrics.multilabel_metrics(metrics.label_prior_scores(train_targets[pool], len(test_set)),
                                       test_set.targets, top_k=top_k)
    test_inputs, zero_shot = None, {}
    if test:
        test_inputs = store("test", model.encode_images, test_set, model.input_kind())
        v = test_inputs[0] if model.inputs_start_with_v else store(
            "zero-shot", lambda x: backbone.encode_image_tokens(x)[:1], test_set, "v")[0]
        scores = zero_shot_scores(backbone, v.float(), train_set.classes)
        zero_shot = {"mAP": metrics.multilabel_metrics(scores, test_set.targets, top_k=top_k)["mAP"]}
        if test_set.biased_pairs:
            bias = metrics.bias_metrics(scores, test_set.targets, test_set.biased_pairs)
            zero_shot.update(exclusive_mAP=bias["exclusive_mAP"], cooccur_mAP=bias["cooccur_mAP"])

    resolved = {**dataclasses.asdict(cfg), **dataclasses.asdict(model_cfg), "root": root,
                "device_used": device, "out": str(out), "classes": train_set.classes,
                "condition_set": conditions, "attribute_source": (attributes or {}).get("source"),
                "tunable_params": sum(t.numel() for t in model.tunable_state().values()),
                "backbone_sha256": sha256, "feature_cache": str(data.cache_root(cfg.cache_dir)), "loss_over_images": "mean",
                "encoded_images": sum(encoded),
                "client_sizes": [len(s) for s in client_splits], "client_names": client_names,
                "label_skew": splits.label_skew(train_set.targets, client_splits),
                "images": {"train": len(train_set) - len(validation), "validation": len(validation), "test": len(test_set)},
                "similar_class_pairs": [[a, b, round(c, 4)] for a, b, c in similar[:50]],
                "masked_positives": int((train_targets == -1).sum() - (train_set.targets == -1).sum()),
                "skipped_images": [str(p) for p in train_set.skipped + test_set.skipped], **(record or {})}
    print(json.dumps({k: v for k, v in resolved.items() if k != "classes"}, indent=1))
    print(f"conditions ({conditions['source']}): {', '.join(map(repr, conditions['conditions']))}")
    if write:
        if not cfg.resume:
            write_json_atomic(out / "config.json", resolved)
            write_json_atomic(out / "conditions.json", conditions)  # what --resume reads back
            if attributes:
                write_json_atomic(out / "attributes.json", attributes)
        splits.plot_client_distributions(train_set.targets, client_splits, train_set.classes,
                                         out / "clients.png", names=client_names)
    return Experiment(cfg, model_cfg, out, model, client_splits, (train, part_targets),
                      (test_inputs, test_set.targets), prior["mAP"], resolved, zero_shot, test_set.biased_pairs,
                      store_keys, validation)


# ---- Evaluation ---------------------------------------------------------------------------
def gather(inputs, rows, device) -> list:
    """A batch of the frozen inputs (memory-mapped float16 or uint8 in the store) on the
    device, as float32; through pinned memory to a GPU."""
    batch = [x[rows] for x in inputs]
    if torch.device(device).type == "cuda":
        batch = [x.pin_memory().to(device, non_blocking=True) for x in batch]
    return [x.to(device).float() for x in batch]


@torch.no_grad()
def predict_scores(model, inputs, batch_size=256, rows=None):
    """Probabilities (n, C) for cached inputs (or their `rows`); the text side is encoded once."""
    T = model.text_features()
    rows = torch.arange(len(inputs[0])) if rows is None else torch.as_tensor(rows)
    return torch.cat([torch.sigmoid(model(*gather(inputs, batch, model.device), T=T)).cpu()
                      for batch in rows.split(batch_size)])


def evaluate_global(exp: Experiment) -> dict:
    """Metrics of the model's current state on the test images."""
    inputs, y = exp.test
    scores = predict_scores(exp.model, inputs)
    result = metrics.multilabel_metrics(scores, y, top_k=min(3, y.shape[1]))
    if exp.biased_pairs:  # how much the spurious companions of training still drive predictions
        bias = metrics.bias_metrics(scores, y, exp.biased_pairs)
        result.update({k: bias[k] for k in ("exclusive_mAP", "cooccur_mAP", "irrelevant_rate")})
    if exp.validation:  # the held-out training images: what settings are chosen on (--validation)
        inputs, y = exp.train
        held_out = metrics.multilabel_metrics(predict_scores(exp.model, inputs, rows=exp.validation),
                                              y[exp.validation], top_k=min(3, y.shape[1]))
        result.update({f"val_{k}": held_out[k] for k in ("mAP", "CF1", "OF1")})
    return result


def reference_scores(exp: Experiment) -> dict:
    """What round 0 of metrics.json also carries: the label prior and the zero-shot backbone."""
    return {"label_prior_mAP": exp.prior_mAP, "zero_shot_mAP": exp.zero_shot["mAP"],
            **{f"zero_shot_{k}": v for k, v in exp.zero_shot.items() if k != "mAP"}}
