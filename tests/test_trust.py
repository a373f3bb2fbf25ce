"""Nothing trusted that should not be (#27): resume refuses what it cannot honour (item 2), what
used to end in a traceback ends in an `error:` line (item 7, in part), and the feature store
checks what it serves (item 1). Each test failed on the code before its fix."""
import dataclasses
import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import experiment
import federate
import predict
from errors import FedMPTError
from options import ModelConfig
import options
from store import runs


def valid_config() -> dict:
    return {**dataclasses.asdict(options.Config()), **dataclasses.asdict(ModelConfig())}


@pytest.fixture
def no_setup(monkeypatch):
    """Fail the test if a run gets as far as its setup."""
    def reached(*args, **kwargs):
        raise AssertionError("setup was reached")
    monkeypatch.setattr(federate, "setup", reached)
    monkeypatch.setattr(experiment, "training_inputs", reached)


@pytest.mark.parametrize("saved, message", [
    ({}, "it lacks --dataset, --root, --method"),
    ([], "holds a JSON list, not a run's configuration"),
    ({**valid_config(), "rounds": "3"}, "--rounds '3': must be a number"),
    ({**valid_config(), "ot_rho": 0.0}, "--ot-rho 0.0: must lie in (0, inf]"),
    ({**valid_config(), "learning_rate": 0.1}, "no option or run record is called learning_rate"),
])
def test_a_config_json_that_is_not_a_runs_configuration_is_refused_before_setup(tmp_path, capsys, no_setup, saved,
                                                                                message):
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert federate.main(["--resume", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert message in error and str(tmp_path / "config.json") in error and "Traceback" not in error
    assert predict.main(["--run", str(tmp_path), "x.jpg"]) == 2
    assert message in capsys.readouterr().err


def test_execution_fields_may_be_missing_and_the_run_record_is_known(tmp_path):
    saved = {k: v for k, v in valid_config().items() if k not in ("threads", "workers")}
    (tmp_path / "config.json").write_text(json.dumps({**saved, "engine": "plain", "classes": ["a"]}))
    cfg, _, _ = runs.read_config(str(tmp_path))
    assert cfg.threads == 0 and cfg.workers == -1


def test_options_that_would_change_the_trained_rounds_are_refused_beside_resume(tmp_path, capsys, no_setup):
    (tmp_path / "config.json").write_text(json.dumps(valid_config()))
    assert federate.main(["--resume", str(tmp_path), "--method", "fedtpg", "--lr=0.5", "--threads", "1"]) == 2
    error = capsys.readouterr().err
    refused = error.split("own options; ", 1)[1].split(" would change", 1)[0]
    assert refused == "--method, --lr"  # --threads applies
    with pytest.raises(SystemExit):  # no abbreviation can slip past the check as another option
        federate.main(["--resume", str(tmp_path), "--round", "3"])


@pytest.fixture(scope="module")
def finished(shapes_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("trust") / "run"
    assert federate.main(["--root", str(shapes_root), "--out", str(out), "--rounds", "1", "--clients", "2",
                          "--batch-size", "128"]) == 0
    return out


@pytest.mark.slow
def test_rounds_beside_resume_extend_a_run_and_execution_options_apply(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    threads = torch.get_num_threads()
    try:
        assert federate.main(["--resume", str(run), "--rounds", "2", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert "extends the run from 1 rounds" in capsys.readouterr().err
    assert [row["round"] for row in json.loads((run / "metrics.json").read_text())] == [0, 1, 2]
    config = json.loads((run / "config.json").read_text())
    assert config["rounds"] == 2 and config["extended"] == [{"after_round": 1, "rounds_before": 1, "rounds": 2}]
    assert federate.main(["--resume", str(run), "--rounds", "1"]) == 2  # fewer than the run has done
    assert "--rounds 1 beside --resume extends a run" in capsys.readouterr().err
    assert runs.read_config(str(run))[0].rounds == 2  # resumable again, with its new length


@pytest.mark.slow
def test_a_checkpoint_of_another_format_or_shape_is_refused_before_any_image_is_encoded(finished, tmp_path, capsys,
                                                                                        monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    torch.save({"round": 1}, run / "checkpoint.pt")
    assert federate.main(["--resume", str(run)]) == 2
    assert "checkpoint.pt is not a checkpoint this code wrote" in capsys.readouterr().err

    name = next(iter(checkpoint["global_state"]))
    checkpoint["global_state"][name] = torch.zeros(3)
    torch.save(checkpoint, run / "checkpoint.pt")
    torch.save(checkpoint["global_state"], run / "state.pt")
    encoded = []
    real = experiment.training_inputs
    monkeypatch.setattr(experiment, "training_inputs", lambda *a: encoded.append(1) or real(*a))
    assert federate.main(["--resume", str(run)]) == 2
    error = capsys.readouterr().err
    assert f"{name} has shape (3,)" in error and "does not fit the model" in error and not encoded
    assert predict.main(["--run", str(run), "--evaluate"]) == 2
    assert f"{name} has shape (3,)" in capsys.readouterr().err


# ---- #27 item 7: what used to end in a traceback ends in an `error:` line -----------------
def test_an_image_too_large_to_decode_safely_is_unreadable_not_a_crash(tmp_path, monkeypatch):
    import warnings

    from PIL import Image

    import data
    from tests.test_folder import write_folder
    root = write_folder(tmp_path / "folder")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses above twice this: the 16 x 16 images
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the 8 x 16 ones only warn
    with pytest.raises(experiment.FedMPTError, match="b.png cannot be read .*decompression bomb"):
        data.load_dataset("folder", root, "train")
    kept = data.load_dataset("folder", root, "train", skip_unreadable=True)  # --skip-unreadable
    assert len(kept) == 5 and sorted(p.name for p in map(Path, kept.skipped)) == ["b.png", "e.png", "g.png"]


def test_a_classes_txt_that_is_not_utf8_names_the_file(tmp_path):
    import data
    from tests.test_folder import write_folder
    root = write_folder(tmp_path / "folder")
    (root / "classes.txt").write_bytes("red\ngr\u00fcn\n".encode("latin-1"))
    with pytest.raises(experiment.FedMPTError, match="classes.txt is not UTF-8 text .* save it as UTF-8"):
        data.load_dataset("folder", root, "train")


def test_a_test_split_without_one_label_is_refused_before_training(tmp_path, capsys):
    from tests.test_folder import HEADER, ROWS, write_folder
    rows = [(image, "" if split == "test" else labels, split, client) for image, labels, split, client in ROWS]
    root = write_folder(tmp_path / "folder", rows=rows, header=HEADER)
    assert federate.main(["--dataset", "folder", "--root", str(root), "--out", str(tmp_path / "run")]) == 2
    assert "not one positive label: there is nothing to evaluate" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"not a checkpoint at all", "tensors"])
def test_clip_weights_that_are_not_a_clip_checkpoint_name_the_file(tmp_path, content):
    from backbone import load_clip
    path = tmp_path / "weights.pt"
    if content == "tensors":
        torch.save({"a": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(experiment.FedMPTError, match=f"--clip-weights {path}: not a CLIP checkpoint"):
        load_clip("ViT-B/16", str(path))


def test_a_damaged_npy_header_in_the_store_is_encoded_again_and_open_store_names_the_entry(tmp_path):
    import numpy as np

    from store import features
    from tests.test_store import Encoder, Images
    dataset, messages = Images(), []
    key = features.store_key("backbone-sha", dataset, "v,P")
    (v, P), _ = features.encode_dataset(Encoder(), dataset, key, str(tmp_path), batch_size=6)
    expected = v.clone()
    directory = features.store_directory(key, str(tmp_path))
    header = bytearray((directory / "input0.npy").read_bytes())
    header[10:40] = b"\x00" * 30  # the dict that says dtype and shape; the size stays
    (directory / "input0.npy").write_bytes(bytes(header))
    with pytest.raises(experiment.FedMPTError, match=f"feature store entry {directory} is damaged.*delete"):
        features.open_store(key, str(tmp_path))
    encoder = Encoder()
    (v, _), encoded = features.encode_dataset(encoder, dataset, key, str(tmp_path), batch_size=6, log=messages.append)
    assert encoded == len(dataset) and torch.equal(v, expected) and np.isfinite(v.numpy()).all()
    assert "the header of input0.npy is damaged" in messages[0]


# ---- #27 item 1: a store that checks what it serves ---------------------------------------
def stored(tmp_path, encoder=None, log=None):
    from store import features
    from tests.test_store import Encoder, Images
    dataset = Images()
    key = features.store_key("backbone-sha", dataset, "v,P")
    inputs, encoded = features.encode_dataset(encoder or Encoder(), dataset, key, str(tmp_path), batch_size=6,
                                              log=log or print)
    return inputs, encoded, features.store_directory(key, str(tmp_path))


@pytest.mark.parametrize("damage", ["flipped bytes", "lowest bit of every value"])
def test_damaged_store_bytes_with_headers_and_sizes_intact_are_encoded_again(tmp_path, damage):
    import numpy as np
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
    import os

    from store import features
    from tests.test_store import Images
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
    from tests.test_store import Encoder

    class Broken(Encoder):
        def __call__(self, x):
            v, P = super().__call__(x)
            return v * 1e6, P  # beyond float16's range: inf once stored
    with pytest.raises(experiment.FedMPTError, match="non-finite values for images 0 to 5"):
        stored(tmp_path, Broken())
    (v, _), encoded, _ = stored(tmp_path)
    assert encoded == 20 and torch.isfinite(v).all()


def test_a_run_waiting_for_anothers_lock_says_so(tmp_path):
    import fcntl
    import threading
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


# ---- #27 item 5: an LLM client that gives nothing away ------------------------------------
class HostileServer:
    """A chat-completions server on 127.0.0.1 that answers every POST with `behaviour`, and
    records every request it gets (path, headers)."""

    def __init__(self, behaviour):
        import http.server
        import threading
        self.requests, server = [], self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.requests.append((self.path, dict(self.headers)))
                try:
                    behaviour(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client hung up, as it should
        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.http.server_address[1]}/v1"
        threading.Thread(target=self.http.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.http.shutdown()
        self.http.server_close()


def chat_reply(handler, content, code=200):
    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
    handler.send_response(code)
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload)


def endless(handler):
    handler.send_response(200)
    handler.end_headers()  # no length: the body runs until the server stops
    for _ in range(200):  # 12.8 MB, more than the client takes
        handler.wfile.write(b"x" * 65536)


def dripping(handler):
    import time
    handler.send_response(200)
    handler.end_headers()
    for _ in range(100):
        handler.wfile.write(b" ")
        handler.wfile.flush()
        time.sleep(0.1)


def ask_hostile(behaviour, tmp_path, *options, monkeypatch=None):
    import time

    from conditions import discover
    server = HostileServer(behaviour)
    out = tmp_path / "conditions.json"
    try:
        start = time.monotonic()
        code = discover.main(["--dataset", "shapes", "--base-url", server.base_url, "--model", "m", "--out", str(out),
                              "--retries", "0", *options])
        return code, time.monotonic() - start, server.requests, out
    finally:
        server.close()


@pytest.mark.parametrize("behaviour, options, message, seconds", [
    (endless, ["--timeout", "30"], "the reply is over 4 MiB", 10),
    (dripping, ["--timeout", "1"], "no whole answer within --timeout 1 s", 4),
    (lambda h: chat_reply(h, "[" * 200_000 + "]" * 200_000), [], "nests deeper than Python's parser goes", 10),
    (lambda h: chat_reply(h, json.dumps({"conditions": [f"c{i}" for i in range(40_000)]})), [],
     "expected exactly 5 conditions, got 40000", 10),
])
def test_hostile_answers_end_in_bounded_time_and_memory(tmp_path, capsys, behaviour, options, message, seconds):
    code, took, _, out = ask_hostile(behaviour, tmp_path, *options)
    error = capsys.readouterr().err
    assert code == 2 and message in error and took < seconds and not out.exists()
    assert len(error) < 10_000  # no answer is echoed whole


def test_an_answer_with_terminal_escapes_is_shown_escaped(tmp_path, capsys):
    code, _, _, _ = ask_hostile(lambda h: chat_reply(h, "\x1b[2J\x1b]0;owned\x07 not json"), tmp_path)
    error = capsys.readouterr().err
    assert code == 2 and "\x1b" not in error and "\x07" not in error and "\\x1b[2J" in error


def test_a_redirect_to_another_origin_is_not_followed_and_gets_no_key(tmp_path, capsys, monkeypatch):
    thief = HostileServer(lambda h: chat_reply(h, json.dumps({"conditions": ["a", "b", "c", "d", "e"]})))

    def redirect(handler):
        handler.send_response(302)
        handler.send_header("Location", f"{thief.base_url}/chat/completions")
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    monkeypatch.setenv("FEDMPT_LLM_API_KEY", "the-secret")
    try:
        code, _, requests, _ = ask_hostile(redirect, tmp_path)
    finally:
        thief.close()
    assert code == 2 and "redirect" in capsys.readouterr().err
    assert requests[0][1].get("Authorization") == "Bearer the-secret" and thief.requests == []


# ---- #27 item 3: writes that cannot tear ---------------------------------------------------
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
    from store import files
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
    from store import files
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


@pytest.mark.slow
@pytest.mark.parametrize("failing", ["checkpoint.pt", "metrics.json"])
def test_a_full_disk_in_a_round_stops_the_run_with_metrics_never_ahead_of_the_checkpoint(
        shapes_root, tmp_path, monkeypatch, capsys, failing):
    from store import files
    out = tmp_path / "run"
    skip = 1 if failing == "checkpoint.pt" else 2  # round 2's checkpoint; round 2's metrics (0 and 1 written)
    monkeypatch.setattr(files, "os", FullDisk(failing, skip=skip))
    options = ["--root", str(shapes_root), "--out", str(out), "--rounds", "2", "--clients", "2", "--batch-size", "128"]
    assert federate.main(options) == 2
    error = capsys.readouterr().err
    assert f"cannot write {out / failing}: No space left on device" in error and "MiB free" in error
    assert f"--resume {out}" in error and "Traceback" not in error
    rows = [row["round"] for row in json.loads((out / "metrics.json").read_text())]
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert rows == [0, 1] and checkpoint["round"] == (1 if failing == "checkpoint.pt" else 2)
    assert not list(out.rglob("*.tmp")) and not (out / "state.pt").exists()
    monkeypatch.setattr(files, "os", os)
    assert federate.main(["--resume", str(out)]) == 0
    assert [row["round"] for row in json.loads((out / "metrics.json").read_text())] == [0, 1, 2]


# ---- #27 item 8: thresholds a user can act on ---------------------------------------------
def test_thresholds_are_chosen_on_validation_only_stored_with_the_run_and_used_by_predict(tmp_path, monkeypatch,
                                                                                          capsys):
    import data
    import metrics
    import splits
    from tests.test_remote_sensing import write_mlrsnet
    root = write_mlrsnet(tmp_path / "mlrsnet", per_scene=20)  # 32 training images, 8 test images
    seen, real = [], metrics.f1_thresholds
    monkeypatch.setattr(metrics, "f1_thresholds", lambda s, t: seen.append((s, torch.as_tensor(t))) or real(s, t))
    out = tmp_path / "run"
    assert federate.main(["--dataset", "mlrsnet", "--root", str(root), "--clients", "2", "--rounds", "2",
                          "--validation", "0.25", "--batch-size", "8", "--workers", "0", "--out", str(out)]) == 0
    train = data.load_dataset("mlrsnet", str(root), "train").targets
    held_out, _ = splits.hold_out(len(train), 0.25, 0)
    assert len(seen) == 4 and all(torch.equal(t, train[held_out]) for _, t in seen)  # each round's row, then the run's
    rows = json.loads((out / "metrics.json").read_text())
    assert all({"CF1_val_thresholds", "OF1_val_thresholds", "CF1", "OF1"} <= set(row) for row in rows)
    stored = json.loads((out / "thresholds.json").read_text())
    classes = json.loads((out / "config.json").read_text())["classes"]
    assert stored["round"] == 2 and list(stored["thresholds"]) == classes
    assert list(stored["thresholds"].values()) == real(*seen[-1]).tolist() != [0.5] * len(classes)

    assert predict.main(["--run", str(out), "--evaluate"]) == 0  # the same thresholds on the same state
    evaluation = json.loads((out / "evaluation-mlrsnet.json").read_text())
    assert evaluation["CF1_val_thresholds"] == pytest.approx(rows[-1]["CF1_val_thresholds"], abs=1e-9)
    thresholds = [stored["thresholds"][c] for c in classes]
    for options, expected, said in [([], thresholds, "per-class thresholds of"),
                                    (["--threshold", "0.5"], [0.5] * len(classes), "threshold 0.5 for every class")]:
        labels = tmp_path / "labels.json"
        capsys.readouterr()
        assert predict.main(["--run", str(out), str(root / "Images"), "--out", str(labels), *options]) == 0
        assert said in capsys.readouterr().out
        for row in json.loads(labels.read_text()):
            p = row["probabilities"]
            assert sorted(row["labels"]) == sorted(c for c, t in zip(classes, expected) if p[c] >= t)


def test_an_interpreter_older_than_the_declared_minimum_stops_with_one_line():
    import subprocess
    import sys
    import tomllib
    import errors
    declared = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["requires-python"]
    assert declared == ">=" + ".".join(map(str, errors.MINIMUM_PYTHON))
    older = "import sys; sys.version_info = (3, 10, 13); import federate"
    result = subprocess.run([sys.executable, "-c", older], capture_output=True, text=True,
                            cwd=Path(__file__).parents[1])
    assert result.returncode == 2 and result.stderr.startswith("error: fedmpt needs Python 3.11 or newer")
    assert "Traceback" not in result.stderr


def test_a_run_saved_before_an_option_was_added_reads_with_its_default(tmp_path):
    """Options marked `added` (newer than saved runs) may be missing and take their default,
    which is what every run before them did; any other missing option is still refused."""
    added = [f.name for config in (options.Config, ModelConfig) for f in dataclasses.fields(config)
             if f.metadata.get("added")]
    assert {"unseen", "zsl_split", "precision"} <= set(added)
    old = {k: v for k, v in valid_config().items() if k not in added}
    (tmp_path / "config.json").write_text(json.dumps(old))
    cfg, model_cfg, _ = runs.read_config(str(tmp_path))
    assert cfg.unseen == "" and cfg.zsl_split == "" and model_cfg.precision == "fp32"
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in old.items() if k != "rounds"}))
    with pytest.raises(FedMPTError, match="it lacks --rounds"):
        runs.read_config(str(tmp_path))
