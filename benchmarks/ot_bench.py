"""Benchmark the batched log-domain Sinkhorn (repo-root ``ot.py``) against POT.

    python benchmarks/ot_bench.py [--threads T]

(a) CPU: one batched call on 32 images x 20 classes x 2 signs = 1,280 problems of
    196 x 5 (eps 0.1, exactly 100 iterations: tol=0) vs POT's ``ot.sinkhorn``
    called in a Python loop on the same problems (numpy float64).
(b) the same batched call on CUDA, when available.
(c) scaling of the batched call with N (patches) and C (classes).
(d) the fused Sinkhorn (speed/fused_sinkhorn.py: each iteration compiled) beside the plain
    ot.sinkhorn at FedMPT's VOC shape (32 images x 2 signs x 20 classes = 1,280 problems of
    196 x 5, rho 0.1 as FedMPT's default, 100 iterations), float32 and float64, in the same run,
    with the compile time of its first call. `--only fused` runs (d) alone.
Prints markdown tables. Timings: best of 3 after one warm-up call (best of 1
for calls slower than 3 s, to keep the run short). On a machine shared with
other busy processes pass ``--threads 1``: torch's OpenMP threads that compete
for cores can make a call 10x slower and the timings meaningless (POT's loop
is single-threaded numpy anyway).
"""
import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ot  # noqa: E402  (the project's ot.py, not POT)

assert pathlib.Path(ot.__file__).resolve() == ROOT / "ot.py", ot.__file__

EPS, ITERS = 0.1, 100

# POT runs in a child process, like the references in tests/test_ot.py: the
# child drops every sys.path entry that resolves to the repo root before
# `import ot`, so it gets POT although the project's module has the same name.
_POT_CHILD = r"""
import pathlib, sys, time
root = pathlib.Path(sys.argv[1]).resolve()
sys.path = [p for p in sys.path if pathlib.Path(p or ".").resolve() != root]
import numpy as np, ot
assert hasattr(ot, "bregman"), f"not POT: {ot.__file__}"
d = np.load(sys.argv[2])
C, eps, iters = d["C"], float(d["eps"]), int(d["iters"])
a, b = np.full(C.shape[1], 1 / C.shape[1]), np.full(C.shape[2], 1 / C.shape[2])
def loop(method, problems):
    t = time.perf_counter()
    plans = np.stack([ot.sinkhorn(a, b, M, eps, method=method, numItermax=iters,
                                  stopThr=0.0, warn=False) for M in problems])
    return time.perf_counter() - t, plans
out = {}
for method in ["sinkhorn", "sinkhorn_log"]:
    loop(method, C[:8])                                    # warm-up
    probe, _ = loop(method, C[:64])
    estimate = probe * len(C) / 64
    if method == "sinkhorn_log" and estimate > 60:
        out[f"{method}_skipped"] = estimate                # too slow, skip it
        continue
    runs = [loop(method, C) for _ in range(3 if estimate < 3 else 1)]
    out[f"{method}_time"] = min(t for t, _ in runs)
    out[f"{method}_runs"] = len(runs)
    out[f"{method}_plan"] = runs[-1][1]
np.savez(sys.argv[3], **out)
"""


def pot_loop(C):
    """POT timings (s) and plans for costs C (P, N, K), float64, in a child process."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        np.savez(tmp / "in.npz", C=C, eps=EPS, iters=ITERS)
        subprocess.run([sys.executable, "-c", _POT_CHILD, str(ROOT), str(tmp / "in.npz"),
                        str(tmp / "out.npz")], cwd=tmp, check=True)
        with np.load(tmp / "out.npz") as d:
            return {k: d[k] for k in d.files}


def timed(fn, sync=lambda: None):
    """(best time in s, number of timed runs, last result) after one warm-up call."""
    sync(); t = time.perf_counter(); out = fn(); sync()
    warm = time.perf_counter() - t
    times = []
    for _ in range(3 if warm < 3 else 1):
        sync(); t = time.perf_counter(); out = fn(); sync()
        times.append(time.perf_counter() - t)
    return min(times), len(times), out


def costs(B, C, N, K=5, dtype=torch.float32, seed=0):
    """Cosine-distance-like costs 1 - S in [0, 2]: (B*C*2, N, K), one per image, class, sign."""
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.rand(B * C * 2, N, K, generator=g, dtype=dtype)


def solve(C):
    return ot.sinkhorn(C, EPS, n_iters=ITERS, tol=0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--only", choices=["fused"], help="run one section")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          f"eps {EPS}, {ITERS} iterations, costs uniform in [0, 2]\n")
    if args.only == "fused":
        return fused_section()

    # (a) CPU: batched vs POT loop on the same 1,280 problems of 196 x 5
    C64 = costs(32, 20, 196, dtype=torch.float64)
    pot = pot_loop(C64.numpy())
    rows = []
    for method in ("sinkhorn", "sinkhorn_log"):
        if f"{method}_time" in pot:
            rows.append((f"POT `ot.sinkhorn(method='{method}')` loop, numpy float64",
                         float(pot[f"{method}_time"]), int(pot[f"{method}_runs"]), pot[f"{method}_plan"]))
        else:
            print(f"POT {method} skipped: a loop would take ~{float(pot[method + '_skipped']):.0f} s")
    pot_rows = {name.split("'")[1]: (t, Q) for name, t, _, Q in rows}
    for dtype in (torch.float32, torch.float64):
        t, r, Q = timed(lambda: solve(C64.to(dtype)))
        rows.append((f"ot.py batched, torch {str(dtype)[6:]}", t, r, Q))
    print("### (a) CPU, 1,280 problems of 196 x 5\n")
    print("| solver | time (s) | runs | " + " | ".join(f"speed-up vs POT `{m}`" for m in pot_rows)
          + " | " + " | ".join(f"max abs plan diff vs POT `{m}`" for m in pot_rows) + " |")
    print("|---|---:|---:|" + "---:|" * (2 * len(pot_rows)))
    for name, t, r, Q in rows:
        Q = Q.double().numpy() if torch.is_tensor(Q) else Q
        print(f"| {name} | {t:.3f} | {r} | " + " | ".join(f"{tp / t:.1f}" for tp, _ in pot_rows.values())
              + " | " + " | ".join(f"{np.abs(Q - Qp).max():.1e}" for _, Qp in pot_rows.values()) + " |")

    # (b) CUDA
    print("\n### (b) CUDA, 1,280 problems of 196 x 5\n")
    if not torch.cuda.is_available():
        print("CUDA not available on this machine: skipped.")
    else:
        print(f"{torch.cuda.get_device_name()}\n")
        print("| solver | time (ms) | runs | speed-up vs CPU batched | max abs plan diff vs CPU |")
        print("|---|---:|---:|---:|---:|")
        for dtype, (_, t_cpu, _, Q_cpu) in zip((torch.float32, torch.float64), rows[-2:]):
            Cg = C64.to("cuda", dtype)
            t, r, Q = timed(lambda: solve(Cg), sync=torch.cuda.synchronize)
            print(f"| ot.py batched, cuda {str(dtype)[6:]} | {1e3 * t:.2f} | {r} | {t_cpu / t:.0f} "
                  f"| {(Q.double().cpu() - Q_cpu.double()).abs().max():.1e} |")

    # (c) scaling of the batched call (B=32 images, K=5, 2 signs)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print("\n### (c) batched ot.py, float32, B=32, K=5, 2 signs: time per call\n")
    print("| N | C | problems | " + " | ".join(f"{d} (ms) | {d} (us / problem)" for d in devices) + " |")
    print("|---:|---:|---:|" + "---:|---:|" * len(devices))
    for N in (49, 196, 784):
        for n_cls in (20, 80):
            C = costs(32, n_cls, N)
            cells = []
            for d in devices:
                Cd = C.to(d)
                sync = torch.cuda.synchronize if d == "cuda" else (lambda: None)
                t, _, _ = timed(lambda: solve(Cd), sync=sync)
                cells.append(f"{1e3 * t:.1f} | {1e6 * t / len(C):.1f}")
            print(f"| {N} | {n_cls} | {len(C)} | " + " | ".join(cells) + " |")
    fused_section()


def fused_section():
    """(d) fused vs plain at FedMPT's VOC shape, side by side."""
    from speed.fused_sinkhorn import sinkhorn as fused
    print("\n### (d) fused Sinkhorn (compiled iterations) vs ot.sinkhorn, 32 x 2 x 20 problems of 196 x 5, "
          "rho 0.1, 100 iterations\n")
    print("| dtype | plain (s) | fused (s) | speed-up | max abs plan diff | first call (compiles) (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for dtype in (torch.float32, torch.float64):
        C = costs(32, 20, 196, dtype=dtype).reshape(32, 2, 20, 196, 5)
        start = time.perf_counter()
        fused(C, EPS, n_iters=ITERS, tol=0, rho=0.1)
        first = time.perf_counter() - start
        t_plain, _, Q_plain = timed(lambda: ot.sinkhorn(C, EPS, n_iters=ITERS, tol=0, rho=0.1))
        t_fused, _, Q_fused = timed(lambda: fused(C, EPS, n_iters=ITERS, tol=0, rho=0.1))
        print(f"| {str(dtype)[6:]} | {t_plain:.3f} | {t_fused:.3f} | {t_plain / t_fused:.1f}x | "
              f"{(Q_plain - Q_fused).abs().max():.1e} | {first:.1f} |", flush=True)


if __name__ == "__main__":
    main()
