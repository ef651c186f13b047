"""Structured pruning of the GPT: whole attention heads and MLP hidden channels removed.

    prune_structured_(model, heads=0.25, mlp=0.3, calib=batches)   # a smaller dense GPT

Unlike masks (``minigrad.prune``), this cuts rows and columns out of the matrices, so the
model really has fewer parameters and does less work per token. The pruned model is an
ordinary GPT whose config says, per layer, how many heads it kept (``model.layer_heads``; each
head keeps its width ``n_embd // n_head``) and how wide its MLP is (``model.layer_mlp``): it
saves, loads (``lm.loader``), trains and generates like any other.

**Importance score (Wanda-style, at the output projection).** A head or an MLP channel
reaches the residual stream only through its columns of the block's output projection
``c_proj``: channel j adds ``x_j * W[:, j]`` to the residual. Its score is
``||X_j||_2 * ||W[:, j]||_2``, the norm of its activations over the calibration tokens
(collected by ``minigrad.calib.collect`` on the input of ``c_proj``) times the norm of the
column it writes with, an upper bound on the size of what it adds. A head's score is the sum
over its channels. Each layer loses ``round(fraction * count)`` of its lowest-scoring heads and
channels (the same share in every layer, so no layer is emptied by a global ranking); a
channel that contributes nothing (zero activations or a zero column) scores 0 and goes first,
and removing it leaves the outputs unchanged (tested).

**With the architecture switches (lm.config).** ``position=rope`` and ``attn_window`` need
nothing: a kept head keeps its width and its rotation. ``low_rank`` layers (``LowRankLinear``)
are cut through their factors (rows of U for the outputs, columns of V for the inputs); one
cut to ``min(in, out) <= rank`` becomes a plain Linear, as ``lm.model`` builds such a layer.
Grouped-query / multi-query attention (``n_kv_head`` other than 0 or n_head) is refused: a head
is removed with its own key and value head, and a kv head shared by a group cannot be; the
same rule is checked on the config (``validate_layers``). ``share_layers`` is refused too: a
shared block serves several layers, whose importance would have to be ranked together.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from minigrad import backend, nn
from minigrad.calib import collect
from minigrad.nn.lowrank import LowRankLinear

from .config import NO_GQA_PRUNING


def _norms(stats, name):
    s = stats[name]
    return np.sqrt(s.sqnorm)


def importance(model, calib, run=None) -> dict:
    """``{layer: {"heads": (nh,) scores, "mlp": (hidden,) scores}}`` (see the module docstring)."""
    if calib is None:
        raise ValueError("structured pruning ranks heads and channels by their activations: pass "
                         "calib= a few batches of token ids (or --data for lm.compress)")
    stats = collect(model, calib, run=run or (lambda m, b: m(b)), modules=["attn.c_proj", "mlp.c_proj"],
                    want=("sqnorm",))
    out = {}
    for i, block in enumerate(model.transformer.h):
        pre = f"transformer.h.{i}"
        a = block.attn
        wa = np.linalg.norm(_dense(a.c_proj).astype(np.float64), axis=0)
        ch = _norms(stats, f"{pre}.attn.c_proj") * wa
        wm = np.linalg.norm(_dense(block.mlp.c_proj).astype(np.float64), axis=0)
        out[i] = {"heads": ch.reshape(a.n_head, a.head_size).sum(axis=1),
                  "mlp": _norms(stats, f"{pre}.mlp.c_proj") * wm}
    return out


def _keep(scores: np.ndarray, drop: int) -> np.ndarray:
    """Sorted indices of what stays after dropping the ``drop`` lowest scores (ties: first goes)."""
    order = np.argsort(scores, kind="stable")
    return np.sort(order[drop:])


def _linear(w, b, device) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype)
    lin.weight.data = backend.to_device(np.ascontiguousarray(w), device)
    if b is not None:
        lin.bias.data = backend.to_device(np.ascontiguousarray(b), device)
    return lin


def _np(p):
    return None if p is None else backend.to_numpy(p.data)


def _dense(m):
    """The (out, in) weight of a Linear or a LowRankLinear (U V), as a NumPy array."""
    if isinstance(m, LowRankLinear):
        return _np(m.U) @ _np(m.V)
    return _np(m.weight)


def _cut(m, device, rows=None, cols=None):
    """``m`` keeping output features ``rows`` and input features ``cols`` (None: all). A
    LowRankLinear is cut through its factors and stays low rank while its rank is below
    min(in, out) of the result; otherwise it becomes the Linear of its product (lm.model's rule)."""
    b = _np(m.bias)
    if b is not None and rows is not None:
        b = b[rows]
    if isinstance(m, LowRankLinear):
        u, v = _np(m.U), _np(m.V)
        if rows is not None:
            u = u[rows]
        if cols is not None:
            v = v[:, cols]
        if m.rank >= min(u.shape[0], v.shape[1]):
            return _linear(u @ v, b, device)
        lr = LowRankLinear(v.shape[1], u.shape[0], m.rank, bias=b is not None, dtype=u.dtype)
        lr.U.data = backend.to_device(np.ascontiguousarray(u), device)
        lr.V.data = backend.to_device(np.ascontiguousarray(v), device)
        if b is not None:
            lr.bias.data = backend.to_device(np.ascontiguousarray(b), device)
        return lr
    w = _np(m.weight)
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    return _linear(w, b, device)


def check_prunable(config) -> None:
    """Raise ValueError for the architecture switches structured pruning does not handle."""
    if config.n_kv_head not in (0, config.n_head):
        raise ValueError(f"{NO_GQA_PRUNING}; this model has n_kv_head={config.n_kv_head}, "
                         f"n_head={config.n_head}")
    if config.share_layers:
        raise ValueError(f"structured pruning does not support model.share_layers={config.share_layers}: "
                         f"a shared block serves several layers at once")


def select_(model, keep_heads: dict, keep_mlp: dict):
    """Keep heads ``keep_heads[layer]`` and MLP channels ``keep_mlp[layer]`` (index arrays); returns model."""
    check_prunable(model.config)
    dev = model.device
    heads, widths = [], []
    for i, block in enumerate(model.transformer.h):
        a, mlp = block.attn, block.mlp
        hs, nh = a.head_size, a.n_head
        kh = np.asarray(keep_heads.get(i, np.arange(nh)), dtype=np.int64)
        if kh.size == 0:
            raise ValueError(f"layer {i}: cannot remove every head of a layer; keep at least one")
        cols = (kh[:, None] * hs + np.arange(hs)).ravel()                   # channels of the kept heads
        C = nh * hs
        rows = np.concatenate([cols, C + cols, 2 * C + cols])              # their q, k and v rows
        a.c_attn = _cut(a.c_attn, dev, rows=rows)
        a.c_proj = _cut(a.c_proj, dev, cols=cols)
        a.n_head = a.n_kv_head = int(kh.size)                              # n_kv_head = n_head (check_prunable)
        km = np.asarray(keep_mlp.get(i, np.arange(mlp.c_fc.out_features)), dtype=np.int64)
        if km.size == 0:
            raise ValueError(f"layer {i}: cannot remove every MLP channel of a layer; keep at least one")
        mlp.c_fc = _cut(mlp.c_fc, dev, rows=km)
        mlp.c_proj = _cut(mlp.c_proj, dev, cols=km)
        heads.append(int(kh.size))
        widths.append(int(km.size))
    model.config = dataclasses.replace(model.config, layer_heads=heads, layer_mlp=widths)
    return model


def parse_spec(spec: str) -> dict:
    """``"heads=0.25,mlp=0.3"`` -> ``{"heads": 0.25, "mlp": 0.3}`` (fractions in [0, 1))."""
    out = {}
    for part in str(spec).split(","):
        key, eq, val = part.strip().partition("=")
        if key not in ("heads", "mlp") or not eq:
            raise ValueError(f"--structured takes heads=F,mlp=F (fractions to remove), got {spec!r}")
        try:
            out[key] = float(val)
        except ValueError:
            raise ValueError(f"--structured: {key}={val!r} is not a number") from None
    return out


def kept_width(n: int, frac: float, multiple: int = 1) -> int:
    """Channels kept out of ``n`` when ``frac`` of them go, rounded to a multiple of ``multiple``
    when at least one multiple is left (block formats such as q4_0 need multiples of 32)."""
    keep = n - int(round(frac * n))
    if multiple > 1 and keep >= multiple:
        keep = max(multiple, int(round(keep / multiple)) * multiple)
    return keep


def prune_structured_(model, heads: float = 0.0, mlp: float = 0.0, calib=None, run=None, mlp_multiple: int = 1):
    """Remove the least important ``heads`` share of each layer's heads and ``mlp`` share of its
    MLP channels; returns the (smaller) model. ``calib``: batches of token ids (B, T).
    ``mlp_multiple``: round each kept MLP width to a multiple of this (see ``kept_width``)."""
    for name, f in (("heads", heads), ("mlp", mlp)):
        if not (isinstance(f, (int, float)) and 0.0 <= f < 1.0):
            raise ValueError(f"structured pruning: {name} must be a fraction in [0, 1), got {f!r}")
    check_prunable(model.config)
    for i, block in enumerate(model.transformer.h):
        if round(heads * block.attn.n_head) >= block.attn.n_head:
            raise ValueError(f"heads={heads} would remove every head of layer {i} "
                             f"({block.attn.n_head} heads); keep at least one")
    score = importance(model, calib, run)
    keep_h, keep_m = {}, {}
    for i, block in enumerate(model.transformer.h):
        keep_h[i] = _keep(score[i]["heads"], int(round(heads * block.attn.n_head)))
        n = block.mlp.c_fc.out_features
        keep_m[i] = _keep(score[i]["mlp"], n - kept_width(n, mlp, mlp_multiple))
    return select_(model, keep_h, keep_m)


def block_parameters(model) -> int:
    """Parameters inside the transformer blocks (what structured pruning shrinks)."""
    return int(sum(p.size for _, p in model.transformer.h.named_parameters()))
