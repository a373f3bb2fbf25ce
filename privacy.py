"""Client-level differential privacy for the FedAvg loop (DP-FedAvg, McMahan et al., ICLR 2018:
"Learning Differentially Private Recurrent Language Models"), on with --dp-noise z --dp-clip S.

Round r, global tunable state theta, the m aggregated clients' states theta_i:

    delta_i   = theta_i - theta                          every tunable tensor, as one vector
    clipped_i = delta_i * min(1, S / ||delta_i||_2)       so one client moves the sum by at most S
    theta'    = theta + (1/m) sum_i clipped_i + N(0, (z S / m)^2 I)

Equal weights, not FedAvg's sample counts: a client's share of the mean must not depend on how
many images it holds, or the sensitivity S / m would not hold. The noise is drawn from a
generator seeded by (--seed, round), so a DP run reproduces itself exactly (and on --resume); it
is numpy's legacy normal generator, the one Flower's DP wrapper draws from (np.random.normal):
flower_app.py seeds that one alike, and both engines add the same noise (docs/flower.md).

Accounting (Google's dp-accounting, the library Flower's own accountant wraps): each round is a
Gaussian mechanism of noise multiplier z on a Poisson sample of the clients at rate
q = clients per round / clients, composed over the rounds with the Renyi-DP accountant
(add-or-remove-one-client neighbours) and turned into epsilon at --dp-delta. The loop samples a
fixed number of clients without replacement (federate.sample_clients), not Poisson: the
amplification by sampling is that of Poisson sampling at the same rate, the usual approximation
(TensorFlow Federated's and Flower's earlier accountants make it too); with --client-fraction 1
every client takes part (q = 1) and the bound is exact.

Only federate.py and flower_app.py call this module, and only with DP on.
"""
import logging

import numpy as np
import torch
from dp_accounting import calibrate_dp_mechanism, dp_event
from dp_accounting.mechanism_calibration import LowerEndpointAndGuess
from dp_accounting.rdp import rdp_privacy_accountant

# dp-accounting logs a warning per fractional Renyi order it cannot evaluate at small q and drops
# that order from the minimum (the result stays a valid bound); the run's own lines say enough.
logging.getLogger("absl").setLevel(logging.ERROR)

NOISE_STREAM = 0xD1FF  # the noise's seed stream, apart from every other seeded draw of a run


# ---- The mechanism ------------------------------------------------------------------------
def clip_update(state: dict, reference: dict, clip: float) -> tuple:
    """(delta clipped to L2 norm `clip` over all tensors together, float64; its norm before)."""
    delta = {key: state[key].double() - reference[key].double() for key in reference}
    norm = float(torch.sqrt(sum((d ** 2).sum() for d in delta.values())))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {key: d * scale for key, d in delta.items()}, norm


def gaussian_noise(reference: dict, std: float, seed: int) -> dict:
    """N(0, std^2) per entry of every tensor, in the reference's key order, float32, from numpy's
    legacy generator seeded with `seed` (the draw of Flower's add_gaussian_noise_inplace)."""
    draw = np.random.RandomState(seed)
    return {key: torch.from_numpy(draw.normal(0, std, tuple(t.shape)).astype(np.float32)).to(t.device)
            for key, t in reference.items()}


def private_mean(states: list, reference: dict, clip: float, noise: float, seed: int) -> dict:
    """theta' = theta + mean of the clipped deltas + N(0, (noise * clip / m)^2): DP-FedAvg's step."""
    m = len(states)
    clipped = [clip_update(state, reference, clip)[0] for state in states]
    added = gaussian_noise(reference, noise * clip / m, seed)
    return {key: (reference[key].double() + sum(c[key] for c in clipped) / m + added[key].double()).to(t.dtype)
            for key, t in reference.items()}


def equal_mean(states: list, sizes=None) -> dict:
    """The mean with equal weights (Flower: its DP wrapper clips before and adds noise after)."""
    return {key: sum(state[key] for state in states) / len(states) for key in states[0]}


def noise_seed(seed: int, round_index: int) -> int:
    """The seed of a round's noise (< 2^32, what np.random.seed takes), apart from other streams."""
    return int(np.random.SeedSequence([NOISE_STREAM, seed, round_index]).generate_state(1)[0])


def round_aggregator(cfg, round_index: int, reference: dict):
    """The plain loop's aggregation of a DP round: (states, sizes) -> private_mean (sizes unused)."""
    return lambda states, sizes: private_mean(states, reference, cfg.dp_clip, cfg.dp_noise,
                                              noise_seed(cfg.seed, round_index))


# ---- The accounting -----------------------------------------------------------------------
def clients_per_round(cfg) -> int:
    """How many clients a round samples (federate.sample_clients' number)."""
    return max(1, round(cfg.client_fraction * cfg.clients))


def sampling_rate(cfg) -> float:
    """q: the share of the clients a round samples."""
    return clients_per_round(cfg) / cfg.clients


def round_event(noise: float, q: float):
    """One round as dp-accounting sees it: a Gaussian mechanism on a Poisson sample at rate q."""
    return dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(noise))


def epsilon_after(noise: float, q: float, rounds: int, delta: float) -> float:
    """Epsilon at `delta` after `rounds` rounds (inf without noise), by the RDP accountant."""
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(round_event(noise, q), rounds)
    return float(accountant.get_epsilon(delta))


def epsilon_spent(cfg, round_index: int):
    """metrics.json's dp_epsilon after a round: a number, or None when --dp-noise 0 (no bound)."""
    epsilon = epsilon_after(cfg.dp_noise, sampling_rate(cfg), round_index, cfg.dp_delta)
    return epsilon if np.isfinite(epsilon) else None


def rounds_within(noise: float, q: float, delta: float, max_epsilon: float, rounds: int) -> int:
    """The most rounds (0 to `rounds`) whose epsilon stays within max_epsilon (it grows with rounds)."""
    low, high = 0, rounds
    while low < high:
        middle = (low + high + 1) // 2
        if epsilon_after(noise, q, middle, delta) <= max_epsilon:
            low = middle
        else:
            high = middle - 1
    return low


def budget_problem(cfg) -> str:
    """Why --rounds would spend more than --dp-max-epsilon ('' if it would not), with the rounds that fit."""
    q = sampling_rate(cfg)
    planned = epsilon_after(cfg.dp_noise, q, cfg.rounds, cfg.dp_delta)
    if planned <= cfg.dp_max_epsilon:
        return ""
    fit = rounds_within(cfg.dp_noise, q, cfg.dp_delta, cfg.dp_max_epsilon, cfg.rounds)
    return (f"--dp-max-epsilon {cfg.dp_max_epsilon:g}: {cfg.rounds} rounds at --dp-noise {cfg.dp_noise:g} "
            f"(sampling rate {q:g}, delta {cfg.dp_delta:g}) spend epsilon {planned:.3g}; {fit} rounds fit "
            f"(give --rounds {fit}, or more noise)")


def noise_for_epsilon(epsilon: float, q: float, rounds: int, delta: float) -> float:
    """The noise multiplier z whose `rounds` rounds at rate q spend `epsilon` at `delta` (the
    accountant inverted by dp-accounting's calibration: the smallest z within its tolerance)."""
    def every_round(noise):
        return dp_event.SelfComposedDpEvent(round_event(noise, q), rounds)
    return float(calibrate_dp_mechanism(rdp_privacy_accountant.RdpAccountant, every_round, epsilon, delta,
                                        LowerEndpointAndGuess(0.0, 1.0)))
