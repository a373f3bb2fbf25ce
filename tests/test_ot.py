"""Tests of the project's batched log-domain Sinkhorn (``ot.py`` at the repo root)."""
import importlib.util
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_project_ot():
    """The repo's ``ot.py``, whatever ``sys.modules['ot']`` holds right now.

    POT's package is also called ``ot``. If it was imported first (or the repo
    root is not on sys.path), ``import ot`` would give POT, so load the file by
    path. Nothing global is changed: sys.path and sys.modules stay as they are.
    """
    path = ROOT / "ot.py"
    mod = sys.modules.get("ot")
    if mod is not None and pathlib.Path(getattr(mod, "__file__", None) or ".").resolve() == path:
        return mod
    spec = importlib.util.spec_from_file_location("_project_ot_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


pot_free = _load_project_ot()
sinkhorn, uniform_plan = pot_free.sinkhorn, pot_free.uniform_plan

# POT references are computed in a child process. This is the most robust way
# to get POT while the project shadows its name: the child drops every
# sys.path entry that resolves to the repo root ('', '.', PYTHONPATH included)
# before `import ot`, and this process's sys.path / sys.modules are never
# touched, so the test order (project `ot` or POT imported first) is irrelevant.
_POT_CHILD = r"""
import pathlib, sys
root = pathlib.Path(sys.argv[1]).resolve()
sys.path = [p for p in sys.path if pathlib.Path(p or ".").resolve() != root]
import numpy as np, ot
assert hasattr(ot, "bregman"), f"not POT: {ot.__file__}"
d = np.load(sys.argv[2])
plans = {f"P{i}": ot.sinkhorn(d[f"a{i}"], d[f"b{i}"], d[f"C{i}"], float(d[f"eps{i}"]),
                              method="sinkhorn_log", numItermax=100000, stopThr=1e-13)
         for i in range(int(d["n"]))}
np.savez(sys.argv[3], **plans)
"""


def pot_sinkhorn_log(problems, tmp_dir):
    """POT plans for a list of (C (N, K), a (N,), b (K,), eps) float64 numpy problems."""
    arrays = {"n": len(problems)}
    for i, (C, a, b, eps) in enumerate(problems):
        arrays.update({f"C{i}": C, f"a{i}": a, f"b{i}": b, f"eps{i}": eps})
    inp, out = tmp_dir / "problems.npz", tmp_dir / "plans.npz"
    np.savez(inp, **arrays)
    subprocess.run([sys.executable, "-c", _POT_CHILD, str(ROOT), str(inp), str(out)],
                   cwd=tmp_dir, check=True, capture_output=True, text=True)
    with np.load(out) as d:
        return [d[f"P{i}"] for i in range(len(problems))]


# ---------------------------------------------------------------- POT agreement
EPS = [0.01, 0.05, 0.1, 1.0]
SHAPES = [(7, 3), (13, 5)]
BATCHES = [(), (2,), (2, 3)]
CASES = [(eps, nk, batch, uniform) for eps in EPS for nk in SHAPES
         for batch in BATCHES for uniform in (True, False)]


def _case(eps, nk, batch, uniform):
    """Random float64 problem; non-uniform a has the batch dims, b broadcasts (K,)."""
    (N, K), gen = nk, torch.Generator().manual_seed(CASES.index((eps, nk, batch, uniform)))
    C = torch.rand(*batch, N, K, generator=gen, dtype=torch.float64)
    if uniform:
        return C, None, None
    a = torch.rand(*batch, N, generator=gen, dtype=torch.float64) + 0.1
    b = torch.rand(K, generator=gen, dtype=torch.float64) + 0.1
    return C, a / a.sum(-1, keepdim=True), b / b.sum()


@pytest.fixture(scope="module")
def pot_plans(tmp_path_factory):
    """All POT reference plans, one per batch element of every case, in one child."""
    problems, index = [], {}
    for case in CASES:
        C, a, b = _case(*case)
        N, K = C.shape[-2:]
        a = torch.full(C.shape[:-1], 1 / N, dtype=C.dtype) if a is None else a.expand(C.shape[:-1])
        b = (torch.full(C.shape[:-2] + (K,), 1 / K, dtype=C.dtype) if b is None
             else b.expand(C.shape[:-2] + (K,)))
        C, a, b = C.reshape(-1, N, K), a.reshape(-1, N), b.reshape(-1, K)
        index[case] = range(len(problems), len(problems) + len(C))
        problems += [(C[i].numpy(), a[i].numpy(), b[i].numpy(), case[0]) for i in range(len(C))]
    plans = pot_sinkhorn_log(problems, tmp_path_factory.mktemp("pot"))
    return {case: np.stack([plans[i] for i in idx]) for case, idx in index.items()}


def _case_id(case):
    eps, (N, K), batch, uniform = case
    return f"eps{eps}-N{N}K{K}-batch{len(batch)}-{'uniform' if uniform else 'nonuniform'}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_plan_matches_pot_sinkhorn_log(case, pot_plans):
    C, a, b = _case(*case)
    Q = sinkhorn(C, case[0], a, b, n_iters=20000, tol=1e-12)
    assert Q.shape == C.shape and Q.dtype == torch.float64
    ref = pot_plans[case].reshape(C.shape)          # element-wise POT reference
    assert np.abs(Q.numpy() - ref).max() < 1e-6


# ---------------------------------------------------------------- properties
def _rand(*shape, dtype=torch.float64, seed=0, scale=1.0):
    return scale * torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_marginals_hold_to_tol():
    C = _rand(4, 3, 11, 5)
    a = _rand(3, 11, seed=1) + 0.1
    a = a / a.sum(-1, keepdim=True)                 # (3, 11) broadcasts over the 4
    Q = sinkhorn(C, 0.05, a, None, n_iters=5000, tol=1e-9)
    assert (Q.sum(-1) - a).abs().sum(-1).max() < 1e-9
    assert torch.allclose(Q.sum(-2), torch.full((4, 3, 5), 0.2, dtype=torch.float64), atol=1e-12)


def test_invariant_to_adding_a_constant_to_the_cost():
    C = _rand(2, 9, 4)
    Q = sinkhorn(C, 0.1, tol=1e-12, n_iters=5000)
    assert torch.allclose(sinkhorn(C + 3.7, 0.1, tol=1e-12, n_iters=5000), Q, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_nan_or_inf_at_eps_1e_3_with_costs_in_0_2(dtype):
    C = _rand(8, 196, 5, dtype=dtype, scale=2.0)
    Q = sinkhorn(C, 1e-3)
    assert Q.dtype == dtype and torch.isfinite(Q).all() and (Q >= 0).all()
    assert torch.allclose(Q.sum(-2), torch.full((8, 5), 0.2, dtype=dtype), atol=1e-4)


def test_inf_cost_entries_give_zero_plan_entries():
    C = _rand(3, 6, 4)
    mask = _rand(3, 6, 4, seed=2) < 0.3
    mask[..., 0] = False                            # every row keeps a finite entry
    Q = sinkhorn(C.masked_fill(mask, float("inf")), 0.1, n_iters=2000, tol=1e-10)
    assert torch.isfinite(Q).all() and (Q[mask] == 0).all()
    assert (Q.sum(-1) - 1 / 6).abs().sum(-1).max() < 1e-10


def test_zero_mass_marginal_entries_give_zero_rows_and_columns_without_nan():
    C = _rand(2, 5, 4)
    C[:, 1, :] = float("inf")                       # a zero-mass row that is also fully masked
    a = torch.tensor([0.25, 0.0, 0.25, 0.25, 0.25], dtype=torch.float64)
    b = torch.tensor([0.5, 0.0, 0.3, 0.2], dtype=torch.float64)
    Q = sinkhorn(C, 0.05, a, b, n_iters=2000, tol=1e-10)
    assert not torch.isnan(Q).any()
    assert (Q[:, 1, :] == 0).all() and (Q[:, :, 1] == 0).all()
    assert torch.allclose(Q.sum(-1), a.expand(2, 5), atol=1e-9)
    assert torch.allclose(Q.sum(-2), b.expand(2, 4), atol=1e-12)


@pytest.mark.parametrize("a_shape,b_shape", [((6,), (3,)), ((7,), (4,)), ((3, 7), (3,)), ((7, 1), (3,))])
def test_shape_mismatch_raises_value_error_naming_the_shapes(a_shape, b_shape):
    C = torch.rand(2, 7, 3)
    with pytest.raises(ValueError) as info:
        sinkhorn(C, 0.1, torch.ones(a_shape), torch.ones(b_shape))
    for shape in [(2, 7, 3), a_shape, b_shape]:
        assert str(shape) in str(info.value)


@pytest.mark.parametrize("eps", [0.0, -0.1])
def test_nonpositive_eps_raises_value_error(eps):
    with pytest.raises(ValueError):
        sinkhorn(torch.rand(4, 3), eps)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_input_returns_float32_plan_close_to_float32_result(half):
    C = _rand(4, 49, 5, dtype=torch.float32).to(half)
    Q = sinkhorn(C, 0.1)
    assert Q.dtype == torch.float32
    assert torch.allclose(Q, sinkhorn(C.float(), 0.1), atol=1e-7)


def test_gradient_by_unrolling_passes_gradcheck_in_float64():
    C = _rand(2, 4, 3).requires_grad_()
    S = _rand(2, 4, 3, seed=3)                      # a fixed score <Q, S> keeps the output small
    assert torch.autograd.gradcheck(lambda c: (sinkhorn(c, 0.5, n_iters=30, tol=0) * S).sum((-2, -1)), (C,))
    assert torch.autograd.gradcheck(lambda c: sinkhorn(c, 0.5, n_iters=30, tol=0), (C,))


def test_uniform_plan_is_outer_product_of_marginals():
    C = torch.rand(2, 3, 6, 4)
    assert torch.allclose(uniform_plan(C), torch.full_like(C, 1 / 24))
    a, b = torch.tensor([0.1, 0.2, 0.3, 0.1, 0.2, 0.1]), torch.tensor([0.4, 0.3, 0.2, 0.1])
    assert torch.allclose(uniform_plan(C, a, b), (a[:, None] * b[None, :]).expand_as(C))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_plan_matches_cpu_plan(dtype):
    C = _rand(32, 196, 5, dtype=dtype, scale=2.0)
    a = _rand(196, seed=4, dtype=dtype) + 0.1
    a = a / a.sum()
    Q_cpu = sinkhorn(C, 0.1, a)
    Q_gpu = sinkhorn(C.cuda(), 0.1, a.cuda())
    assert Q_gpu.is_cuda
    assert torch.allclose(Q_gpu.cpu(), Q_cpu, atol=1e-6 if dtype == torch.float32 else 1e-12)


_POT_UNBALANCED_CHILD = r"""
import pathlib, sys
root = pathlib.Path(sys.argv[1]).resolve()
sys.path = [p for p in sys.path if pathlib.Path(p or ".").resolve() != root]
import numpy as np, ot
d = np.load(sys.argv[2])
plans = {f"P{i}": ot.unbalanced.sinkhorn_unbalanced(
    d["a"], d["b"], d["C"], 0.1, reg_m=(float(rho), 1e12), reg_type="kl", method="sinkhorn",
    numItermax=100000, stopThr=1e-14) for i, rho in enumerate(d["rhos"])}
np.savez(sys.argv[3], **plans)
"""


def test_semi_relaxed_plan_matches_pot_unbalanced_with_exact_columns(tmp_path):
    rng = np.random.default_rng(3)
    C, a, b, rhos = rng.random((9, 5)), rng.random(9) + 0.1, np.full(5, 0.2), np.array([0.01, 0.1, 1.0, 10.0])
    a /= a.sum()
    np.savez(tmp_path / "in.npz", C=C, a=a, b=b, rhos=rhos)
    subprocess.run([sys.executable, "-c", _POT_UNBALANCED_CHILD, str(ROOT), str(tmp_path / "in.npz"),
                    str(tmp_path / "out.npz")], cwd=tmp_path, check=True, capture_output=True, text=True)
    with np.load(tmp_path / "out.npz") as d:
        for i, rho in enumerate(rhos):
            Q = sinkhorn(torch.tensor(C), 0.1, torch.tensor(a), torch.tensor(b), n_iters=5000, tol=1e-12,
                         rho=float(rho)).numpy()
            assert np.abs(Q - d[f"P{i}"]).max() < 1e-9, rho
            assert np.allclose(Q.sum(0), b)  # the columns (conditions) stay exact
    # small rho: the rows no longer hold a; a large rho approaches the balanced plan
    loose = sinkhorn(torch.tensor(C), 0.1, torch.tensor(a), torch.tensor(b), tol=1e-12, n_iters=5000, rho=0.01)
    tight = sinkhorn(torch.tensor(C), 0.1, torch.tensor(a), torch.tensor(b), tol=1e-12, n_iters=5000, rho=1e6)
    exact = sinkhorn(torch.tensor(C), 0.1, torch.tensor(a), torch.tensor(b), tol=1e-12, n_iters=5000)
    assert (loose.sum(1) - torch.tensor(a)).abs().sum() > 0.1 and torch.allclose(tight, exact, atol=1e-6)
    with pytest.raises(ValueError, match="rho"):
        sinkhorn(torch.tensor(C), 0.1, rho=0.0)
