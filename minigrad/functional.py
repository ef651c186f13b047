"""Composite functions, built from the primitives of ``ops.py``.

Each one is differentiable because its parts are; none has a backward of its own.
Where speed later calls for a fused version, it must be tested equal to these.
"""
from __future__ import annotations

import math

import numpy as np

from . import backend
from . import ops
from . import fused as _fused
from .tensor import Tensor


def _as_tensor(x) -> Tensor:
    return x if isinstance(x, Tensor) else Tensor(x)


def logsumexp(x, axis=-1, keepdims=False):
    """log(sum(exp(x))) stable for large values: the max is taken out first.

    The max is detached: the function does not depend on it, so its gradient
    contributions cancel exactly and need not be computed. A row whose max is not finite
    is shifted by 0 instead (as PyTorch does): all -inf gives -inf, a +inf entry gives +inf,
    where shifting by the max would give inf - inf = nan.
    """
    x = _as_tensor(x)
    m = ops.max(x, axis=axis, keepdims=True).detach()
    xp = backend.get_array_module(m.data)
    if not bool(xp.isfinite(m.data).all()):
        m = Tensor(xp.where(xp.isfinite(m.data), m.data, 0).astype(m.dtype, copy=False))
    out = ops.log(ops.sum(ops.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else ops.squeeze(out, axis)


def softmax(x, axis=-1):
    x = _as_tensor(x)
    e = ops.exp(x - ops.max(x, axis=axis, keepdims=True).detach())
    return e / ops.sum(e, axis=axis, keepdims=True)


def log_softmax(x, axis=-1):
    x = _as_tensor(x)
    return x - logsumexp(x, axis=axis, keepdims=True)


def cross_entropy(logits, targets, ignore_index: int | None = -100, reduction: str = "mean",
                  fused: bool = True, label_smoothing: float = 0.0):
    """Cross-entropy of ``logits`` (..., C) against integer ``targets`` (...).

    ``reduction="mean"`` averages over the targets that are not ``ignore_index``
    (PyTorch's convention); ``"sum"`` and ``"none"`` are also available.
    ``label_smoothing=eps`` mixes the one-hot target with the uniform distribution, as
    PyTorch does: loss = (1 - eps) * nll + eps * mean over classes of -log p.

    When every target is ``ignore_index``, the mean is **0.0** with a zero gradient
    (PyTorch returns nan, 0/0): a batch of padding adds nothing instead of poisoning the run.
    """
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    logits = _as_tensor(logits)
    t = targets.data if isinstance(targets, Tensor) else targets
    xp = backend.get_array_module(logits.data)
    t = xp.asarray(t)
    if t.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: targets must be integers, got dtype {t.dtype}")
    if logits.shape[:-1] != t.shape:
        raise ops.ShapeError(f"cross_entropy: logits of shape {logits.shape} need targets of shape "
                             f"{logits.shape[:-1]}, got {t.shape}")
    C = logits.shape[-1]
    tf = t.reshape(-1)
    valid = tf != ignore_index if ignore_index is not None else xp.ones(tf.shape, dtype=bool)
    safe_t = xp.where(valid, tf, 0)
    if int(((safe_t < 0) | (safe_t >= C)).sum()):
        bad = backend.to_numpy(safe_t[(safe_t < 0) | (safe_t >= C)])[:5]
        raise IndexError(f"cross_entropy: target ids {bad.tolist()} out of range for {C} classes")
    if fused and reduction == "mean" and label_smoothing == 0.0:
        return _fused.SoftmaxCrossEntropy(tf, ignore_index)(logits.reshape(-1, C))
    lp = log_softmax(logits.reshape(-1, C), axis=-1)                   # (N, C)
    picked = lp[xp.arange(tf.shape[0]), safe_t]                         # (N,)
    if label_smoothing:
        picked = picked * (1.0 - label_smoothing) + ops.mean(lp, axis=-1) * label_smoothing
    nll = -ops.where(valid, picked, 0.0)
    if reduction == "none":
        return nll.reshape(t.shape)
    if reduction == "sum":
        return ops.sum(nll)
    if reduction != "mean":
        raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    n = int(valid.sum())
    return ops.sum(nll) * (1.0 / max(n, 1))


def gelu(x, approximate: str = "tanh", fused: bool = True):
    """GELU. ``approximate="tanh"`` is GPT-2's formula; ``"none"`` is exact (with erf).

    ``fused=True`` runs either form as one node (``minigrad.fused.GeluTanh`` / ``GeluExact``).
    """
    x = _as_tensor(x)
    if approximate == "tanh" and fused:
        return _fused.GeluTanh()(x)
    if approximate == "tanh":
        c = math.sqrt(2.0 / math.pi)
        return 0.5 * x * (1.0 + ops.tanh(c * (x + 0.044715 * x * x * x)))
    if approximate == "none" and fused:
        return _fused.GeluExact()(x)
    if approximate == "none":
        return 0.5 * x * (1.0 + ops.erf(x * (1.0 / math.sqrt(2.0))))
    raise ValueError(f"gelu: approximate must be 'tanh' or 'none', got {approximate!r}")


def sigmoid(x):
    x = _as_tensor(x)
    return 0.5 * (ops.tanh(x * 0.5) + 1.0)  # tanh form: no overflow for large |x|


def layer_norm(x, weight=None, bias=None, eps: float = 1e-5, fused: bool = True):
    """Normalise over the last axis, then scale and shift.

    ``fused=True`` is one node with a hand-written backward (``minigrad.fused.LayerNorm``);
    ``fused=False`` is the composite below, its reference.
    """
    x = _as_tensor(x)
    if fused:
        if weight is None and bias is not None:   # the node takes (x, weight, bias) in order
            weight = Tensor(backend.get_array_module(x.data).ones(x.shape[-1], dtype=x.dtype))
        if weight is not None:
            ops._check_pair("layer_norm", x, weight)
        return _fused.LayerNorm(eps)(*[a for a in (x, weight, bias) if a is not None])
    mu = ops.mean(x, axis=-1, keepdims=True)
    d = x - mu
    v = ops.mean(d * d, axis=-1, keepdims=True)
    y = d / ops.sqrt(v + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def dropout(x, p: float = 0.5, training: bool = True):
    """Zero each element with probability p, scale the rest by 1/(1-p) (inverted dropout)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0
    xp = backend.get_array_module(x.data)
    keep = backend.get_rng(xp).random(x.shape, dtype=np.float32) >= p
    return x * (keep * (1.0 / (1.0 - p))).astype(x.dtype)


def embedding(ids, weight: Tensor):
    """Rows of ``weight`` picked by integer ``ids``; the gradient scatter-adds into the table."""
    raw = ids.data if isinstance(ids, Tensor) else ids
    xp = backend.get_array_module(weight.data)
    raw = xp.asarray(raw)
    if raw.dtype.kind not in "iu":
        raise TypeError(f"embedding: ids must be integers, got dtype {raw.dtype}")
    if raw.size and (int(raw.min()) < 0 or int(raw.max()) >= weight.shape[0]):
        raise IndexError(f"embedding: ids must lie in [0, {weight.shape[0]}), got min {int(raw.min())} "
                         f"max {int(raw.max())}")
    return ops.getitem(weight, raw)


def masked_fill(x, mask, value: float):
    """Where ``mask`` is true, put ``value``; elsewhere keep ``x`` (gradient flows there only)."""
    m = mask.data if isinstance(mask, Tensor) else mask
    return ops.where(m, float(value), x)


def tril(x, k: int = 0):
    """Keep the lower triangle of the last two axes, zero the rest."""
    xp = backend.get_array_module(x.data)
    keep = xp.tril(xp.ones(x.shape[-2:], dtype=bool), k)
    return ops.where(keep, x, 0.0)


def scaled_dot_product_attention(q, k, v, causal: bool = True, dropout_p: float = 0.0,
                                 training: bool = True, return_weights: bool = False):
    """softmax(q k^T / sqrt(d)) v over the last two axes; q, k, v: (..., T, d).

    This is the reference that materialises the (T, T) scores.
    """
    d = q.shape[-1]
    att = ops.matmul(q, ops.swapaxes(k, -1, -2)) * (1.0 / math.sqrt(d))   # (..., T, S)
    if causal:
        T, S = att.shape[-2], att.shape[-1]
        xp = backend.get_array_module(att.data)
        # queries are the last T of S positions (S > T when a KV cache holds the past)
        mask = ~xp.tril(xp.ones((T, S), dtype=bool), S - T)
        att = masked_fill(att, mask, -np.inf)
    w = softmax(att, axis=-1)
    w_d = dropout(w, dropout_p, training)
    y = ops.matmul(w_d, v)                                                  # (..., T, d)
    return (y, w) if return_weights else y


def mse_loss(pred, target):
    d = pred - target
    return ops.mean(d * d)
