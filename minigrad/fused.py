"""Fused versions of composites that the training profile showed to be hot.

Each is one autograd node with a hand-written backward, where the composite in
``functional.py`` builds 5-15 nodes with a temporary array each. They are written in
array code (NumPy or CuPy through ``xp``), call the compiled loops of ``kernels/`` where
those fit, and are tested equal to the composites. (They live here, beside the other
``Function``s, so that ``kernels/`` stays array in, array out.)
"""
from __future__ import annotations

import math

import numpy as np

from . import backend
from .kernels import cpu, pooled
from .tensor import Function

_GELU_C = math.sqrt(2.0 / math.pi)


def _half_x_one_plus(x, s):
    """0.5 x (1 + s): GELU from s = tanh(...) or erf(...), in the buffer of 1 + s."""
    y = 1.0 + s
    y *= x
    y *= 0.5
    return y


class _Gelu(Function):
    """A GELU: float32 NumPy arrays go through one compiled loop each way (``loops``: the
    forward and backward of ``kernels/pooled.py``) that saves only ``x``; float64 and CuPy
    arrays through the subclass's array code (``_array_forward`` / ``_array_backward``)."""

    loops = None

    def forward(self, x):
        if cpu.accepts(x, dtypes=(np.float32,)):
            self.compiled = True
            xc = np.ascontiguousarray(x)
            y = np.empty_like(xc)
            self.loops[0](xc.reshape(-1), y.reshape(-1))
            self.save_for_backward(xc, None)
            return y
        self.compiled = False
        y, s = self._array_forward(x)
        self.save_for_backward(x, s)
        return y

    def backward(self, gy):
        x, s = self.saved
        if self.compiled:
            gy = np.ascontiguousarray(gy, dtype=x.dtype)
            gx = np.empty_like(x)
            self.loops[1](x.reshape(-1), gy.reshape(-1), gx.reshape(-1))
            return gx
        return self._array_backward(x, s, gy)


class GeluTanh(_Gelu):
    """GPT-2's GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    The compiled loops (``cpu.gelu_tanh_fwd`` / ``_bwd``) build tanh from a vectorised exp,
    good to a few ulp; the array code also saves ``tanh(...)``.
    """

    loops = (pooled.gelu_tanh_fwd, pooled.gelu_tanh_bwd)

    @staticmethod
    def _array_forward(x):
        xp = backend.get_array_module(x)
        t = xp.tanh(x * (_GELU_C + (_GELU_C * 0.044715) * (x * x)))
        return _half_x_one_plus(x, t), t

    @staticmethod
    def _array_backward(x, t, gy):
        # d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 * 0.044715 x^2)
        x2 = x * x
        inner = _GELU_C + (3 * _GELU_C * 0.044715) * x2
        d = 1.0 - t * t
        d *= inner
        d *= x
        d += 1.0
        d += t
        d *= 0.5
        d *= gy
        return d


class GeluExact(_Gelu):
    """0.5 x (1 + erf(x / sqrt(2))), the exact GELU (nn.GELU()'s default, nanoGPT's).

    The compiled loops (``cpu.gelu_erf_fwd`` / ``_bwd``) take erfc from a Chebyshev fit and
    our exp; the array code also saves ``erf(...)``.
    """

    loops = (pooled.gelu_erf_fwd, pooled.gelu_erf_bwd)

    @staticmethod
    def _array_forward(x):
        e = backend.erf(x * (1.0 / math.sqrt(2.0)))
        return _half_x_one_plus(x, e), e

    @staticmethod
    def _array_backward(x, e, gy):
        xp = backend.get_array_module(x)
        # d/dx = 0.5 (1 + erf(x / sqrt 2)) + x * exp(-x^2 / 2) / sqrt(2 pi)
        d = xp.exp(-0.5 * x * x)
        d *= x * (1.0 / math.sqrt(2.0 * math.pi))
        d += 0.5 * (1.0 + e)
        d *= gy
        return d


class LayerNorm(Function):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis.

    NumPy arrays (float32 or float64) go through compiled row loops (``cpu.layer_norm_fwd``
    / ``_bwd``: statistics in float64, the input and two numbers per row saved); CuPy
    arrays, or no Numba, through the array code, which saves the normalised input.
    """

    def __init__(self, eps: float = 1e-5):
        self.eps = eps

    def forward(self, x, weight=None, bias=None):
        self.has_w, self.has_b = weight is not None, bias is not None
        if cpu.accepts(*(a for a in (x, weight, bias) if a is not None)):
            return self._forward_compiled(x, weight, bias)
        self.compiled = False
        xp = backend.get_array_module(x)
        mu = x.mean(axis=-1, keepdims=True)
        xc = x - mu
        var = (xc * xc).mean(axis=-1, keepdims=True)
        rstd = 1.0 / xp.sqrt(var + self.eps)
        xhat = xc
        xhat *= rstd                                     # reuse the centred buffer
        self.save_for_backward(xhat, rstd, weight)
        if weight is None:
            return xhat.copy() if bias is None else xhat + bias
        y = xhat * weight
        if bias is not None:
            y += bias
        return y

    def _forward_compiled(self, x, weight, bias):
        self.compiled = True
        C = x.shape[-1]
        x2 = np.ascontiguousarray(x.reshape(-1, C))
        w = np.ones(C, x.dtype) if weight is None else np.ascontiguousarray(weight, dtype=x.dtype)
        b = np.zeros(C, x.dtype) if bias is None else np.ascontiguousarray(bias, dtype=x.dtype)
        y = np.empty_like(x2)
        mean = np.empty(x2.shape[0], np.float64)
        rstd = np.empty(x2.shape[0], np.float64)
        pooled.layer_norm_fwd(x2, w, b, self.eps, y, mean, rstd)
        self.save_for_backward(x2, w, mean, rstd)
        return y.reshape(x.shape)

    def _grads(self, gx, gw, gb):
        grads = (gx,)
        if self.has_w:
            grads += (gw if self.needs_input_grad[1] else None,)
        if self.has_b:
            grads += (gb if self.needs_input_grad[-1] else None,)
        return grads if len(grads) > 1 else grads[0]

    def backward(self, gy):
        if self.compiled:
            x2, w, mean, rstd = self.saved
            C = x2.shape[1]
            g2 = np.ascontiguousarray(gy.reshape(-1, C), dtype=x2.dtype)
            gx = np.empty_like(x2)
            gw, gb = pooled.layer_norm_bwd(x2, w, mean, rstd, g2, gx)
            gx = gx.reshape(gy.shape) if self.needs_input_grad[0] else None
            return self._grads(gx, gw.astype(x2.dtype), gb.astype(x2.dtype))
        xhat, rstd, w = self.saved
        lead = tuple(range(gy.ndim - 1))
        gw = (gy * xhat).sum(axis=lead) if self.has_w and self.needs_input_grad[1] else None
        gb = gy.sum(axis=lead) if self.has_b and self.needs_input_grad[-1] else None
        gx = None
        if self.needs_input_grad[0]:
            g = gy * w if w is not None else gy
            # dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
            m1 = g.mean(axis=-1, keepdims=True)
            m2 = (g * xhat).mean(axis=-1, keepdims=True)
            gx = g - m1
            gx -= xhat * m2
            gx *= rstd
        return self._grads(gx, gw, gb)


class SoftmaxCrossEntropy(Function):
    """Mean cross-entropy of logits (N, C) against targets (N,), skipping ``ignore_index``
    (every target ignored: 0.0, as ``functional.cross_entropy`` documents)."""

    def __init__(self, targets, ignore_index):
        self.targets, self.ignore_index = targets, ignore_index

    def forward(self, z):
        xp = backend.get_array_module(z)
        N = z.shape[0]
        t = self.targets
        valid = t != self.ignore_index if self.ignore_index is not None else xp.ones(N, dtype=bool)
        safe_t = xp.where(valid, t, 0)
        m = z.max(axis=-1, keepdims=True)
        e = xp.exp(z - m)
        s = e.sum(axis=-1, keepdims=True)
        lse = (xp.log(s) + m)[:, 0]
        nll = lse - z[xp.arange(N), safe_t]
        n = int(valid.sum())
        self.n = max(n, 1)
        e /= s                                             # softmax probabilities, kept for backward
        self.save_for_backward(e, safe_t, valid)
        return xp.asarray((nll * valid).sum() / self.n, dtype=z.dtype)

    def backward(self, gy):
        p, t, valid = self.saved
        xp = backend.get_array_module(p)
        g = p.copy()                                        # p stays intact for retain_graph
        g[xp.arange(g.shape[0]), t] -= 1.0
        g *= (gy / self.n) * valid[:, None]
        return g.astype(p.dtype, copy=False)
