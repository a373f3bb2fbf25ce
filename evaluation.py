"""Evaluation: the global model's metrics on the test images each round (both engines), and the
held-out images' (--validation) and the thresholds chosen on them.
"""
import torch

import metrics
import zeroshot
from client import gather
from errors import RunFailed


@torch.no_grad()
def predict_scores(model, inputs, batch_size=256, rows=None):
    """Probabilities (n, C) for cached inputs (or their `rows`); the text side is encoded once."""
    T = model.text_features()
    n = len(inputs[0])
    parts = ([slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)] if rows is None
             else torch.as_tensor(rows).split(batch_size))
    return torch.cat([torch.sigmoid(model(*gather(inputs, part, model.device), T=T)).cpu() for part in parts])


def evaluate_global(exp) -> dict:
    """Metrics of the model's current state on the test images (with unseen classes: every
    class scored by exp.scorer, and the zero-shot figures). A state whose scores are not finite
    (finite updates so large that the model overflows) ends the run: RunFailed."""
    inputs, y = exp.test
    if exp.unseen:
        exp.scorer.load_tunable_state(exp.model.tunable_state())
    scores = predict_scores(exp.scorer or exp.model, inputs)
    if not torch.isfinite(scores).all():
        raise RunFailed("the run could not train: the global model's test scores are not finite (its tunable state "
                        "overflowed: the steps were too large); checkpoint.pt keeps the last round whose model scored. "
                        "Try a lower --lr (or 0, the method's own) and keep --grad-clip on (its default 10).")
    result = metrics.multilabel_metrics(scores, y, top_k=min(3, y.shape[1]))
    if exp.unseen:
        result.update(metrics.zsl_metrics(scores, y, exp.unseen))
    if exp.test_set.biased_pairs:  # how much the spurious companions of training still drive predictions
        bias = metrics.bias_metrics(scores, y, exp.test_set.biased_pairs)
        result.update({k: bias[k] for k in ("exclusive_mAP", "cooccur_mAP", "irrelevant_rate")})
    if bool(((y == 1).sum(1) == 1).all()):  # one label a test image: FedMVP's and CoCoOp's accuracies too
        result.update(metrics.single_label_accuracy(scores, y, exp.unseen))
    if exp.validation:  # the held-out training images: what settings are chosen on (--validation)
        val_scores, val_y = validation_scores(exp)
        held_out = metrics.multilabel_metrics(val_scores, val_y, top_k=min(3, y.shape[1]))
        result.update({f"val_{k}": held_out[k] for k in ("mAP", "CF1", "OF1")})
        chosen = metrics.multilabel_metrics(scores, y, validation_thresholds(exp, val_scores, val_y), min(3, y.shape[1]))
        result.update({f"{k}_val_thresholds": chosen[k] for k in ("CF1", "OF1")})
    return result


def validation_scores(exp) -> tuple:
    """Probabilities and labels of the held-out training images (--validation), never the test's."""
    inputs, y = exp.train
    return predict_scores(exp.model, inputs, rows=exp.validation), y[exp.validation]


def validation_thresholds(exp, val_scores, val_y):
    """Per-class F1-optimal thresholds (C,) on the held-out images; an unseen class keeps 0.5."""
    chosen = torch.as_tensor(metrics.f1_thresholds(val_scores, val_y))
    return zeroshot.every_column(chosen, exp.unseen, len(exp.train_set.classes), 0.5).numpy()


def thresholds_record(exp, round_index: int) -> dict:
    """thresholds.json: per-class F1-optimal thresholds of the model's current state, chosen on
    the held-out training images (what predict.py labels with)."""
    thresholds = validation_thresholds(exp, *validation_scores(exp))
    return {"round": round_index, "chosen_on": f"{len(exp.validation)} held-out training images (--validation)",
            "rule": "per class, the threshold that maximises F1 of probability >= threshold (metrics.f1_thresholds)",
            "thresholds": dict(zip(exp.train_set.classes, thresholds.tolist()))}
