"""A run built as one pipeline, `setup`:

    options -> data -> clients -> backbone -> model -> frozen features -> reference scores -> run directory

Each stage is a function of the stages before it; `prepare` is data to model, which the Flower
engine (flower_app.py) also composes: a SuperNode then encodes its own client's images only, the
server the test side only. Evaluation is in evaluation.py, the run directory in store/runs.py.
"""
import dataclasses
import operator
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import baselines
import data
import metrics
import speed
import splits
import zeroshot
from backbone import ARCHITECTURES, FrozenCLIP, load_clip
from conditions import load_conditions
from errors import FedMPTError
from fedmpt import PromptModel
from options import Config, ModelConfig, validate
from store import features, runs
from store.files import write_json


@dataclass
class Experiment:
    """Everything a run needs. `prepare` fills the first part; setup's later stages the rest."""
    cfg: Config  # as resolved: the method's own --lr, `clients` the number of sites where the dataset names them
    model_cfg: ModelConfig
    device: str
    root: str
    conditions: dict  # the condition set (conditions.json)
    attributes: dict  # FedMVP's descriptions (attributes.json), else None
    train_set: object  # the datasets (their images, classes, targets)
    test_set: object
    unseen: list  # class indices no client labels (--unseen, --zsl-split)
    splits: list  # rows of the training set each client holds
    client_names: list  # the sites' names where the dataset names them, else None
    validation: list  # rows held out from every client (--validation)
    pool: list  # the other rows
    similar: list  # class pairs the backbone's text side hardly tells apart
    model: PromptModel  # on the class names the clients label (all of them without unseen classes)
    scorer: PromptModel  # the model on every class name, scoring with model's state (`model` itself without)
    train_targets: torch.Tensor  # the training labels the clients see (--label-mask applied, seen classes)
    train: tuple = None  # (inputs, targets) of the training images: inputs = model.encode_images' tuple
    test: tuple = None  # the same for the test images
    prior_mAP: float = None
    zero_shot: dict = None  # metrics of the frozen backbone alone, "a photo of a <class>."
    store_keys: dict = dataclasses.field(default_factory=dict)  # {"train"/"test"/"zero-shot": key in the store}
    encoded: int = 0  # images encoded now (not found in the feature store)
    out: Path = None
    client_test: list = None  # each client's test rows (--client-eval, --personalize: clients_eval.test_clients)


def setup(cfg: Config, model_cfg: ModelConfig, record: dict = None, state: dict = None, backbone=None) -> Experiment:
    """The plain loop's start: every stage in order. `state`: a saved tunable state to continue
    from (--resume), loaded as soon as the model is built, so one that does not fit fails before
    any image is encoded. An --out that already holds a run is refused first. `backbone`: a
    FrozenCLIP already loaded (cells side by side share one: speed/lockstep.py)."""
    cfg, model_cfg, device, root = resolve(cfg, model_cfg)  # bad options first, before anything is built
    if cfg.threads:  # after the checks: a bad option is all a refused run says
        torch.set_num_threads(cfg.threads)
    elif (cores := os.cpu_count() or 1) > 1 and (load := os.getloadavg()[0]) >= 0.75 * cores:  # torch's default
        print(f"note: the CPUs are busy (load {load:.1f} on {cores} cores); a run that shares them is faster "
              "with --threads 1 (docs/usage.md).", file=sys.stderr)
    out = runs.run_directory(cfg)
    exp = prepare(cfg, model_cfg, device, root, backbone)
    if state is not None:
        try:
            exp.model.load_tunable_state(state)
        except FedMPTError as error:
            raise FedMPTError(f"--resume {cfg.resume}: checkpoint.pt does not fit the model its config.json builds "
                              f"({error}) Restore the run's own files, or train it again with another --out.") from None
    exp.train = training_inputs(exp)
    test_side(exp)
    save_run_directory(exp, out, record)
    return exp


def prepare(cfg: Config, model_cfg: ModelConfig, device: str, root: str, backbone=None) -> Experiment:
    """(resolved options) -> data -> (seen classes) -> clients -> backbone (`backbone`, when one
    is given) -> model."""
    print(f"feature store: {features.cache_root(cfg.cache_dir)} (set FEDMPT_CACHE or --cache-dir to move it)")
    conditions = load_conditions(cfg.conditions, cfg.dataset)
    train_set, test_set = load_data(cfg, root)
    unseen, labelled = [], train_set  # labelled: what the clients label, no unseen class
    if cfg.unseen or cfg.zsl_split:
        unseen = zeroshot.unseen_classes(cfg.unseen, train_set.classes, cfg.seed, getattr(train_set, "unseen_names", None))
        labelled = zeroshot.seen_view(train_set, unseen)
    validation, pool = [], list(range(len(labelled)))
    if cfg.validation:  # held out before the client split
        validation, pool = splits.hold_out(len(labelled), cfg.validation, cfg.seed)
    cfg, client_splits, client_names = splits.make_clients(cfg, labelled.subset(pool) if validation else labelled)
    if validation:  # back to rows of the whole training set
        client_splits = [[pool[i] for i in s] for s in client_splits]
    print(splits.split_report(labelled.targets, client_splits, labelled.classes, names=client_names))
    backbone = load_backbone(cfg, device) if backbone is None else backbone
    train_set.transform = test_set.transform = data.clip_transform(backbone.resolution)
    similar = similar_classes(backbone, train_set.classes)
    attributes = method_attributes(cfg, train_set.classes) if cfg.method == "fedmvp" else None
    # the model's initial values follow --seed; its text side runs as --text-encoding asks (speed/)
    placed = {"seed": cfg.seed, "device": device, "text_encoding": cfg.text_encoding}
    model = build_model(cfg.method, backbone, labelled.classes, conditions, model_cfg, attributes, **placed)
    if cfg.compile:  # --compile: its training loss compiled, on fused kernels (speed/compiled.py)
        model = speed.compiled_step(model)
    scorer = model  # with unseen classes: the model on every class name, scoring with model's state
    if unseen:
        scorer = build_model(cfg.method, backbone, train_set.classes, conditions, model_cfg, attributes, **placed)
    # --label-mask: what the clients' annotators left out (after the split and the store key:
    # neither depends on it); the test labels stay whole
    train_targets = data.mask_positives(labelled.targets, cfg.label_mask, cfg.seed) if cfg.label_mask else labelled.targets
    return Experiment(cfg, model_cfg, device, root, conditions, attributes, train_set, test_set, unseen, client_splits,
                      client_names, validation, pool, similar, model, scorer, train_targets)


# ---- The stages ---------------------------------------------------------------------------
def resolve(cfg: Config, model_cfg: ModelConfig):
    """The checked options, the method's own rate resolved (--lr 0); the device and the dataset
    root: (cfg, model_cfg, device, root), what `prepare` starts from."""
    validate(cfg, model_cfg)
    cfg = dataclasses.replace(cfg, lr=cfg.lr or baselines.model_class(cfg.method).learning_rate)  # --lr 0: its own
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    return cfg, model_cfg, device, cfg.root or os.path.join("data", cfg.dataset)


def load_data(cfg: Config, root: str):
    """(train, test) datasets; with --min-labels both keep only images with that many labels.
    A test split without a single positive label has nothing to evaluate: FedMPTError."""
    if cfg.download:
        from tools import download
        download.download_voc2007(root)
    train_set, test_set = (data.load_dataset(cfg.dataset, root, split, skip_unreadable=cfg.skip_unreadable,
                                             zsl_split=cfg.zsl_split) for split in ("train", "test"))
    if cfg.min_labels:
        train_set, test_set = (data.keep_min_labels(split_set, cfg.min_labels) for split_set in (train_set, test_set))
    if not (test_set.targets == 1).any():
        raise FedMPTError(f"the test split of {cfg.dataset} at {root} has {len(test_set)} images and not one positive "
                          "label: there is nothing to evaluate. Check its labels (for a folder dataset, the labels "
                          "and split columns of labels.csv).")
    return train_set, test_set


def load_backbone(cfg: Config, device="cpu", random_init=None):
    """The frozen CLIP a run names: the shipped shapes CLIP, or `backbone.load_clip`."""
    from shapes import model as shapes_clip
    random_init = cfg.random_init if random_init is None else random_init
    if cfg.clip == "shapes":
        model = shapes_clip.new_model(cfg.seed) if random_init else shapes_clip.load_shapes_clip(cfg.clip_weights or None)
    else:
        model = load_clip(cfg.clip, cfg.clip_weights or None, random_init, cfg.seed)
    backbone = FrozenCLIP(model).to(device)
    backbone.precision = cfg.precision  # where tuned tensors pass through the frozen encoders
    if cfg.resume and runs.read_saved_config(cfg.resume).get("backbone_sha256") not in (None, backbone.fingerprint()):
        raise FedMPTError(f"--resume {cfg.resume}: the run was trained on other {cfg.clip} weights "
                          "than the ones found now; resume it with the same backbone file.")
    return backbone


def method_attributes(cfg: Config, classes):
    """FedMVP's class descriptions (baselines.fedmvp.load_attributes): the only method that has them."""
    from baselines.fedmvp import load_attributes
    return load_attributes(cfg.dataset, classes, cfg.attributes)


def build_model(method, backbone, classes, conditions, model_cfg, attributes=None, *, seed: int, device=None,
                text_encoding="full") -> PromptModel:
    """The method's model on the frozen backbone; prompts say `data.prompt_name` of each class.
    `seed` (a run's --seed) decides every initial value of its tunable tensors. With a `device`,
    the model is moved there and its text side runs as `text_encoding` (--text-encoding) asks
    (speed.with_text_encoding)."""
    names = [data.prompt_name(c) for c in classes]
    if method != "fedmvp":  # FedMPT takes the conditions, FedMVP the attribute descriptions
        model = baselines.model_class(method)(backbone, names, conditions["conditions"], model_cfg, seed=seed)
    else:
        sentences = [t for c in classes for t in attributes["attributes"][c]]
        model = baselines.model_class(method)(backbone, names, conditions["conditions"], model_cfg,
                                              attributes=sentences, seed=seed)
    return model if device is None else speed.with_text_encoding(model.to(device), text_encoding)


def frozen_inputs(encode, split_set, kind, backbone_sha256, cfg: Config, device):
    """A split's frozen inputs from the feature store: (inputs, store key, images encoded now)."""
    key = features.store_key(backbone_sha256, split_set, kind)
    workers = min(os.cpu_count() or 1, 8) if cfg.workers < 0 else cfg.workers
    inputs, n = features.encode_dataset(encode, split_set, key, cfg.cache_dir, device=device, workers=workers)
    return inputs, key, n


def zero_shot_metrics(backbone, v, test_set, classes, unseen=()) -> dict:
    """The frozen backbone alone on the test images (its bias metrics on the shapes world, its
    zero-shot figures with unseen classes)."""
    text = backbone.encode_texts([f"a photo of a {data.prompt_name(c)}." for c in classes]).cpu()  # (C, D)
    scores = torch.nn.functional.normalize(v.float(), dim=-1) @ text.T  # cosines (n, C): a ranking, not probabilities
    result = {"mAP": metrics.multilabel_metrics(scores, test_set.targets, top_k=min(3, len(classes)))["mAP"]}
    if unseen:
        result.update(metrics.zsl_metrics(scores, test_set.targets, unseen))
    if bool(((test_set.targets == 1).sum(1) == 1).all()):  # one label a test image: top-1 accuracies too
        result.update(metrics.single_label_accuracy(scores, test_set.targets, unseen))
    if test_set.biased_pairs:
        bias = metrics.bias_metrics(scores, test_set.targets, test_set.biased_pairs)
        result.update(exclusive_mAP=bias["exclusive_mAP"], cooccur_mAP=bias["cooccur_mAP"])
    return result


SIMILAR_TEXT = 0.97  # the shapes CLIP: its own 12 shape words reach 0.85, words it never saw 0.977-0.999


def similar_classes(backbone, classes, threshold=SIMILAR_TEXT) -> list:
    """Class pairs the backbone's text side hardly tells apart, [(a, b, cosine)] of "a photo of a
    <class>." above `threshold`, with a printed warning: prompt tuning starts each such class
    alike (real CLIP: misspelled or exotic names; the shapes CLIP: any word outside its captions)."""
    text = backbone.encode_texts([f"a photo of a {data.prompt_name(c)}." for c in classes]).float()  # (C, D)
    similarity = torch.triu(text @ text.T, diagonal=1)
    pairs = [(classes[i], classes[j], float(similarity[i, j])) for i, j in (similarity > threshold).nonzero().tolist()]
    pairs.sort(key=operator.itemgetter(2), reverse=True)  # most similar first (a stable sort)
    if pairs:
        shown = ", ".join(f"{a}/{b} {c:.3f}" for a, b, c in pairs[:8]) + (" ..." if len(pairs) > 8 else "")
        print(f"warning: the backbone's text side hardly tells {len(pairs)} of the {len(classes) * (len(classes) - 1) // 2} "
              f"class pairs apart (cosine of 'a photo of a <class>.' above {threshold}): {shown}. Prompt tuning "
              "starts each such class alike; check the class names, use a backbone that knows them, or give "
              "FedMPT contexts of each class's own (--class-ctx 4; docs/choices.md).", file=sys.stderr)
    return pairs


def training_inputs(exp: Experiment, rows=None):
    """The frozen inputs of the training images (or of their `rows`: one client's, on a Flower
    SuperNode) from the feature store, and their targets: (inputs, targets)."""
    split_set = exp.train_set if rows is None else exp.train_set.subset(rows)
    model = exp.model
    inputs, exp.store_keys["train"], n = frozen_inputs(model.encode_images, split_set, model.input_kind,
                                                       model.backbone.fingerprint(), exp.cfg, exp.device)
    exp.encoded += n
    return inputs, exp.train_targets if rows is None else exp.train_targets[rows]


def test_side(exp: Experiment):
    """frozen test features -> the label prior and the zero-shot backbone's scores."""
    cfg, model, test_set, train_set = exp.cfg, exp.model, exp.test_set, exp.train_set
    backbone, sha256 = model.backbone, model.backbone.fingerprint()
    n_classes = len(train_set.classes)  # every class (an unseen one ranks alike on every image: its prevalence)
    seen = exp.train_targets[exp.pool]
    prior = metrics.label_prior_scores(zeroshot.every_column(seen, exp.unseen, n_classes, 0) if exp.unseen else seen,
                                       len(test_set))  # every test image ranked by the training label frequencies
    exp.prior_mAP = metrics.multilabel_metrics(prior, test_set.targets, top_k=min(3, n_classes))["mAP"]
    test, exp.store_keys["test"], n = frozen_inputs(model.encode_images, test_set, model.input_kind, sha256, cfg,
                                                    exp.device)
    exp.test, exp.encoded = (test, test_set.targets), exp.encoded + n
    if model.inputs_start_with_v:
        v = test[0]
    else:
        (v,), exp.store_keys["zero-shot"], n = frozen_inputs(lambda x: backbone.encode_image_tokens(x)[:1], test_set,
                                                             "v", sha256, cfg, exp.device)
        exp.encoded += n
    exp.zero_shot = zero_shot_metrics(backbone, v, test_set, train_set.classes, exp.unseen)


def save_run_directory(exp: Experiment, out: Path, record: dict = None):
    """The run directory `out`. For a new run: config.json (every resolved option and what the
    run was built from, with `record`), conditions.json (and FedMVP's attributes.json); clients.png."""
    cfg, train_set, test_set, client_splits = exp.cfg, exp.train_set, exp.test_set, exp.splits
    exp.out = out
    if not cfg.resume:
        write_json(out / "config.json", {
            **dataclasses.asdict(cfg), **dataclasses.asdict(exp.model_cfg), "root": exp.root, "device_used": exp.device,
            "out": str(out), "classes": train_set.classes, "condition_set": exp.conditions,
            "attribute_source": (exp.attributes or {}).get("source"),
            "tunable_params": sum(t.numel() for t in exp.model.tunable_state().values()),
            "backbone_sha256": exp.model.backbone.fingerprint(), "feature_cache": str(features.cache_root(cfg.cache_dir)),
            "loss_over_images": "mean", "encoded_images": exp.encoded,
            "client_sizes": [len(s) for s in client_splits], "client_names": exp.client_names,
            "label_skew": splits.label_skew(train_set.targets, client_splits),
            "images": {"train": len(train_set) - len(exp.validation), "validation": len(exp.validation),
                       "test": len(test_set)},
            "similar_class_pairs": [[a, b, round(c, 4)] for a, b, c in exp.similar[:50]],
            "masked_positives": int((exp.train_targets == -1).sum() - (zeroshot.seen_view(train_set, exp.unseen).
                                                                        targets == -1).sum()) if cfg.label_mask else 0,
            "unseen_classes": [train_set.classes[c] for c in exp.unseen],
            "negative_only_images": zeroshot.negative_only(train_set, exp.unseen) if exp.unseen else 0,
            "skipped_images": [str(p) for p in train_set.skipped + test_set.skipped], **(record or {})})
        write_json(out / "conditions.json", exp.conditions)  # what --resume builds the model from
        if exp.attributes:
            write_json(out / "attributes.json", exp.attributes)
    splits.plot_client_distributions(train_set.targets, client_splits, train_set.classes, out / "clients.png",
                                     names=exp.client_names)
    print(f"options and sizes: {out / 'config.json'}" + (  # only FedMPT predicts through conditions
        f"; conditions ({exp.conditions['source']}): {', '.join(map(repr, exp.conditions['conditions']))}"
        if cfg.method == "fedmpt" else ""))


def count_params(cfg: Config, model_cfg: ModelConfig) -> dict:
    """Tunable and total parameters of a method, from the class list alone (no data, no
    download: counts do not depend on weight values, so named architectures get random ones)."""
    validate(cfg, model_cfg)
    classes = data.known_classes(cfg.dataset)
    if not classes:  # a dataset whose classes are read from disk
        classes = data.load_dataset(cfg.dataset, cfg.root or os.path.join("data", cfg.dataset), "train").classes
    random_init = not cfg.clip_weights and (cfg.clip in ARCHITECTURES or cfg.clip == "shapes")
    backbone = load_backbone(cfg, random_init=random_init)
    attributes = method_attributes(cfg, classes) if cfg.method == "fedmvp" else None
    model = build_model(cfg.method, backbone, classes, load_conditions(cfg.conditions, cfg.dataset),
                        model_cfg, attributes, seed=cfg.seed)
    tunable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"method": cfg.method, "dataset": cfg.dataset, "classes": len(classes), "clip": cfg.clip,
            "tunable": tunable, "total": sum(p.numel() for p in model.parameters())}
