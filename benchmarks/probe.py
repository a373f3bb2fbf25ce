"""The linear-probe reference: logistic regression on the frozen backbone's image features.

    python benchmarks/probe.py [--dataset shapes] [--root DIR] [--clip shapes] [--compare runs/compare]

Prompt tuning learns a few vectors on top of a frozen CLIP; a logistic regression per class on
the same frozen global image features, trained centrally on every training image, is the classic
upper reference for what those features hold. Its regularisation C is chosen on a validation
split carved from the training images (seeded, --val of them); the test split is read once, to
report. With --compare (a benchmarks/compare.py directory) each method's share of the probe's
gain over the label prior is added: (method - prior) / (probe - prior). `--features patches`
fits it on the region (patch) features instead, each normalised, all concatenated: what
FedMPT and the region-pooling baselines read (N x D inputs: large for real CLIP).
Writes OUT/probe.json and OUT/probe.md.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
from store import features  # noqa: E402
import experiment  # noqa: E402
from options import Config, ModelConfig, validate  # noqa: E402
import metrics  # noqa: E402
from errors import FedMPTError  # noqa: E402

C_GRID = [0.01, 0.1, 1.0, 10.0, 100.0]


def frozen_features(cfg, backbone, dataset, kind="global") -> np.ndarray:
    """The normalised global features v (n, D), or the patch features P (n, N, D) normalised per
    patch and concatenated (n, N * D) with kind "patches", from the feature store runs share."""
    index = 0 if kind == "global" else 1
    key = features.store_key(backbone.fingerprint(), dataset, "v" if kind == "global" else "P")
    (x,), _ = features.encode_dataset(lambda images: backbone.encode_image_tokens(images)[index:index + 1], dataset, key,
                                  cfg.cache_dir, workers=0)
    x = torch.nn.functional.normalize(torch.as_tensor(np.asarray(x), dtype=torch.float32), dim=-1)
    return x.flatten(1).numpy()


def fit_scores(x_train, y_train, x_eval, C, seed) -> np.ndarray:
    """One logistic regression per class (pairs with target -1 left out); (n_eval, C) scores.
    A class with one value in training scores its training frequency."""
    scores = np.zeros((len(x_eval), y_train.shape[1]))
    for c in range(y_train.shape[1]):
        known = y_train[:, c] >= 0
        y = y_train[known, c]
        if y.min() == y.max():
            scores[:, c] = float(y.mean()) if len(y) else 0.0
            continue
        model = LogisticRegression(C=C, max_iter=2000, random_state=seed).fit(x_train[known], y)
        scores[:, c] = model.predict_proba(x_eval)[:, 1]
    return scores


def probe(cfg, val_share=0.2, features="global") -> dict:
    """The probe's test metrics, the validation sweep of C, the label prior and zero-shot."""
    train_set, test_set = experiment.load_data(cfg, cfg.root or str(ROOT / "data" / cfg.dataset))
    backbone = experiment.load_backbone(cfg)
    train_set.transform = test_set.transform = data.clip_transform(backbone.resolution)
    x_train, x_test = (frozen_features(cfg, backbone, split, features) for split in (train_set, test_set))
    y_train, y_test = train_set.targets.numpy(), test_set.targets
    order = np.random.default_rng(cfg.seed).permutation(len(x_train))
    n_val = max(1, int(round(val_share * len(x_train))))
    val, fit = order[:n_val], order[n_val:]
    top_k = min(3, y_test.shape[1])
    sweep = {}
    for C in C_GRID:  # chosen on the validation images only
        scores = fit_scores(x_train[fit], y_train[fit], x_train[val], C, cfg.seed)
        sweep[C] = metrics.multilabel_metrics(scores, train_set.targets[val], top_k=top_k)["mAP"]
    best = max(sweep, key=lambda C: (sweep[C], -C))
    test = metrics.multilabel_metrics(fit_scores(x_train, y_train, x_test, best, cfg.seed), y_test, top_k=top_k)
    v_test = torch.as_tensor(x_test if features == "global" else frozen_features(cfg, backbone, test_set))
    zero_shot = experiment.zero_shot_metrics(backbone, v_test, test_set, train_set.classes)  # its mAP, as federate.py's
    prior = metrics.multilabel_metrics(metrics.label_prior_scores(train_set.targets, len(test_set)), y_test, top_k=top_k)
    return {"dataset": cfg.dataset, "clip": cfg.clip, "seed": cfg.seed, "features": features, "C": best, "validation_mAP": sweep,
            "probe": {k: test[k] for k in ("mAP", "CF1", "OF1")}, "zero_shot_mAP": zero_shot["mAP"],
            "label_prior_mAP": prior["mAP"], "train_images": len(fit), "validation_images": len(val)}


def gain_shares(result, compare_dir: Path) -> dict:
    """{method: mean final mAP over seeds, share of the probe's gain over the prior}."""
    rows = json.loads((compare_dir / "compare.json").read_text())
    prior, gain = result["label_prior_mAP"], result["probe"]["mAP"] - result["label_prior_mAP"]
    shares = {}
    for method, row in rows.items():
        mAP = float(np.mean([r["mAP"] for r in row["final"]]))
        shares[method] = {"mAP": mAP, "share": (mAP - prior) / gain if gain > 0 else None}
    return shares


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in [("--dataset", "shapes"), ("--root", ""), ("--clip", "shapes"), ("--clip-weights", ""),
                          ("--cache-dir", ""), ("--out", "runs/probe"), ("--compare", "")]:
        parser.add_argument(flag, default=default)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val", type=float, default=0.2, help="share of the training images kept for choosing C")
    parser.add_argument("--features", choices=["global", "patches"], default="global",
                        help="global: the global image feature; patches: the region features, concatenated")
    args = parser.parse_args(argv)
    try:
        cfg = Config(dataset=args.dataset, root=args.root, clip=args.clip, clip_weights=args.clip_weights,
                                cache_dir=args.cache_dir, seed=args.seed, device="cpu")
        validate(cfg, ModelConfig())
        if not 0 < args.val < 1:
            raise FedMPTError(f"--val {args.val}: must lie in (0, 1).")
        result = probe(cfg, args.val, args.features)
        if args.compare:
            result["methods"] = gain_shares(result, Path(args.compare))
    except FedMPTError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(result, indent=1))
    lines = [f"{args.dataset}, backbone {args.clip}, {args.features} features: label prior {result['label_prior_mAP']:.2f}, zero-shot "
             f"{result['zero_shot_mAP']:.2f}, linear probe {result['probe']['mAP']:.2f} mAP (C = {result['C']:g}, chosen on "
             f"{result['validation_images']} validation images: "
             + ", ".join(f"{C:g}: {m:.2f}" for C, m in result["validation_mAP"].items()) + ")."]
    if "methods" in result:
        lines += ["", "| method | mAP | share of the probe's gain over the prior |", "|---|---:|---:|"]
        lines += [f"| {m} | {r['mAP']:.2f} | {r['share']:.2f} |" if r["share"] is not None else f"| {m} | {r['mAP']:.2f} | n/a |"
                  for m, r in result["methods"].items()]
    (out / "probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
