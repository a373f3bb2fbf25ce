"""ot.sinkhorn with each iteration fused into a few kernels (torch.compile): the same log-domain
updates, the same stopping rule, the same plan up to float rounding (float64 to 1e-12, float32 to
1e-6 of the plan's scale; tests/test_speed.py).

Eagerly, one iteration is a dozen operators, each a pass over the (..., K, N) costs that writes a
temporary of their size (g - C, its max, exp, sum, log, ...). Compiled, each logsumexp and the
subtraction and `where` around it become one loop over the costs, which on the CPU runs several
times faster (benchmarks/ot_bench.py prints both side by side) and on a GPU launches a few kernels
per iteration instead of a dozen. The first call at a new shape or dtype compiles (inductor: a C++
compiler on the CPU; about 20-30 s of one core, cached on disk for later processes).

    from speed.fused_sinkhorn import sinkhorn      # the signature of ot.sinkhorn
"""
import math

import torch

import ot


def iteration(f, g, Ct, log_a, log_b, rows_kept, columns_kept, scale: float):
    """One f and one g update of ot.sinkhorn (potentials divided by eps; Ct = C^T / eps (..., K, N))."""
    f = torch.where(rows_kept, log_a - scale * torch.logsumexp(g.unsqueeze(-1) - Ct, dim=-2), float("-inf"))
    g = torch.where(columns_kept, log_b - torch.logsumexp(f.unsqueeze(-2) - Ct, dim=-1), float("-inf"))
    return f, g


fused_iteration = torch.compile(iteration, dynamic=False, fullgraph=True)  # compiled at its first call


@torch.compiler.disable  # inside a compiled step it stays this (already compiled) loop
def sinkhorn(cost, eps, a=None, b=None, n_iters=100, tol=None, check_every=10, rho=math.inf):
    """ot.sinkhorn (same arguments, same result up to rounding), its iterations compiled."""
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if not rho > 0:
        raise ValueError(f"rho must be > 0 (math.inf for the exact row marginal), got {rho}")
    C, a, b = ot._marginals(cost, a, b)  # (..., N, K), (..., N), (..., K)
    tol = (0.0 if C.is_cuda else 1e-6) if tol is None else tol
    exact = math.isinf(rho)
    scale = 1.0 if exact else rho / (rho + eps)
    log_a, log_b, rows_kept, columns_kept = a.log(), b.log(), a > 0, b > 0
    Ct = (C / eps).transpose(-1, -2).contiguous()  # (..., K, N)
    f = torch.zeros(C.shape[:-1], dtype=C.dtype, device=C.device)  # (..., N)
    g = torch.zeros(C.shape[:-2] + C.shape[-1:], dtype=C.dtype, device=C.device)  # (..., K)
    for it in range(1, n_iters + 1):
        previous = f
        f, g = fused_iteration(f, g, Ct, log_a, log_b, rows_kept, columns_kept, scale)
        if tol > 0 and it % check_every == 0:  # ot.sinkhorn's test, read on the host as there
            if exact:
                rows = torch.exp(f.unsqueeze(-2) + g.unsqueeze(-1) - Ct).sum(-2)  # (..., N) = Q 1
                error = (rows - a).abs().sum(-1).max()
            else:
                error = torch.where(rows_kept, f - previous, 0.0).abs().max()
            if error.item() < tol:
                break
    return torch.exp(f.unsqueeze(-1) + g.unsqueeze(-2) - C / eps)  # (..., N, K)
