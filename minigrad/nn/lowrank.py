"""Low-rank linear layers: W (out x in) replaced by the product U V of two thin matrices.

``LowRankLinear(in, out, rank)`` computes ``y = (x V^T) U^T + b`` with ``V`` of shape
(rank, in) and ``U`` of shape (out, rank): ``rank * (in + out)`` weights instead of
``in * out``, and two thin products instead of one wide one. It is the one class used both
for training a low-rank model from scratch (``model.low_rank``) and for factorizing a trained
``Linear`` by truncated SVD (``factorize_``).
"""
from __future__ import annotations

import math

from .. import ops
from .layers import uniform
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
