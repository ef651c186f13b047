"""Low-rank linear layers: W (out x in) replaced by the product U V of two thin matrices.

``LowRankLinear(in, out, rank)`` computes ``y = (x V^T) U^T + b`` with ``V`` of shape
(rank, in) and ``U`` of shape (out, rank): ``rank * (in + out)`` weights instead of
``in * out``, and two thin products instead of one wide one. It is the one class used both
for training a low-rank model from scratch (``model.low_rank``) and for factorizing a trained
``Linear`` by truncated SVD (``factorize_``).
"""
from __future__ import annotations

import math

import numpy as np

from .. import backend, ops
from .layers import Linear, uniform
from .module import Module, Parameter


class LowRankLinear(Module):
    """y = x (U V)^T + b, with U (out, rank) and V (rank, in)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, dtype=None):
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LowRankLinear: rank must be a positive integer, got {rank!r}")
        if rank >= min(in_features, out_features):
            raise ValueError(f"LowRankLinear: rank {rank} must be below min(in, out) = "
                             f"{min(in_features, out_features)}; a full-rank layer is a Linear")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        # Each factor is drawn so that the product has the variance of PyTorch's Linear init:
        # Var(sum_r U_ir V_rj) = rank * Var(U) * Var(V) = 1 / (3 in).
        self.V = Parameter(uniform((rank, in_features), 1.0 / math.sqrt(in_features), dtype))
        self.U = Parameter(uniform((out_features, rank), math.sqrt(3.0 / rank), dtype))
        bound = 1.0 / math.sqrt(in_features)
        self.bias = Parameter(uniform((out_features,), bound, dtype)) if bias else None

    def forward(self, x):
        return ops.linear(ops.linear(x, self.V, None), self.U, self.bias)

    def dense_weight(self):
        """The (out, in) matrix U V this layer stands for (an array, for inspection and export)."""
        return self.U.data @ self.V.data

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")


def rank_for_energy(s, energy: float) -> int:
    """The smallest r whose top singular values hold ``energy`` of sum(s^2) (the squared Frobenius norm)."""
    e = np.cumsum(np.asarray(s, dtype=np.float64) ** 2)
    return int(np.searchsorted(e, energy * e[-1] - 1e-12 * e[-1]) + 1)


def factorize_(model, rank: int | None = None, energy: float | None = None, targets=None):
    """Replace trained Linear layers by ``LowRankLinear`` through a truncated SVD; returns ``model``.

    ``W = U S V^T`` keeps its top ``r`` singular triplets, split evenly between the factors
    (``U sqrt(S)`` and ``sqrt(S) V^T``, so neither factor is much larger than the other when
    fine-tuning). By Eckart-Young this is the best rank-r approximation in the Frobenius norm,
    with error ``sqrt(sum of the dropped s_i^2)``. Give either ``rank`` (the same for every
    target; it must be below min(in, out)) or ``energy`` in (0, 1] (per layer, the smallest rank
    that keeps that share of sum(s^2)). A layer whose rank would not save parameters
    (``r (in + out) >= in out``, e.g. rank 128 of a 256 x 256 matrix) stays a Linear. ``targets``: module name patterns
    (``calib.match``), default every untied Linear. The ranks chosen are in ``model.low_rank_ranks``.
    """
    from ..prune import prunable
    if (rank is None) == (energy is None):
        raise ValueError("factorize_: give exactly one of rank= or energy=")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"factorize_: energy must be in (0, 1], got {energy}")
    modules = [(n, m) for n, m in prunable(model, targets) if isinstance(m, Linear)]
    if rank is not None:
        if not isinstance(rank, (int, np.integer)) or rank < 1:
            raise ValueError(f"factorize_: rank must be a positive integer, got {rank!r}")
        for n, m in modules:
            if rank >= min(m.in_features, m.out_features):
                raise ValueError(f"factorize_: rank {rank} must be below min(in, out) = "
                                 f"{min(m.in_features, m.out_features)} of {n}")
    ranks = dict(getattr(model, "low_rank_ranks", {}) or {})
    for name, m in modules:
        w = backend.to_numpy(m.weight.data).astype(np.float64)
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        r = int(rank) if rank is not None else rank_for_energy(s, energy)
        if r * (m.in_features + m.out_features) >= m.in_features * m.out_features or \
                r >= min(m.in_features, m.out_features):
            continue
        root = np.sqrt(s[:r])
        dt = m.weight.data.dtype
        lr = LowRankLinear(m.in_features, m.out_features, r, bias=m.bias is not None, dtype=dt)
        lr.U.data = backend.to_device((u[:, :r] * root).astype(dt), m.weight.device)
        lr.V.data = backend.to_device((root[:, None] * vt[:r]).astype(dt), m.weight.device)
        if m.bias is not None:
            lr.bias.data = m.bias.data.copy()
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, lr)
        ranks[name] = r
    object.__setattr__(model, "low_rank_ranks", ranks)
    return model


def low_rank_structure_(model, ranks: dict):
    """Give ``model`` the shapes of a factorized one (``{module name: rank}``, zeros inside), so
    that a factorized state dict loads into it (the loader's low-rank folders)."""
    for name, r in ranks.items():
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        m = getattr(owner, attr)
        setattr(owner, attr, LowRankLinear(m.in_features, m.out_features, int(r), bias=m.bias is not None,
                                           dtype=m.weight.data.dtype))
    object.__setattr__(model, "low_rank_ranks", dict(ranks))
    return model
