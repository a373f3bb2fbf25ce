"""An experiment: its options (`Config`), and `build`, which makes a run as a straight pipeline:

    options -> data -> clients -> backbone -> model -> frozen features -> reference scores

`setup` is `build` plus the run directory (store/runs.py): what the plain loop (federate.py)
starts from. The Flower app (flower_app.py) calls the stages it needs: a SuperNode builds its own
client's features only, the server the test set's. Evaluation is in evaluation.py.
"""
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import baselines
import data
import metrics
import splits
import zeroshot
from backbone import ARCHITECTURES, FrozenCLIP, load_clip
from conditions import load_conditions
from errors import FedMPTError
from fedmpt import ModelConfig, PromptModel, option
from store import features, runs
from tools.options import field_problems, flag

@dataclass
class Config:
    dataset: str = option("shapes", "shapes is the offline world, generated on first use", choices=data.DATASETS)
    root: str = option("", "dataset directory", shown="data/<dataset>")
    method: str = option("fedmpt", "FedMPT or a comparison method (baselines/)", choices=tuple(baselines.METHODS))
    clip: str = option("shapes", "the frozen CLIP: shapes (small, pretrained offline, shipped in shapes/weights/), "
                                 "tiny (random weights) or a real one: " + ", ".join(a for a in ARCHITECTURES if a != "tiny"))
    clip_weights: str = option("", "a local CLIP .pt file instead of the download", shown="none (download)")
    random_init: bool = option(False, "random weights for a named architecture (no download)")
    conditions: str = option("", "condition JSON file, or none (one generic condition: the ablation)",
                             shown="conditions/<dataset>.json")
    attributes: str = option("", "FedMVP's class descriptions (else templates)",
                             shown="baselines/attributes/<dataset>.json")
    clients: int = option(4, "clients: K-means clusters of the training label vectors", range="[1, inf)")
    rounds: int = option(10, "communication rounds", range="[1, inf)")
    local_epochs: int = option(1, "local epochs per round", range="[1, inf)")
    client_fraction: float = option(1.0, "share of the clients sampled each round", range="(0, 1]")
    lr: float = option(0.0, "SGD learning rate, cosine over the rounds; 0 = the method's own (its class's "
                            f"learning_rate, chosen on a validation split: fedmpt {baselines.model_class('fedmpt').learning_rate})",
                       range="[0, inf)", shown="0 (the method's own)")
    grad_clip: float = option(10.0, "a guard: clip a local step's gradient norm above this (0 = off); "
                                    "metrics.json records the share of clipped steps", range="[0, inf)")
    batch_size: int = option(32, "images per local step", range="[1, inf)")
    heterogeneity: float = option(1.0, "t: share of a client's images from its own K-means cluster "
                                       "(1 = each client is its cluster, small t ~ IID)", range="(0, 1]")
    clients_by: str = option("kmeans", "kmeans (the paper's label clusters, with t) or scene (mlrsnet's scene "
                                       "folders dealt into --clients sites)", choices=("kmeans", "scene"))
    min_labels: int = option(0, "keep only images with at least N labels, train and test (the authors' "
                                "COCO/NUS-WIDE runs: 5, MLRSNet: 7; 0 = every image)", range="[0, inf)")
    label_mask: float = option(0.0, "partial annotation: each training positive becomes unknown with this "
                                    "probability (seeded; test labels are never masked)", range="[0, 1)")
    unseen: str = option("", "classes no client labels, scored zero-shot: names (comma-separated), a file of "
                             "names, or random:F (a seeded share F of the classes)", shown="none",
                         added="0.2")
    zsl_split: str = option("", "a published zero-shot split, its files in ROOT/annotations/: 48/17 (coco2014) or "
                                "925/81 (nuswide)", choices=("", "48/17", "925/81"), shown="none",
                            added="0.2")
    validation: float = option(0.0, "share of the training images held out (seeded, before the client split); "
                                    "metrics.json records val_mAP each round: choose settings on it", range="[0, 1)")
    loss: str = option("asl", "asl (asymmetric loss) or bce", choices=("asl", "bce"))
    seed: int = option(0, "seed of every initial value, the client split, client sampling and data order")
    device: str = option("auto", "auto: cuda when visible", choices=("auto", "cpu", "cuda"), execution=True)
    threads: int = option(0, "torch CPU threads (0 = torch's default, one per core); give 1 when other "
                             "work shares the cores (docs/usage.md)", range="[0, inf)", execution=True)
    out: str = option("", "run directory", shown="runs/<dataset>-<method>-<timestamp>")
    aggregate: str = option("mean", "mean (FedAvg, weighted by samples), median or trimmed-mean (robust)",
                            choices=("mean", "median", "trimmed-mean"))
    resume: str = option("", "a run directory to continue from its last checkpoint, with its own options")
    download: bool = option(False, "download and extract VOC2007 into --root first (voc2007 only)")
    skip_unreadable: bool = option(False, "decode every image first; leave out (and list) the unreadable ones")
    plot: bool = option(False, "fedmpt: save plans.png, the transport plans and gate of a few test images")
    cache_dir: str = option("", "the feature store", shown="$FEDMPT_CACHE, else ~/.cache/fedmpt", execution=True)
    workers: int = option(-1, "DataLoader workers that decode images while encoding (-1: the CPU count, "
                              "at most 8)", range="[-1, inf)", execution=True)
    parallel_clients: int = option(1, "train N clients of a round side by side in one process: one text-encoder "
                                      "call for their prompts, each its own gradient (equal to one by one up to "
                                      "float rounding; not fed-maple, fed-ram)", range="[1, inf)", execution=True)


def validate(cfg: Config, model_cfg: ModelConfig):
    """Raises FedMPTError naming every bad option (and nothing else); fills in --lr 0 with the
    method's own rate."""
    problems = field_problems(cfg) + field_problems(model_cfg)
    rules = [(not cfg.download or cfg.dataset == "voc2007",
              "--download: only voc2007 can be downloaded; see docs/datasets.md for coco2014 and nuswide"),
             (model_cfg.class_ctx == 0 or cfg.method == "fedmpt",
              f"--class-ctx {model_cfg.class_ctx}: FedMPT's option (--method fedmpt)"),
             (not cfg.plot or cfg.method == "fedmpt", "--plot: draws FedMPT's transport plans; use it with --method fedmpt"),
             (not (cfg.unseen and cfg.zsl_split), "--unseen and --zsl-split: the published split names its unseen "
                                                  "classes; give one of the two"),
             (cfg.parallel_clients == 1 or cfg.method not in baselines.METHODS
              or hasattr(baselines.model_class(cfg.method), "text_from"),
              f"--parallel-clients {cfg.parallel_clients}: {cfg.method} changes tokens inside CLIP's text encoder "
              "(deep prompts, adapters), so its clients cannot share one encoder call; use --parallel-clients 1")]
    if cfg.unseen or cfg.zsl_split:  # every method scores the classes it never trained on, or says why not
        why = zeroshot.cannot_score_unseen(cfg.method, model_cfg.class_ctx)
        rules.append((not why, f"--{'unseen' if cfg.unseen else 'zsl-split'}: {cfg.method} cannot score unseen "
                               f"classes: {why}"))
    problems += [message for ok, message in rules if not ok]
    if problems:
        raise FedMPTError("; ".join(problems) + ".")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise FedMPTError("--device cuda: no CUDA device is visible; use --device cpu.")
    cfg.lr = cfg.lr or baselines.model_class(cfg.method).learning_rate


# What config.json holds besides the options (describe(), the engines' records, resume's notes).
RUN_RECORD = ("root", "device_used", "out", "classes", "condition_set", "attribute_source", "tunable_params",
              "backbone_sha256", "feature_cache", "loss_over_images", "encoded_images", "client_sizes", "client_names",
              "label_skew", "images", "similar_class_pairs", "masked_positives", "skipped_images", "engine",
              "superlink", "round_timeout", "min_nodes", "extended", "unseen_classes", "negative_only_images")


def read_config(run_dir: str):
    """(Config, ModelConfig, the whole config.json) of a run, checked (store.runs.read_run_config)."""
    return runs.read_run_config(run_dir, (Config, ModelConfig), RUN_RECORD)


def resume_config(run_dir: str, given: dict = None):
    """The run's own options; its conditions from the copy it saved (an edited source file
    must not change a resumed model). `given`: options named beside --resume, {name: value}.
    Those that only say how the run is executed (--device, --threads, --workers, --cache-dir)
    apply, and --rounds may extend the run; any other is refused: it would change what the
    saved rounds were trained with."""
    cfg, model_cfg, saved = read_config(run_dir)
    cfg.unseen = zeroshot.resumed_unseen(cfg.unseen, saved)  # the names it resolved, not the file read again
    given = {name: value for name, value in (given or {}).items() if name != "resume"}
    execution = {f.name for f in dataclasses.fields(Config) if f.metadata.get("execution")}
    refused = [flag(name) for name in given if name not in execution | {"rounds"}]
    if refused:
        raise FedMPTError(f"--resume {run_dir} continues the run with its own options; {', '.join(refused)} would change "
                          "what its saved rounds were trained with. Start a new run (another --out) to change them; "
                          f"beside --resume only --rounds (to extend it), {', '.join(flag(n) for n in sorted(execution))} "
                          "apply.")
    for name, value in given.items():
        setattr(cfg, name, value)
    cfg.out, cfg.resume = str(run_dir), str(run_dir)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        print("note: the run was trained with --device cuda; no CUDA device is visible here, so it "
              "continues on the CPU.", file=sys.stderr)
        cfg.device = "cpu"
    if cfg.conditions != "none" and (Path(run_dir) / "conditions.json").exists():
        cfg.conditions = str(Path(run_dir) / "conditions.json")
    if (Path(run_dir) / "attributes.json").exists():
        cfg.attributes = str(Path(run_dir) / "attributes.json")
    return cfg, model_cfg


# ---- The stages ---------------------------------------------------------------------------
def resolve(cfg: Config, model_cfg: ModelConfig):
    """Checked options, the device and the dataset root."""
    validate(cfg, model_cfg)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    return cfg, device, cfg.root or os.path.join("data", cfg.dataset)


def load_data(cfg: Config, root: str):
    """(train, test) datasets; with --min-labels both keep only images with that many labels.
    A test split without a single positive label has nothing to evaluate: FedMPTError."""
    if cfg.download:
        from tools import download
        download.download_voc2007(root)
    train_set, test_set = (data.keep_min_labels(data.load_dataset(cfg.dataset, root, split, skip_unreadable=cfg.
                                                                  skip_unreadable, zsl_split=cfg.zsl_split), cfg.min_labels)
                           for split in ("train", "test"))
    if not (test_set.targets == 1).any():
        raise FedMPTError(f"the test split of {cfg.dataset} at {root} has {len(test_set)} images and not one positive "
                          "label: there is nothing to evaluate. Check its labels (for a folder dataset, the labels "
                          "and split columns of labels.csv).")
    return train_set, test_set


@dataclass
class Clients:
    splits: list  # rows of the training set each client holds
    names: list  # the sites' names where the dataset names them, else None
    validation: list  # rows held out from every client (--validation)
    pool: list  # the other rows


def split_clients(cfg: Config, train_set):
    """(cfg, Clients): the validation rows held out, the rest split into clients (splits.py)."""
    validation, pool = splits.hold_out(len(train_set), cfg.validation, cfg.seed)
    cfg, client_splits, names = splits.make_clients(cfg, train_set.subset(pool) if validation else train_set)
    if validation:  # back to rows of the whole training set
        client_splits = [[pool[i] for i in s] for s in client_splits]
    print(splits.split_report(train_set.targets, client_splits, train_set.classes, names=names))
    return cfg, Clients(client_splits, names, validation, pool)


def load_backbone(cfg: Config, device="cpu", random_init=None):
    """The frozen CLIP a run names: the shipped shapes CLIP, or `backbone.load_clip`."""
    from shapes import model as shapes_clip
    random_init = cfg.random_init if random_init is None else random_init
    if cfg.clip == "shapes":
        model = shapes_clip.new_model(cfg.seed) if random_init else shapes_clip.load_shapes_clip(cfg.clip_weights or None)
    else:
        model = load_clip(cfg.clip, cfg.clip_weights or None, random_init, cfg.seed)
    backbone = FrozenCLIP(model).to(device)
    if cfg.resume and runs.read_saved_config(cfg.resume).get("backbone_sha256") not in (None, backbone.fingerprint()):
        raise FedMPTError(f"--resume {cfg.resume}: the run was trained on other {cfg.clip} weights "
                          "than the ones found now; resume it with the same backbone file.")
    return backbone


def method_attributes(cfg: Config, classes):
    """FedMVP's class descriptions (baselines.fedmvp.load_attributes); None for every other method."""
    if cfg.method != "fedmvp":
        return None
    from baselines.fedmvp import load_attributes
    return load_attributes(cfg.dataset, classes, cfg.attributes)


def build_model(method, backbone, classes, conditions, model_cfg, attributes=None, *, seed: int) -> PromptModel:
    """The method's model on the frozen backbone; prompts say `data.prompt_name` of each class.
    `seed` (a run's --seed) decides every initial value of its tunable tensors."""
    names = [data.prompt_name(c) for c in classes]
    sentences = [t for c in classes for t in attributes["attributes"][c]] if attributes else ()
    return baselines.build(method, backbone, names, conditions["conditions"], model_cfg, sentences, seed=seed)


def frozen_inputs(encode, split_set, kind, backbone_sha256, cfg: Config, device):
    """A split's frozen inputs from the feature store: (inputs, store key, images encoded now)."""
    key = features.store_key(backbone_sha256, split_set, kind)
    workers = min(os.cpu_count() or 1, 8) if cfg.workers < 0 else cfg.workers
    inputs, n = features.encode_dataset(encode, split_set, key, cfg.cache_dir, device=device, workers=workers)
    return inputs, key, n


def zero_shot_scores(backbone, v: torch.Tensor, classes) -> torch.Tensor:
    """Cosines (n, C) of global image features v with "a photo of a <class>.": a ranking, not probabilities."""
    text = backbone.encode_texts([f"a photo of a {data.prompt_name(c)}." for c in classes]).cpu()
    return torch.nn.functional.normalize(v, dim=-1) @ text.T


def zero_shot_metrics(backbone, v, test_set, classes, unseen=()) -> dict:
    """The frozen backbone alone on the test images (its bias metrics on the shapes world, its
    zero-shot figures with unseen classes)."""
    scores = zero_shot_scores(backbone, v.float(), classes)
    result = {"mAP": metrics.multilabel_metrics(scores, test_set.targets, top_k=min(3, len(classes)))["mAP"]}
    if unseen:
        result.update(metrics.zsl_metrics(scores, test_set.targets, unseen))
    if test_set.biased_pairs:
        bias = metrics.bias_metrics(scores, test_set.targets, test_set.biased_pairs)
        result.update(exclusive_mAP=bias["exclusive_mAP"], cooccur_mAP=bias["cooccur_mAP"])
    return result


SIMILAR_TEXT = 0.97  # the shapes CLIP: its own 12 shape words reach 0.85, words it never saw 0.977-0.999


def similar_classes(backbone, classes, threshold=SIMILAR_TEXT) -> list:
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


# ---- The pipeline -------------------------------------------------------------------------
@dataclass
class Experiment:
    """Everything a run needs, built once by `build`."""
    cfg: Config  # as resolved: `clients` is the number of sites where the dataset names them
    model_cfg: ModelConfig
    out: Path
    model: PromptModel
    train: tuple  # (inputs, targets) of the training images: inputs = model.encode_images' tuple
    test: tuple  # the same for the test images
    prior_mAP: float
    resolved: dict  # what config.json holds
    zero_shot: dict  # metrics of the frozen backbone alone, "a photo of a <class>."
    store_keys: dict  # {"train"/"test"/"zero-shot": key} of the frozen inputs in the feature store
    conditions: dict  # the condition set (conditions.json)
    attributes: dict  # FedMVP's descriptions (attributes.json), else None
    clients: Clients
    train_set: object  # the datasets (their images, classes, targets)
    test_set: object
    unseen: list = dataclasses.field(default_factory=list)  # classes no client labels (--unseen, --zsl-split)
    scorer: PromptModel = None  # with unseen classes: the model on every class name, scoring with model's state

    @property
    def splits(self) -> list:  # rows of exp.train each client holds
        return self.clients.splits

    @property
    def validation(self) -> list:  # rows of exp.train held out (--validation)
        return self.clients.validation

    @property
    def biased_pairs(self) -> list:  # class index pairs for the bias metrics (the shapes world); [] elsewhere
        return self.test_set.biased_pairs


def setup(cfg: Config, model_cfg: ModelConfig, record: dict = None, state: dict = None) -> Experiment:
    """The plain loop's start: `build` (from `state` when resuming), then the run directory
    (config.json with `record` added, conditions.json, clients.png); an --out that already
    holds a run is refused first."""
    exp = build(cfg, model_cfg, record, new_run_directory(cfg), state)
    save_run_directory(exp)
    return exp


def new_run_directory(cfg: Config) -> Path:
    """--out (or the default), refused when it already holds a run that is not being resumed."""
    out = Path(runs.default_out(cfg))
    if not cfg.resume and (out / "metrics.json").exists():  # never overwrite a run
        raise FedMPTError(f"--out {out} already holds a run; continue it with --resume {out} "
                          "or choose another --out.")
    return out


def save_run_directory(exp: Experiment):
    if not exp.cfg.resume:
        runs.write_run_files(exp.out, exp.resolved, exp.conditions, exp.attributes)
    splits.plot_client_distributions(exp.train_set.targets, exp.splits, exp.train_set.classes,
                                     exp.out / "clients.png", names=exp.clients.names)
    print(f"options and sizes: {exp.out / 'config.json'}; conditions ({exp.conditions['source']}): "
          f"{', '.join(map(repr, exp.conditions['conditions']))}")


def build(cfg: Config, model_cfg: ModelConfig, record: dict = None, out=None, state: dict = None) -> Experiment:
    """Every stage, in order; writes nothing but the feature store. `state`: a saved tunable
    state to continue from, loaded as soon as the model is built (one that does not fit fails
    before any image is encoded)."""
    parts = prepare(cfg, model_cfg)
    if state is not None:
        try:
            parts.model.load_tunable_state(state)
        except FedMPTError as error:
            raise FedMPTError(f"--resume {cfg.resume}: checkpoint.pt does not fit the model its config.json builds "
                              f"({error}) Restore the run's own files, or train it again with another --out.") from None
    return assemble(parts, training_inputs(parts), out, record)


@dataclass
class Parts:
    """What `prepare` builds: the checked options, the data, the clients, the model."""
    cfg: Config
    model_cfg: ModelConfig
    device: str
    root: str
    conditions: dict
    train_set: object
    test_set: object
    clients: Clients
    similar: list  # class pairs the text side hardly tells apart
    attributes: dict
    model: PromptModel  # on the class names the clients label (all of them without --unseen)
    train_targets: torch.Tensor  # the training labels the clients see (--label-mask applied, seen classes)
    unseen: list  # class indices no client labels (zeroshot/)
    scorer: PromptModel  # the model on every class name (`model` itself without unseen classes)


def prepare(cfg: Config, model_cfg: ModelConfig) -> Parts:
    """options -> data -> (seen classes) -> clients -> backbone -> model."""
    cfg, device, root = resolve(cfg, model_cfg)
    conditions = load_conditions(cfg.conditions, cfg.dataset)
    train_set, test_set = load_data(cfg, root)
    unseen = zeroshot.unseen_classes(cfg.unseen, train_set.classes, cfg.seed, getattr(train_set, "unseen_names", None))
    labelled = zeroshot.seen_view(train_set, unseen)  # what the clients label: no unseen class
    cfg, clients = split_clients(cfg, labelled)
    backbone = load_backbone(cfg, device)
    train_set.transform = test_set.transform = data.clip_transform(backbone.resolution)
    similar = similar_classes(backbone, train_set.classes)
    attributes = method_attributes(cfg, train_set.classes)
    build = lambda names: build_model(cfg.method, backbone, names, conditions, model_cfg, attributes,
                                      seed=cfg.seed).to(device)  # its initial values follow --seed
    model = build(labelled.classes)
    scorer = build(train_set.classes) if unseen else model  # scores every class with model's state
    # --label-mask: what the clients' annotators left out (after the split and the store key:
    # neither depends on it); the test labels stay whole
    train_targets = data.mask_positives(labelled.targets, cfg.label_mask, cfg.seed)
    return Parts(cfg, model_cfg, device, root, conditions, train_set, test_set, clients, similar, attributes,
                 model, train_targets, unseen, scorer)


def training_inputs(parts: Parts, rows=None):
    """The frozen inputs of the training images (or of their `rows`: one client's, on a
    Flower SuperNode) from the feature store: (inputs, store key, images encoded now)."""
    split_set = parts.train_set if rows is None else parts.train_set.subset(rows)
    model = parts.model
    return frozen_inputs(model.encode_images, split_set, model.input_kind(), model.backbone.fingerprint(),
                         parts.cfg, parts.device)


def client_part(parts: Parts, client: int):
    """A Flower SuperNode's share of a run: one client's frozen inputs (from the feature store),
    its training labels in split order, and the store key: (inputs, targets, key)."""
    client_splits = parts.clients.splits
    if not 0 <= client < len(client_splits):
        raise FedMPTError(f"client {client}: this run has {len(client_splits)} clients, 0 to {len(client_splits) - 1}.")
    inputs, key, _ = training_inputs(parts, client_splits[client])
    return inputs, parts.train_targets[client_splits[client]], key


def assemble(parts: Parts, train=None, out=None, record: dict = None) -> Experiment:
    """frozen test features -> reference scores -> the run's description (config.json). `train`:
    training_inputs' result, or None where no client trains here (the Flower server)."""
    cfg, model, test_set, train_set = parts.cfg, parts.model, parts.test_set, parts.train_set
    backbone, clients = model.backbone, parts.clients
    out = Path(out or runs.default_out(cfg))
    sha256, kind = backbone.fingerprint(), model.input_kind()
    n_classes = len(train_set.classes)  # every class (an unseen one ranks alike on every image: its prevalence)
    prior = label_prior_mAP(zeroshot.every_column(parts.train_targets[clients.pool], parts.unseen, n_classes, 0),
                            test_set, n_classes)
    test, test_key, encoded = frozen_inputs(model.encode_images, test_set, kind, sha256, cfg, parts.device)
    store_keys = {"test": test_key}
    if train is not None:
        store_keys["train"], encoded = train[1], encoded + train[2]
    if model.inputs_start_with_v:
        v = test[0]
    else:
        (v,), store_keys["zero-shot"], n = frozen_inputs(lambda x: backbone.encode_image_tokens(x)[:1], test_set,
                                                         "v", sha256, cfg, parts.device)
        encoded += n
    zero_shot = zero_shot_metrics(backbone, v, test_set, train_set.classes, parts.unseen)
    resolved = describe(parts, out, sha256, encoded, record)
    return Experiment(cfg, parts.model_cfg, out, model, (None if train is None else train[0], parts.train_targets),
                      (test, test_set.targets), prior, resolved, zero_shot, store_keys, parts.conditions,
                      parts.attributes, clients, train_set, test_set, parts.unseen, parts.scorer)


def label_prior_mAP(train_targets, test_set, n_classes) -> float:
    """mAP of ranking every test image by the training label frequencies alone."""
    scores = metrics.label_prior_scores(train_targets, len(test_set))
    return metrics.multilabel_metrics(scores, test_set.targets, top_k=min(3, n_classes))["mAP"]


def describe(parts: Parts, out, sha256, encoded, record=None) -> dict:
    """config.json: every resolved option and what the run was built from."""
    cfg, train_set, test_set, clients = parts.cfg, parts.train_set, parts.test_set, parts.clients
    client_splits = clients.splits
    return {**dataclasses.asdict(cfg), **dataclasses.asdict(parts.model_cfg), "root": parts.root,
            "device_used": parts.device, "out": str(out), "classes": train_set.classes,
            "condition_set": parts.conditions, "attribute_source": (parts.attributes or {}).get("source"),
            "tunable_params": sum(t.numel() for t in parts.model.tunable_state().values()),
            "backbone_sha256": sha256, "feature_cache": str(features.cache_root(cfg.cache_dir)),
            "loss_over_images": "mean", "encoded_images": encoded,
            "client_sizes": [len(s) for s in client_splits], "client_names": clients.names,
            "label_skew": splits.label_skew(train_set.targets, client_splits),
            "images": {"train": len(train_set) - len(clients.validation), "validation": len(clients.validation),
                       "test": len(test_set)},
            "similar_class_pairs": [[a, b, round(c, 4)] for a, b, c in parts.similar[:50]],
            "masked_positives": int((parts.train_targets == -1).sum() - (zeroshot.seen_view(train_set, parts.unseen).
                                                                          targets == -1).sum()),
            "unseen_classes": [train_set.classes[c] for c in parts.unseen],
            "negative_only_images": zeroshot.negative_only(train_set, parts.unseen),
            "skipped_images": [str(p) for p in train_set.skipped + test_set.skipped], **(record or {})}


def count_params(cfg: Config, model_cfg: ModelConfig) -> dict:
    """Tunable and total parameters of a method, from the class list alone (no data, no
    download: counts do not depend on weight values, so named architectures get random ones)."""
    validate(cfg, model_cfg)
    classes = data.known_classes(cfg.dataset)
    if not classes:  # a dataset whose classes are read from disk
        classes = data.load_dataset(cfg.dataset, cfg.root or os.path.join("data", cfg.dataset), "train").classes
    random_init = not cfg.clip_weights and (cfg.clip in ARCHITECTURES or cfg.clip == "shapes")
    backbone = load_backbone(cfg, random_init=random_init)
    model = build_model(cfg.method, backbone, classes, load_conditions(cfg.conditions, cfg.dataset),
                        model_cfg, method_attributes(cfg, classes), seed=cfg.seed)
    tunable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"method": cfg.method, "dataset": cfg.dataset, "classes": len(classes), "clip": cfg.clip,
            "tunable": tunable, "total": sum(p.numel() for p in model.parameters())}
