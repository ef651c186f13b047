"""Attention as graph nodes: the ``Function``s over the kernels of ``minigrad.kernels.attention``.

- ``attention(q, k, v)``: causal attention of (..., Hq, T, d) queries against (..., Hkv, S, d)
  keys and values, as one node that saves the output and the row log-sum-exp (not the (T, S)
  scores). Hq may be a multiple of Hkv (grouped-query / multi-query attention), and
  ``window = w`` limits each query to the last w positions.
- ``attention_qkv(qkv, n_head)``: multi-head self-attention straight from the packed (B, T, .)
  projection, heads read and written in place; optionally with rotary positions applied to
  q and k inside the node (``rope=True``).
- ``rope(x, pos0)``: rotary position embedding of (..., T, d) as a node of its own (the
  composite and cached-decoding paths use it).
- ``attention_composite``: the same attention from primitive ops (matmul, where, softmax,
  dropout): materialises the scores; the reference, and the path with attention dropout.

All kernels are the array functions of ``kernels.attention``; this module holds the graph.
"""
from __future__ import annotations

import math

import numpy as np

from . import backend, functional as F, ops
from .kernels import attention as K
from .tensor import Function, Tensor

__all__ = ["Attention", "QKVAttention", "Rope", "attention", "attention_qkv", "rope",
           "attention_composite"]


def _shape_error(msg):
    from .ops import ShapeError
    return ShapeError(msg)


class Attention(Function):
    """Causal attention as one node: saves q, k, v, the output and the row log-sum-exp."""

    def __init__(self, causal: bool = True, impl: str = "auto", block: int = 128, window: int = 0):
        self.causal, self.impl, self.block, self.window = causal, impl, block, window

    def forward(self, q, k, v):
        xp = backend.get_array_module(q)
        self.scale = 1.0 / math.sqrt(q.shape[-1])
        self.impl = K.pick_impl(self.impl, xp)
        o = xp.empty(q.shape, dtype=q.dtype)
        lse = K.run_forward(self.impl, q, k, v, self.scale, self.causal, self.block, o, self.window)
        self.save_for_backward(q, k, v, o, lse)
        return o

    def backward(self, do):
        q, k, v, o, lse = self.saved
        xp = backend.get_array_module(do)
        grads = tuple(xp.empty(a.shape, dtype=a.dtype) for a in (q, k, v))
        K.run_backward(self.impl, q, k, v, o, lse, do, self.scale, self.causal, self.block, grads,
                       self.window)
        return grads


def _check_qkv(q, k, v, window):
    if (q.ndim < 3 or q.shape[:-3] != k.shape[:-3] or k.shape != v.shape
            or q.shape[-1] != k.shape[-1] or q.shape[-3] % k.shape[-3]):
        raise _shape_error(f"attention: q {q.shape}, k {k.shape}, v {v.shape} do not fit "
                           f"(..., Hq, T, d) and (..., Hkv, S, d) with Hq a multiple of Hkv")
    if k.shape[-2] < q.shape[-2]:
        raise _shape_error(f"attention: fewer keys ({k.shape[-2]}) than queries ({q.shape[-2]})")
    if window < 0:
        raise ValueError(f"attention: window must be >= 0 (0: none), got {window}")


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, impl: str = "auto",
              block: int = 128, window: int = 0):
    """softmax(q k^T / sqrt(d)) v for q (..., Hq, T, d), k, v (..., Hkv, S, d), without storing
    the (T, S) scores. Query heads h*g .. h*g+g-1 share key/value head h (g = Hq / Hkv);
    ``window`` > 0: each query sees only the last ``window`` positions (itself included)."""
    _check_qkv(q, k, v, window)
    return Attention(causal, impl, block, window)(q, k, v)


class QKVAttention(Function):
    """Multi-head causal self-attention from the packed projection: (B, T, (nh + 2 nkv) hs)
    -> (B, T, nh hs).

    The same result as splitting q, k, v, moving heads forward ((B, nh, T, hs) queries and
    (B, nkv, T, hs) keys and values), rotating q and k (``rope``), running ``Attention`` and
    moving heads back, as one node. The blocked kernel reads q, k and v as strided views of
    the packed array and writes the output straight into the (B, T, C) layout, and backward
    writes dq, dk, dv straight into one packed gradient: none of the ten copies and
    reorderings of the step-by-step version. With RoPE the rotated q and k are two new
    arrays (recomputed in backward, not saved: two elementwise passes, against a third more
    saved memory), and the rotation's transpose takes their gradients back.
    """

    def __init__(self, n_head: int, causal: bool = True, impl: str = "auto", block: int = 128,
                 n_kv_head: int | None = None, window: int = 0, rope: bool = False, pos0: int = 0):
        self.n_head, self.causal, self.impl, self.block = n_head, causal, impl, block
        self.n_kv_head = n_kv_head or n_head
        self.window, self.rope, self.pos0 = window, rope, pos0

    def _heads(self, packed):
        """(B, T, (nh + 2 nkv) hs) -> strided views q (B, nh, T, hs), k, v (B, nkv, T, hs)."""
        B, T, W = packed.shape
        nh, nkv = self.n_head, self.n_kv_head
        hs = W // (nh + 2 * nkv)
        cq = nh * hs
        ck = nkv * hs
        q = packed[..., :cq].reshape(B, T, nh, hs).transpose(0, 2, 1, 3)
        k = packed[..., cq:cq + ck].reshape(B, T, nkv, hs).transpose(0, 2, 1, 3)
        v = packed[..., cq + ck:].reshape(B, T, nkv, hs).transpose(0, 2, 1, 3)
        return q, k, v

    def _out_heads(self, y):
        B, T, C = y.shape
        return y.reshape(B, T, self.n_head, C // self.n_head).transpose(0, 2, 1, 3)

    def _tables(self, q):
        return K.rope_tables(self.pos0, q.shape[-2], q.shape[-1], q.dtype, backend.get_array_module(q))

    def forward(self, qkv):
        xp = backend.get_array_module(qkv)
        B, T, W = qkv.shape
        nh, nkv = self.n_head, self.n_kv_head
        if W % (nh + 2 * nkv) or (self.rope and (W // (nh + 2 * nkv)) % 2):
            raise _shape_error(f"attention_qkv: last axis {W} is not (n_head ({nh}) + 2 * n_kv_head "
                               f"({nkv})) * head size" + (" with an even head size (RoPE)" if self.rope else ""))
        qkv = xp.ascontiguousarray(qkv)
        q, k, v = self._heads(qkv)
        if self.rope:
            cos, sin = self._tables(q)
            q, k = K.rope_apply(q, cos, sin), K.rope_apply(k, cos, sin)
        self.scale = 1.0 / math.sqrt(q.shape[-1])
        self.impl = K.pick_impl(self.impl, xp)
        y = xp.empty((B, T, nh * q.shape[-1]), dtype=qkv.dtype)
        lse = K.run_forward(self.impl, q, k, v, self.scale, self.causal, self.block,
                            self._out_heads(y), self.window)
        self.save_for_backward(qkv, y, lse)
        return y

    def backward(self, gy):
        qkv, y, lse = self.saved
        xp = backend.get_array_module(gy)
        q, k, v = self._heads(qkv)
        o = self._out_heads(y)
        do = self._out_heads(xp.ascontiguousarray(gy))
        g = xp.empty_like(qkv)
        gq, gk, gv = self._heads(g)
        if not self.rope:
            K.run_backward(self.impl, q, k, v, o, lse, do, self.scale, self.causal, self.block,
                           (gq, gk, gv), self.window)
            return g
        cos, sin = self._tables(q)
        qr, kr = K.rope_apply(q, cos, sin), K.rope_apply(k, cos, sin)
        dqr, dkr = xp.empty_like(qr), xp.empty_like(kr)
        K.run_backward(self.impl, qr, kr, v, o, lse, do, self.scale, self.causal, self.block,
                       (dqr, dkr, gv), self.window)
        K.rope_apply(dqr, cos, sin, out=gq, inverse=True)      # the rotation's transpose
        K.rope_apply(dkr, cos, sin, out=gk, inverse=True)
        return g


def attention_qkv(qkv: Tensor, n_head: int, causal: bool = True, impl: str = "auto", block: int = 128,
                  n_kv_head: int | None = None, window: int = 0, rope: bool = False, pos0: int = 0):
    """Causal multi-head self-attention of a packed (B, T, (nh + 2 nkv) hs) q|k|v projection
    -> (B, T, nh hs); ``n_kv_head`` (default ``n_head``) key/value heads, each shared by
    nh / nkv query heads; ``window``; ``rope``: rotary positions from ``pos0`` on q and k.

    Equal to ``attention`` on the split (and rotated) heads, with the heads moved back (tests
    hold them equal); see ``QKVAttention`` for what it saves.
    """
    if qkv.ndim != 3:
        raise _shape_error(f"attention_qkv: expected (B, T, 3C), got shape {qkv.shape}")
    nkv = n_kv_head or n_head
    if n_head % nkv:
        raise ValueError(f"attention_qkv: n_head ({n_head}) must be a multiple of n_kv_head ({nkv})")
    if window < 0:
        raise ValueError(f"attention_qkv: window must be >= 0 (0: none), got {window}")
    return QKVAttention(n_head, causal, impl, block, nkv, window, rope, pos0)(qkv)


class Rope(Function):
    """Rotary position embedding of x (..., T, d), positions pos0 .. pos0 + T - 1.

    Each pair (x_i, x_{i + d/2}) turns by the angle position * 10000^(-2i/d). A rotation is
    orthogonal, so the backward pass is the rotation by minus the angle; nothing is saved.
    """

    def __init__(self, pos0: int = 0, base: float = 10000.0):
        self.pos0, self.base = pos0, base

    def _tables(self, x):
        return K.rope_tables(self.pos0, x.shape[-2], x.shape[-1], x.dtype,
                             backend.get_array_module(x), self.base)

    def forward(self, x):
        if x.shape[-1] % 2:
            raise _shape_error(f"rope: the last axis must be even (pairs of features), got {x.shape}")
        return K.rope_apply(x, *self._tables(x))

    def backward(self, gy):
        return K.rope_apply(gy, *self._tables(gy), inverse=True)


def rope(x: Tensor, pos0: int = 0, base: float = 10000.0) -> Tensor:
    return Rope(pos0, base)(x)


def attention_composite(q, k, v, causal: bool = True, window: int = 0, dropout_p: float = 0.0,
                        training: bool = True):
    """The reference from primitive ops: scores materialised, band mask, softmax, dropout.
    q (B, Hq, T, d), k, v (B, Hkv, S, d); the g = Hq / Hkv query heads of a group are one
    axis that broadcasts against the shared k and v (no repeated copies of them)."""
    _check_qkv(q, k, v, window)
    B, Hq, T, d = q.shape
    Hkv, S = k.shape[-3], k.shape[-2]
    g = Hq // Hkv
    q5 = q.reshape(B, Hkv, g, T, d)
    k5, v5 = k.reshape(B, Hkv, 1, S, d), v.reshape(B, Hkv, 1, S, d)
    att = ops.matmul(q5, ops.swapaxes(k5, -1, -2)) * (1.0 / math.sqrt(d))   # (B, Hkv, g, T, S)
    if causal:
        xp = backend.get_array_module(att.data)
        att = F.masked_fill(att, K.band_mask(T, S, window, xp), -np.inf)
    w = F.softmax(att, axis=-1)
    w = F.dropout(w, dropout_p, training)
    return ops.matmul(w, v5).reshape(B, Hq, T, d)                           # (B, Hq, T, d)
