"""Multi-label evaluation metrics (mAP, CP/CR/CF1, OP/OR/OF1, top-k variants) and F1-optimal
per-class thresholds.

Conventions (ML-GCN / ASL / DualCoOp):
  * targets are in {1, 0, -1}; -1 means "ignore this (image, class) pair"
    (e.g. VOC difficult-only) and the pair is excluded from every metric.
  * AP is sklearn's non-interpolated average precision
        AP = sum_n (R_n - R_{n-1}) P_n
    over the distinct score thresholds in decreasing order (tied scores enter
    together). mAP is the mean AP over classes that have >= 1 positive.
  * CP, CR = mean over ALL C classes of per-class precision / recall, where an
    undefined value (no prediction / no positive) counts as 0.
    CF1 = 2 CP CR / (CP + CR).  NOTE: this is the F1 of the means, not
    sklearn's macro F1 (the mean of per-class F1s).
  * OP, OR, OF1 = precision / recall / F1 pooled over all non-ignored pairs.
  * All metric values are returned in percent.
"""
import numpy as np


def _validate(scores, targets):
    """Return (scores float64, targets int64) as numpy arrays (from torch tensors or array-likes),
    or raise ValueError."""
    s, t = (np.asarray(x.detach().cpu() if hasattr(x, "detach") else x) for x in (scores, targets))
    if s.ndim != 2 or s.shape != t.shape:
        raise ValueError(f"scores and targets must be 2-D with equal shapes "
                         f"(n_images, C); got scores {s.shape}, targets {t.shape}")
    if not np.isin(t, (-1, 0, 1)).all():
        bad = np.unique(t[~np.isin(t, (-1, 0, 1))])[:5].tolist()
        raise ValueError(f"targets (shape {t.shape}) must only contain -1, 0, 1; "
                         f"found e.g. {bad}")
    s = s.astype(np.float64)
    if not np.isfinite(s).all():
        raise ValueError(f"scores (shape {s.shape}) contain "
                         f"{int((~np.isfinite(s)).sum())} non-finite values")
    return s, t.astype(np.int64)


def average_precision(scores, labels):
    """Non-interpolated AP of one class: sum_n (R_n - R_{n-1}) P_n.

    scores, labels: 1-D arrays, labels in {0, 1} with at least one 1.
    Thresholds are the distinct scores, highest first; all samples sharing a
    score are counted together (same as sklearn.average_precision_score).
    """
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]       # end of each tie group
    tp = np.cumsum(y)[last_of_tie]
    n_pred = np.arange(1, len(s) + 1)[last_of_tie]
    precision, recall = tp / n_pred, tp / tp[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def _prf(pred, targets, suffix=""):
    """CP, CR, CF1, OP, OR, OF1 (percent) for a boolean prediction matrix.

    Pairs with target -1 are dropped from predictions and positives. A ratio a / b is 0 where
    b == 0, an F1 is 0 where its precision and recall are both 0.
    """
    pred = pred & (targets != -1)
    pos = targets == 1
    tp, n_pred, n_pos = (np.asarray(x, float) for x in ((pred & pos).sum(0), pred.sum(0), pos.sum(0)))
    # per class (C,), then pooled over classes (one value each)
    (cp, cr), (op, or_) = [[np.divide(a, b, out=np.zeros_like(a), where=b > 0) for b in (p, n)]
                           for a, p, n in ((tp, n_pred, n_pos), (tp.sum(), n_pred.sum(), n_pos.sum()))]
    cp, cr = (cp.mean(), cr.mean()) if tp.size else (0.0, 0.0)
    cf1, of1 = (float(2 * p * r / (p + r)) if p + r > 0 else 0.0 for p, r in ((cp, cr), (op, or_)))
    vals = {"CP": cp, "CR": cr, "CF1": cf1, "OP": op, "OR": or_, "OF1": of1}
    return {k + suffix: 100.0 * float(v) for k, v in vals.items()}


def multilabel_metrics(scores, targets, threshold=0.5, top_k=3):
    """All multi-label metrics in percent, as a JSON-serialisable dict.

    scores: (n_images, C) probabilities (higher = more likely).
    targets: (n_images, C) in {1, 0, -1}; -1 pairs are ignored everywhere.
    Threshold metrics: predicted positive iff score >= threshold (one number, or one per class:
    f1_thresholds).
    Top-k metrics (keys suffixed f"_top{top_k}"): each image's predicted
    positives are its top_k scores (ties -> lower class index); a top-k slot
    that falls on a -1 pair is simply dropped (not refilled).
    per_class_AP[c] is None and c is in excluded_classes when class c has no
    positive among its non-ignored pairs; mAP averages the others (None if
    every class is excluded).
    """
    s, t = _validate(scores, targets)
    if not 1 <= top_k <= s.shape[1]:
        raise ValueError(f"top_k must be in [1, C={s.shape[1]}]; got {top_k}")
    per_class, excluded = [], []
    for c in range(s.shape[1]):
        keep = t[:, c] != -1
        y = t[keep, c]
        if y.sum() == 0:
            per_class.append(None)
            excluded.append(c)
        else:
            per_class.append(100.0 * average_precision(s[keep, c], y))
    included = [ap for ap in per_class if ap is not None]
    out = {"mAP": float(np.mean(included)) if included else None}
    out.update(_prf(s >= threshold, t))
    top = np.zeros(s.shape, dtype=bool)  # each image's top_k scores (ties: the lower class index, a stable sort)
    np.put_along_axis(top, np.argsort(-s, axis=1, kind="stable")[:, :top_k], True, axis=1)
    out.update(_prf(top, t, f"_top{top_k}"))
    out["per_class_AP"] = per_class
    out["excluded_classes"] = excluded
    return out


def f1_thresholds(scores, targets, default=0.5):
    """Per-class thresholds (C,) that maximise each class's F1 of `score >= threshold` on these
    images (-1 pairs ignored): each lies halfway between the lowest score predicted positive at
    the best cut and the next lower score (the highest threshold wins a tie in F1). A class
    without a positive here keeps `default`. Choose them on held-out training images only."""
    s, t = _validate(scores, targets)
    thresholds = np.full(s.shape[1], float(default))
    for c in range(s.shape[1]):
        keep = t[:, c] != -1
        scores_c, y = s[keep, c], t[keep, c]
        if y.sum() == 0:
            continue
        order = np.argsort(-scores_c, kind="stable")
        ranked, hits = scores_c[order], y[order]
        cuts = np.flatnonzero(np.r_[ranked[1:] != ranked[:-1], True])  # last image of each tie group
        f1 = 2 * np.cumsum(hits)[cuts] / (cuts + 1 + y.sum())
        cut = cuts[np.argmax(f1)]
        thresholds[c] = (ranked[cut] + ranked[cut + 1]) / 2 if cut + 1 < len(ranked) else ranked[cut]
    return thresholds


def zsl_metrics(scores, targets, unseen, ks=(3, 5)):
    """Zero-shot figures (percent) for the class indices `unseen` (classes no client labelled):
      seen_mAP        the seen classes on every image
      unseen_mAP      the unseen classes on the images holding one (the zero-shot setting)
      unseen_mAP_all  the unseen classes on every image (beside it: a figure that can fail)
      H_mAP           the harmonic mean of seen_mAP and unseen_mAP (the base-to-novel figure)
      gzsl_mAP        every class on every image (the generalized setting)
      unseen_F1@K, gzsl_F1@K  F1 of each image's K highest-scoring classes, among the same
                  classes and images, pooled: precision = hits / predictions, recall = hits /
                  positives (as the zero-shot multi-label works report it); None where K is
                  not below the number of classes scored.
    The unseen figures need a positive and a negative to rank: a class whose every scored image holds it
    (one unseen class in the zero-shot setting: every image there holds it) has none, and a
    figure whose classes all lack one is undefined, None, with the reason under
    `<figure>_undefined`, never the 100 it would read by construction.
    -1 pairs are ignored, as everywhere here."""
    s, t = _validate(scores, targets)
    unseen = sorted(set(int(c) for c in unseen))
    seen = [c for c in range(s.shape[1]) if c not in unseen]
    holding = (t[:, unseen] == 1).any(1)
    zsl = s[holding][:, unseen], t[holding][:, unseen]  # the zero-shot setting's scores and targets
    mean_ap = lambda s_, t_: multilabel_metrics(s_, t_, top_k=1)["mAP"] if t_.size else None
    out = {"seen_mAP": mean_ap(s[:, seen], t[:, seen]), "gzsl_mAP": mean_ap(s, t)}
    reasons = {}
    for name, (s_, t_) in (("unseen_mAP", zsl), ("unseen_mAP_all", (s[:, unseen], t[:, unseen]))):
        out[name], why = ranked_mean_ap(s_, t_)
        if why:
            reasons[f"{name}_undefined"] = why
    a, b = out["seen_mAP"], out["unseen_mAP"]
    out["H_mAP"] = None if a is None or b is None else (2 * a * b / (a + b) if a + b > 0 else 0.0)
    if out["H_mAP"] is None and reasons:
        reasons["H_mAP_undefined"] = "; ".join(reasons.values())
    for k in ks:
        for name, (s_, t_) in (("unseen", zsl), ("gzsl", (s, t))):
            out[f"{name}_F1@{k}"] = (multilabel_metrics(s_, t_, top_k=k)[f"OF1_top{k}"]
                                     if k < s_.shape[1] and len(s_) else None)
    return {**out, **reasons}


def single_label_accuracy(scores, targets, unseen=()):
    """Top-1 accuracy (percent) of single-label images, as FedMVP and CoCoOp report it: an image
    is right when its highest-scoring class is its one label (np.argmax: a tie goes to the lower
    class index).
      top1_accuracy   every class competes, on every image
    With classes no client labelled (`unseen`, CoCoOp's base-to-novel protocol):
      base_accuracy   the images of a base (seen) class, only the base classes competing
      novel_accuracy  the images of a novel (unseen) class, only the novel classes competing
      H_accuracy      the harmonic mean of the two
    A figure without an image to score is None. targets: (n_images, C), exactly one 1 a row."""
    s, t = _validate(scores, targets)
    if not ((t == 1).sum(1) == 1).all():
        raise ValueError("single_label_accuracy needs exactly one positive label per image")
    label = (t == 1).argmax(1)  # (n_images,) each image's class
    out = {"top1_accuracy": 100.0 * float(np.mean(s.argmax(1) == label))}
    if len(unseen):
        novel = sorted(set(int(c) for c in unseen))
        base = [c for c in range(s.shape[1]) if c not in novel]
        for name, classes in (("base", base), ("novel", novel)):
            holding = np.isin(label, classes)  # the images of these classes
            chosen = np.asarray(classes)[s[holding][:, classes].argmax(1)] if holding.any() else None
            out[f"{name}_accuracy"] = 100.0 * float(np.mean(chosen == label[holding])) if holding.any() else None
        a, b = out["base_accuracy"], out["novel_accuracy"]
        out["H_accuracy"] = None if a is None or b is None else (2 * a * b / (a + b) if a + b > 0 else 0.0)
    return out


def ranked_mean_ap(scores, targets) -> tuple:
    """(mAP in percent over the classes with both a positive and a negative among these images,
    '') or (None, why) when no class has both."""
    if not targets.size:
        return None, "no image to score"
    rankable = [c for c in range(targets.shape[1])
                if (targets[:, c] == 1).any() and (targets[:, c] == 0).any()]
    if not rankable:
        return None, (f"none of its {targets.shape[1]} class(es) has both a positive and a negative among the "
                      f"{len(targets)} images scored (every image holds it): an AP there is 100 by construction")
    aps = [average_precision(scores[targets[:, c] != -1, c], targets[targets[:, c] != -1, c]) for c in rankable]
    return 100 * float(np.mean(aps)), ""


def label_prior_scores(train_targets, n_images):
    """Label-prior baseline: score every image with each class's training
    frequency, positives / non-ignored pairs (0 if a class is all ignored).

    Returns an (n_images, C) array. All scores of a class tie, so its AP is the
    class's test prevalence and the mAP is the mean test prevalence.
    """
    _, t = _validate(train_targets, train_targets)
    positives, known = np.asarray((t == 1).sum(0), float), np.asarray((t != -1).sum(0), float)
    freq = np.divide(positives, known, out=np.zeros_like(positives), where=known > 0)
    return np.tile(freq, (int(n_images), 1))


def bias_metrics(scores, targets, pairs, threshold=0.5):
    """Context-bias metrics for biased class pairs (Singh et al., "Don't judge an object by its
    context", CVPR 2020), in percent. For each ordered pair (a, b), i.e. both directions of
    every pair given as class indices:
      * exclusive AP of a: AP of score_a on the images holding a without b (positives) and
        all images without a (negatives);
      * co-occur AP of a: the same with the images holding both a and b as positives;
      * irrelevant activation rate: among images holding b but not a, the share where
        score_a >= threshold (a fires because its training companion is there).
    -1 targets of a or b leave the image out of that pair's sets. Returns the means over the
    ordered pairs that have images in each set, and the per-pair values."""
    s, t = _validate(scores, targets)
    rows = []
    for a0, b0 in pairs:
        for a, b in ((a0, b0), (b0, a0)):
            known = (t[:, a] != -1) & (t[:, b] != -1)
            has_a, has_b = known & (t[:, a] == 1), known & (t[:, b] == 1)
            negatives = known & (t[:, a] == 0)
            row = {"class": a, "companion": b}
            for name, positives in (("exclusive_AP", has_a & ~has_b), ("cooccur_AP", has_a & has_b)):
                keep = positives | negatives
                row[name] = (100.0 * average_precision(s[keep, a], positives[keep].astype(np.int64))
                             if positives.any() and negatives.any() else None)
            companions_only = has_b & negatives
            row["irrelevant_rate"] = (100.0 * float(np.mean(s[companions_only, a] >= threshold))
                                      if companions_only.any() else None)
            row["n_exclusive"], row["n_cooccur"] = int((has_a & ~has_b).sum()), int((has_a & has_b).sum())
            rows.append(row)
    values = {key: [r[key] for r in rows if r[key] is not None] for key in ("exclusive_AP", "cooccur_AP", "irrelevant_rate")}
    means = {key: float(np.mean(found)) if found else None for key, found in values.items()}
    return {"exclusive_mAP": means["exclusive_AP"], "cooccur_mAP": means["cooccur_AP"],
            "irrelevant_rate": means["irrelevant_rate"], "pairs": rows}
