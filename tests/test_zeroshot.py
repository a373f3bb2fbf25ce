"""Beyond the training classes: the class split of --unseen, the zero-shot figures, the
published COCO 48/17 and NUS-WIDE 925/81 split files, refusals, and cross-dataset transfer."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clip
import client
import data
import experiment
import federate
import fedmpt
import metrics
import predict
import zeroshot
from errors import FedMPTError


# ---- The figures --------------------------------------------------------------------------
def test_zero_shot_figures_equal_a_hand_computed_case():
    """4 images, classes 0 and 1 seen, 2 unseen. seen: class 0 AP 1, class 1 AP 0.5 (its one
    positive ranked second of two... by hand below); unseen on images 1 and 3 only."""
    scores = np.array([[0.9, 0.2, 0.1], [0.8, 0.7, 0.6], [0.1, 0.9, 0.3], [0.3, 0.1, 0.8]])
    targets = np.array([[1, 0, 0], [1, 0, 1], [0, 0, 0], [0, 1, 1]])
    got = metrics.zsl_metrics(scores, targets, unseen=[2], ks=(1,))
    # seen: class 0 ranks its positives (0.9, 0.8) first: AP 1; class 1's positive (0.1) ranks
    # last of 4: AP 1/4. unseen (images 1, 3): class 2's positives are both images: AP 1.
    assert got["seen_mAP"] == pytest.approx(100 * (1 + 0.25) / 2)
    # one unseen class: every image of the zero-shot setting holds it, so its AP there is 100 by
    # construction: undefined, with the reason, and so is H
    assert got["unseen_mAP"] is None and "every image holds it" in got["unseen_mAP_undefined"]
    assert got["H_mAP"] is None and "H_mAP_undefined" in got
    # over every image: class 2's positives (0.6, 0.8) rank first of 4: AP 1, a figure that could fail
    assert got["unseen_mAP_all"] == pytest.approx(100.0)
    # gzsl: class 0 AP 1, class 1 AP 1/4, class 2 over all 4 images: 0.8, 0.6 first: AP 1
    assert got["gzsl_mAP"] == pytest.approx(100 * 2.25 / 3)
    assert got["unseen_F1@1"] is None  # one unseen class: its top 1 is every image's only class
    # gzsl top 1: image 0 -> 0 (hit), 1 -> 0 (hit), 2 -> 1 (miss), 3 -> 2 (hit): P = 3/4, R = 3/5
    assert got["gzsl_F1@1"] == pytest.approx(100 * 2 * 0.75 * 0.6 / 1.35)


def test_unseen_names_files_and_seeded_shares():
    classes = ["cat", "dog", "bird", "fish"]
    assert zeroshot.unseen_classes("fish, cat", classes, 0) == [0, 3]
    assert zeroshot.unseen_classes("", classes, 0) == []
    drawn = zeroshot.unseen_classes("random:0.5", classes, 0)
    assert len(drawn) == 2 and drawn == zeroshot.unseen_classes("random:0.5", classes, 0)
    assert any(zeroshot.unseen_classes("random:0.5", classes, seed) != drawn for seed in range(1, 6))
    for spec, message in [("cow", "'cow' is not a class"), ("cat,dog,bird,fish", "leaves no class to train on"),
                          ("random:1.5", "0 < F < 1"), ("random:0.01", "at least one"), (",", "names no class")]:
        with pytest.raises(FedMPTError, match=message):
            zeroshot.unseen_classes(spec, classes, 0)


def test_a_file_of_unseen_names(tmp_path):
    path = tmp_path / "unseen.txt"
    path.write_text("# held out\nbird\n\ndog  # a comment\n")
    assert zeroshot.unseen_classes(str(path), ["cat", "dog", "bird"], 0) == [1, 2]


# ---- Training never sees an unseen class -----------------------------------------------------
UNSEEN = ["ring", "star", "heart"]


@pytest.fixture(scope="module")
def zsl_run(shapes_root, tmp_path_factory):
    """A one-round run with three shapes held out, the loss targets and the tokenized texts of
    every model built, seen through spies."""
    out = tmp_path_factory.mktemp("zsl") / "run"
    mp = pytest.MonkeyPatch()
    spy = {"targets": [], "texts": [], "built": {}, "trained": set()}
    tokenize, build, loss = clip.tokenize, experiment.build_model, fedmpt.LOSSES["asl"]
    mp.setattr(clip, "tokenize", lambda texts, *a, **k: spy["texts"].extend(texts) or tokenize(texts, *a, **k))

    def built(*args, **kwargs):
        spy["texts"].clear()
        model = build(*args, **kwargs)
        spy["built"][id(model)] = (list(args[2]), list(spy["texts"]))
        return model
    mp.setattr(experiment, "build_model", built)
    mp.setitem(fedmpt.LOSSES, "asl", lambda logits, targets: spy["targets"].append(targets.clone())
               or loss(logits, targets))
    local_train = client.local_train
    mp.setattr(federate, "local_train", lambda model, *a: spy["trained"].add(id(model)) or local_train(model, *a))
    try:
        assert federate.main(["--root", str(shapes_root), "--out", str(out), "--rounds", "1", "--clients", "2",
                              "--batch-size", "128", "--unseen", ",".join(UNSEEN)]) == 0
    finally:
        mp.undo()
    return out, spy


@pytest.mark.slow  # zsl_run trains a whole federation
def test_no_unseen_label_or_name_reaches_training(zsl_run, shapes_root):
    out, spy = zsl_run
    classes = data.load_dataset("shapes", shapes_root, "train").classes
    unseen = [classes.index(name) for name in UNSEEN]
    seen = [c for c in range(len(classes)) if c not in unseen]
    train = data.load_dataset("shapes", shapes_root, "train").targets
    assert spy["targets"] and all(t.shape[1] == len(seen) for t in spy["targets"])
    rows = torch.cat(spy["targets"])  # every training image once (one local epoch), in some order
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, train[:, seen].tolist()))
    (trained,) = spy["trained"]
    names, texts = spy["built"][trained]
    assert names == [classes[c] for c in seen] and texts
    assert not any(name in text for text in texts for name in UNSEEN)  # the model that trains never reads them
    scorer = [names for key, (names, _) in spy["built"].items() if key != trained]
    assert scorer == [classes]  # the one that scores reads every class
    config = json.loads((out / "config.json").read_text())
    assert sorted(config["unseen_classes"]) == sorted(UNSEEN)
    holds = train == 1
    assert config["negative_only_images"] == int((holds.any(1) & ~holds[:, seen].any(1)).sum()) > 0


@pytest.mark.slow  # zsl_run trains a whole federation
def test_every_round_records_the_zero_shot_figures(zsl_run):
    out, _ = zsl_run
    rows = json.loads((out / "metrics.json").read_text())
    keys = {"seen_mAP", "unseen_mAP", "H_mAP", "gzsl_mAP", "gzsl_F1@3", "gzsl_F1@5"}
    assert all(keys <= set(row) for row in rows) and rows[-1]["gzsl_mAP"] == rows[-1]["mAP"]
    assert {"zero_shot_unseen_mAP", "zero_shot_H_mAP"} <= set(rows[0])  # the frozen backbone's, as reference
    assert rows[-1]["unseen_mAP"] > 0 and rows[-1]["H_mAP"] == pytest.approx(
        2 * rows[-1]["seen_mAP"] * rows[-1]["unseen_mAP"] / (rows[-1]["seen_mAP"] + rows[-1]["unseen_mAP"]))


@pytest.mark.parametrize("options, message", [
    (["--method", "fed-poscoop"], "fed-poscoop cannot score unseen classes: its negative side is a learned feature"),
    (["--class-ctx", "2"], "fedmpt cannot score unseen classes: contexts of each class's own"),
    (["--zsl-split", "48/17"], "--unseen and --zsl-split"),
])
def test_methods_that_cannot_score_unseen_classes_refuse(options, message, capsys, tmp_path):
    assert federate.main(["--unseen", "ring", "--out", str(tmp_path / "x"), *options]) == 2
    assert message in capsys.readouterr().err


def test_fedmvp_needs_descriptions_of_the_unseen_classes_too(shapes_root, tmp_path, capsys):
    shipped = json.loads(Path("baselines/attributes/shapes.json").read_text())
    attributes = {**shipped, "attributes": {c: s for c, s in shipped["attributes"].items() if c != "ring"}}
    (tmp_path / "attributes.json").write_text(json.dumps(attributes))
    assert federate.main(["--root", str(shapes_root), "--method", "fedmvp", "--unseen", "ring", "--rounds", "1",
                          "--attributes", str(tmp_path / "attributes.json"), "--out", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err
    assert "no descriptions" in error and "for ring" in error and "conditions.discover --attributes" in error


# ---- The published splits --------------------------------------------------------------------
def write_split(root: Path, files, seen, unseen, n_train=6, n_test=6):
    """Filtered split files in the published layout, their image paths those of another
    machine (absolute, COCO's trainval2014 folder), and the images under ROOT/train2014, val2014."""
    (root / "annotations").mkdir(parents=True)
    rng = np.random.default_rng(0)

    def images(n, folder, names):
        listed = []
        for i in range(n):
            name = f"COCO_{folder}_{i:012d}.jpg"
            (root / folder).mkdir(exist_ok=True)
            Image.new("RGB", (24, 16), (i * 30 % 255, 90, 160)).save(root / folder / name)
            labels = [str(x) for x in rng.choice(names, 2, replace=False)]
            listed.append([f"/mnt/nas/someone/COCO/trainval2014/{name}", labels + ["not-a-class"]])
        return listed
    train = images(n_train, "train2014", seen)
    test = images(n_test, "val2014", seen + unseen)
    for name, classes, listed in [(files[0], seen, train), (files[1], unseen, [r for r in test if set(r[1]) & set(unseen)]),
                                  (files[2], seen + unseen, test)]:
        (root / "annotations" / name).write_text(json.dumps({"classes": classes, "images": listed}))
    return train, test


def test_the_coco_48_17_split_files_read_in_their_published_layout(tmp_path):
    from loaders.zsl import SPLITS
    seen, unseen = [f"seen{i:02d}" for i in range(48)], [f"unseen{i:02d}" for i in range(17)]
    train, test = write_split(tmp_path, SPLITS["coco2014", "48/17"], seen[::-1], unseen)
    train_set = data.load_dataset("coco2014", tmp_path, "train", zsl_split="48/17")
    test_set = data.load_dataset("coco2014", tmp_path, "test", zsl_split="48/17")
    assert train_set.classes == test_set.classes == sorted(seen) + sorted(unseen)
    assert train_set.unseen_names == sorted(unseen) and len(train_set) == 6 and len(test_set) == 6
    assert test_set.images[0] == tmp_path / "val2014" / "COCO_val2014_000000000000.jpg"
    first = test[0][1][:2]  # the labels outside the split ("not-a-class") are dropped
    assert sorted(test_set.classes[c] for c in test_set.targets[0].nonzero().flatten()) == sorted(first)
    assert zeroshot.unseen_classes("", train_set.classes, 0, train_set.unseen_names) == list(range(48, 65))


def test_published_split_files_are_checked(tmp_path):
    from loaders.zsl import SPLITS
    with pytest.raises(FedMPTError, match=r"missing .*train_48_filtered\.json.*DualCoOp"):
        data.load_dataset("coco2014", tmp_path, "train", zsl_split="48/17")
    seen, unseen = [f"s{i}" for i in range(47)], [f"u{i}" for i in range(17)]  # one seen class short
    write_split(tmp_path / "short", SPLITS["coco2014", "48/17"], seen, unseen)
    with pytest.raises(FedMPTError, match="lists 47 distinct classes where the published split has 48"):
        data.load_dataset("coco2014", tmp_path / "short", "train", zsl_split="48/17")
    with pytest.raises(FedMPTError, match="the published splits are --dataset coco2014 --zsl-split 48/17"):
        data.load_dataset("voc2007", tmp_path, "train", zsl_split="48/17")


def test_the_nuswide_925_81_split_checks_its_vocabularies(tmp_path):
    from loaders.nuswide import NUSWIDE_CLASSES
    from loaders.zsl import SPLITS
    seen = [f"tag{i:03d}" for i in range(925)]
    write_split(tmp_path, SPLITS["nuswide", "925/81"], seen, list(NUSWIDE_CLASSES))
    (tmp_path / "NUS_WID_Tags").mkdir()
    (tmp_path / "NUS_WID_Tags" / "TagList1k.txt").write_text("\n".join(seen + ["extra"]) + "\n")
    assert data.load_dataset("nuswide", tmp_path, "test", zsl_split="925/81").unseen_names == NUSWIDE_CLASSES
    (tmp_path / "NUS_WID_Tags" / "TagList1k.txt").write_text("\n".join(seen[1:]) + "\n")
    with pytest.raises(FedMPTError, match="tag000 is neither one of the 81 concepts"):
        data.load_dataset("nuswide", tmp_path, "test", zsl_split="925/81")


# ---- Cross-dataset transfer ------------------------------------------------------------------
def write_second_world(shapes_root, root, classes=("circle", "star", "heart", "square")):
    """A folder dataset of another class list: the shapes world's test images, labelled with
    four of its classes only."""
    test = data.load_dataset("shapes", shapes_root, "test")
    lines = ["image,labels,split"]
    for i, (path, target) in enumerate(zip(test.images[:160], test.targets[:160])):
        labels = [c for c in classes if target[test.classes.index(c)] == 1]
        (root / "images").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / "images" / f"{i:04d}{Path(path).suffix}")
        lines.append(f"images/{i:04d}{Path(path).suffix},{'|'.join(labels)},{'train' if i < 40 else 'test'}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


@pytest.mark.slow  # zsl_run trains a whole federation
def test_a_finished_run_scores_another_datasets_classes(zsl_run, shapes_root, tmp_path, capsys):
    out, _ = zsl_run
    other = write_second_world(shapes_root, tmp_path / "other")
    assert predict.main(["--run", str(out), "--evaluate", "--dataset", "folder", "--root", str(other)]) == 0
    result = json.loads((out / "evaluation-folder.json").read_text())
    assert result["transfer"] and result["trained_on"] == "shapes" and result["classes"] == ["circle", "star", "heart",
                                                                                            "square"]
    assert len(result["per_class_AP"]) == 4 and 0 < result["mAP"] <= 100 and 0 < result["zero_shot"]["mAP"] <= 100
    assert "zero-shot mAP" in capsys.readouterr().out
    assert predict.main(["--run", str(out), "--evaluate"]) == 0  # its own test split: the zero-shot figures too
    own = json.loads((out / "evaluation-shapes.json").read_text())
    rows = json.loads((out / "metrics.json").read_text())
    assert own["unseen_mAP"] == pytest.approx(rows[-1]["unseen_mAP"], abs=1e-9) and not own["transfer"]


# ---- The grid command ------------------------------------------------------------------------
def test_the_zsl_grid_gives_each_dataset_its_split_and_tables_seen_unseen_and_the_backbone(tmp_path):
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import reproduce
    args = reproduce.parse(["zsl", "--out", str(tmp_path), "--seeds", "0,1"])
    assert args.dataset == ["coco2014", "nuswide"] and "fed-poscoop" not in args.methods and "fedmpt" in args.methods
    cells = reproduce.make_cells(args)
    assert {(c["dataset"], c["options"]) for c in cells} == {("coco2014", "--zsl-split 48/17"),
                                                             ("nuswide", "--zsl-split 925/81")}
    shapes = reproduce.make_cells(reproduce.parse(["zsl", "--out", str(tmp_path), "--dataset", "shapes"]))
    assert {c["options"] for c in shapes} == {"--unseen random:0.33"}
    args = reproduce.parse(["zsl", "--out", str(tmp_path), "--dataset", "coco2014", "--methods", "fedmpt",
                            "--seeds", "0,1"])
    cells = reproduce.make_cells(args)
    rows = {}
    for cell, value in zip(cells, [40.0, 44.0]):
        figures = {k: str(value + i) for i, k in enumerate(reproduce.ZSL_KEYS)}
        rows[reproduce.cell_key(cell)] = {**cell, **figures, **{f"zero_shot_{k}": "30.0" for k in reproduce.ZSL_KEYS}}
    table = reproduce.zsl_table(cells, rows, args)
    assert "| FedMPT | 42.00 ± 2.83 | 43.00 ± 2.83 | 44.00 ± 2.83 |" in table
    assert "| zero-shot backbone | 30.00 ± 0.00 | 30.00 ± 0.00 |" in table and "### coco2014 (--zsl-split 48/17)" in table
    assert reproduce.columns_of("zsl")[-1] == "zero_shot_gzsl_F1@3" and reproduce.columns_of("table1") == reproduce.COLUMNS


def test_thresholds_chosen_on_validation_leave_unseen_classes_at_one_half():
    """--validation with --unseen: the held-out images carry no unseen label, so an unseen
    class keeps 0.5 and the seen ones get theirs (evaluation.validation_thresholds)."""
    from types import SimpleNamespace
    import evaluation
    exp = SimpleNamespace(unseen=[1], train_set=SimpleNamespace(classes=["a", "b", "c"]))
    scores = np.array([[0.9, 0.2], [0.3, 0.8], [0.6, 0.1]])  # the seen classes a and c
    targets = np.array([[1, 0], [0, 1], [1, 0]])
    chosen = evaluation.validation_thresholds(exp, scores, targets)
    assert chosen.tolist() == [metrics.f1_thresholds(scores, targets)[0], 0.5, metrics.f1_thresholds(scores, targets)[1]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.slow  # zsl_run trains a whole federation
def test_predict_takes_a_device_and_refuses_cuda_where_there_is_none(zsl_run, capsys):
    out, _ = zsl_run
    assert predict.main(["--run", str(out), "--evaluate", "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA device is visible" in capsys.readouterr().err
    assert predict.main(["--run", str(out), "--evaluate", "--device", "cpu"]) == 0


def test_a_split_file_path_that_climbs_out_of_the_root_is_refused(tmp_path):
    """../../../../etc/passwd in a split file must not resolve outside ROOT."""
    from loaders.zsl import SPLITS
    seen, unseen = [f"seen{i:02d}" for i in range(48)], [f"unseen{i:02d}" for i in range(17)]
    files = SPLITS["coco2014", "48/17"]
    write_split(tmp_path / "root", files, seen, unseen)
    path = tmp_path / "root" / "annotations" / files[2]
    content = json.loads(path.read_text())
    (tmp_path / "outside.jpg").write_bytes(b"x")
    content["images"][1][0] = "../outside.jpg"
    path.write_text(json.dumps(content))
    with pytest.raises(FedMPTError) as raised:
        data.load_dataset("coco2014", tmp_path / "root", "test", zsl_split="48/17")
    assert f"{files[2]} entry 2" in str(raised.value) and "outside the dataset root" in str(raised.value)


def test_an_unseen_file_that_is_not_utf8_names_the_file(tmp_path):
    """An --unseen file that is not UTF-8 is an error line naming it."""
    names = tmp_path / "unseen.txt"
    names.write_bytes(b"ring\n\xff\n")
    with pytest.raises(FedMPTError, match="unseen.txt: the file is not UTF-8"):
        zeroshot.unseen_classes(str(names), ["ring", "star"], 0)


def test_the_unseen_figures_can_fail():
    """With two unseen classes the zero-shot setting has negatives, and the figure
    over every image ranks them against images holding no unseen class."""
    scores = np.array([[0.9, 0.1, 0.9], [0.8, 0.7, 0.1], [0.1, 0.9, 0.2], [0.3, 0.1, 0.8]])
    targets = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1]])  # unseen: classes 1, 2
    got = metrics.zsl_metrics(scores, targets, unseen=[1, 2], ks=())
    # zero-shot setting (images 1, 2, 3): class 1 positives 0.7, 0.9 vs 0.1: AP 1; class 2: 0.8 first: AP 1
    assert got["unseen_mAP"] == pytest.approx(100.0) and "unseen_mAP_undefined" not in got
    # every image: class 2's positive 0.8 ranks second behind image 0's 0.9: AP 1/2; class 1 still 1
    assert got["unseen_mAP_all"] == pytest.approx(100 * (1 + 0.5) / 2)
