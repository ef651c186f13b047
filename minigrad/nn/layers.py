"""The standard layers. Initialisation draws from minigrad's seeded generator."""
from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np

from .. import backend, functional as F, ops
from ..tensor import get_default_dtype
from .module import Module, Parameter


def _rng():
    return backend.get_rng(np)


_SKIP_INIT = [False]


@contextmanager
def skip_init():
    """Layers built inside get read-only zero-stride placeholder weights that hold no memory
    (and draw no random numbers), for a loader that replaces every one with
    ``load_state_dict`` or swaps the layer out: building a quantized model this way never
    allocates its float32 weights."""
    old, _SKIP_INIT[0] = _SKIP_INIT[0], True
    try:
        yield
    finally:
        _SKIP_INIT[0] = old


def _placeholder(shape, dtype):
    return np.broadcast_to(np.zeros((), dtype or get_default_dtype()), shape)


def uniform(shape, bound: float, dtype=None) -> np.ndarray:
    if _SKIP_INIT[0]:
        return _placeholder(shape, dtype)
    return _rng().uniform(-bound, bound, size=shape).astype(dtype or get_default_dtype())


def normal(shape, std: float, dtype=None) -> np.ndarray:
    if _SKIP_INIT[0]:
        return _placeholder(shape, dtype)
    return (_rng().standard_normal(size=shape) * std).astype(dtype or get_default_dtype())


class Linear(Module):
    """y = x W^T + b with W of shape (out_features, in_features), as in PyTorch."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / math.sqrt(in_features)  # PyTorch's default: U(-1/sqrt(in), 1/sqrt(in))
        self.weight = Parameter(uniform((out_features, in_features), bound, dtype))
        self.bias = Parameter(uniform((out_features,), bound, dtype)) if bias else None

    def forward(self, x):
        return ops.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = Parameter(normal((num_embeddings, embedding_dim), 1.0, dtype))

    def forward(self, ids):
        return F.embedding(ids, self.weight)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"


class LayerNorm(Module):
    def __init__(self, normalized_shape: int, eps: float = 1e-5, bias: bool = True, dtype=None):
        super().__init__()
        self.normalized_shape, self.eps = normalized_shape, eps
        dt = dtype or get_default_dtype()
        self.weight = Parameter(np.ones(normalized_shape, dtype=dt))
        self.bias = Parameter(np.zeros(normalized_shape, dtype=dt)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}"


class Dropout(Module):
    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p}"


class GELU(Module):
    def __init__(self, approximate: str = "tanh"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x):
        return F.gelu(x, self.approximate)


class ReLU(Module):
    def forward(self, x):
        return ops.relu(x)


class Tanh(Module):
    def forward(self, x):
        return ops.tanh(x)


class Sequential(Module):
    def __init__(self, *modules):
        super().__init__()
        for i, m in enumerate(modules):
            setattr(self, str(i), m)

    def __len__(self):
        return len(self._modules)

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def __iter__(self):
        return iter(self._modules.values())

    def forward(self, x):
        for m in self._modules.values():
            x = m(x)
        return x


class ModuleList(Module):
    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, m: Module) -> "ModuleList":
        setattr(self, str(len(self._modules)), m)
        return self

    def __len__(self):
        return len(self._modules)

    def __getitem__(self, i):
        mods = list(self._modules.values())
        if isinstance(i, slice):
            return ModuleList(mods[i])
        return mods[i]

    def __iter__(self):
        return iter(self._modules.values())
