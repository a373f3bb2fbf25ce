"""How the server combines the client states of a round (`--aggregate`), tensor by tensor:

    mean          theta = sum_i n_i theta_i / sum_i n_i          (FedAvg, weighted by samples)
    median        theta = coordinate-wise median of the theta_i   (unweighted)
    trimmed-mean  theta = coordinate-wise mean after dropping the k largest and k smallest
                  values, k = floor(trim * n) (at least 1 once n >= 3)   (unweighted)

The robust rules bound what one poisoned client can do to the global model; with honest
clients they cost some accuracy on non-IID data because they ignore client sizes.
"""
import torch


def aggregate_weighted(states, weights):
    """FedAvg: theta = sum_i w_i theta_i / sum_i w_i, tensor by tensor."""
    total = float(sum(weights))
    return {key: sum(state[key] * (w / total) for state, w in zip(states, weights)) for key in states[0]}


def aggregate_median(states, weights=None):
    """Coordinate-wise median (for an even count, the mean of the two middle values)."""
    return {key: torch.stack([s[key] for s in states]).quantile(0.5, dim=0) for key in states[0]}


def aggregate_trimmed_mean(states, weights=None, trim=0.2):
    """Coordinate-wise mean of the values left after cutting k from each end."""
    n = len(states)
    k = min(max(int(trim * n), 1 if n >= 3 else 0), (n - 1) // 2)
    result = {}
    for key in states[0]:
        values = torch.stack([s[key] for s in states]).sort(dim=0).values  # (n, ...)
        result[key] = values[k:n - k].mean(dim=0)
    return result


# the --aggregate rules by name: the option's choices are these keys
AGGREGATORS = {"mean": aggregate_weighted, "median": aggregate_median, "trimmed-mean": aggregate_trimmed_mean}
