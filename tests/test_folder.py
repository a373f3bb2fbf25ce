"""Your own data: `--dataset folder`, images under a folder plus labels.csv. Class order, targets,
natural clients (one per site) in `experiment.setup`, every problem of the file in one message,
the warning for a class without training positives, and a new user's whole path: build the
folder, train, predict. Every fixture is written here."""
import json
import random
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

import conditions
import data
import experiment
import federate
import predict
from conditions import discover
from conftest import build_experiment
from errors import FedMPTError
from shapes import world as shapes

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}
HEADER = "image,labels,split,client"
# Three sites, nested folders, an image without a label, test rows with and without a site.
ROWS = [("north/2021/a.png", "red", "train", "north"),
        ("north/2021/b.png", "red|green", "train", "north"),
        ("north/2022/deep/c.png", "", "train", "north"),
        ("south/d.png", "blue", "train", "south"),
        ("south/e.png", "green|blue", "train", "south"),
        ("east/x/f.png", "green", "train", "east"),
        ("east/x/g.png", "red|blue", "train", "east"),
        ("east/x/h.png", "blue", "train", "east"),
        ("held-out/i.png", "red", "test", ""),
        ("held-out/j.png", "green|blue", "test", "north"),
        ("held-out/k.png", "", "test", "")]


def save_image(path, labels):
    """Vertical stripes in the colours of the labels, grey without a label."""
    path.parent.mkdir(parents=True, exist_ok=True)
    colours = [COLOURS.get(name, (0, 0, 0)) for name in labels.split("|") if name] or [(128, 128, 128)]
    image = Image.new("RGB", (8 * len(colours), 16))
    for i, colour in enumerate(colours):
        image.paste(colour, (8 * i, 0, 8 * i + 8, 16))
    image.save(path)


def write_folder(root, rows=ROWS, header=HEADER, classes=None):
    """Images for every row (columns beyond the header's are dropped) and labels.csv; classes.txt if given."""
    width = len(header.split(","))
    for image, labels, *_ in rows:
        save_image(root / image, labels)
    (root / "labels.csv").write_text("\n".join([header] + [",".join(row[:width]) for row in rows]) + "\n")
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def train_and_test(root):
    return data.load_dataset("folder", root, "train"), data.load_dataset("folder", root, "test")


# ---- Reading the folder -------------------------------------------------------------------
def test_targets_follow_the_sorted_names_without_classes_txt(tmp_path):
    train, test = train_and_test(write_folder(tmp_path))
    assert "folder" in data.DATASETS
    assert train.classes == test.classes == ["blue", "green", "red"]
    assert (len(train), len(test)) == (8, 3)
    assert train.images[2] == tmp_path / "north/2022/deep/c.png"
    assert torch.equal(train.targets[:3], torch.tensor([[0, 0, 1], [0, 1, 1], [0, 0, 0]]))
    assert train.targets.dtype == torch.long and set(train.targets.unique().tolist()) == {0, 1}  # no -1
    assert test.targets[2].sum() == 0  # the empty label: absent everywhere
    image, target = train[4]
    assert image.size == (16, 16) and target.tolist() == [1, 1, 0]  # green|blue


def test_classes_txt_sets_the_order(tmp_path, capsys):
    train, test = train_and_test(write_folder(tmp_path, classes=["red", "green", "blue"]))
    assert train.classes == test.classes == ["red", "green", "blue"]
    assert train.targets[4].tolist() == [0, 1, 1] and train.targets[6].tolist() == [1, 0, 1]
    assert "warning" not in capsys.readouterr().err


def test_a_class_without_training_positives_warns_and_the_run_goes_on(tmp_path, capsys):
    rows = ROWS + [("held-out/l.png", "green", "test", "")]
    root = write_folder(tmp_path / "data", rows, classes=["red", "green", "blue", "purple"])
    code = federate.main(["--dataset", "folder", "--root", str(root), "--rounds", "1",
                          "--out", str(tmp_path / "run")])
    assert code == 0
    err = capsys.readouterr().err
    assert "warning" in err and "'purple'" in err and "labels.csv" in err
    assert err.count("'purple'") == 1  # once, for the training split
    assert len(json.loads((tmp_path / "run" / "metrics.json").read_text())) == 2


def test_natural_clients_give_one_client_per_site_sorted_by_name(tmp_path):
    train, test = train_and_test(write_folder(tmp_path))
    assert train.natural_clients == [("east", [5, 6, 7]), ("north", [0, 1, 2]), ("south", [3, 4])]
    assert test.natural_clients == [("north", [1])]  # test rows may leave the site empty


def test_setup_trains_one_client_per_site_and_records_their_names(tmp_path, capsys):
    root = write_folder(tmp_path / "data")
    cfg, model_cfg = federate.parse_config(["--dataset", "folder", "--root", str(root), "--clients", "5",
                                            "--heterogeneity", "0.5", "--out", str(tmp_path / "run")])
    exp = experiment.setup(cfg, model_cfg)
    assert [len(split) for split in exp.splits] == [3, 3, 2] and exp.cfg.clients == 3
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["client_names"] == ["east", "north", "south"] and config["client_sizes"] == [3, 3, 2]
    assert config["clients"] == 3
    err = capsys.readouterr().err
    assert "note: --clients 5 and --heterogeneity 0.5 not used" in err and "east, north, south" in err
    build_experiment(*federate.parse_config(["--dataset", "folder", "--root", str(root)]))
    assert "note" not in capsys.readouterr().err  # defaults: nothing to say


def test_without_a_client_column_the_k_means_split_applies(tmp_path):
    root = write_folder(tmp_path / "data", header="image,labels,split")
    assert data.load_dataset("folder", root, "train").natural_clients is None
    cfg, model_cfg = federate.parse_config(["--dataset", "folder", "--root", str(root), "--clients", "2",
                                            "--out", str(tmp_path / "run")])
    exp = experiment.setup(cfg, model_cfg)
    assert len(exp.splits) == 2 and sum(map(len, exp.splits)) == 8
    assert json.loads((tmp_path / "run" / "config.json").read_text())["client_names"] is None


def test_skip_unreadable_leaves_a_broken_image_out_and_keeps_the_sites(tmp_path, capsys):
    root = write_folder(tmp_path)
    (root / "north/2021/b.png").write_bytes(b"not a png")
    train = data.load_dataset("folder", root, "train", skip_unreadable=True)
    assert train.skipped == [root / "north/2021/b.png"] and len(train) == 7
    assert train.natural_clients == [("east", [4, 5, 6]), ("north", [0, 1]), ("south", [2, 3])]


def test_prompts_discover_and_the_default_conditions_work_for_a_folder(tmp_path, monkeypatch):
    default = conditions.load_conditions("", "folder")  # no shipped conditions/folder.json
    assert default["source"] == "default" and default["conditions"] == conditions.DEFAULT_CONDITIONS
    asked = []

    def answer(base_url, model, messages, api_key, timeout):  # instead of an LLM server
        asked.append(messages[0]["content"])
        return json.dumps({"conditions": ["colour", "background", "scene type", "layout", "size"]})
    monkeypatch.setattr(discover, "chat_completion", answer)
    result = discover.discover("folder", write_folder(tmp_path / "data"), "http://127.0.0.1:9/v1", "scripted", 5,
                              tmp_path / "folder.json")
    assert result["conditions"][0] == "colour" and all(name in asked[0] for name in ["red", "green", "blue"])
    assert conditions.load_conditions(str(tmp_path / "folder.json"), "folder")["conditions"] == result["conditions"]


# ---- Every problem of the file, in one message --------------------------------------------
def replace_row(index, **changes):
    """ROWS with row `index` changed (image, labels, split, client by name)."""
    names = ["image", "labels", "split", "client"]
    row = dict(zip(names, ROWS[index]), **changes)
    return ROWS[:index] + [tuple(row[name] for name in names)] + ROWS[index + 1:]


def broken_image(root):
    (root / "east/x/g.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")


# (rows, classes.txt, what to do after writing, the line named, words of the message)
PROBLEMS = {
    "missing header column": (ROWS, None, lambda root: (root / "labels.csv").write_text(
        "image,labels,site\nnorth/2021/a.png,red,north\n"), 1, "the header lacks the column(s) split"),
    "missing image": (ROWS, None, lambda root: (root / "south/d.png").unlink(), 5, "image south/d.png not found"),
    "unreadable image": (ROWS, None, broken_image, 8, "image east/x/g.png cannot be read"),
    "unknown split": (replace_row(3, split="val"), None, None, 5, "split 'val' is neither train nor test"),
    "label not in classes.txt": (replace_row(0, labels="red|purple"), ["red", "green", "blue"], None, 2,
                                 "label(s) 'purple' not in classes.txt"),
    "duplicate image": (ROWS[:4] + [ROWS[1]] + ROWS[4:], None, None, 6,
                        "image north/2021/b.png is listed twice (also on line 3)"),
    "client missing": (replace_row(6, client=""), None, None, 8, "no client"),
}


@pytest.mark.parametrize("case", PROBLEMS)
def test_each_problem_exits_2_naming_the_file_and_line(case, tmp_path, capsys):
    rows, classes, spoil, line, words = PROBLEMS[case]
    root = write_folder(tmp_path / "data", rows, classes=classes)
    if spoil:
        spoil(root)
    code = federate.main(["--dataset", "folder", "--root", str(root), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"error: {root / 'labels.csv'}" in err and f"line {line}: {words}" in err, err
    assert not (tmp_path / "run").exists()  # stopped before any training


def test_every_problem_is_listed_in_one_message(tmp_path, capsys):
    rows = replace_row(3, split="val")[:6] + [("east/x/g.png", "red|purple", "train", "")] + ROWS[7:] + [ROWS[0]]
    root = write_folder(tmp_path, rows, classes=["red", "green", "blue"])
    (root / "south/e.png").unlink()
    code = federate.main(["--dataset", "folder", "--root", str(root), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and "has 5 problem(s)" in err, err
    for line, words in [(5, "split 'val'"), (6, "image south/e.png not found"),
                        (8, "label(s) 'purple' not in classes.txt"), (8, "no client"),
                        (13, "image north/2021/a.png is listed twice (also on line 2)")]:
        assert f"line {line}: {words}" in err, (line, err)


def test_a_long_list_of_problems_is_cut_at_twenty(tmp_path):
    rows = ROWS + [(f"missing/{i}.png", "red", "train", "north") for i in range(30)]
    root = write_folder(tmp_path, ROWS)
    (root / "labels.csv").write_text("\n".join([HEADER] + [",".join(row) for row in rows]) + "\n")
    with pytest.raises(FedMPTError) as error:
        data.load_dataset("folder", root, "train")
    message = str(error.value)
    assert "has 30 problem(s)" in message and "missing/20.png" not in message
    assert "line 32: image missing/19.png not found" in message and "... and 10 more" in message


def test_an_image_too_large_to_decode_safely_is_unreadable_not_a_crash(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "folder")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses above twice this: the 16 x 16 images
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the 8 x 16 ones only warn
    with pytest.raises(FedMPTError, match="b.png cannot be read .*decompression bomb"):
        data.load_dataset("folder", root, "train")
    kept = data.load_dataset("folder", root, "train", skip_unreadable=True)  # --skip-unreadable
    assert len(kept) == 5 and sorted(p.name for p in map(Path, kept.skipped)) == ["b.png", "e.png", "g.png"]


def test_a_classes_txt_that_is_not_utf8_names_the_file(tmp_path):
    root = write_folder(tmp_path / "folder")
    (root / "classes.txt").write_bytes("red\ngr\u00fcn\n".encode("latin-1"))
    with pytest.raises(FedMPTError, match="classes.txt is not UTF-8 text .* save it as UTF-8"):
        data.load_dataset("folder", root, "train")


def test_a_test_split_without_one_label_is_refused_before_training(tmp_path, capsys):
    rows = [(image, "" if split == "test" else labels, split, client) for image, labels, split, client in ROWS]
    root = write_folder(tmp_path / "folder", rows=rows, header=HEADER)
    assert federate.main(["--dataset", "folder", "--root", str(root), "--out", str(tmp_path / "run")]) == 2
    assert "not one positive label: there is nothing to evaluate" in capsys.readouterr().err


# ---- A new user's whole path: own images, three sites, train, predict ---------------------
def write_shapes_folder(root, n_train=1500, n_test=300, n_new=3, seed=12345):
    """Shapes-world images from a seed no other test uses, as PNGs in nested folders of three
    sites, and labels.csv; every object counts, tiny ("difficult") ones too: they are visible.
    Returns the paths of `n_new` further images that labels.csv does not list. 500 training
    images a site: with 200, four rounds on the tiny backbone gain fewer than 10 mAP points."""
    rng, sites, lines = random.Random(seed), ["site-a", "site-b", "site-c"], [HEADER]
    for i in range(n_train + n_test + n_new):
        image, objects = shapes.generate_shapes_image(rng, 64)
        site, split = sites[i % 3], "train" if i < n_train else "test"
        path = f"{site}/{split}/batch-{i // 100}/{i:04d}.png" if i < n_train + n_test else f"new/{i:04d}.png"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / path)
        if i < n_train + n_test:
            lines.append(f"{path},{'|'.join(sorted({name for name, _, _ in objects}))},{split},{site}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return [root / f"new/{i:04d}.png" for i in range(n_train + n_test, n_train + n_test + n_new)]


@pytest.mark.slow
def test_a_new_user_trains_on_three_sites_and_labels_new_images(tmp_path, capsys):
    root, out = tmp_path / "my-data", tmp_path / "run"
    new_images = write_shapes_folder(root)
    assert federate.main(["--dataset", "folder", "--root", str(root), "--rounds", "4", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["client_names"] == ["site-a", "site-b", "site-c"] and config["client_sizes"] == [500, 500, 500]
    assert config["classes"] == sorted(shapes.SHAPES_CLASSES)
    history = json.loads((out / "metrics.json").read_text())
    maps = [row["mAP"] for row in history]
    assert maps[-1] > history[0]["label_prior_mAP"] + 10, (maps, history[0]["label_prior_mAP"])
    assert maps[-1] > maps[0] + 5, maps
    capsys.readouterr()
    assert predict.main(["--run", str(out), *map(str, new_images)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[0] for line in lines if line.startswith(str(root))] == list(map(str, new_images))


def test_a_folder_with_two_classes_runs_end_to_end(tmp_path):
    rows = [(f"{site}/{i}.png", labels, "train", site) for i, (site, labels) in enumerate(
        [("a", "red"), ("a", "green"), ("a", "red|green"), ("b", "green"), ("b", "red"), ("b", "")])]
    rows += [(f"test/{i}.png", labels, "test", "") for i, labels in enumerate(["red", "green", "red|green"])]
    write_folder(tmp_path / "two", rows=rows)
    import federate
    out = tmp_path / "run"
    assert federate.main(["--dataset", "folder", "--root", str(tmp_path / "two"), "--rounds", "1",
                          "--batch-size", "2", "--out", str(out)]) == 0  # top-3 metrics with C = 2
    assert predict.main(["--run", str(out), "--evaluate"]) == 0


def test_classes_the_text_side_cannot_tell_apart_are_named_before_training(tmp_path, capsys):
    digits = [(image, labels.replace("red", "one").replace("green", "two").replace("blue", "three"), *rest)
              for image, labels, *rest in ROWS]
    root = write_folder(tmp_path / "digits", rows=digits)
    exp = build_experiment(*federate.parse_config(["--dataset", "folder", "--root", str(root)]))
    err = capsys.readouterr().err
    assert "warning: the backbone's text side hardly tells 3 of the 3 class pairs apart" in err
    assert {tuple(sorted(p[:2])) for p in exp.similar} == {
        ("one", "three"), ("one", "two"), ("three", "two")}
    assert all(p[2] > 0.97 for p in exp.similar)
    colours = build_experiment(*federate.parse_config(["--dataset", "folder", "--root",
                                                       str(write_folder(tmp_path / "c"))]))  # words the shapes CLIP learned
    assert colours.similar == [] and "hardly tells" not in capsys.readouterr().err


def test_min_labels_keeps_each_site_with_its_remaining_images(tmp_path):
    train = data.keep_min_labels(data.load_dataset("folder", write_folder(tmp_path), "train"), 2)
    assert [p.name for p in train.images] == ["b.png", "e.png", "g.png"]
    assert train.natural_clients == [("east", [2]), ("north", [0]), ("south", [1])]


# ---- Every path resolves inside ROOT; class names that cannot be written back -------------
def test_an_image_link_inside_root_to_a_file_outside_is_refused(tmp_path):
    """The written path lies inside ROOT, but a symbolic link takes it outside: refused."""
    root = write_folder(tmp_path / "data")
    outside = tmp_path / "secret.png"
    outside.write_bytes((root / ROWS[0][0]).read_bytes())
    (root / ROWS[0][0]).unlink()
    (root / ROWS[0][0]).symlink_to(outside)
    with pytest.raises(FedMPTError) as raised:
        data.load_dataset("folder", root, "train")
    assert "line 2" in str(raised.value) and "not a path inside" in str(raised.value)


@pytest.mark.parametrize("where", ["labels.csv", "classes.txt"])
@pytest.mark.parametrize("name", ["red,ish", "red\nish"])
def test_a_class_name_with_a_comma_or_line_break_is_refused(tmp_path, where, name):
    """Such a name cannot be written back (--unseen, classes.txt) as one name: refused."""
    rows = [(image, labels.replace("red", name), *rest) for image, labels, *rest in ROWS]
    if where == "labels.csv":
        root = tmp_path / "data"
        for image, labels, *_ in ROWS:
            save_image(root / image, labels)
        import csv
        with open(root / "labels.csv", "w", newline="") as file:
            csv.writer(file).writerows([HEADER.split(","), *rows])
    elif "\n" in name:
        pytest.skip("classes.txt holds one name a line: a line break makes two names there")
    else:
        root = write_folder(tmp_path / "data", rows=rows, classes=["blue", "green", name])
    with pytest.raises(FedMPTError, match="holds a comma or a line break"):
        data.load_dataset("folder", root, "train")
