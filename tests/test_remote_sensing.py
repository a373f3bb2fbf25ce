"""Table 3's datasets in their published layouts: Multi-Scene-Clean and MLRSNet (fixtures)."""
import json

import pytest
from PIL import Image

import data
from errors import FedMPTError

MULTISCENE = ["BaseballField", "Beach", "OilFiled"]  # header order and spelling, typo included
MLRSNET = ["airplane", "bare soil", "habor"]


def image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (90, 120, 30)).save(path)


def write_multiscene(root, rows=None):
    directory = root / "MultiScene-Clean"
    rows = rows or {"Tra.csv": [("a1", "1,0,1"), ("a2", "0,1,0")], "Test.csv": [("t1.jpg", "1,1,0")]}
    for file, lines in rows.items():
        directory.mkdir(parents=True, exist_ok=True)
        (directory / file).write_text("\n".join(["image," + ",".join(MULTISCENE)] + [f"{n},{v}" for n, v in lines]) + "\n")
        for name, _ in lines:
            image(directory / "images" / (name if name.endswith(".jpg") else f"{name}.jpg"))
    return root


def write_mlrsnet(root, per_scene=10, labels_dir="labels"):
    for scene in ["airport", "harbor"]:
        lines = ["image," + ",".join(MLRSNET)]
        for i in range(per_scene):
            name = f"{scene}_{i:05d}.jpg"
            image(root / "Images" / scene / name)
            lines.append(f"{name},{int(scene == 'airport')},{i % 2},{int(scene == 'harbor')}")
        (root / labels_dir).mkdir(parents=True, exist_ok=True)
        (root / labels_dir / f"{scene}.csv").write_text("\n".join(lines) + "\n")
    return root


def test_multiscene_reads_classes_from_the_header_and_targets_per_image(tmp_path):
    root = write_multiscene(tmp_path)
    train, test = data.load_dataset("multiscene", root, "train"), data.load_dataset("multiscene", root, "test")
    assert train.classes == MULTISCENE and train.targets.tolist() == [[1, 0, 1], [0, 1, 0]]
    assert test.images[0].name == "t1.jpg" and test.targets.tolist() == [[1, 1, 0]]
    assert [data.prompt_name(c) for c in train.classes] == ["baseball field", "beach", "oil field"]
    image_, target = train[0]
    assert image_.size == (16, 16) and target.tolist() == [1, 0, 1]


def test_multiscene_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(FedMPTError, match="Tra.csv"):
        data.load_dataset("multiscene", tmp_path, "train")
    root = write_multiscene(tmp_path / "bad", {"Tra.csv": [("a1", "1,0"), ("a2", "0,1,0")]})
    with pytest.raises(FedMPTError, match="line 2: expected 3 columns"):
        data.load_dataset("multiscene", root, "train")


@pytest.mark.parametrize("labels_dir", ["labels", "Labels"])
def test_mlrsnet_reads_scenes_and_classes_and_writes_a_reusable_split(tmp_path, labels_dir):
    root = write_mlrsnet(tmp_path, labels_dir=labels_dir)
    train, test = data.load_dataset("mlrsnet", root, "train"), data.load_dataset("mlrsnet", root, "test")
    assert train.classes == MLRSNET and data.prompt_name("habor") == "harbor"
    assert (len(train), len(test)) == (16, 4)  # 80/20 within each scene
    assert sorted(set(train.scenes)) == ["airport", "harbor"] and train.scenes.count("harbor") == 8
    assert not {p.name for p in train.images} & {p.name for p in test.images}
    split_file = root / "splits" / "split-seed0.json"
    saved = json.loads(split_file.read_text())
    assert data.load_dataset("mlrsnet", root, "train").images == train.images  # read back, not redrawn
    saved["test"], saved["train"] = saved["train"][:2], saved["train"][2:] + saved["test"]  # the user's own split
    split_file.write_text(json.dumps(saved))
    assert len(data.load_dataset("mlrsnet", root, "test")) == 2


def test_mlrsnet_refuses_label_files_with_other_classes(tmp_path):
    root = write_mlrsnet(tmp_path)
    path = root / "labels" / "harbor.csv"
    path.write_text(path.read_text().replace("habor", "harbour"))
    with pytest.raises(FedMPTError, match="harbor.csv"):
        data.load_dataset("mlrsnet", root, "train")
    with pytest.raises(FedMPTError, match="Images"):
        data.load_dataset("mlrsnet", tmp_path / "empty", "train")


@pytest.mark.parametrize("name", ["multiscene", "mlrsnet"])
def test_federate_runs_end_to_end_on_both_layouts(name, tmp_path):
    import federate
    if name == "multiscene":
        lines = [(f"m{i}", ",".join("1" if (i + c) % 3 else "0" for c in range(3))) for i in range(12)]
        root = write_multiscene(tmp_path / name, {"Tra.csv": lines[:8], "Test.csv": lines[8:]})
    else:
        root = write_mlrsnet(tmp_path / name)
    out = tmp_path / "run"
    assert federate.main(["--dataset", name, "--root", str(root), "--clients", "2", "--rounds", "1",
                          "--batch-size", "4", "--out", str(out)]) == 0
    rows = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert [row["round"] for row in rows] == [0, 1] and config["condition_set"]["conditions"][0] == "aerial view"
