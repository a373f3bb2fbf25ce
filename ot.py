r"""Batched entropic optimal transport (log-domain Sinkhorn) in PyTorch.

The project's own small ``ot`` module (it shadows the name of POT's package).

For every problem in the batch, :func:`sinkhorn` solves

.. math::
    Q^\star = \arg\min_{Q \ge 0} \ \langle Q, C \rangle_F - \varepsilon H(Q)
    \quad \text{s.t.} \quad Q\mathbf{1}_K = a, \quad Q^\top \mathbf{1}_N = b,

with :math:`H(Q) = -\sum_{nk} Q_{nk}(\log Q_{nk} - 1)`. Since :math:`\sum Q = 1`
on the feasible set, this has the same minimiser as POT's
``ot.sinkhorn(a, b, C, eps, method='sinkhorn_log')``, whose regulariser is
:math:`\Omega(Q) = \sum Q \log Q`.

Algorithm (Sinkhorn iterations on the dual potentials :math:`f, g`):

.. math::
    f_n &\leftarrow \varepsilon \log a_n
          - \varepsilon \log \textstyle\sum_k \exp((g_k - C_{nk})/\varepsilon) \\
    g_k &\leftarrow \varepsilon \log b_k
          - \varepsilon \log \textstyle\sum_n \exp((f_n - C_{nk})/\varepsilon) \\
    Q_{nk} &= \exp((f_n + g_k - C_{nk})/\varepsilon)

Everything stays in the log domain (``logsumexp``), so no ``exp(-C/eps)``
underflows, even for ``eps = 1e-3``. ``C_nk = inf`` (a masked pair) gives
``Q_nk = 0``; ``a_n = 0`` (or ``b_k = 0``) gives ``f_n = -inf`` and a zero row
(column); ``torch.where`` keeps such potentials at ``-inf`` instead of NaN.

Parameters
----------
cost : Tensor (..., N, K), any number of leading batch dims.
eps : float > 0, entropic regularisation.
a, b : Tensor (..., N) / (..., K), optional; default uniform 1/N, 1/K.
    They may omit the batch dims (they broadcast against ``cost``).
n_iters : int, maximal number of iterations (one = an f and a g update).
tol : float, stop once max over problems of ``||Q 1 - a||_1 < tol``
    (the column marginal is exact after each g update). ``tol <= 0``: run
    exactly ``n_iters`` iterations. Default: 1e-6 on the CPU; on CUDA none (the
    full ``n_iters``), as the test would stop the GPU to wait for the host.
check_every : int, test the error only every ``check_every`` iterations, so
    that on CUDA the host synchronises (``.item()``) rarely.
rho : float, optional. Semi-relaxed transport: the row marginal becomes a
    penalty :math:`\rho\,\mathrm{KL}(Q\mathbf{1} \,|\, a)` instead of a constraint
    (the columns stay exact), with the entropic term taken relative to
    :math:`ab^\top` (POT's ``sinkhorn_unbalanced``, ``reg_type='kl'``). The f
    update is scaled, :math:`f_n \leftarrow \varepsilon \log a_n - \lambda
    \varepsilon \log \sum_k \exp((g_k - C_{nk})/\varepsilon)`,
    :math:`\lambda = \rho / (\rho + \varepsilon)`. ``inf`` (default): the
    exact row marginal (:math:`\lambda = 1`, the limit rho -> inf). Small rho
    lets rows carry little mass: a column's mass goes where its cost is low
    (rho -> 0: a softmax over rows per column).

Dtypes: float32 / float64 are computed in their own dtype; float16 /
bfloat16 (or integer) costs are computed in float32 and the plan is returned
in float32 (half precision is too coarse for ``logsumexp(. / eps)``).

Gradients: :func:`sinkhorn` is plain torch code, so when ``cost`` requires
grad, autograd differentiates through the unrolled iterations. The model
(``fedmpt.py``) instead calls it on a *detached* cost and back-propagates only
through the transport score :math:`\langle Q, S \rangle` with :math:`Q` fixed:
by the envelope (Danskin) theorem the gradient of the regularised OT value
w.r.t. the cost at the optimum is the plan itself, :math:`\partial
\mathrm{OT}_\varepsilon / \partial C = Q^\star`; and unrolling 100
iterations over 1,280 problems would store every iterate for backward.

References
----------
M. Cuturi. Sinkhorn distances: lightspeed computation of optimal transport.
NeurIPS 2013.
G. Peyré, M. Cuturi. Computational optimal transport. Foundations and Trends
in Machine Learning 11(5-6), 2019 (Sec. 4.4, log-domain stabilisation).
"""
import math

import torch

__all__ = ["sinkhorn", "uniform_plan"]


def _marginals(cost, a, b):
    """Validate shapes; return (work cost, a, b) in the working dtype."""
    if cost.dim() < 2:
        raise ValueError(f"cost must have shape (..., N, K), got {tuple(cost.shape)}")
    dtype = cost.dtype if cost.dtype in (torch.float32, torch.float64) else torch.float32
    C = cost.to(dtype)
    *batch, N, K = C.shape
    kw = dict(dtype=dtype, device=C.device)
    a = torch.full((N,), 1.0 / N, **kw) if a is None else torch.as_tensor(a, **kw)
    b = torch.full((K,), 1.0 / K, **kw) if b is None else torch.as_tensor(b, **kw)
    try:
        ok = (a.dim() >= 1 and b.dim() >= 1 and a.shape[-1] == N and b.shape[-1] == K
              and torch.broadcast_shapes(a.shape, (*batch, N)) == (*batch, N)
              and torch.broadcast_shapes(b.shape, (*batch, K)) == (*batch, K))
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"shape mismatch: cost {tuple(cost.shape)} (..., N, K) needs a (..., N) and "
            f"b (..., K), got a {tuple(a.shape)} and b {tuple(b.shape)}")
    return C, a, b


def sinkhorn(cost, eps, a=None, b=None, n_iters=100, tol=None, check_every=10, rho=math.inf):
    """Entropic OT plans Q (..., N, K) for costs (..., N, K); see module docs."""
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    C, a, b = _marginals(cost, a, b)                   # (..., N, K), (..., N), (..., K)
    tol = (0.0 if C.is_cuda else 1e-6) if tol is None else tol
    log_a, log_b = a.log(), b.log()                    # -inf where the mass is 0
    # f and g below hold the potentials divided by eps; the cost is stored as C^T/eps,
    # (..., K, N), so that the long axis N is contiguous (faster logsumexp on CPU).
    Ct = (C / eps).transpose(-1, -2).contiguous()                             # (..., K, N)
    f = torch.zeros(C.shape[:-1], dtype=C.dtype, device=C.device)             # (..., N)
    g = torch.zeros(C.shape[:-2] + C.shape[-1:], dtype=C.dtype, device=C.device)  # (..., K)
    neg_inf = torch.tensor(float("-inf"), dtype=C.dtype, device=C.device)
    if not rho > 0:
        raise ValueError(f"rho must be > 0 (math.inf for the exact row marginal), got {rho}")
    exact, rows_kept, columns_kept = math.isinf(rho), a > 0, b > 0  # the kept: where potentials are finite
    scale = 1.0 if exact else rho / (rho + eps)  # lambda: 1 = the exact row marginal

    for it in range(1, n_iters + 1):
        # f_n = eps log a_n - eps logsumexp_k((g_k - C_nk)/eps)
        previous = f
        f = torch.where(rows_kept, log_a - scale * torch.logsumexp(g.unsqueeze(-1) - Ct, dim=-2), neg_inf)
        # g_k = eps log b_k - eps logsumexp_n((f_n - C_nk)/eps)
        g = torch.where(columns_kept, log_b - torch.logsumexp(f.unsqueeze(-2) - Ct, dim=-1), neg_inf)
        if tol > 0 and it % check_every == 0:
            if exact:
                rows = torch.exp(f.unsqueeze(-2) + g.unsqueeze(-1) - Ct).sum(-2)  # (..., N) = Q 1
                err = (rows - a).abs().sum(-1).max()    # worst row-marginal L1 error
            else:  # no row marginal to reach: stop when the potentials settle
                err = torch.where(rows_kept, f - previous, 0.0).abs().max()
            if err.item() < tol:                        # the only host sync
                break
    # Q_nk = exp((f_n + g_k - C_nk)/eps)
    return torch.exp(f.unsqueeze(-1) + g.unsqueeze(-2) - C / eps)             # (..., N, K)


def uniform_plan(cost, a=None, b=None):
    """Independent coupling Q_nk = a_n b_k (ablation: no transport), shape of cost."""
    C, a, b = _marginals(cost, a, b)
    return (a.unsqueeze(-1) * b.unsqueeze(-2)).expand(C.shape).contiguous()  # (..., N, K)
