"""How fast this machine multiplies matrices: ``python -m minigrad.speed``.

Training time is mostly matrix products, so NumPy's float32 matmul rate (GFLOP/s) says
whether a slow run is the machine or the code: the README gives the default run's time
next to the rate measured by this command. A product of two n x n matrices is 2 n^3 FLOPs;
the rate printed is the median over ``repeats`` products after one warm-up.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def matmul_rate(n: int = 2048, repeats: int = 7, dtype=np.float32) -> dict:
    """GFLOP/s of ``a @ b`` for n x n matrices: median, best and worst of ``repeats`` timings."""
    if n < 1 or repeats < 1:
        raise ValueError(f"n and repeats must be >= 1, got {n} and {repeats}")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    a @ b  # warm-up: thread pool start, page faults
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        rates.append(2.0 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return {"n": n, "median": statistics.median(rates), "best": max(rates), "worst": min(rates)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minigrad.speed", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2048, help="matrix size (default 2048)")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    if args.n < 1 or args.repeats < 1:
        p.error("--n and --repeats must be >= 1")
    r = matmul_rate(args.n, args.repeats)
    print(f"float32 matmul {r['n']}x{r['n']}: {r['median']:.0f} GFLOP/s "
          f"(median of {args.repeats}; {r['worst']:.0f}-{r['best']:.0f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
