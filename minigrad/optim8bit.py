"""8-bit AdamW: both Adam moments stored block-wise in a dynamic 8-bit code.

After Dettmers, Lewis, Shleifer and Zettlemoyer, "8-bit Optimizers via Block-wise
Quantization" (ICLR 2022, arXiv:2110.02861), the method of bitsandbytes' ``AdamW8bit``:

* each moment is cut into blocks of 256 values; a block keeps one float32 ``absmax`` and
  one byte per value, the index of the nearest entry of a 256-entry code table applied to
  ``value / absmax``. 2 bytes + 8/256 per parameter instead of 8: -74.6% of the state;
* the code is *dynamic* (non-linear): Dettmers' dynamic tree code spends its bits on an
  exponent and a fraction, so values from 1e-6 to 1 of the block's largest keep a few
  percent of relative precision (a linear int8 code would round everything below 1/254 of
  the block maximum to 0). The first moment is signed, the second is not, so ``v`` uses an
  unsigned variant with the sign bit given to the fraction;
* a step dequantizes, runs the ordinary AdamW update in float32 (the parameter moves with
  the float32 moments), then requantizes the new moments with the nearest code;
* tensors with fewer than 4,096 values (biases, LayerNorm gains) keep float32 moments, as
  in bitsandbytes' ``min_8bit_size``: they cost little and are the most sensitive.

Hyperparameters, decoupled weight decay and parameter groups are AdamW's. The state
(codes + absmax) saves and loads exactly, so a resumed run continues bit for bit. The step
runs as one compiled pass per tensor (``kernels/adam8bit.py``) on NumPy float32 arrays and
as array code (``searchsorted``, CuPy too) otherwise.
"""
from __future__ import annotations

import math

import numpy as np

from . import backend
from .kernels import adam8bit as _k
from .optim import AdamW

BLOCK = 256          # values per absmax
MIN_8BIT = 4096      # tensors under this many values keep float32 moments


def dynamic_code(signed: bool = True) -> np.ndarray:
    """The 256 sorted values (float32) of the dynamic tree code on [-1, 1] (signed) or [0, 1].

    A code byte reads: a sign bit (signed code only), then E zero bits, a 1 (the indicator),
    then k fraction bits with E + 1 + k = 7 (signed) or 8 (unsigned). Its value is
    ``+-10**-E * f``, f one of 2**k evenly spaced points of [0.1, 1] (the midpoints of its
    2**k equal intervals), for E = 0..6. The remaining patterns give 0 and 1 (so a block's
    largest value is stored exactly). Signed: 2 x 127 + 2 values; unsigned: 254 + 2.
    """
    bits = 7 if signed else 8
    values = [0.0, 1.0]
    for e in range(7):
        k = bits - 1 - e                    # fraction bits left after e zeros and the indicator
        if k < 0:
            break
        n = 2 ** k
        edges = np.linspace(0.1, 1.0, n + 1)
        mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** -e
        values.extend(mids)
        if signed:
            values.extend(-mids)
    code = np.sort(np.asarray(values, np.float64)).astype(np.float32)
    assert code.size == 256, code.size
    return code


class Code:
    """A code table and what quantizing with it needs: the midpoints between neighbours
    (nearest entry = how many midpoints lie below the value) and the bucket table of the
    compiled kernel (see ``kernels/adam8bit.py``)."""

    def __init__(self, signed: bool):
        self.signed = signed
        self.values = dynamic_code(signed)
        self.mids = ((self.values[1:].astype(np.float64) + self.values[:-1]) / 2).astype(np.float32)
        self.buckets = _k.bucket_table(self.mids)
        self.mids_padded = np.append(self.mids, np.float32(np.inf))   # index 255 compares false
        self._dev: dict = {}

    def on(self, xp):
        """(values, mids) as arrays of ``xp`` (CuPy copies made once)."""
        if xp is np:
            return self.values, self.mids
        if xp not in self._dev:
            self._dev[xp] = (xp.asarray(self.values), xp.asarray(self.mids))
        return self._dev[xp]


SIGNED = Code(True)
UNSIGNED = Code(False)


def quantize_blockwise(x, code: Code = SIGNED, block: int = BLOCK):
    """(codes uint8 (n,), absmax float32 (ceil(n / block),)) of ``x`` flattened: each value
    divided by its block's largest magnitude, rounded to the nearest code entry."""
    xp = backend.get_array_module(x)
    flat = x.reshape(-1).astype(xp.float32, copy=False)
    n = flat.size
    nb = -(-n // block)
    padded = xp.zeros(nb * block, xp.float32)
    padded[:n] = flat
    absmax = xp.abs(padded.reshape(nb, block)).max(axis=1)
    scale = xp.where(absmax > 0, absmax, xp.float32(1.0))
    y = (padded.reshape(nb, block) / scale[:, None]).reshape(-1)[:n]
    _, mids = code.on(xp)
    q = xp.searchsorted(mids, y, side="left").astype(xp.uint8)
    return q, absmax.astype(xp.float32)


def dequantize_blockwise(q, absmax, code: Code = SIGNED, block: int = BLOCK, shape=None):
    """The float32 values that ``q, absmax`` stand for (``shape``, or flat)."""
    xp = backend.get_array_module(q)
    values, _ = code.on(xp)
    n = q.size
    out = values[q.astype(xp.int64)] * xp.repeat(absmax, block)[:n]
    return out.reshape(shape) if shape is not None else out


def state_nbytes(n: int, block: int = BLOCK) -> int:
    """Bytes of both moments of an ``n``-value tensor in this optimizer."""
    if n < MIN_8BIT:
        return 2 * 4 * n
    return 2 * (n + 4 * -(-n // block))


class AdamW8bit(AdamW):
    """AdamW whose moments are block-wise 8-bit (see the module docstring).

    ``min_8bit_size``: tensors with fewer values keep float32 moments (4,096 as in
    bitsandbytes). State per 8-bit tensor: ``exp_avg_q``/``exp_avg_sq_q`` (uint8, one per
    value) and ``exp_avg_absmax``/``exp_avg_sq_absmax`` (float32, one per block of 256).
    """

    block = BLOCK

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, min_8bit_size: int = MIN_8BIT):
        if min_8bit_size < 0:
            raise ValueError(f"AdamW8bit: min_8bit_size must be >= 0, got {min_8bit_size}")
        self.min_8bit_size = int(min_8bit_size)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def is_8bit(self, p) -> bool:
        return p.size >= self.min_8bit_size

    def _update(self, group, name, p, g, state):
        if not self.is_8bit(p):
            return super()._update(group, name, p, g, state)
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        decay = lr * wd if wd else 0.0
        xp = backend.get_array_module(p.data)
        if "exp_avg_q" not in state:
            n, nb = p.size, -(-p.size // self.block)
            state["step"] = 0
            # all-zero moments: code index of 0.0 with absmax 0 (any index times 0 is 0)
            state["exp_avg_q"] = xp.full(n, int(np.searchsorted(SIGNED.values, 0.0)), xp.uint8)
            state["exp_avg_absmax"] = xp.zeros(nb, xp.float32)
            state["exp_avg_sq_q"] = xp.zeros(n, xp.uint8)
            state["exp_avg_sq_absmax"] = xp.zeros(nb, xp.float32)
        state["step"] += 1
        t = state["step"]
        bc1 = 1.0 - b1 ** t
        bc2_sqrt = math.sqrt(1.0 - b2 ** t)
        qm, am, qv, av = (state[k] for k in ("exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax"))
        if _k.step_inplace(p.data, g, qm, am, qv, av, SIGNED, UNSIGNED, lr, b1, b2, eps, bc1, bc2_sqrt,
                           decay, self.block):
            return   # one compiled pass; the array code below is its reference
        shape, dt = p.data.shape, p.data.dtype
        m = dequantize_blockwise(qm, am, SIGNED, self.block, shape).astype(dt, copy=False)
        v = dequantize_blockwise(qv, av, UNSIGNED, self.block, shape).astype(dt, copy=False)
        if decay:
            p.data *= 1 - decay
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * (g * g)
        p.data -= (lr / bc1) * (m / (xp.sqrt(v) / bc2_sqrt + eps))
        qm[...], am[...] = quantize_blockwise(m, SIGNED, self.block)
        qv[...], av[...] = quantize_blockwise(v, UNSIGNED, self.block)

    # ------------------------------------------------------------------ state
    QUANT_KEYS = {"exp_avg_q": np.uint8, "exp_avg_sq_q": np.uint8,
                  "exp_avg_absmax": np.float32, "exp_avg_sq_absmax": np.float32}

    def load_state_dict(self, sd: dict) -> None:
        """AdamW's load, plus the 8-bit moments: codes and absmax checked for size and copied
        exactly (never re-rounded), so training continues bit for bit."""
        mine = {n: p for _, n, p in self.named_params()}
        plain, quant = {}, {}
        for n, s in sd["state"].items():
            plain[n] = {k: v for k, v in s.items() if k not in self.QUANT_KEYS}
            q = {k: v for k, v in s.items() if k in self.QUANT_KEYS}
            if not q:
                continue
            if n not in mine:
                continue   # the base load names the unknown parameter
            p = mine[n]
            if set(q) != set(self.QUANT_KEYS) or not self.is_8bit(p):
                raise ValueError(f"optimizer state {n}: 8-bit moments {sorted(q)} do not fit a "
                                 f"{p.size}-value parameter of this AdamW8bit (min_8bit_size={self.min_8bit_size})")
            sizes = {"exp_avg_q": p.size, "exp_avg_sq_q": p.size,
                     "exp_avg_absmax": -(-p.size // self.block), "exp_avg_sq_absmax": -(-p.size // self.block)}
            for k, v in q.items():
                if tuple(v.shape) != (sizes[k],):
                    raise ValueError(f"optimizer state {n}.{k} has shape {tuple(v.shape)}, expected "
                                     f"({sizes[k]},) for a {p.size}-value parameter")
                quant.setdefault(n, {})[k] = backend.to_device(v, p.device).astype(self.QUANT_KEYS[k], copy=True)
        for n, p in mine.items():   # float32 moments where this optimizer keeps 8-bit ones: another optimizer's state
            if n in plain and "exp_avg" in plain[n] and self.is_8bit(p):
                raise ValueError(f"optimizer state {n} holds float32 moments, but AdamW8bit keeps this "
                                 f"{p.size}-value parameter in 8 bits: the state is from another optimizer")
        super().load_state_dict({**sd, "state": plain})
        for n, q in quant.items():
            self.state.setdefault(n, {}).update(q)
