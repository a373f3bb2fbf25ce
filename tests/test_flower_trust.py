"""What a Flower run trusts, and what it refuses: a node's kit in its cache dir (a shared scratch
disk, possibly) loads as tensors and plain values only, so a file planted there never runs as
code; a --superlink HOST:PORT on another machine, reached without TLS, is warned about loudly.
"""
import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

flwr = pytest.importorskip("flwr", reason="flwr is not installed: pip install -r requirements-flower.txt")
import evaluation  # noqa: E402
import flower_app  # noqa: E402
from errors import FedMPTError  # noqa: E402
from launcher import flower  # noqa: E402
from options import Config, FlowerConfig, ModelConfig  # noqa: E402


def node_context(shapes_root, cache_dir, run_id=7, **options):
    """What Flower hands a ClientApp: the run's options and SuperNode 0's node config."""
    options = {**dataclasses.asdict(Config(root=str(shapes_root), clients=2, batch_size=128, **options)),
               **dataclasses.asdict(ModelConfig()), **dataclasses.asdict(FlowerConfig())}
    return SimpleNamespace(run_config={"options": json.dumps(options)}, run_id=run_id,
                           node_config={"partition-id": 0, "num-partitions": 2, "cache-dir": str(cache_dir)})


class Planted:
    """A pickle that would run code when unpickled: it creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_the_kit_is_tensors_and_plain_values_and_a_planted_one_never_runs(shapes_root, tmp_path):
    context = node_context(shapes_root, tmp_path / "kits")
    client, prepared, path = flower_app.client_kit(context)  # the run's first message prepares
    kit = torch.load(path, weights_only=True)  # loads without unpickling any object
    assert client == 0 and set(kit) == {"y", "key", "cache_dir", "classes", "conditions", "attributes"}
    assert torch.equal(kit["y"], prepared["y"]) and path.stat().st_size < 1_000_000  # no backbone (the shapes CLIP: 3.5 MB)

    _, later, _ = flower_app.client_kit(context)  # a later message: the model built again from the kit
    later["model"].load_tunable_state(prepared["model"].tunable_state())
    rows = list(range(8))
    assert torch.equal(evaluation.predict_scores(later["model"], later["inputs"], rows=rows),
                       evaluation.predict_scores(prepared["model"], prepared["inputs"], rows=rows))

    marker = tmp_path / "the-planted-kit-ran"
    torch.save({"y": kit["y"], "model": Planted(marker)}, path)  # a file planted where the kit lies
    _, again, _ = flower_app.client_kit(context)
    assert not marker.exists()  # never unpickled
    assert set(torch.load(path, weights_only=True)) == set(kit) and torch.equal(again["y"], kit["y"])  # prepared again


@pytest.mark.parametrize("address, warned", [
    ("192.0.2.7:9093", True), ("server.example.org:9093", True),
    ("127.0.0.1:9093", False), ("localhost:9093", False), ("[::1]:9093", False)])
def test_an_insecure_superlink_on_another_machine_is_warned_about(address, warned, tmp_path, monkeypatch, capsys):
    def stop(*args):
        raise FedMPTError("stopped before flwr run")
    monkeypatch.setattr(flower, "flwr_run", stop)
    with pytest.raises(FedMPTError, match="stopped before flwr run"):
        flower.launch(Config(out=str(tmp_path / "run"), rounds=1), ModelConfig(), FlowerConfig(superlink=address))
    error = capsys.readouterr().err
    assert ("WARNING: --superlink" in error and "without TLS" in error) == warned, error


def test_a_supernode_trains_on_the_seen_classes_only(shapes_root, tmp_path):
    """--unseen on Flower: the client's labels and the model it rebuilds from its kit know the
    seen classes only (the plain loop's rule: zeroshot/)."""
    context = node_context(shapes_root, tmp_path / "kits", unseen="ring,star")
    _, prepared, path = flower_app.client_kit(context)
    kit = torch.load(path, weights_only=True)
    assert "ring" not in kit["classes"] and "star" not in kit["classes"] and len(kit["classes"]) == 10
    assert kit["y"].shape[1] == 10 and prepared["model"](*[x[:2].float() for x in prepared["inputs"]]).shape == (2, 10)
    _, later, _ = flower_app.client_kit(context)
    assert later["model"](*[x[:2].float() for x in later["inputs"]]).shape == (2, 10)
