"""Client-level DP on Flower (`python flower_app.py --dp-noise z --dp-clip S`): Flower's own
DifferentialPrivacyServerSideFixedClipping around the strategy gives the plain loop's run, with
the plain loop's epsilon each round; without noise within today's Flower-vs-plain parity, and
with noise too (the wrapper's np.random.normal is seeded as privacy.gaussian_noise draws)."""
import pytest
import torch

pytestmark = pytest.mark.slow  # whole federations in subprocesses

flwr = pytest.importorskip("flwr", reason="flwr is not installed: pip install -r requirements-flower.txt")
import federate  # noqa: E402
from test_flower import ONE_THREAD, TINY, both_engines, flower_run  # noqa: E402,F401 (flower_run: the fixture)


@pytest.mark.parametrize("noise, clip", [("0", "1"), ("1", "0.5")])
def test_flowers_dp_wrapper_equals_the_plain_loops_dp(shapes_root, tmp_path, flower_run, noise, clip):  # noqa: F811
    options = ["--root", str(shapes_root), "--clients", "2", "--rounds", "2", "--seed", "3", *TINY,
               "--dp-noise", noise, "--dp-clip", clip]
    flower, plain = both_engines(flower_run, tmp_path, options)
    flower_log = (tmp_path / "flower" / "flower" / "flwr-run.log").read_text()  # every line of flwr run, INFO too
    assert "central DP noise with" in flower_log and "parameters are clipped by value" in flower_log  # the wrapper's
    a = torch.load(tmp_path / "flower" / "state.pt", weights_only=True)
    b = torch.load(tmp_path / "plain" / "state.pt", weights_only=True)
    scale = max(1.0, max(float(b[k].abs().max()) for k in b))  # with noise the values grow: compare relatively
    largest = max(float((a[k] - b[k]).abs().max()) for k in b) / scale
    history = flower.history()
    metric_gap = max(abs(x[k] - y[k]) for x, y in zip(history, plain) for k in ("mAP", "CF1", "OF1"))
    print(f"largest difference flower - plain with --dp-noise {noise}: state {largest:.2e} (relative), "
          f"metrics {metric_gap:.2e}")
    assert largest <= 1e-5 and metric_gap <= 1e-3  # test_flower's parity
    assert [list(row) for row in history] == [list(row) for row in plain]  # dp_epsilon in both
    assert [row.get("dp_epsilon") for row in history] == [row.get("dp_epsilon") for row in plain]
    assert (history[-1]["dp_epsilon"] is None) == (noise == "0")
