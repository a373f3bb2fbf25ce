"""The feature store: each split's frozen inputs are encoded once per key, resume after an
interruption, survive two writers, and are encoded again when their files do not fit."""
import errno
import fcntl
import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import federate
from errors import FedMPTError
from store import features, files


class Images(torch.utils.data.Dataset):
    """20 random 'images' (8 numbers each), with the attributes a store key reads."""
    name, split, transform = "toy", "train", None

    def __init__(self, n=20):
        generator = torch.Generator().manual_seed(0)
        self.pixels = torch.randn(n, 8, generator=generator)
        self.images = [f"image-{i}.jpg" for i in range(n)]
        self.targets = (torch.rand(n, 3, generator=generator) < 0.5).long()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.pixels[i], self.targets[i]


class Encoder:
    """v = 2x, P = x stacked twice; counts the images it encoded; may fail at a chosen call."""

    def __init__(self, fail_at_call=None):
        self.images, self.calls, self.fail_at_call = 0, 0, fail_at_call

    def __call__(self, x):
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise KeyboardInterrupt  # as Ctrl-C mid-encoding
        self.images += len(x)
        return 2 * x, torch.stack([x, x], dim=1)


def encode(dataset, encoder, cache, kind="v,P", batch_size=6):
    key = features.store_key("backbone-sha", dataset, kind)
    return features.encode_dataset(encoder, dataset, key, str(cache), batch_size=batch_size)


def test_a_split_is_encoded_once_per_key_and_read_back_in_float16(tmp_path):
    dataset, first, again = Images(), Encoder(), Encoder()
    (v, P), encoded = encode(dataset, first, tmp_path)
    assert encoded == 20 and first.images == 20 and v.dtype == P.dtype == torch.float16
    assert torch.equal(v, (2 * dataset.pixels).half()) and P.shape == (20, 2, 8)
    (v_again, P_again), encoded = encode(dataset, again, tmp_path)
    assert encoded == 0 and again.calls == 0 and torch.equal(v, v_again) and torch.equal(P, P_again)
    _, encoded = encode(dataset, Encoder(), tmp_path, kind="another input")  # another key
    assert encoded == 20
    manifest = json.loads(next(tmp_path.glob("features/*/manifest.json")).read_text())
    assert manifest["rows_completed"] == 20 and manifest["dtypes"] == ["float16", "float16"]


def test_an_interrupted_encoding_resumes_from_its_last_chunk(tmp_path):
    dataset = Images()
    with pytest.raises(KeyboardInterrupt):
        encode(dataset, Encoder(fail_at_call=3), tmp_path)  # two chunks of 6 are on disk
    resumed = Encoder()
    (v, P), encoded = encode(dataset, resumed, tmp_path)
    assert encoded == resumed.images == 8  # rows 12..19 only
    (v_straight, P_straight), _ = encode(dataset, Encoder(), tmp_path / "straight")
    assert torch.equal(v, v_straight) and torch.equal(P, P_straight)


def test_files_that_do_not_match_their_manifest_are_encoded_again(tmp_path, capsys):
    dataset = Images()
    encode(dataset, Encoder(), tmp_path)
    array = next(tmp_path.glob("features/*/input1.npy"))
    array.write_bytes(array.read_bytes()[:100])  # truncated
    messages = []
    key = features.store_key("backbone-sha", dataset, "v,P")
    (v, P), encoded = features.encode_dataset(Encoder(), dataset, key, str(tmp_path), batch_size=6, log=messages.append)
    assert encoded == 20 and "encoding again" in messages[0] and torch.equal(P[:, 0], dataset.pixels.half())


def test_two_writers_of_one_key_take_turns(tmp_path):
    dataset, results, encoders = Images(), [None, None], [Encoder(), Encoder()]

    def one(i):
        results[i] = encode(dataset, encoders[i], tmp_path)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r[1] for r in results) == [0, 20] and encoders[0].images + encoders[1].images == 20
    assert all(torch.equal(a, b) for a, b in zip(results[0][0], results[1][0]))


@pytest.mark.slow
def test_a_second_run_with_another_seed_or_method_encodes_nothing(shapes_root, tmp_path):
    cache = tmp_path / "cache"
    common = ["--root", str(shapes_root), "--rounds", "1", "--clients", "2", "--batch-size", "128", "--cache-dir", str(cache)]
    runs = [("first", []), ("seed", ["--seed", "1"]), ("method", ["--method", "fed-dualcoop"])]
    for name, extra in runs:
        assert federate.main([*common, *extra, "--out", str(tmp_path / name)]) == 0
    configs = [json.loads((tmp_path / name / "config.json").read_text()) for name, _ in runs]
    assert configs[0]["encoded_images"] == 2300 and [c["encoded_images"] for c in configs[1:]] == [0, 0]
    assert all(c["feature_cache"] == str(cache) for c in configs)
    shapes = sorted(np.load(path, mmap_mode="r").shape for path in cache.glob("features/*/input*.npy"))
    assert shapes == sorted([(800, 128), (800, 9, 128), (1500, 128), (1500, 9, 128)])  # (v, P) of train, test


def test_images_are_stored_as_their_exact_uint8_pixels():
    from PIL import Image
    from baselines.common import images_as_uint8, images_from_uint8
    pixels = np.random.default_rng(0).integers(0, 256, (2, 40, 50, 3), dtype=np.uint8)
    transform = data.clip_transform(32)
    images = torch.stack([transform(Image.fromarray(p)) for p in pixels])  # CLIP-normalised (2, 3, 32, 32)
    stored = images_as_uint8(images)
    assert stored.dtype == torch.uint8 and torch.allclose(images_from_uint8(stored), images, atol=1e-6)
    assert torch.equal(images_from_uint8(stored.float()), images_from_uint8(stored))  # as a batch gathers them


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("planted", [".lock", "input0.npy", "manifest.json", ".manifest.json.{pid}.tmp", "entry"])
def test_a_link_planted_in_the_store_is_refused_and_its_target_untouched(tmp_path, planted):
    """A shared cache in which another user planted links cannot make a run write
    through them: the run stops naming the link, and the file it points to keeps its bytes."""
    dataset, cache = Images(), tmp_path / "cache"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    before = sha256(victim)
    directory = features.store_directory(features.store_key("backbone-sha", dataset, "v,P"), str(cache))
    if planted == "entry":  # the entry directory itself, a link to a directory elsewhere
        (tmp_path / "elsewhere").mkdir()
        directory.parent.mkdir(parents=True)
        directory.symlink_to(tmp_path / "elsewhere")
        link = directory
    else:
        directory.mkdir(parents=True)
        link = directory / planted.format(pid=os.getpid())
        link.symlink_to(victim)
    with pytest.raises(FedMPTError) as raised:
        encode(dataset, Encoder(), cache)
    assert str(link) in str(raised.value) and "symbolic link" in str(raised.value)
    assert sha256(victim) == before and os.path.islink(link)
    assert planted != "entry" or not any((tmp_path / "elsewhere").iterdir())


def test_run_files_are_never_written_through_a_planted_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    for name in ("metrics.json", f".metrics.json.{os.getpid()}.tmp"):
        run = tmp_path / name.strip(".")
        run.mkdir()
        (run / name).symlink_to(victim)
        with pytest.raises(FedMPTError, match="symbolic link"):
            files.write_json(run / "metrics.json", [1])
        assert victim.read_text() == "precious\n" and os.path.islink(run / name)


def test_pictures_and_the_error_log_are_never_written_through_a_planted_link(tmp_path):
    """clients.png, plans.png and the grids' plots (files.save_figure) and error.log (a failed
    round: runs.round_failure) refuse a link planted at their name; its target keeps its bytes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from errors import RunFailed
    from store import runs
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "clients.png").symlink_to(victim)
    figure = plt.figure()
    with pytest.raises(FedMPTError, match="clients.png is a symbolic link"):
        files.save_figure(figure, tmp_path / "clients.png", dpi=50)
    plt.close(figure)
    (tmp_path / "error.log").symlink_to(victim)
    with pytest.raises(FedMPTError, match="error.log is a symbolic link"):
        with runs.round_failure(tmp_path, 2):
            raise RunFailed("round 2, client 0: a failing update") from ValueError("a bug")
    assert victim.read_text() == "precious\n"
    files.save_figure(plt.figure(), tmp_path / "plot.png", dpi=50)  # where no link is planted: a whole PNG
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")


# ---- What the store serves is what was encoded ---------------------------------------------
def test_a_damaged_npy_header_in_the_store_is_encoded_again_and_open_store_names_the_entry(tmp_path):
    dataset, messages = Images(), []
    key = features.store_key("backbone-sha", dataset, "v,P")
    (v, P), _ = features.encode_dataset(Encoder(), dataset, key, str(tmp_path), batch_size=6)
    expected = v.clone()
    directory = features.store_directory(key, str(tmp_path))
    header = bytearray((directory / "input0.npy").read_bytes())
    header[10:40] = b"\x00" * 30  # the dict that says dtype and shape; the size stays
    (directory / "input0.npy").write_bytes(bytes(header))
    with pytest.raises(FedMPTError, match=f"feature store entry {directory} is damaged.*delete"):
        features.open_store(key, str(tmp_path))
    encoder = Encoder()
    (v, _), encoded = features.encode_dataset(encoder, dataset, key, str(tmp_path), batch_size=6, log=messages.append)
    assert encoded == len(dataset) and torch.equal(v, expected) and np.isfinite(v.numpy()).all()
    assert "the header of input0.npy is damaged" in messages[0]


def stored(tmp_path, encoder=None, log=None):
    dataset = Images()
    key = features.store_key("backbone-sha", dataset, "v,P")
    inputs, encoded = features.encode_dataset(encoder or Encoder(), dataset, key, str(tmp_path), batch_size=6,
                                              log=log or print)
    return inputs, encoded, features.store_directory(key, str(tmp_path))


@pytest.mark.parametrize("damage", ["flipped bytes", "lowest bit of every value"])
def test_damaged_store_bytes_with_headers_and_sizes_intact_are_encoded_again(tmp_path, damage):
    (v, P), _, directory = stored(tmp_path)
    expected = P.clone()
    array = np.load(directory / "input1.npy", mmap_mode="r+")
    if damage == "flipped bytes":
        raw = array.reshape(-1).view(np.uint8)
        raw[100:164] ^= 0xFF
    else:
        array.view(np.uint16)[...] ^= 1  # every float16 moves by one unit in the last place
    array.flush()
    del array
    messages = []
    (v, P), encoded, _ = stored(tmp_path, log=messages.append)
    assert encoded == 20 and torch.equal(P, expected)
    assert "input1.npy fail their checksum" in messages[0] and "encoding again" in messages[0]
    assert stored(tmp_path)[1] == 0  # and then it is served as it is


def test_a_replaced_image_with_its_size_and_mtime_kept_changes_the_key(tmp_path):
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    first.write_bytes(b"A" * 100)
    second.write_bytes(b"B" * 100)
    dataset = Images(1)
    dataset.images = [first]
    before = features.store_key("sha", dataset, "v,P")
    status = os.stat(first)
    os.replace(second, first)  # other pictures, same size ...
    os.utime(first, ns=(status.st_atime_ns, status.st_mtime_ns))  # ... and the same modification time
    assert os.stat(first).st_size == status.st_size and os.stat(first).st_mtime_ns == status.st_mtime_ns
    assert features.store_key("sha", dataset, "v,P") != before


def test_non_finite_encoder_output_is_never_stored(tmp_path):
    class Broken(Encoder):
        def __call__(self, x):
            v, P = super().__call__(x)
            return v * 1e6, P  # beyond float16's range: inf once stored
    with pytest.raises(FedMPTError, match="non-finite values for images 0 to 5"):
        stored(tmp_path, Broken())
    (v, _), encoded, _ = stored(tmp_path)
    assert encoded == 20 and torch.isfinite(v).all()


def test_a_run_waiting_for_anothers_lock_says_so(tmp_path):
    _, _, directory = stored(tmp_path)
    messages, holder = [], open(directory / ".lock", "w")
    fcntl.flock(holder, fcntl.LOCK_EX)
    waiter = threading.Thread(target=lambda: stored(tmp_path, log=messages.append), daemon=True)
    try:
        waiter.start()
        waiter.join(timeout=2)
        assert waiter.is_alive() and "waiting for another run that encodes the same inputs" in " ".join(messages)
    finally:
        fcntl.flock(holder, fcntl.LOCK_UN)
        holder.close()
    waiter.join(timeout=30)
    assert not waiter.is_alive()


# ---- Writes that cannot tear ---------------------------------------------------------------
class FullDisk:
    """`os` for store/files.py, except that a write into a file whose name holds `name`, from
    the (skip + 1)-th such file on, puts half its bytes on disk and fails with ENOSPC."""
    def __init__(self, name, skip=0):
        self.name, self.skip, self.failing = name, skip, set()

    def __getattr__(self, attribute):
        return getattr(os, attribute)

    def open(self, path, *args):
        descriptor = os.open(path, *args)
        if self.name in Path(path).name:
            if self.skip == 0:
                self.failing.add(descriptor)
            self.skip -= 1
        return descriptor

    def write(self, descriptor, data):
        if descriptor in self.failing:
            os.write(descriptor, bytes(data[:len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.write(descriptor, data)


@pytest.mark.parametrize("write", ["json", "tensors"])
def test_a_full_disk_keeps_the_previous_file_whole_and_leaves_no_temporary(tmp_path, monkeypatch, write):
    path = tmp_path / ("metrics.json" if write == "json" else "checkpoint.pt")
    save = (lambda value: files.write_json(path, value, "fix it")) if write == "json" else \
        (lambda value: files.save_tensors({"w": torch.full((1000,), float(value))}, path, "fix it"))
    save(1)
    before = path.read_bytes()
    monkeypatch.setattr(files, "os", FullDisk(path.name))
    with pytest.raises(FedMPTError) as raised:
        save(2)
    message = str(raised.value)
    assert str(path) in message and "No space left on device" in message and "MiB free" in message
    assert "previous content" in message and "fix it" in message
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_full_disk_while_the_store_writes_its_manifest_resumes_where_it_stopped(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(files, "os", FullDisk("manifest", skip=1))  # the second chunk's manifest
    with pytest.raises(FedMPTError, match="manifest.json: No space left on device"):
        stored(tmp_path)
    directory = next((tmp_path / "features").iterdir())
    assert json.loads((directory / "manifest.json").read_text())["rows_completed"] == 6
    assert not list(directory.glob("*.tmp"))
    monkeypatch.setattr(files, "os", os)
    inputs, encoded, _ = stored(tmp_path)
    fresh, _, _ = stored(tmp_path / "fresh")
    assert encoded == len(fresh[0]) - 6 and all(torch.equal(a, b) for a, b in zip(inputs, fresh))


def test_the_feature_store_is_the_given_folder_else_the_environment_s_else_the_home_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMPT_CACHE", str(tmp_path / "env"))
    assert features.cache_root() == tmp_path / "env"
    assert features.cache_root(str(tmp_path / "given")) == tmp_path / "given"
    monkeypatch.delenv("FEDMPT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert features.cache_root() == tmp_path / "home" / ".cache" / "fedmpt"
