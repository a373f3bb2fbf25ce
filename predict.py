"""Use a finished run: label new images, or evaluate its global model on a test split.

    python predict.py --run DIR PATH... [--threshold T] [--top-k K] [--out FILE.csv|.json]
    python predict.py --run DIR --evaluate [--dataset NAME --root DIR]

Both rebuild the model from the run directory alone: config.json (backbone, classes,
conditions, model options) and state.pt (or the last checkpoint of an unfinished run). Labels
are the classes whose probability reaches their threshold: the run's thresholds.json (chosen
per class on its held-out training images: a run trained with --validation) when it has one,
else 0.5; `--threshold T` sets one for every class.
"""
import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch

import data
import metrics
import zeroshot
from errors import FedMPTError, exit_code
from evaluation import predict_scores
from experiment import build_model, frozen_inputs, load_backbone, method_attributes, zero_shot_metrics
from options import Config, build_parser
from loaders.base import UNREADABLE
from store import features
from store.files import write_atomic, write_json
from store.runs import read_checkpoint, read_config, read_state, require_record

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def load_run(run_dir: str, device: str = "cpu", classes=None, dataset=""):
    """The run's configuration and its global model, on the backbone it was trained with. With
    `classes` (another dataset's, `dataset`): the text side is built for those names and scores
    them with the trained state (cross-dataset transfer), where the method can."""
    cfg, model_cfg, saved = read_config(run_dir)
    require_record(run_dir, saved, ("classes", "condition_set"))
    classes = saved["classes"] if classes is None else list(classes)
    if classes != saved["classes"]:
        why = zeroshot.cannot_score_unseen(cfg.method, model_cfg.class_ctx)
        if why:
            raise FedMPTError(f"run {run_dir} ({cfg.method}) cannot score {dataset or 'these'} classes it was not "
                              f"trained on: {why}.")
        cfg.dataset, cfg.attributes = dataset or cfg.dataset, ""  # FedMVP: that dataset's descriptions
    else:
        cfg.attributes = str(Path(run_dir) / "attributes.json")  # the descriptions the run trained with
    backbone = load_backbone(cfg)
    if saved.get("backbone_sha256") and backbone.fingerprint() != saved["backbone_sha256"]:
        raise FedMPTError(f"run {run_dir} was trained on another backbone than the {cfg.clip} found "
                          f"now (weights differ; clip-weights {cfg.clip_weights or 'none'}).")
    attributes = method_attributes(cfg, classes) if cfg.method == "fedmvp" else None
    model = build_model(cfg.method, backbone, classes, saved["condition_set"], model_cfg, attributes, seed=cfg.seed,
                        device=device, text_encoding=cfg.text_encoding).eval()  # the trained state replaces each value
    state_path, checkpoint_path = Path(run_dir) / "state.pt", Path(run_dir) / "checkpoint.pt"
    if not state_path.exists() and not checkpoint_path.exists():
        raise FedMPTError(f"run {run_dir} has neither state.pt nor checkpoint.pt: nothing to load.")
    fix = f"train the run again, or continue an unfinished one with `python federate.py --resume {run_dir}`"
    if state_path.exists():  # both load onto the CPU: a GPU-trained run loads anywhere
        state = read_state(state_path, fix)
    else:
        state = read_checkpoint(checkpoint_path, fix)["global_state"]
    try:
        model.load_tunable_state(state)
    except FedMPTError as error:
        raise FedMPTError(f"run {run_dir}: {state_path if state_path.exists() else checkpoint_path} does not fit "
                          f"the model its config.json builds ({error}) {fix[0].upper() + fix[1:]}.") from None
    return cfg, saved, model


def list_images(paths):
    """Image files named directly, and every image under named folders (sorted)."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise FedMPTError(f"{path}: no such file or folder.")
    if not found:
        raise FedMPTError(f"no images found in {', '.join(map(str, paths))}.")
    return found


class ImageFiles(torch.utils.data.Dataset):
    def __init__(self, files, transform):
        self.files, self.transform = files, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image
        try:
            return self.transform(Image.open(self.files[i]).convert("RGB")), 0
        except UNREADABLE as error:
            raise FedMPTError(f"cannot read image {self.files[i]} ({error}).") from None


@torch.no_grad()
def score_images(model, files, batch_size=64):
    """Probabilities (n_images, C), through the same frozen encoding as training."""
    dataset = ImageFiles(files, data.clip_transform(model.backbone.resolution))
    inputs, _ = features.encode_dataset(model.encode_images, dataset, batch_size=batch_size, device=model.device)
    return predict_scores(model, inputs)


def parse_options(argv):
    parser = build_parser([Config], prog="predict.py", description="Label images with a finished run, or evaluate "
                          "its global model (--evaluate) on the test split of --dataset at --root.",
                          only=("dataset", "root", "device", "cache_dir"),
                          defaults={"dataset": ("", "the run's own"), "root": ("", "the run's own root (data/<dataset> "
                                                                               "for another --dataset)")})
    parser.add_argument("--run", required=True, help="run directory (config.json + state.pt)")
    parser.add_argument("paths", nargs="*", help="image files or folders to label")
    parser.add_argument("--threshold", type=float, default=None,
                        help="label if probability >= this (default: the run's thresholds.json, else 0.5)")
    parser.add_argument("--top-k", type=int, default=0, help="instead: the K most probable labels")
    parser.add_argument("--out", default="", help="write results to FILE.csv or FILE.json")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--evaluate", action="store_true", help="evaluate on a test split instead")
    args = parser.parse_args(argv)
    if args.evaluate == bool(args.paths):
        raise FedMPTError("give image files or folders to label, or --evaluate (not both).")
    if args.out and Path(args.out).suffix not in (".csv", ".json"):
        raise FedMPTError(f"--out {args.out}: use a .csv or .json file name.")
    if args.batch_size < 1:
        raise FedMPTError(f"--batch-size {args.batch_size}: give 1 or more images per batch.")
    if args.threshold is not None and not threshold_ok(args.threshold):
        raise FedMPTError(f"--threshold {args.threshold}: give a number in [0, 1].")
    if args.out:
        check_out(Path(args.out), Path(args.run))
    return args


def check_out(out: Path, run_dir: Path):
    """--out, refused before anything is read or written when it would overwrite one of the run's
    own files, or cannot be a file (a folder there, or a file where a folder of its path must be)."""
    if out.is_dir():
        raise FedMPTError(f"--out {out} is a folder; give a .csv or .json file name.")
    above = next((p for p in out.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise FedMPTError(f"--out {out}: {above} is a file, not a folder; give a path in a folder.")
    if out.exists() and run_dir.is_dir() and out.resolve().parent == run_dir.resolve():
        raise FedMPTError(f"--out {out} is a file of the run {run_dir} itself; write the predictions elsewhere "
                          "(another --out).")


def threshold_ok(value) -> bool:
    """A threshold is a finite number in [0, 1] (not a JSON true, not NaN, not -5)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


def run_thresholds(run_dir, classes, threshold=None) -> tuple:
    """(per-class thresholds, what they are): `threshold` for every class when given, else the
    run's thresholds.json (checked against its classes), else 0.5."""
    path = Path(run_dir) / "thresholds.json"
    if threshold is not None or not path.exists():
        value = 0.5 if threshold is None else threshold
        return [value] * len(classes), f"the threshold {value:g} for every class"
    fix = "restore it, or give --threshold T for one threshold for every class"
    try:
        chosen = json.loads(path.read_text())["thresholds"]
        values = [chosen[c] for c in classes]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise FedMPTError(f"{path} is damaged or not this run's ({type(error).__name__}: {error}); {fix}.") from None
    if set(chosen) != set(classes):
        raise FedMPTError(f"{path}: its thresholds are not one per class of the run (also "
                          f"{sorted(set(chosen) - set(classes))[:5]}); {fix}.")
    bad = [f"{c} {value!r}" for c, value in zip(classes, values) if not threshold_ok(value)]
    if bad:
        raise FedMPTError(f"{path}: thresholds must be numbers in [0, 1]; {', '.join(bad[:5])} "
                          f"{'is' if len(bad) == 1 else 'are'} not; {fix}.")
    return values, f"the per-class thresholds of {path} (chosen on held-out training images; --threshold T overrides)"


def label_images(args):
    _, saved, model = load_run(args.run, device(args.device))
    classes, files = saved["classes"], list_images(args.paths)
    thresholds, source = run_thresholds(args.run, classes, args.threshold)
    probabilities = score_images(model, files, args.batch_size)
    if not args.top_k:
        print(f"labels: {source}")
    rows = []
    for file, p in zip(files, probabilities.tolist()):
        order = sorted(range(len(classes)), key=lambda c: -p[c])
        chosen = order[:args.top_k] if args.top_k > 0 else [c for c in order if p[c] >= thresholds[c]]
        rows.append({"image": str(file), "labels": [classes[c] for c in chosen],
                     "probabilities": dict(zip(classes, p))})
        print(f"{file}: " + (", ".join(f"{classes[c]} ({p[c]:.2f})" for c in chosen) or "(no label)"))
    if args.out:
        write_predictions(Path(args.out), rows, classes)
        print(f"wrote {args.out}")
    return 0


def write_predictions(path: Path, rows, classes):
    """FILE.json (the rows) or FILE.csv (image, labels joined by |, a probability per class)."""
    if path.suffix == ".json":
        return write_json(path, rows)
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["image", "labels", *classes])
    for row in rows:
        writer.writerow([row["image"], "|".join(row["labels"]), *(f"{row['probabilities'][c]:.6f}" for c in classes)])
    write_atomic(path, text.getvalue().encode())


def evaluate(args):
    """The run's global model on a test split: its own, or (--dataset/--root) another dataset's,
    whose class names the text side is rebuilt for; the frozen backbone alone beside it."""
    cfg, _, saved = read_config(args.run)
    require_record(args.run, saved, ("classes", "condition_set", "root"))
    dataset = args.dataset or cfg.dataset
    root = args.root or (saved["root"] if dataset == cfg.dataset else str(Path("data") / dataset))
    if dataset == "shapes" and args.root and not (Path(root) / "VOCdevkit" / "VOC2007" / "generated.json").exists():
        raise FedMPTError(f"--root {root} holds no generated shapes world, and --evaluate never writes one into a "
                          "folder: name your data's kind with --dataset (e.g. --dataset folder --root "
                          f"{root}), or give the run's own root ({saved.get('root')}).")
    test_set = data.load_dataset(dataset, root, "test", skip_unreadable=cfg.skip_unreadable,
                                 zsl_split=cfg.zsl_split if dataset == cfg.dataset else "")
    transfer = list(test_set.classes) != list(saved["classes"])
    if transfer and not args.dataset:
        raise FedMPTError(f"run {args.run} was trained on classes {saved['classes']}; {dataset} at "
                          f"{root} has {list(test_set.classes)} (name it with --dataset to score them).")
    cfg, saved, model = load_run(args.run, device(args.device), test_set.classes, dataset)
    cfg.cache_dir = args.cache_dir or cfg.cache_dir
    unseen = [] if transfer else [saved["classes"].index(c) for c in saved.get("unseen_classes", [])]
    test_set.transform = data.clip_transform(model.backbone.resolution)
    sha256, backbone = model.backbone.fingerprint(), model.backbone
    inputs, _, _ = frozen_inputs(model.encode_images, test_set, model.input_kind, sha256, cfg, model.device)
    v = inputs[0] if model.inputs_start_with_v else frozen_inputs(  # the zero-shot reference's global features
        lambda x: backbone.encode_image_tokens(x)[:1], test_set, "v", sha256, cfg, model.device)[0][0]
    scores, top_k = predict_scores(model, inputs), min(3, len(test_set.classes))
    result = metrics.multilabel_metrics(scores, test_set.targets, top_k=top_k)
    summary = {k: result[k] for k in ("mAP", "CF1", "OF1")}
    if unseen:
        result.update(metrics.zsl_metrics(scores, test_set.targets, unseen))
        summary.update({k: result[k] for k in ("seen_mAP", "unseen_mAP", "H_mAP")})
    if (Path(args.run) / "thresholds.json").exists() and not transfer:  # CF1/OF1 also at the run's thresholds
        thresholds, _ = run_thresholds(args.run, saved["classes"])
        chosen = metrics.multilabel_metrics(scores, test_set.targets, np.asarray(thresholds), top_k)
        result.update({f"{k}_val_thresholds": chosen[k] for k in ("CF1", "OF1")})
        summary.update({f"{k}_val_thresholds": chosen[k] for k in ("CF1", "OF1")})
    result["zero_shot"] = zero_shot_metrics(backbone, v, test_set, test_set.classes, unseen)
    summary["zero-shot mAP"] = result["zero_shot"]["mAP"]
    print(" ".join(f"{k} {v:.2f}" if v is not None else f"{k} -" for k, v in summary.items()))
    for key in (k for k in result if k.endswith("_undefined") and k[:-len("_undefined")] in summary):
        print(f"note: {key[:-len('_undefined')]} is undefined: {result[key]}")
    out = Path(args.run) / f"evaluation-{dataset}.json"
    write_json(out, {"dataset": dataset, "root": str(root), "classes": test_set.classes,
                     "trained_on": saved["dataset"], "transfer": transfer, **result})
    print(f"wrote {out}")
    return 0


def device(choice: str) -> str:
    """--device: auto is CUDA when visible."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise FedMPTError("--device cuda: no CUDA device is visible; use --device cpu.")
    return ("cuda" if torch.cuda.is_available() else "cpu") if choice == "auto" else choice


def main(argv=None) -> int:
    def command():
        args = parse_options(sys.argv[1:] if argv is None else argv)
        return evaluate(args) if args.evaluate else label_images(args)
    return exit_code(command)


if __name__ == "__main__":
    sys.exit(main())
