"""Numerical gradient checking: central differences in float64.

``gradcheck(fn, inputs)`` compares the gradients that backward computes with
(f(x + h) - f(x - h)) / 2h for every element of every input. The output is reduced
with a fixed random weighting, so every output element matters and errors cannot
cancel out by symmetry.
"""
from __future__ import annotations

import numpy as np

from . import backend
from .tensor import Tensor, no_grad


class GradcheckError(AssertionError):
    pass


def numerical_grad(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """d f / d x by central differences; ``f`` returns a float and reads ``x`` in place."""
    g = np.zeros_like(x, dtype=np.float64)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * eps)
    return g


def gradcheck(fn, inputs, eps: float = 1e-6, atol: float = 1e-6, rtol: float = 1e-4,
              seed: int = 0, name: str | None = None) -> bool:
    """Check ``fn(*tensors)`` against numerical gradients; raise GradcheckError if they differ.

    ``inputs``: arrays or Tensors; floating ones are checked (they must be float64),
    integer ones are passed through unchanged.
    """
    label = name or getattr(fn, "__name__", "fn")
    tensors = []
    for x in inputs:
        arr = x.data if isinstance(x, Tensor) else np.asarray(x)
        arr = backend.to_numpy(arr).copy()
        if arr.dtype.kind == "f" and arr.dtype != np.float64:
            raise GradcheckError(f"gradcheck({label}): inputs must be float64 for a meaningful check, "
                                 f"got {arr.dtype}")
        tensors.append(Tensor(arr, requires_grad=arr.dtype.kind == "f"))

    def outputs(ts):
        out = fn(*ts)
        return list(out) if isinstance(out, (tuple, list)) else [out]

    outs = outputs(tensors)
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal(o.shape) for o in outs]
    total = None
    for o, w in zip(outs, weights):
        term = (o * Tensor(w)).sum()
        total = term if total is None else total + term
    total.backward()

    def scalar():
        with no_grad():
            vals = outputs(tensors)
        return float(sum(float((backend.to_numpy(v.data) * w).sum()) for v, w in zip(vals, weights)))

    for i, t in enumerate(tensors):
        if not t.requires_grad:
            continue
        num = numerical_grad(scalar, t.data, eps)
        ana = np.zeros_like(num) if t.grad is None else backend.to_numpy(t.grad.data)
        if not np.allclose(ana, num, atol=atol, rtol=rtol):
            err = np.abs(ana - num)
            j = np.unravel_index(int(np.argmax(err)), err.shape) if err.ndim else ()
            raise GradcheckError(
                f"gradcheck({label}): gradient of input {i} (shape {t.shape}) is wrong\n"
                f"  largest error {err.max():.3e} at index {tuple(int(k) for k in j)}: "
                f"backward {ana[j]!r}, numerical {num[j]!r}\n"
                f"  backward:\n{np.array2string(ana, precision=6, threshold=50)}\n"
                f"  numerical:\n{np.array2string(num, precision=6, threshold=50)}")
    return True
