"""COCO2014 and NUS-WIDE loaders, unreadable images, the VOC2007 download (served from
127.0.0.1), and how heterogeneous the client splits are. Every fixture is generated here, tiny,
in the dataset's own layout."""
import hashlib
import http.server
import io
import json
import os
import socket
import tarfile
import threading

import pytest
import torch
from PIL import Image

from loaders.base import check_images
from loaders.coco import COCO_CLASSES
from loaders.nuswide import NUSWIDE_CLASSES
from loaders.voc import VOC_CLASSES
import data
from splits import client_splits, kmeans, label_shares, label_skew, plot_client_distributions, split_report
from tools import download
from errors import FedMPTError

# COCO's category ids run 1..90 with ten gaps.
COCO_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]


def save_jpeg(path, size=(32, 24), colour=(120, 90, 60)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def write_coco(root, folder, images, annotations, categories=None):
    """instances_<folder>.json plus one JPEG per image; images are (id, file_name, width)."""
    categories = categories or [{"id": i, "name": n, "supercategory": "x"}
                                for i, n in zip(COCO_IDS, COCO_CLASSES)]
    coco = {"images": [{"id": i, "file_name": f, "width": w, "height": 24} for i, f, w in images],
            "annotations": [{"id": k, "image_id": i, "category_id": c, "iscrowd": crowd}
                            for k, (i, c, crowd) in enumerate(annotations)],
            "categories": categories[::-1]}  # file order must not matter: ids decide
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{folder}.json").write_text(json.dumps(coco))
    for _, file_name, width in images:
        save_jpeg(root / folder / file_name, size=(width, 24))


@pytest.fixture
def coco_root(tmp_path):
    person, dog, toothbrush = COCO_IDS[0], COCO_IDS[16], COCO_IDS[79]
    write_coco(tmp_path, "train2014",
               [(30, "COCO_train2014_000000000030.jpg", 30), (9, "COCO_train2014_000000000009.jpg", 9),
                (25, "COCO_train2014_000000000025.jpg", 25), (12, "COCO_train2014_000000000012.jpg", 12)],
               [(9, person, 0), (9, person, 0), (9, dog, 0), (25, toothbrush, 1), (30, dog, 0)])
    write_coco(tmp_path, "val2014", [(42, "COCO_val2014_000000000042.jpg", 42),
                                     (7, "COCO_val2014_000000000007.jpg", 7)], [(7, dog, 0)])
    return tmp_path


def test_coco_class_order_targets_and_splits(coco_root):
    train = data.load_dataset("coco2014", coco_root, "train")
    test = data.load_dataset("coco2014", coco_root, "test")
    assert train.classes == COCO_CLASSES and len(COCO_CLASSES) == 80
    assert (len(train), len(test)) == (4, 2)
    person, dog, toothbrush = 0, COCO_CLASSES.index("dog"), 79
    expected = torch.zeros(4, 80, dtype=torch.long)  # images in ascending id: 9, 12, 25, 30
    expected[0, person] = expected[0, dog] = 1  # two persons count once
    expected[2, toothbrush] = 1  # a crowd annotation counts
    expected[3, dog] = 1  # image 12 has no annotation: all zeros, kept
    assert torch.equal(train.targets, expected) and train.targets.dtype == torch.long
    image, target = train[1]
    assert image.size == (12, 24) and torch.equal(target, expected[1])  # PIL image, id 12
    assert test.targets[0, dog] == 1 and test.targets[1].sum() == 0  # ids 7 then 42


def test_coco_missing_files_and_wrong_categories_are_named(coco_root, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FedMPTError, match=r"instances_val2014\.json.*val2014.*cocodataset\.org"):
        data.load_dataset("coco2014", empty, "test")
    (coco_root / "annotations" / "instances_val2014.json").unlink()
    with pytest.raises(FedMPTError, match=r"missing \S*instances_val2014\.json\. To get it"):
        data.load_dataset("coco2014", coco_root, "test")
    categories = [{"id": i, "name": n} for i, n in zip(COCO_IDS, VOC_CLASSES)]
    write_coco(coco_root, "val2014", [(1, "a.jpg", 8)], [], categories=categories)
    with pytest.raises(FedMPTError, match=r"instances_val2014\.json: its categories"):
        data.load_dataset("coco2014", coco_root, "test")


NUS_IMAGES = {"Train": ["actor\\0001_2124494179.jpg", "beach\\0002_11.jpg", "sky/0003_12.jpg"],
              "Test": ["zebra\\0004_13.jpg", "beach\\0005_14.jpg"]}
NUS_LABELS = {"Train": {"person": [1, 0, 0], "beach": [0, 1, 0], "sky": [1, 1, 0]},
              "Test": {"zebra": [1, 0], "water": [0, 1]}}


def write_nuswide(root):
    """The official layout: Concepts81.txt, ImageList/, TrainTestLabels/, images/."""
    (root / "Concepts81.txt").write_text("\n".join(NUSWIDE_CLASSES) + "\n")
    (root / "ImageList").mkdir(parents=True)
    (root / "TrainTestLabels").mkdir()
    for part, lines in NUS_IMAGES.items():
        (root / "ImageList" / f"{part}Imagelist.txt").write_text("\r\n".join(lines) + "\r\n")
        for concept in NUSWIDE_CLASSES:
            labels = NUS_LABELS[part].get(concept, [0] * len(lines))
            (root / "TrainTestLabels" / f"Labels_{concept}_{part}.txt").write_text(
                "".join(f"{v}\n" for v in labels))
        for line in lines:
            save_jpeg(root / "images" / line.replace("\\", "/"))
    return root


def test_nuswide_class_order_targets_and_splits(tmp_path):
    root = write_nuswide(tmp_path)
    train = data.load_dataset("nuswide", root, "train")
    test = data.load_dataset("nuswide", root, "test")
    assert len(NUSWIDE_CLASSES) == 81 and NUSWIDE_CLASSES == sorted(NUSWIDE_CLASSES)
    assert train.classes == NUSWIDE_CLASSES and (len(train), len(test)) == (3, 2)
    index = NUSWIDE_CLASSES.index
    expected = torch.zeros(3, 81, dtype=torch.long)
    expected[0, [index("person"), index("sky")]] = 1
    expected[1, [index("beach"), index("sky")]] = 1  # image 2 (no concept) stays, all zeros
    assert torch.equal(train.targets, expected)
    assert train.images[0] == root / "images" / "actor" / "0001_2124494179.jpg"  # '\' read as '/'
    image, target = train[0]
    assert image.size == (32, 24) and torch.equal(target, expected[0])
    assert test.targets[0, index("zebra")] == 1 and test.targets[1, index("water")] == 1


def test_nuswide_missing_files_are_listed(tmp_path):
    root = write_nuswide(tmp_path)
    (root / "TrainTestLabels" / "Labels_zebra_Test.txt").unlink()
    (root / "ImageList" / "TestImagelist.txt").unlink()
    with pytest.raises(FedMPTError) as caught:
        data.load_dataset("nuswide", root, "test")
    message = str(caught.value)
    assert "TestImagelist.txt" in message and "Labels_zebra_Test.txt" in message
    assert "Labels_airport_Test.txt" not in message  # only what is missing
    data.load_dataset("nuswide", root, "train")  # the other split is complete
    with pytest.raises(FedMPTError, match=r"missing .*Concepts81\.txt.*TrainImagelist\.txt.*and \d+ more"):
        data.load_dataset("nuswide", tmp_path / "nowhere", "train")


def test_nuswide_bad_concepts_labels_and_paths_name_the_file(tmp_path):
    root = write_nuswide(tmp_path)
    labels = root / "TrainTestLabels" / "Labels_sky_Train.txt"
    labels.write_text("1\n0\n")  # one line short
    with pytest.raises(FedMPTError, match=r"Labels_sky_Train\.txt.*3 lines.*has 2"):
        data.load_dataset("nuswide", root, "train")
    labels.write_text("1\n1\n0\n")
    (root / "ImageList" / "TrainImagelist.txt").write_text("..\\secret.jpg\nb.jpg\nc.jpg\n")
    with pytest.raises(FedMPTError, match=r"TrainImagelist\.txt.*secret"):
        data.load_dataset("nuswide", root, "train")
    (root / "Concepts81.txt").write_text("\n".join(["airplane"] + NUSWIDE_CLASSES[1:]))
    with pytest.raises(FedMPTError, match=r"Concepts81\.txt.*line 1: 'airplane'"):
        data.load_dataset("nuswide", root, "train")


def test_unknown_dataset_and_split_list_the_choices(tmp_path):
    assert list(data.DATASETS) == ["shapes", "voc2007", "coco2014", "nuswide", "multiscene", "mlrsnet", "folder"]
    with pytest.raises(FedMPTError, match="shapes, voc2007, coco2014, nuswide"):
        data.load_dataset("imagenet", tmp_path, "train")
    with pytest.raises(FedMPTError, match="train or test"):
        data.load_dataset("coco2014", tmp_path, "val")


# ---- Unreadable images ---------------------------------------------------------------------
def test_unreadable_images_raise_or_are_skipped_with_a_message(coco_root, capsys):
    (coco_root / "train2014" / "COCO_train2014_000000000012.jpg").write_bytes(b"not a jpeg")
    (coco_root / "train2014" / "COCO_train2014_000000000030.jpg").unlink()
    dataset = data.load_dataset("coco2014", coco_root, "train")
    assert len(dataset) == 4  # nothing is checked or dropped without the flag
    with pytest.raises(FedMPTError, match=r"000000000012\.jpg.*--skip-unreadable"):
        check_images(dataset)
    with pytest.raises(FedMPTError, match=r"000000000030\.jpg"):
        dataset[3]
    kept = data.load_dataset("coco2014", coco_root, "train", skip_unreadable=True)
    printed = capsys.readouterr().out
    assert "skipped 2 of 4" in printed and "000000000012.jpg" in printed and "000000000030.jpg" in printed
    assert [p.name for p in kept.images] == ["COCO_train2014_000000000009.jpg", "COCO_train2014_000000000025.jpg"]
    assert torch.equal(kept.targets, dataset.targets[[0, 2]])  # targets dropped with their images
    assert sorted(p.name for p in kept.skipped) == ["COCO_train2014_000000000012.jpg", "COCO_train2014_000000000030.jpg"]
    assert kept[1][0].size == (25, 24)
    assert "all 2 images are readable" in check_images(kept)


# ---- Downloading VOC2007 -------------------------------------------------------------------
def voc_archive(tmp_path, split, ids):
    """A tar with the VOC layout of one split, as the official archives have it."""
    base = tmp_path / f"build-{split}" / "VOCdevkit" / "VOC2007"
    for image_id in ids:
        save_jpeg(base / "JPEGImages" / f"{image_id}.jpg")
        (base / "Annotations").mkdir(parents=True, exist_ok=True)
        (base / "Annotations" / f"{image_id}.xml").write_text(
            "<annotation><object><name>dog</name><difficult>0</difficult></object></annotation>")
    (base / "ImageSets" / "Main").mkdir(parents=True)
    (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(base.parents[1] / "VOCdevkit", arcname="VOCdevkit")
    return buffer.getvalue()


class ArchiveHandler(http.server.BaseHTTPRequestHandler):
    """Serves server.files; honours 'Range: bytes=N-' only when server.ranges is set."""

    def do_GET(self):
        body, asked = self.server.files.get(self.path), self.headers.get("Range")
        self.server.requests.append((self.path, asked))
        if body is None:
            return self.send_error(404)
        start = int(asked.removeprefix("bytes=").rstrip("-")) if asked and self.server.ranges else 0
        if start >= len(body) > 0:
            self.send_response(416)
            self.send_header("Content-Length", "0")
            return self.end_headers()
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A local HTTP server on a random port with the two VOC archives; `.urls`, `.md5s`."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ArchiveHandler)
    archives = {"trainval": voc_archive(tmp_path, "trainval", ["000001", "000002"]),
                "test": voc_archive(tmp_path, "test", ["000003"])}
    httpd.files = {f"/voc/VOC{split}.tar": body for split, body in archives.items()}
    httpd.requests, httpd.ranges, httpd.archives = [], True, archives
    httpd.urls = {split: f"http://127.0.0.1:{httpd.server_port}/voc/VOC{split}.tar" for split in archives}
    httpd.md5s = {split: hashlib.md5(body).hexdigest() for split, body in archives.items()}
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_download_extracts_loads_and_second_call_downloads_nothing(server, tmp_path):
    root = tmp_path / "voc"
    directory = download.download_voc2007(root, progress=False, urls=server.urls, md5s=server.md5s)
    assert directory == root / "VOCdevkit" / "VOC2007" and len(server.requests) == 2
    assert len(data.load_dataset("voc2007", root, "train")) == 2
    assert len(data.load_dataset("voc2007", root, "test")) == 1
    download.download_voc2007(root, progress=False, urls=server.urls, md5s=server.md5s)
    assert len(server.requests) == 2  # both splits already extracted
    (directory / "JPEGImages" / "000003.jpg").unlink()  # test split incomplete, archive still here
    download.download_voc2007(root, progress=False, urls=server.urls, md5s=server.md5s)
    assert len(server.requests) == 2 and (directory / "JPEGImages" / "000003.jpg").exists()


@pytest.mark.parametrize("ranges", [True, False])
def test_download_resumes_a_partial_archive(server, tmp_path, capsys, ranges):
    server.ranges = ranges
    root = tmp_path / "voc"
    root.mkdir()
    body = server.archives["trainval"]
    (root / "VOCtrainval.tar").write_bytes(body[:len(body) // 3])
    download.download_voc2007(root, progress=False, urls=server.urls, md5s=server.md5s)
    assert download.file_md5(root / "VOCtrainval.tar") == server.md5s["trainval"]
    assert ("/voc/VOCtrainval.tar", f"bytes={len(body) // 3}-") in server.requests
    assert ("from the start" in capsys.readouterr().out) is not ranges  # no Range: restart, said
    assert len(data.load_dataset("voc2007", root, "train")) == 2


def test_download_wrong_md5_names_the_file(server, tmp_path):
    md5s = {**server.md5s, "test": "0" * 32}
    with pytest.raises(FedMPTError, match=r"VOCtest\.tar does not have the expected md5.*delete"):
        download.download_voc2007(tmp_path, progress=False, urls=server.urls, md5s=md5s)
    corrupt = tmp_path / "fresh" / "VOCtrainval.tar"  # full length, wrong bytes: nothing to resume
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"x" * len(server.archives["trainval"]))
    with pytest.raises(FedMPTError, match=r"VOCtrainval\.tar does not have the expected md5.*delete"):
        download.download_voc2007(corrupt.parent, progress=False, urls=server.urls, md5s=server.md5s)
    assert server.requests[-1][1] == f"bytes={len(server.archives['trainval'])}-"  # answered 416


def test_download_network_errors_name_the_url(server, tmp_path):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    urls = {"trainval": f"http://127.0.0.1:{port}/VOCtrainval.tar"}
    with pytest.raises(FedMPTError, match=rf"cannot download http://127\.0\.0\.1:{port}/VOCtrainval\.tar.*by hand"):
        download.download_voc2007(tmp_path, progress=False, urls=urls, md5s=server.md5s)
    with pytest.raises(FedMPTError, match=r"HTTP 404.*by hand"):
        download.download_voc2007(tmp_path, progress=False, urls={"test": server.urls["test"] + "x"}, md5s=server.md5s)


def malicious_tar(member: tarfile.TarInfo, payload=b"owned\n") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        good = tarfile.TarInfo("VOCdevkit/VOC2007/ok.txt")
        good.size = 3
        tar.addfile(good, io.BytesIO(b"ok\n"))
        member.size = len(payload) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(payload) if member.isfile() else None)
    return buffer.getvalue()


def test_download_refuses_a_tar_that_writes_outside(server, tmp_path):
    body = malicious_tar(tarfile.TarInfo("../evil.txt"))
    server.files["/voc/VOCtrainval.tar"] = body
    root = tmp_path / "root"
    with pytest.raises(FedMPTError, match=r"member '\.\./evil\.txt' would write outside"):
        download.download_voc2007(root, progress=False, urls={"trainval": server.urls["trainval"]},
                              md5s={"trainval": hashlib.md5(body).hexdigest()})
    assert not (tmp_path / "evil.txt").exists() and not (root / "VOCdevkit").exists()


def link(name, target, kind):
    member = tarfile.TarInfo(name)
    member.type, member.linkname = kind, target
    return member


@pytest.mark.parametrize("member", [
    tarfile.TarInfo("/tmp/fedmpt-absolute-evil.txt"),
    tarfile.TarInfo("VOCdevkit/../../evil.txt"),
    link("VOCdevkit/escape", "../../outside", tarfile.SYMTYPE),
    link("VOCdevkit/passwd", "/etc/passwd", tarfile.SYMTYPE),
    link("VOCdevkit/hard", "../outside.txt", tarfile.LNKTYPE)], ids=lambda m: m.name)
def test_safe_extract_refuses_members_pointing_outside(tmp_path, member):
    archive = tmp_path / "bad.tar"
    archive.write_bytes(malicious_tar(member))
    target = tmp_path / "a" / "b"
    target.mkdir(parents=True)
    with pytest.raises(FedMPTError, match=rf"member '{member.name}'"):
        download.safe_extract(archive, target)
    assert list(target.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["a", "bad.tar"]


# ---- Client splits: how heterogeneous ------------------------------------------------------
def test_label_skew_falls_as_t_falls_and_t1_keeps_own_cluster(shapes_root):
    targets = data.load_dataset("shapes", shapes_root, "train").targets
    skews = []
    for t in [1.0, 0.7, 0.4, 0.1]:
        splits = client_splits(targets, 4, t, seed=0)
        assert sorted(i for s in splits for i in s) == list(range(len(targets)))  # conserved
        skews.append(label_skew(targets, splits))
    assert all(a > b for a, b in zip(skews, skews[1:])), skews  # strictly less skewed as t falls
    assert skews[0] > 0.3 and skews[-1] < 0.1
    clusters = kmeans((targets == 1).float().numpy(), 4, seed=0)
    for client, split in enumerate(client_splits(targets, 4, 1.0, seed=0)):
        assert set(clusters[split].tolist()) == {client}  # t = 1: only its own cluster


def test_split_report_and_plot(shapes_root, tmp_path):
    dataset = data.load_dataset("shapes", shapes_root, "train")
    splits = client_splits(dataset.targets, 4, 1.0, seed=0)
    report = split_report(dataset.targets, splits, dataset.classes)
    lines = report.splitlines()
    assert len(lines) == 6 and lines[0].split()[:2] == ["all", "1500"]
    for client, split in enumerate(splits):
        assert f"client {client} {len(split):>7} images" in lines[client + 1]
        shares = label_shares(dataset.targets, split)
        assert dataset.classes[int(shares.argmax())] in lines[client + 1]  # most frequent label
    path = plot_client_distributions(dataset.targets, splits, dataset.classes, tmp_path / "clients.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["coco2014", "nuswide"])
def test_federate_runs_end_to_end_on_the_fixture_layout(name, coco_root, tmp_path):
    import federate
    root = coco_root if name == "coco2014" else tmp_path / "nus"
    root.mkdir(exist_ok=True)
    if name == "nuswide":
        write_nuswide(root)
    out = tmp_path / "run"
    code = federate.main(["--dataset", name, "--root", str(root), "--clients", "2", "--rounds", "1",
                          "--batch-size", "2", "--out", str(out)])
    assert code == 0
    rows = json.loads((out / "metrics.json").read_text())
    assert [row["round"] for row in rows] == [0, 1] and rows[1]["clients_aggregated"] == 2
    assert (out / "clients.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_safe_extract_refuses_a_symlink_chain_that_escapes_once_its_links_exist(tmp_path, monkeypatch):
    """`d -> .`, `l -> d/..`, `l/evil.txt`: each member passes a check of paths resolved before
    extraction; once d and l exist, l is the target's parent. Refused with nothing extracted,
    also where tarfile has no 'data' filter (Python before 3.11.4) to stop it."""
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for member in [link("d", ".", tarfile.SYMTYPE), link("l", "d/..", tarfile.SYMTYPE)]:
            tar.addfile(member)
        evil = tarfile.TarInfo("l/evil.txt")
        evil.size = 5
        tar.addfile(evil, io.BytesIO(b"evil\n"))
    archive = tmp_path / "chain.tar"
    archive.write_bytes(buffer.getvalue())
    target = tmp_path / "a" / "b"
    target.mkdir(parents=True)
    with pytest.raises(FedMPTError, match=r"member 'l' would write outside"):
        download.safe_extract(archive, target)
    assert list(target.iterdir()) == [] and not (tmp_path / "a" / "evil.txt").exists()
    inside = tmp_path / "fine.tar"  # links that stay inside and are never passed through are kept
    with tarfile.open(inside, mode="w") as tar:
        tar.addfile(link("VOCdevkit/latest", "VOC2007", tarfile.SYMTYPE))
    download.safe_extract(inside, target)
    assert os.readlink(target / "VOCdevkit" / "latest") == "VOC2007"


# ---- One path rule for every loader; files that are not text -----------------------------
@pytest.mark.parametrize("file_name", ["../../outside.jpg", "/etc/hostname"])
def test_a_coco_file_name_outside_the_root_is_refused(coco_root, tmp_path_factory, file_name):
    """COCO's file_name joined with the image folder must stay inside it."""
    path = coco_root / "annotations" / "instances_val2014.json"
    coco = json.loads(path.read_text())
    coco["images"][0]["file_name"] = file_name
    path.write_text(json.dumps(coco))
    with pytest.raises(FedMPTError) as raised:
        data.load_dataset("coco2014", coco_root, "test")
    assert "instances_val2014.json" in str(raised.value) and "outside the dataset root" in str(raised.value)


def voc_root(root):
    """A two-image VOC layout under ROOT/VOC2007."""
    directory = root / "VOC2007"
    (directory / "ImageSets" / "Main").mkdir(parents=True)
    (directory / "Annotations").mkdir()
    for image_id in ("000001", "000002"):
        save_jpeg(directory / "JPEGImages" / f"{image_id}.jpg")
        (directory / "Annotations" / f"{image_id}.xml").write_text(
            "<annotation><object><name>dog</name><difficult>0</difficult></object></annotation>")
    (directory / "ImageSets" / "Main" / "test.txt").write_text("000001\n000002\n")
    return directory


def test_a_voc_image_id_that_climbs_out_of_the_root_is_refused(tmp_path):
    """An ImageSets id ../../../x, which would read x.xml and x.jpg outside ROOT, is refused."""
    directory = voc_root(tmp_path / "voc")
    (tmp_path / "x.xml").write_text("<annotation></annotation>")
    save_jpeg(tmp_path / "x.jpg")
    (directory / "ImageSets" / "Main" / "test.txt").write_text("000001\n../../../x\n")
    with pytest.raises(FedMPTError) as raised:
        data.load_dataset("voc2007", tmp_path / "voc", "test")
    assert "test.txt line 2" in str(raised.value) and "outside the dataset root" in str(raised.value)


def test_a_voc_image_set_or_generated_json_that_does_not_read_names_the_file(tmp_path):
    """A non-UTF-8 ImageSets file and a malformed generated.json end in error: lines naming them."""
    directory = voc_root(tmp_path / "voc")
    (directory / "ImageSets" / "Main" / "test.txt").write_bytes(b"000001\n\xff\xfe\n")
    with pytest.raises(FedMPTError, match="test.txt is not UTF-8"):
        data.load_dataset("voc2007", tmp_path / "voc", "test")
    (directory / "ImageSets" / "Main" / "test.txt").write_text("000001\n")
    (directory / "generated.json").write_text("{not json")
    with pytest.raises(FedMPTError, match="generated.json is not"):
        data.load_dataset("voc2007", tmp_path / "voc", "test")
    stamp = tmp_path / "shapes" / "VOCdevkit" / "VOC2007" / "generated.json"
    stamp.parent.mkdir(parents=True)
    stamp.write_text("[1,")
    with pytest.raises(FedMPTError, match="generated.json is not a generated world"):
        data.load_dataset("shapes", tmp_path / "shapes", "test")  # the shapes world reads its record first


def test_missing_voc2007_names_the_papers_full_command(tmp_path):
    """A newcomer who points --root at an empty folder learns the whole command of the paper's
    setting (the real backbone and the GPU), not only how to fetch the images."""
    with pytest.raises(FedMPTError) as caught:
        data.load_dataset("voc2007", str(tmp_path), "train")
    message = str(caught.value)
    assert f"python federate.py --dataset voc2007 --root {tmp_path} --clip ViT-B/16 --device cuda" in message
    assert "--download" in message
