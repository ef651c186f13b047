"""GPTQ: 4-bit codes chosen with the layer's inputs in mind (Frantar et al., 2022).

Round-to-nearest quantizes each weight alone. GPTQ minimises the error of the layer's
*output* over calibration inputs X, ``||X W^T - X Q^T||^2``, whose Hessian in each row of W
is ``H = 2 X^T X`` (the same for every row). It quantizes the columns (input channels) in
order; after column i is rounded, its error ``e = (w_i - q_i) / [H^-1]_ii`` is spread onto the
columns not yet quantized, ``w_j -= e [H^-1]_ij``, so they compensate for it (the optimal
brain surgeon update, with the inverse Hessian's Cholesky factor so each step is one row).
Columns go in lazy batches of ``block`` (the update of the rest is one matrix product per
batch).

The codes land in q4_0's layout, byte for byte (scheme ``gptq``): each block of 32 columns
gets its float16 scale d = m / -8 from the block's weights *as they are when its first
column is reached* (error feedback included), the codes are q = trunc(w / d + 8.5) clipped
to 0..15, and the value that feeds the error is the stored one, (q - 8) * float16(d). So a
GPTQ layer runs on the q4_0 kernels and exports to GGUF as Q4_0.

Each block's scale is searched (``group_scale``): among fractions of q4_0's d, the one that
rounds the block with the least Hessian-weighted error (a little clipping of the largest value
buys finer steps for the rest). The Hessians come from ``minigrad.calib.collect`` (forward
hooks): from one pass over the float model (the default), or layer by layer in the order the
model runs them, each from a pass through the model whose earlier layers are already quantized
(GPTQ's order, ``sequential=True``). ``damp`` (1% of the mean diagonal) keeps H
invertible; input channels that never fired get a unit diagonal and zero weights.

``act_order`` (GPTQ's "desc_act") takes the columns in order of decreasing Hessian diagonal:
the input channels that move the output most are rounded first, while the most columns are
left to absorb their error. The blocks stay q4_0's contiguous blocks of 32 (so the layout and
the kernels do not change): a block's scale is chosen when the first of its columns comes up,
from the block's weights as they are then. On the reference model it did worse than left to
right (Δ loss +0.0055 against +0.0045, 16 calibration batches), so it is off by default.

Measured on the char-level reference model (benchmarks/quantization.py, Δ validation loss
against the float model): round-to-nearest q4_0 +0.0077 (KL 0.0101); GPTQ in one pass over
48 calibration batches +0.0028 (KL 0.0053), 63% of RTN's Δ removed; sequential over 16 batches
+0.0045 (KL 0.0042); one pass over 16 batches +0.0041 (KL 0.0050).
"""
from __future__ import annotations

import numpy as np

from . import backend
from .quant import BLOCK, Q4_0, QuantizedTensor


SHRINK = tuple(np.linspace(1.0, 0.7, 13))   # scale candidates, as fractions of q4_0's m / -8


def group_scale(g: np.ndarray, h: np.ndarray, shrink=SHRINK) -> np.ndarray:
    """The float32 scale per row of a block g (rows, 32) among ``shrink`` x q4_0's own d = m / -8
    that rounds g with the least error, weighted by the Hessian's diagonal h (32,) (how much
    each input channel moves the output). Shrinking below m / -8 clips the largest value a
    little to round the rest more finely; 1.0 alone is q4_0's choice."""
    rows = g.shape[0]
    imax = np.abs(g).argmax(axis=1)
    d0 = (g[np.arange(rows), imax] / np.float32(-8)).astype(np.float32)
    if len(shrink) == 1:
        return d0
    d = (d0[None, :] * np.asarray(shrink, np.float32)[:, None]).astype(np.float32)        # (S, rows)
    inv = np.where(d == 0, np.float32(0), np.float32(1) / np.where(d == 0, np.float32(1), d))
    q = np.clip(np.trunc(g[None] * inv[..., None] + np.float32(8.5)), 0, 15)
    err = (((q - 8) * d.astype(np.float16).astype(np.float32)[..., None] - g[None]) ** 2 * h).sum(-1)
    return d[err.argmin(axis=0), np.arange(rows)]


def gptq_weight(w: np.ndarray, H: np.ndarray, damp: float = 0.01, block: int = 128, shrink=SHRINK,
                act_order: bool = False):
    """GPTQ of one weight (rows, cols) with Hessian H (cols, cols) -> (d, q) as Q4_0.pack_codes takes.

    ``act_order``: quantize the columns in order of decreasing Hessian diagonal (the inputs that
    move the output most first, while the most columns are left to absorb their error) instead
    of left to right. The blocks of 32 stay q4_0's contiguous blocks: a block's scale is chosen
    when its first column comes up, from the block's weights as they are at that moment."""
    if block % BLOCK:
        raise ValueError(f"gptq: block ({block}) must be a multiple of {BLOCK}")
    W = np.array(w, dtype=np.float64)
    rows, cols = W.shape
    H = np.array(H, dtype=np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H[np.diag_indices(cols)] += damp * np.mean(np.diag(H))
    hdiag = np.diag(H).astype(np.float32)
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(cols)
    pos = np.argsort(perm)                          # pos[c]: where original column c is processed
    W, H = W[:, perm], H[np.ix_(perm, perm)]
    # upper Cholesky factor of H^-1: row i holds [H^-1]_ii..., scaled as the OBS update needs
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T
    nb = cols // BLOCK
    d_all = np.zeros((rows, nb, 1), np.float32)
    q_all = np.zeros((rows, nb, BLOCK), np.uint8)
    inv = np.zeros((nb, rows), np.float32)
    d16 = np.zeros((nb, rows), np.float64)
    done = np.zeros(nb, bool)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].copy()
        Err = np.zeros_like(W1)
        for i in range(i2 - i1):
            p = i1 + i
            c = int(perm[p])
            b = c // BLOCK
            if not done[b]:                         # the block's scale, from its weights as they are now
                P = pos[b * BLOCK:(b + 1) * BLOCK]
                inside = (P >= i1) & (P < i2)
                g = np.empty((rows, BLOCK), np.float64)
                g[:, inside] = W1[:, P[inside] - i1]
                out = ~inside                       # later batches: their lazy update so far
                if out.any():
                    g[:, out] = W[:, P[out]] - Err @ Hinv[i1:i2, P[out]]
                d32 = group_scale(g.astype(np.float32), hdiag[b * BLOCK:(b + 1) * BLOCK], shrink)
                inv[b] = np.where(d32 == 0, np.float32(0), np.float32(1) / np.where(d32 == 0, np.float32(1), d32))
                d16[b] = d32.astype(np.float16).astype(np.float64)
                d_all[:, b, 0] = d32
                done[b] = True
            w = W1[:, i]
            q = np.clip(np.trunc((w.astype(np.float32) * inv[b]).astype(np.float32) + np.float32(8.5)), 0, 15)
            q_all[:, b, c % BLOCK] = q.astype(np.uint8)
            err = (w - (q - 8) * d16[b]) / Hinv[p, p]
            W1[:, i + 1:] -= np.outer(err, Hinv[p, p + 1:i2])
            Err[:, i] = err
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]
    return d_all, q_all


def gptq_quantize(model, names, batches, run=None, progress: bool = False, damp: float = 0.01,
                  block: int = 128, shrink=SHRINK, sequential: bool = False, act_order: bool = False) -> dict:
    """{layer name: QuantizedTensor("gptq")} for the named Linear layers of ``model``.

    ``sequential`` (GPTQ's own order): the layers are quantized one at a time in the order the
    model runs them, and each one's Hessian comes from a calibration pass through the model
    whose earlier layers are quantized already (``replace_``: a function that swaps one layer
    in), so a layer also corrects what the ones before it got wrong. Without it (the default),
    one pass over the float model gives every Hessian: one calibration pass instead of one per
    layer, so more calibration text for the same time, and on the reference model a lower
    validation loss (48 batches: Δ +0.0028 against RTN's +0.0077; sequential with 16: +0.0045).
    """
    from .calib import collect
    from .quant import replace_linears_
    batches = list(batches)
    names = list(names)
    modules = dict(model.named_modules())
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    names.sort(key=order.get)
    it = names
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(names, desc="gptq layers", unit="layer")
    stats = None if sequential else collect(model, batches, run=run, modules=names, want=("xtx",))
    out = {}
    for n in it:
        st = collect(model, batches, run=run, modules=[n], want=("xtx",))[n] if sequential else stats[n]
        w = backend.to_numpy(modules[n].weight.data)
        d, q = gptq_weight(w, st.hessian(), damp, block, shrink, act_order)
        xp = backend.get_array_module(modules[n].weight.data)
        arrays = Q4_0.pack_codes(d, q)
        out[n] = QuantizedTensor("gptq", w.shape, {k: xp.asarray(a) for k, a in arrays.items()})
        if sequential:
            replace_linears_(model, {n: out[n]})
    return out
