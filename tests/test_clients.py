"""Clients as federated users see them: every client's own score (`--client-eval`, its test images
assigned by the rule that split the training images), a model of each client's own
(`--personalize`), clients that drop out (`--client-dropout`, the same draw on both engines), and
single-label data scored as FedMVP and CoCoOp score it (top-1, base/novel/H accuracy). The
references are sklearn's average precision and numpy's argmax on hand-made cases."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score

import availability
import clients_eval
import data
import evaluation
import federate
import metrics
import splits
from conftest import build_experiment
from evaluation import predict_scores

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "grey": (128, 128, 128)}


def write_folder(root, rows):
    """A folder dataset: an image of stripes in the colours of each row's labels, and labels.csv
    (image,labels,split,client)."""
    for image, labels, _, _ in rows:
        colours = [COLOURS[name] for name in labels.split("|")]
        picture = Image.new("RGB", (8 * len(colours), 16))
        for i, colour in enumerate(colours):
            picture.paste(colour, (8 * i, 0, 8 * i + 8, 16))
        (root / image).parent.mkdir(parents=True, exist_ok=True)
        picture.save(root / image)
    (root / "labels.csv").write_text("\n".join(["image,labels,split,client"] + [",".join(r) for r in rows]) + "\n")
    return root


# Three sites, each with its own training and test images; a test row without a site and one
# from a site that trains nowhere belong to no client.
LABELS = ["red", "green", "blue", "red|green", "green|blue", "red|blue"]
SITES = ["east", "north", "south"]
ROWS = ([(f"{site}/train{i}.png", LABELS[(i + k) % 6], "train", site) for k, site in enumerate(SITES) for i in range(4)]
        + [(f"{site}/test{i}.png", LABELS[(2 * i + k) % 6], "test", site) for k, site in enumerate(SITES)
           for i in range(5)]
        + [("other/x.png", "red", "test", ""), ("west/y.png", "blue|green", "test", "west")])


def folder_options(root, *more):
    return federate.parse_config(["--dataset", "folder", "--root", str(root), "--batch-size", "8", *more])


# ---- Which test images are whose ---------------------------------------------------------
def test_the_kmeans_rule_gives_every_training_image_its_own_client():
    """Applied to the training images themselves at t = 1, the nearest-centroid rule gives back
    the split splits.client_splits made: the rule is the split's own."""
    rng = np.random.default_rng(0)
    prototypes = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]])
    targets = prototypes[rng.integers(3, size=60)]  # (60, 6) label vectors around three prototypes
    targets = torch.where(torch.as_tensor(rng.random(targets.shape) < 0.1), 1 - targets, targets)  # and some noise
    for seed in (0, 3):
        split = splits.client_splits(targets, 3, 1.0, seed)
        assert clients_eval.kmeans_test_clients(targets, 3, seed, targets) == split


def test_the_site_and_scene_rules_on_hand_made_cases():
    assert clients_eval.site_test_clients(["east", "north", "south"], [("north", [4, 1]), ("west", [0])]) == [[], [1, 4], []]
    assert clients_eval.site_test_clients(["east"], None) == [[]]
    train_scenes = ["beach", "beach", "port", "farm", "city"]
    client_splits = [[0, 1, 3], [2, 4]]  # site 0: beach and farm; site 1: port and city
    assert clients_eval.scene_test_clients(train_scenes, client_splits, ["city", "beach", "desert", "farm", "port"]) == \
        [[1, 3], [0, 4]]


def test_the_spread_of_client_scores():
    summary = clients_eval.spread([70.0, None, 50.0, 90.0, 50.0])
    assert summary == {"mean": pytest.approx(65.0), "std": pytest.approx(np.std([70, 50, 90, 50])), "worst": 50.0,
                       "best": 90.0, "worst_client": 2}  # a tie: the lower client
    assert clients_eval.spread([None])["mean"] is None


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """The three-site folder world, built with --client-eval (no run directory)."""
    root = write_folder(tmp_path_factory.mktemp("sites"), ROWS)
    return build_experiment(*folder_options(root, "--client-eval"))


def test_client_eval_equals_sklearn_on_each_sites_own_test_rows(sites):
    exp = sites
    result = federate.evaluate_round(exp, 0, 0.0)  # a round's row
    scores, y = predict_scores(exp.model, exp.test[0]).double().numpy(), exp.test[1].numpy()
    names = [exp.test_set.images[i].parent.name for i in range(len(exp.test_set))]
    assert exp.client_names == SITES and result["client_test_images"] == [5, 5, 5]
    for client, site in enumerate(SITES):
        rows = [i for i, name in enumerate(names) if name == site]
        classes = [c for c in range(y.shape[1]) if y[rows, c].any()]
        expected = 100 * np.mean([average_precision_score(y[rows, c], scores[rows, c]) for c in classes])
        assert result["client_mAP"][client] == pytest.approx(expected, abs=1e-9)
    assert result["client_mAP_worst"] <= result["client_mAP_mean"] <= result["client_mAP_best"]
    assert result["client_mAP_worst"] == min(result["client_mAP"]) == result["client_mAP"][result["worst_client"]]
    assert result["client_mAP_std"] == pytest.approx(np.std(result["client_mAP"]))
    assert result["mAP"] == pytest.approx(metrics.multilabel_metrics(scores, y)["mAP"])  # the global figure stays


def test_without_the_option_a_multi_label_round_gains_no_key(sites):
    sites.cfg.client_eval = False
    try:
        result = federate.evaluate_round(sites, 0, 0.0)
    finally:
        sites.cfg.client_eval = True
    assert not [key for key in result if "client" in key or "accuracy" in key]


# ---- Single-label data: FedMVP's and CoCoOp's accuracies -----------------------------------
def test_single_label_accuracy_equals_a_hand_computed_case():
    scores = np.array([[0.9, 0.1, 0.3, 0.2],   # label 0: argmax 0, right; among base {0, 1}: 0, right
                       [0.2, 0.1, 0.8, 0.5],   # label 1: argmax 2, wrong; among base: 0, wrong
                       [0.1, 0.7, 0.2, 0.4],   # label 2: argmax 1, wrong; among novel {2, 3}: 3, wrong
                       [0.3, 0.2, 0.1, 0.6],   # label 3: argmax 3, right; among novel: 3, right
                       [0.1, 0.6, 0.5, 0.2]])  # label 2: argmax 1, wrong; among novel: 2, right
    targets = np.eye(4, dtype=int)[[0, 1, 2, 3, 2]]
    assert metrics.single_label_accuracy(scores, targets) == {"top1_accuracy": pytest.approx(40.0)}
    result = metrics.single_label_accuracy(scores, targets, unseen=[3, 2])
    assert result["top1_accuracy"] == pytest.approx(40.0)
    assert result["base_accuracy"] == pytest.approx(50.0) and result["novel_accuracy"] == pytest.approx(200 / 3)
    assert result["H_accuracy"] == pytest.approx(2 * 50 * (200 / 3) / (50 + 200 / 3))
    with pytest.raises(ValueError, match="exactly one positive"):
        metrics.single_label_accuracy(scores, np.ones((5, 4), dtype=int))


SINGLE = [(f"{colour}/{split}{i}.png", colour, split, "") for colour in ("red", "green", "blue", "grey")
          for split, n in (("train", 3), ("test", 3)) for i in range(n)]


@pytest.mark.parametrize("unseen", ["", "blue,grey"])
def test_a_one_label_folder_reports_top1_and_base_novel_accuracy_as_computed_by_hand(tmp_path, unseen):
    root = write_folder(tmp_path, SINGLE)
    exp = build_experiment(*folder_options(root, "--clients", "2", *(["--unseen", unseen] if unseen else [])))
    result = evaluation.evaluate_global(exp)
    scores = predict_scores(exp.scorer, exp.test[0]).numpy()  # every class
    label = exp.test[1].numpy().argmax(1)
    assert result["top1_accuracy"] == pytest.approx(100 * np.mean(scores.argmax(1) == label))
    if not unseen:
        assert "base_accuracy" not in result
        return
    novel = [exp.train_set.classes.index(name) for name in unseen.split(",")]
    base = [c for c in range(4) if c not in novel]
    rights = {name: [np.asarray(group)[scores[i, group].argmax()] == label[i] for i in range(len(label))
                     if label[i] in group] for name, group in (("base", base), ("novel", novel))}
    assert result["base_accuracy"] == pytest.approx(100 * np.mean(rights["base"]))
    assert result["novel_accuracy"] == pytest.approx(100 * np.mean(rights["novel"]))
    a, b = result["base_accuracy"], result["novel_accuracy"]
    assert result["H_accuracy"] == pytest.approx(2 * a * b / (a + b) if a + b else 0.0)
    assert exp.zero_shot["top1_accuracy"] is not None and "H_accuracy" in exp.zero_shot  # round 0's backbone too


# ---- Clients that drop out -----------------------------------------------------------------
def test_the_dropout_draw_is_seeded_by_seed_and_round_and_apart_from_who_was_sampled():
    draw = availability.dropped_clients
    assert draw(0, 3, [0, 1, 2, 3, 4, 5], 6, 0.5) == draw(0, 3, [0, 1, 2, 3, 4, 5], 6, 0.5)
    whole = draw(0, 3, list(range(6)), 6, 0.5)
    assert draw(0, 3, [1, 4, 5], 6, 0.5) == [c for c in whole if c in (1, 4, 5)]
    assert draw(0, 3, list(range(6)), 6, 0.0) == []
    rounds = [draw(7, r, list(range(100)), 100, 0.3) for r in range(1, 21)]
    assert len({tuple(d) for d in rounds}) == 20  # another round, another draw
    assert abs(np.mean([len(d) for d in rounds]) - 30) < 3  # about p of the clients


def seed_where(condition, n_clients, rounds, p):
    """The first seed whose draws (rounds 1..`rounds`) satisfy `condition`."""
    return next(seed for seed in range(1000) if condition(
        [availability.dropped_clients(seed, r, list(range(n_clients)), n_clients, p) for r in range(1, rounds + 1)]))


@pytest.mark.slow
def test_a_round_where_no_client_reports_keeps_the_global_state_and_says_so(tmp_path, capsys):
    # round 1: both clients drop out; round 2: one reports
    seed = seed_where(lambda d: len(d[0]) == 2 and len(d[1]) == 1, 2, 2, 0.5)
    root = write_folder(tmp_path / "data", SINGLE)
    out = tmp_path / "run"
    assert federate.main(["--dataset", "folder", "--root", str(root), "--clients", "2", "--rounds", "2", "--seed",
                          str(seed), "--client-dropout", "0.5", "--out", str(out)]) == 0
    history = json.loads((out / "metrics.json").read_text())
    first, second = history[1], history[2]
    assert first["clients_dropped"] == [0, 1] and first["none_reported"] and first["failed"]
    assert first["clients_aggregated"] == 0 and first["mAP"] == history[0]["mAP"]  # the state as it was
    assert len(second["clients_dropped"]) == 1 and second["clients_aggregated"] == 1 and not second["none_reported"]
    assert "round 1: client(s) [0, 1] dropped out (--client-dropout 0.5); none reported" in capsys.readouterr().out
    assert "clients_dropped" not in json.loads((out / "metrics.json").read_text())[0]


# ---- A model of each client's own ----------------------------------------------------------
@pytest.mark.slow
def test_personalize_scores_each_client_beside_the_global_state(tmp_path):
    root = write_folder(tmp_path / "data", ROWS)
    out = tmp_path / "run"
    assert federate.main(["--dataset", "folder", "--root", str(root), "--rounds", "2", "--batch-size", "8",
                          "--client-eval", "--personalize", "2", "--loss", "bce", "--lr", "0.01", "--out", str(out)]) == 0
    last = json.loads((out / "metrics.json").read_text())[-1]
    record = json.loads((out / "personalized.json").read_text())
    assert record["epochs"] == 2 and [c["name"] for c in record["clients"]] == SITES
    assert [c["global_mAP"] for c in record["clients"]] == pytest.approx(last["client_mAP"], abs=1e-6)
    assert record["global_mean"] == pytest.approx(last["client_mAP_mean"])
    assert all(c["personalized_mAP"] != c["global_mAP"] for c in record["clients"])  # it trained


def test_flower_refuses_personalize_before_anything_starts(tmp_path, capsys):
    pytest.importorskip("flwr")
    import flower_app
    assert flower_app.main(["--personalize", "1", "--out", str(tmp_path / "run")]) == 2
    assert "--personalize: only with the plain loop" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_single_label_world_holds_one_label_an_image_at_four_sites(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import clients  # benchmarks/clients.py, which makes the world of docs/results.md's single-label table
    root = clients.write_single_label_world(tmp_path, n_train=8, n_test=4)
    train, test = data.load_dataset("folder", root, "train"), data.load_dataset("folder", root, "test")
    assert ((train.targets == 1).sum(1) == 1).all() and ((test.targets == 1).sum(1) == 1).all()
    assert [site for site, _ in train.natural_clients] == [f"site-{s}" for s in range(4)]
    assert [len(rows) for _, rows in test.natural_clients] == [1, 1, 1, 1]
