"""Tests for metrics.py: each test is named after the property it proves."""
import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_fscore_support

import metrics
from metrics import label_prior_scores, multilabel_metrics

SEEDS = [0, 1, 2, 3, 4]


def random_case(seed, n=40, C=6):
    """Scores with ties (1 decimal), ~15% ignored pairs, class 0 has no
    positive, class 1 has positives only on ignored pairs."""
    rng = np.random.default_rng(seed)
    scores = np.round(rng.random((n, C)), 1)
    targets = (rng.random((n, C)) < 0.3).astype(int)
    targets[rng.random((n, C)) < 0.15] = -1
    targets[:, 0] = np.where(targets[:, 0] == -1, -1, 0)
    targets[:, 1] = np.where(targets[:, 1] == 1, -1, targets[:, 1])
    targets[0, 1], targets[1, 1] = -1, 0
    targets[:5, 2:] = 1                          # every other class has positives
    return scores, targets


def topk_reference(scores, k):
    """Top-k prediction matrix built row by row (ties -> lower class index)."""
    pred = np.zeros(scores.shape, dtype=bool)
    for i, row in enumerate(scores):
        for c in sorted(range(len(row)), key=lambda c: (-row[c], c))[:k]:
            pred[i, c] = True
    return pred


def sklearn_prf(pred, targets):
    """Per-class P/R (sklearn, zero_division=0) and micro P/R on non -1 pairs."""
    P, R = [], []
    for c in range(targets.shape[1]):
        keep = targets[:, c] != -1
        p, r, _, _ = precision_recall_fscore_support(
            targets[keep, c], pred[keep, c], average="binary", zero_division=0)
        P.append(p)
        R.append(r)
    keep = targets != -1
    op, or_, _, _ = precision_recall_fscore_support(
        targets[keep], pred[keep], average="binary", zero_division=0)
    return np.array(P), np.array(R), op, or_


def check_prf(m, pred, targets, suffix):
    P, R, op, or_ = sklearn_prf(pred, targets)
    cp, cr = P.mean(), R.mean()
    cf1 = 2 * cp * cr / (cp + cr) if cp + cr else 0.0
    of1 = 2 * op * or_ / (op + or_) if op + or_ else 0.0
    for key, ref in [("CP", cp), ("CR", cr), ("CF1", cf1),
                     ("OP", op), ("OR", or_), ("OF1", of1)]:
        assert m[key + suffix] == pytest.approx(100 * ref, abs=1e-6), key + suffix


@pytest.mark.parametrize("seed", SEEDS)
def test_map_and_per_class_ap_equal_sklearn_with_ties_ignored_and_empty_classes(seed):
    scores, targets = random_case(seed)
    m = multilabel_metrics(scores, targets)
    assert m["excluded_classes"] == [0, 1]
    assert m["per_class_AP"][:2] == [None, None]
    ref = []
    for c in range(2, targets.shape[1]):
        keep = targets[:, c] != -1
        ap = 100 * average_precision_score(targets[keep, c], scores[keep, c])
        assert m["per_class_AP"][c] == pytest.approx(ap, abs=1e-6)
        ref.append(ap)
    assert m["mAP"] == pytest.approx(np.mean(ref), abs=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_threshold_metrics_equal_sklearn_per_class_and_micro(seed):
    scores, targets = random_case(seed)
    for thr in (0.3, 0.5, 0.8):
        m = multilabel_metrics(scores, targets, threshold=thr)
        check_prf(m, scores >= thr, targets, "")


@pytest.mark.parametrize("seed", SEEDS)
def test_top3_metrics_equal_sklearn_on_top3_prediction_matrix(seed):
    scores, targets = random_case(seed)
    m = multilabel_metrics(scores, targets, top_k=3)
    check_prf(m, topk_reference(scores, 3), targets, "_top3")


def test_hand_computed_3x2_case():
    scores = np.array([[0.9, 0.2], [0.6, 0.7], [0.3, 0.4]])
    targets = np.array([[1, 0], [0, 1], [1, -1]])
    m = multilabel_metrics(scores, targets, threshold=0.5, top_k=1)
    # class 0 ranked: 0.9(+) 0.6(-) 0.3(+): AP = 1*1/2 + 0*1/2 + 1/2*2/3 = 5/6
    # class 1 (image 2 ignored): 0.7(+) 0.2(-): AP = 1
    assert m["per_class_AP"] == pytest.approx([500 / 6, 100.0])
    assert m["mAP"] == pytest.approx((500 / 6 + 100) / 2)
    assert m["excluded_classes"] == []
    # threshold 0.5: class 0 predicts images 0,1 (tp 1 of 2 positives): P=R=1/2
    #                class 1 predicts image 1 (tp 1 of 1 positive):    P=R=1
    assert m["CP"] == pytest.approx(75.0) and m["CR"] == pytest.approx(75.0)
    assert m["CF1"] == pytest.approx(75.0)
    # pooled: tp 2, predicted 3, positives 3
    assert m["OP"] == pytest.approx(200 / 3) and m["OR"] == pytest.approx(200 / 3)
    assert m["OF1"] == pytest.approx(200 / 3)
    # top-1: image 0 -> c0 (tp), image 1 -> c1 (tp), image 2 -> c1 (ignored pair)
    # class 0: P=1, R=1/2; class 1: P=1, R=1 -> CP=1, CR=3/4, CF1=6/7
    assert m["CP_top1"] == pytest.approx(100.0)
    assert m["CR_top1"] == pytest.approx(75.0)
    assert m["CF1_top1"] == pytest.approx(600 / 7)
    # pooled: tp 2, predicted 2, positives 3 -> OP=1, OR=2/3, OF1=4/5
    assert m["OP_top1"] == pytest.approx(100.0)
    assert m["OR_top1"] == pytest.approx(200 / 3)
    assert m["OF1_top1"] == pytest.approx(80.0)


def test_top_k_ties_broken_by_lower_class_index():
    scores = np.array([[0.5, 0.5, 0.5, 0.1]])
    m = multilabel_metrics(scores, np.array([[0, 1, 0, 0]]), top_k=1)
    assert m["OP_top1"] == 0.0                   # class 0 chosen, not class 1
    m = multilabel_metrics(scores, np.array([[1, 0, 0, 0]]), top_k=1)
    assert m["OP_top1"] == 100.0


def test_result_has_required_keys_and_is_strict_json():
    scores, targets = random_case(0)
    m = multilabel_metrics(scores, targets)
    keys = ["mAP", "CP", "CR", "CF1", "OP", "OR", "OF1", "CP_top3", "CR_top3",
            "CF1_top3", "OP_top3", "OR_top3", "OF1_top3", "per_class_AP",
            "excluded_classes"]
    assert set(keys) <= set(m)
    assert json.loads(json.dumps(m, allow_nan=False)) == m


def test_torch_tensors_give_same_result_as_numpy():
    torch = pytest.importorskip("torch")
    scores, targets = random_case(1)
    assert multilabel_metrics(torch.tensor(scores), torch.tensor(targets)) == \
        multilabel_metrics(scores, targets)


@pytest.mark.parametrize("seed", SEEDS)
def test_label_prior_map_equals_mean_test_prevalence(seed):
    rng = np.random.default_rng(seed)
    train = (rng.random((100, 5)) < rng.random(5)).astype(int)
    train[rng.random(train.shape) < 0.1] = -1
    _, test = random_case(seed + 10, n=30, C=5)
    prior = label_prior_scores(train, 30)
    assert prior.shape == (30, 5)
    freq = (train == 1).sum(0) / (train != -1).sum(0)
    assert np.allclose(prior, freq)
    m = multilabel_metrics(prior, test)
    included = [c for c in range(5) if c not in m["excluded_classes"]]
    prevalence = [(test[:, c] == 1).sum() / (test[:, c] != -1).sum() for c in included]
    assert m["mAP"] == pytest.approx(100 * np.mean(prevalence), abs=1e-6)


@pytest.mark.parametrize("scores, targets, match", [
    (np.zeros((3, 2)), np.zeros((3, 3)), r"equal shapes.*\(3, 2\).*\(3, 3\)"),
    (np.zeros(3), np.zeros(3), r"2-D.*\(3,\)"),
    (np.zeros((2, 2)), np.array([[0, 2], [1, -1]]), r"-1, 0, 1.*\[2\]"),
    (np.array([[np.nan, 0.1], [0.2, 0.3]]), np.zeros((2, 2)), r"non-finite"),
])
def test_bad_inputs_raise_value_error_naming_the_problem(scores, targets, match):
    with pytest.raises(ValueError, match=match):
        multilabel_metrics(scores, targets)


def test_top_k_larger_than_number_of_classes_raises():
    with pytest.raises(ValueError, match="top_k"):
        multilabel_metrics(np.zeros((2, 2)), np.zeros((2, 2)), top_k=3)


def test_bias_metrics_on_a_hand_computed_case():
    # classes: 0 = a, 1 = b, 2 = unrelated. Images:
    #   0: a b     1: a       2: b       3: b      4: -       5: a b (b ignored)
    targets = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 0], [0, 1, 1], [0, 0, 0], [1, -1, 0]])
    scores = np.array([[0.9, 0.8, 0], [0.4, 0.1, 0], [0.6, 0.7, 0], [0.3, 0.2, 0], [0.1, 0.05, 0], [0.5, 0.5, 0]])
    result = metrics.bias_metrics(scores, targets, [(0, 1)])
    a_given_b, b_given_a = result["pairs"]
    # a exclusive: positive image 1 (0.4) among negatives 2 (0.6), 3 (0.3), 4 (0.1): rank 2 -> AP 1/2
    assert a_given_b["exclusive_AP"] == pytest.approx(50.0)
    # a co-occur: positive image 0 (0.9) above every negative -> AP 1
    assert a_given_b["cooccur_AP"] == pytest.approx(100.0)
    # a fires (>= 0.5) on images holding b without a: 2 (0.6) yes, 3 (0.3) no -> 50 %
    assert a_given_b["irrelevant_rate"] == pytest.approx(50.0)
    # b exclusive: positives 2 (0.7), 3 (0.2) among negatives 1 (0.1), 4 (0.05): AP 1
    # b co-occur: positive 0 (0.8) above negatives -> 1; b on image 1 (a only) 0.1 -> rate 0
    assert (b_given_a["exclusive_AP"], b_given_a["cooccur_AP"], b_given_a["irrelevant_rate"]) == \
        pytest.approx((100.0, 100.0, 0.0))
    assert result["exclusive_mAP"] == pytest.approx(75.0) and result["irrelevant_rate"] == pytest.approx(25.0)
    assert (a_given_b["n_exclusive"], a_given_b["n_cooccur"]) == (1, 1)  # image 5 left out (b ignored)
    # and it agrees with scikit-learn on random data
    rng = np.random.default_rng(0)
    t, s = rng.integers(0, 2, (200, 4)), rng.random((200, 4))
    row = metrics.bias_metrics(s, t, [(0, 1)])["pairs"][0]
    keep = (t[:, 0] == 0) | (t[:, 1] == 0)
    assert row["exclusive_AP"] == pytest.approx(100 * average_precision_score(t[keep, 0], s[keep, 0]))


def test_f1_thresholds_reach_the_best_f1_sklearn_finds_over_every_cut():
    """Each class's threshold reaches the highest F1 of `score >= t` over every possible cut (ties
    included, -1 pairs ignored; sklearn's f1_score); a class with no positive keeps the default."""
    from sklearn.metrics import f1_score
    rng = np.random.default_rng(0)
    for _ in range(40):
        n = int(rng.integers(5, 40))
        scores = np.round(rng.random((n, 4)), 1)  # many ties
        targets = (rng.random((n, 4)) < 0.3).astype(int)
        targets[rng.random((n, 4)) < 0.1] = -1
        targets[:, 3] = np.minimum(targets[:, 3], 0)  # no positive
        thresholds = metrics.f1_thresholds(scores, targets, default=0.4)
        assert thresholds[3] == 0.4
        for c in range(3):
            keep = targets[:, c] != -1
            s, y = scores[keep, c], targets[keep, c]
            if y.sum() == 0:
                continue
            best = max(f1_score(y, s >= t) for t in np.r_[np.unique(s), np.inf])
            assert f1_score(y, s >= thresholds[c]) == pytest.approx(best, abs=1e-12)
    # a threshold per class broadcasts over the images: 0.5 each is the scalar 0.5; below every score, all is predicted
    assert metrics.multilabel_metrics(scores, targets, np.full(4, 0.5)) == metrics.multilabel_metrics(scores, targets)
    predict_all = metrics.multilabel_metrics(scores, targets, np.array([-1.0, -1.0, 2.0, 2.0]))
    assert predict_all["OR"] == pytest.approx(100 * (targets[:, :2] == 1).sum() / (targets == 1).sum())
