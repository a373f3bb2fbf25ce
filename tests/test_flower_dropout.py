"""`--client-dropout` on Flower: the same clients drop out in the same rounds as in the plain loop
(one draw both engines call, availability.dropped_clients), a round where none reports keeps the
global state, and the two engines' results (with `--client-eval`, every client's own mAP too)
agree within their usual parity."""
import json

import pytest
import torch

import availability
import federate
from test_clients import seed_where

pytestmark = pytest.mark.slow  # a whole federation in subprocesses
pytest.importorskip("flwr", reason="flwr is not installed: pip install -r requirements-flower.txt")
from test_flower import TINY, both_engines, flower_run  # noqa: E402,F401 (the fixture)


def test_both_engines_drop_the_same_clients_in_the_same_rounds(shapes_root, tmp_path, flower_run):
    # three rounds of two clients at p = 0.5: one where both drop out, one where one does
    seed = seed_where(lambda d: sorted(map(len, d))[-2:] == [1, 2], 2, 3, 0.5)
    options = ["--root", str(shapes_root), "--clients", "2", "--rounds", "3", "--seed", str(seed),
               "--client-dropout", "0.5", "--client-eval", *TINY]
    flower, plain = both_engines(flower_run, tmp_path, options)
    history = flower.history()
    expected = [availability.dropped_clients(seed, r, [0, 1], 2, 0.5) for r in (1, 2, 3)]
    assert [row["clients_dropped"] for row in history[1:]] == [row["clients_dropped"] for row in plain[1:]] == expected
    assert [row["none_reported"] for row in history[1:]] == [len(d) == 2 for d in expected]
    assert [row["clients_aggregated"] for row in history[1:]] == [2 - len(d) for d in expected]
    kept = expected.index([0, 1]) + 1  # the round where none reported: the state of the round before
    assert history[kept]["mAP"] == history[kept - 1]["mAP"]
    assert [list(row) for row in history] == [list(row) for row in plain]  # the same keys, in order
    a = torch.load(tmp_path / "flower" / "state.pt", weights_only=True)
    b = torch.load(tmp_path / "plain" / "state.pt", weights_only=True)
    assert max(float((a[k] - b[k]).abs().max()) for k in b) <= 1e-5
    assert max(abs(x["mAP"] - y["mAP"]) for x, y in zip(history, plain)) <= 1e-3
    assert max(abs(f - p) for x, y in zip(history, plain) for f, p in zip(x["client_mAP"], y["client_mAP"])) <= 1e-3
    assert history[-1]["client_test_images"] == plain[-1]["client_test_images"]  # the server assigns them alike
    assert "dropped out (--client-dropout 0.5); none reported" in flower.output()
    flower.assert_no_process_left()
