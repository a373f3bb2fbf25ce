"""Client-level DP (privacy.py, --dp-noise --dp-clip): the mechanism (clipping over all tensors,
equal weights, noise of std z*S/m, seeded), the accounting against dp-accounting's own RDP
accountant, the options' rules, the budget refusal, and whole DP runs (slow): epsilon every
round, a run that reproduces itself."""
import json
import math

import numpy as np
import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant

import federate
import privacy
from errors import FedMPTError
from options import Config, ModelConfig, validate


def random_state(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {"prompts.context": scale * torch.randn(4, 3, generator=g), "gate.bias": scale * torch.randn(5, generator=g)}


def norm(state):
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in state.values()))


def test_clip_update_bounds_the_norm_over_every_tensor_together():
    reference, state = random_state(0), random_state(1, scale=3.0)
    delta = {k: state[k].double() - reference[k].double() for k in reference}
    clipped, before = privacy.clip_update(state, reference, 0.5)
    assert before == pytest.approx(norm(delta), rel=1e-12) and before > 0.5
    assert norm(clipped) == pytest.approx(0.5, rel=1e-12)  # the whole update, not each tensor
    for key in reference:  # the direction kept: a common factor on every tensor
        assert torch.allclose(clipped[key], delta[key] * (0.5 / before), rtol=0, atol=1e-15)
    unclipped, _ = privacy.clip_update(state, reference, 2 * before)  # inside the ball: unchanged
    assert all(torch.equal(unclipped[k], delta[k]) for k in reference)


def test_the_private_mean_weighs_clients_equally_whatever_their_sizes():
    reference = random_state(0)
    states = [random_state(1, 0.1), random_state(2, 5.0), random_state(3, 0.3)]
    cfg = Config(clients=3, dp_noise=0.0, dp_clip=1.0)
    updates = [(c, s, n, {"loss": 1.0, "steps": 1, "clip_share": 0.0, "grad_norm": 1.0}, "")
               for c, (s, n) in enumerate(zip(states, [1, 1000, 10]))]
    combine = privacy.round_aggregator(cfg, 1, reference)
    result, _, n_aggregated, _ = federate.accept_and_aggregate(1, updates, reference, "mean", print, combine)
    assert n_aggregated == 3
    for key in reference:  # by hand: theta + (1/3) sum_i delta_i min(1, S/||delta_i||)
        expected = reference[key].double() + sum(
            (s[key].double() - reference[key].double()) * min(1.0, 1.0 / norm({k: s[k].double() - reference[k].double()
                                                                                for k in s})) for s in states) / 3
        assert result[key].dtype == torch.float32
        assert torch.allclose(result[key].double(), expected, rtol=0, atol=1e-6)


def test_the_noise_has_std_z_times_s_over_m_and_mean_zero():
    reference = {"a": torch.zeros(300_000), "b": torch.zeros(100, 1000)}  # 400,000 draws
    states = [dict(reference) for _ in range(4)]  # no update: the result is the noise alone
    result = privacy.private_mean(states, reference, clip=2.0, noise=1.5, seed=7)
    noise = torch.cat([result["a"], result["b"].flatten()]).double()
    expected = 1.5 * 2.0 / 4
    assert noise.std().item() == pytest.approx(expected, rel=0.01)  # standard error ~0.1%
    assert abs(noise.mean().item()) < 5 * expected / math.sqrt(len(noise))


def test_the_noise_is_seeded_by_seed_and_round():
    reference = random_state(0)
    draw = lambda seed, round_index: privacy.private_mean(  # noqa: E731
        [random_state(1)], reference, 1.0, 1.0, privacy.noise_seed(seed, round_index))
    first, again = draw(0, 3), draw(0, 3)
    assert all(torch.equal(first[k], again[k]) for k in reference)
    assert not torch.equal(first["gate.bias"], draw(0, 4)["gate.bias"])
    assert not torch.equal(first["gate.bias"], draw(1, 3)["gate.bias"])


def test_the_noise_equals_flowers_own_draw_when_seeded_alike():
    flower_dp = pytest.importorskip("flwr.supercore.differential_privacy")
    reference = random_state(0)
    arrays = [t.numpy().copy() for t in reference.values()]
    np.random.seed(privacy.noise_seed(2, 5))
    flower_dp.add_gaussian_noise_inplace(arrays, 0.3)  # what DifferentialPrivacyServerSideFixedClipping adds
    ours = privacy.gaussian_noise(reference, 0.3, privacy.noise_seed(2, 5))
    for (key, tensor), array in zip(reference.items(), arrays):
        assert np.allclose(array - tensor.numpy(), ours[key].numpy(), rtol=0, atol=1e-6)


SAMPLED = pytest.mark.slow  # q < 1: the accountant takes seconds (its fractional orders converge slowly)


@pytest.mark.parametrize("noise, clients, fraction, rounds", [(1.0, 4, 1.0, 5), pytest.param(0.8, 100, 0.1, 7, marks=SAMPLED),
                                                              pytest.param(2.5, 10, 0.3, 3, marks=SAMPLED)])
def test_epsilon_equals_dp_accountings_rdp_accountant_round_by_round(noise, clients, fraction, rounds):
    cfg = Config(clients=clients, client_fraction=fraction, rounds=rounds, dp_noise=noise, dp_clip=1.0, dp_delta=1e-5)
    q = max(1, round(fraction * clients)) / clients  # federate.sample_clients' count over the clients
    accountant = rdp_privacy_accountant.RdpAccountant()
    for round_index in range(1, rounds + 1):  # composed one round at a time, independently of privacy.py
        accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(noise)))
        assert privacy.epsilon_spent(cfg, round_index) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)


def test_epsilon_without_sampling_lies_below_the_classic_gaussian_rdp_bound():
    # q = 1: the Gaussian mechanism's RDP is r * alpha / (2 z^2); RDP -> (epsilon, delta) by
    # epsilon <= min over alpha of RDP + log(1/delta) / (alpha - 1) (Mironov 2017); the accountant's
    # conversion is tighter, never looser
    z, r, delta = 2.0, 10, 1e-5
    classic = min(r * a / (2 * z ** 2) + math.log(1 / delta) / (a - 1) for a in np.linspace(1.01, 200, 20000))
    epsilon = privacy.epsilon_after(z, 1.0, r, delta)
    assert 0.7 * classic < epsilon <= classic


@SAMPLED
def test_the_rounds_that_fit_and_the_noise_for_an_epsilon_invert_the_accountant():
    q, delta = 0.1, 1e-5
    fit = privacy.rounds_within(1.0, q, delta, 3.0, 500)
    assert 0 < fit < 500
    assert privacy.epsilon_after(1.0, q, fit, delta) <= 3.0 < privacy.epsilon_after(1.0, q, fit + 1, delta)
    z = privacy.noise_for_epsilon(4.0, q, 10, delta)
    assert privacy.epsilon_after(z, q, 10, delta) == pytest.approx(4.0, rel=1e-3)


def test_the_sampling_rate_counts_the_clients_sample_clients_draws():
    for clients, fraction in [(4, 1.0), (100, 0.1), (7, 0.3), (3, 0.01)]:
        cfg = Config(clients=clients, client_fraction=fraction)
        drawn = len(federate.sample_clients(np.random.default_rng(0), cfg))
        assert privacy.sampling_rate(cfg) == drawn / clients


@pytest.mark.parametrize("options, says", [
    ({"dp_noise": 1.0}, "--dp-noise and --dp-clip: client-level DP needs both"),
    ({"dp_clip": 1.0}, "--dp-noise and --dp-clip: client-level DP needs both"),
    ({"dp_noise": -0.5, "dp_clip": 1.0}, "--dp-noise -0.5: must be 0 or more"),
    ({"dp_noise": 1.0, "dp_clip": -1.0}, "--dp-clip -1.0: must lie in [0, inf)"),
    ({"dp_noise": 1.0, "dp_clip": 1.0, "aggregate": "median"}, "--aggregate median: client-level DP"),
    ({"dp_noise": 1.0, "dp_clip": 1.0, "dp_delta": 0.3}, "--dp-delta 0.3: must lie below 1/--clients (0.25)"),
    ({"dp_noise": 1.0, "dp_clip": 1.0, "dp_delta": 0.0}, "--dp-delta 0.0: must lie in (0, 1)"),
    ({"dp_max_epsilon": 3.0}, "--dp-max-epsilon: a budget for client-level DP"),
    ({"dp_noise": 1.0, "dp_clip": 1.0, "dp_max_epsilon": 5.0}, "10 rounds at --dp-noise 1 (sampling rate 1, delta "
                                                                "1e-05) spend epsilon 19.1; 1 rounds fit (give --rounds 1")])
def test_bad_dp_options_are_refused_naming_the_option(options, says):
    with pytest.raises(FedMPTError) as refused:
        validate(Config(**options), ModelConfig())
    assert says in str(refused.value)


def test_a_budget_the_planned_rounds_keep_is_accepted():
    validate(Config(dp_noise=1.0, dp_clip=1.0, dp_max_epsilon=20.0), ModelConfig())  # 10 rounds spend 19.05
    validate(Config(dp_noise=0.0, dp_clip=1.0), ModelConfig())  # clipping alone: a check, no budget asked


def test_too_small_a_budget_exits_2_before_anything_is_written(tmp_path, capsys):
    code = federate.main(["--dp-noise", "1", "--dp-clip", "1", "--dp-max-epsilon", "10", "--rounds", "8",
                          "--out", str(tmp_path / "run")])
    assert code == 2 and not (tmp_path / "run").exists()
    fit = privacy.rounds_within(1.0, 1.0, 1e-5, 10.0, 8)
    assert f"; {fit} rounds fit (give --rounds {fit}" in capsys.readouterr().err
    assert fit == 3  # dp-accounting: epsilon 9.01 after 3 rounds, 10.73 after 4


@pytest.mark.slow
def test_a_dp_run_writes_the_accountants_epsilon_every_round_and_reproduces_itself(shapes_root, tmp_path):
    options = ["--root", str(shapes_root), "--rounds", "5", "--dp-noise", "1", "--dp-clip", "1", "--batch-size", "128"]
    histories = []
    for name in ("a", "b"):
        assert federate.main([*options, "--out", str(tmp_path / name)]) == 0
        histories.append(json.loads((tmp_path / name / "metrics.json").read_text()))
    accountant = rdp_privacy_accountant.RdpAccountant()
    for row in histories[0][1:]:  # 4 clients, all every round: q = 1
        accountant.compose(dp_event.PoissonSampledDpEvent(1.0, dp_event.GaussianDpEvent(1.0)))
        assert row["dp_epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert "dp_epsilon" not in histories[0][0]  # round 0 releases nothing
    strip = lambda h: [{k: v for k, v in row.items() if k != "seconds"} for row in h]  # noqa: E731
    assert strip(histories[0]) == strip(histories[1])
    a, b = (torch.load(tmp_path / name / "state.pt", weights_only=True) for name in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_the_plain_loop_without_dp_loads_neither_privacy_nor_dp_accounting():
    import subprocess
    import sys
    from pathlib import Path
    code = ("import sys, federate\nfederate.parse_config(['--rounds', '1'])\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('privacy', 'dp_accounting')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0 and result.stdout.strip().splitlines()[-1] == "[]", result.stderr[-2000:]


class Memorizer(torch.nn.Module):
    """A stand-in model whose logit for image i is its label (+-4) where `knows[i]`, else 0:
    what a model that memorised exactly the members would score."""

    def __init__(self, targets, knows):
        super().__init__()
        self.logits, self.device = torch.where(knows[:, None], 8.0 * targets - 4.0, torch.zeros_like(targets)), "cpu"

    def text_features(self):
        return None

    def forward(self, index, T=None):
        return self.logits[index.long().flatten()]


def test_the_attack_scores_minus_the_loss_so_memorised_members_rank_first():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.privacy import image_losses
    from sklearn.metrics import roc_auc_score
    targets = (torch.rand(60, 3, generator=torch.Generator().manual_seed(0)) < 0.4).float()
    targets[0, 1] = -1  # an unknown label: left out of the loss
    knows = torch.arange(60) < 40  # images 0-39 memorised (the members), 40-59 not
    losses = image_losses(Memorizer(targets, knows), (torch.arange(60.0)[:, None],), targets, list(range(60)))
    expected = torch.nn.functional.binary_cross_entropy_with_logits(  # the loss by its own formula
        Memorizer(targets, knows).logits.double(), targets.clamp(min=0).double(), reduction="none")
    assert np.allclose(losses, (expected * (targets >= 0)).sum(1).numpy(), rtol=1e-4)  # float32 probabilities
    assert roc_auc_score(knows.numpy(), -losses) == 1.0  # members below every non-member's loss
