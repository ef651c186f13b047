"""Quantized weights: 16-, 8- and 4-bit formats that stay packed, and ``quantize_``.

A weight matrix W (rows, cols) is quantized along its input axis (cols): each row is cut
into blocks, and each block keeps small integer codes and one scale. Every format is a
pack/unpack pair over NumPy (or CuPy) arrays; the compiled kernels in
``minigrad.kernels.quant`` read the same arrays and are tested against ``unpack``.

| scheme | arrays (shape)                                                  | bits/weight |
|--------|-----------------------------------------------------------------|-------------|
| fp16   | data float16 (rows, cols)                                       | 16          |
| bf16   | data uint16 (rows, cols): the top half of the float32 bits, RNE | 16          |
| int8   | codes int8 (rows, cols), scale float32 (rows,): per output channel, symmetric absmax | 8 + 32/cols |
| q8_0   | blocks uint8 (rows, cols/32 * 34): GGML's block_q8_0, byte for byte | 8.5     |
| q4_0   | blocks uint8 (rows, cols/32 * 18): GGML's block_q4_0, byte for byte | 4.5     |
| nf4    | codes uint8 (rows, cols/2), absmax_q int8 (rows*cols/64,), absmax_scale float32 (groups of 256 blocks,), absmax_offset float32 (1,) | ~4.13 |
| gptq   | q4_0's blocks, codes chosen by GPTQ (``minigrad.gptq``)          | 4.5         |

GGML layouts (little endian, one block per 32 consecutive weights of a row):

- ``block_q8_0`` (34 bytes): ``d`` float16 = absmax / 127, then 32 int8 codes ``q``;
  w = d * q. Codes are round-half-away-from-zero of w / d (computed in float32, with the
  float32 d; the stored d is its float16 rounding), as GGML's reference code does.
- ``block_q4_0`` (18 bytes): ``d`` float16 = m / -8 where m is the block's value of largest
  magnitude (sign kept), then 16 bytes: byte j holds code j in its low nibble and code
  j + 16 in its high nibble; w = d * (q - 8), q = min(15, trunc(w / d + 8.5)).

NF4 (QLoRA): blocks of 64 normalised by their absmax and mapped to the nearest of 16
levels placed at quantiles of N(0, 1) (``NF4_LEVELS``, exact zero included); two codes per
byte, the even element in the low nibble. Double quantization: the block absmaxes, less
their mean, are quantized again to int8 with one float32 scale per 256 blocks.

The block rule: a matrix whose input size is not a multiple of the scheme's block (32 for
q8_0/q4_0/gptq, 64 for nf4) is refused with an error that names it; ``quantize_`` checks
every layer before it changes any (pass ``exclude=`` to keep such a layer in float). GGUF
files cannot hold padded blocks either, so refusing keeps our files exportable.
"""
from __future__ import annotations

import json
import statistics

import numpy as np

from . import backend

BLOCK = 32             # q8_0, q4_0, gptq
NF4_BLOCK = 64
NF4_GROUP = 256        # blocks per second-level (double-quantization) scale


class QuantError(ValueError):
    """A weight or model that cannot be quantized (or unpacked) as asked: the message says why."""


# --------------------------------------------------------------------------- helpers
def _xp(a):
    return backend.get_array_module(a)


def _roundf(v):
    """Round half away from zero (C's roundf), exact for float32: floor(a) + (frac >= 0.5)."""
    xp = _xp(v)
    a = xp.abs(v)
    fl = xp.floor(a)
    return xp.sign(v) * (fl + (a - fl >= 0.5))


def _blocks(w, block: int):
    rows, cols = w.shape
    return w.reshape(rows, cols // block, block)


def _f16_bytes(d):
    """float32 (..., 1) scales -> the little-endian bytes of their float16 rounding (..., 2)."""
    return _xp(d).ascontiguousarray(d.astype(np.float16)).view(np.uint8)


def _f16_from(b):
    """(..., 2) bytes -> (..., 1) float32 of the float16 they hold."""
    xp = _xp(b)
    return xp.ascontiguousarray(b).view(np.float16).astype(np.float32)


# --------------------------------------------------------------------------- formats
class Format:
    """One storage layout: its block, bits per weight, array kinds, and pack/unpack."""
    name = ""
    block = 1
    main = "data"                       # the array that holds the codes
    kinds: dict[str, str] = {}          # array name -> "codes" | "scales"

    def check(self, shape, what: str = "weight") -> None:
        if len(shape) != 2:
            raise QuantError(f"{what}: {self.name} quantizes 2-D weights, got shape {tuple(shape)}")
        if shape[1] % self.block:
            raise QuantError(f"{what} of shape {tuple(shape)}: {self.name} needs the input size "
                             f"({shape[1]}) to be a multiple of its block of {self.block}; keep this "
                             f"layer in float (exclude=[...]) or pick a scheme with a smaller block")

    def pack(self, w) -> dict:
        raise NotImplementedError

    def unpack(self, arrays: dict, shape, rows=None, dtype=np.float32):
        raise NotImplementedError

    def nbytes(self, shape) -> int:
        raise NotImplementedError

    def rows_of(self, arrays: dict, rows):
        """The arrays restricted to some rows (every array of these layouts is row-major)."""
        return {k: (a if rows is None else a[rows]) for k, a in arrays.items()}


class FP16(Format):
    name, kinds = "fp16", {"data": "codes"}

    def pack(self, w):
        return {"data": w.astype(np.float16)}

    def unpack(self, arrays, shape, rows=None, dtype=np.float32):
        return self.rows_of(arrays, rows)["data"].astype(dtype)

    def nbytes(self, shape):
        return 2 * shape[0] * shape[1]


def bf16_from_f32(w):
    """float32 -> bfloat16 bits (uint16) with round-to-nearest-even; NaN stays a quiet NaN."""
    xp = _xp(w)
    u = xp.ascontiguousarray(w, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return xp.where(nan, (u >> 16) | 0x40, rounded).astype(np.uint16)


def f32_from_bf16(h):
    xp = _xp(h)
    return (h.astype(np.uint32) << 16).view(np.float32) if h.flags.c_contiguous else \
        (xp.ascontiguousarray(h).astype(np.uint32) << 16).view(np.float32)


class BF16(Format):
    name, kinds = "bf16", {"data": "codes"}

    def pack(self, w):
        return {"data": bf16_from_f32(w)}

    def unpack(self, arrays, shape, rows=None, dtype=np.float32):
        return f32_from_bf16(self.rows_of(arrays, rows)["data"]).astype(dtype, copy=False)

    def nbytes(self, shape):
        return 2 * shape[0] * shape[1]


class Int8(Format):
    name, main, kinds = "int8", "codes", {"codes": "codes", "scale": "scales"}

    def pack(self, w):
        xp = _xp(w)
        scale = (xp.abs(w).max(axis=1) / np.float32(127)).astype(np.float32)
        inv = xp.where(scale > 0, 1 / xp.where(scale > 0, scale, 1), 0).astype(np.float32)
        codes = xp.clip(xp.rint(w * inv[:, None]), -127, 127).astype(np.int8)
        return {"codes": codes, "scale": scale}

    def unpack(self, arrays, shape, rows=None, dtype=np.float32):
        a = self.rows_of(arrays, rows)
        return (a["codes"].astype(np.float32) * a["scale"][..., None]).astype(dtype, copy=False)

    def nbytes(self, shape):
        return shape[0] * shape[1] + 4 * shape[0]


class Q8_0(Format):
    name, block, main, kinds = "q8_0", BLOCK, "blocks", {"blocks": "codes"}
    type_size = 34

    def pack(self, w):
        xp = _xp(w)
        b = _blocks(w.astype(np.float32), BLOCK)                         # (rows, nb, 32)
        d = (xp.abs(b).max(axis=-1, keepdims=True) / np.float32(127)).astype(np.float32)
        inv = xp.where(d == 0, np.float32(0), np.float32(1) / xp.where(d == 0, np.float32(1), d)).astype(np.float32)
        q = _roundf((b * inv).astype(np.float32)).astype(np.int8)
        out = xp.concatenate([_f16_bytes(d), q.view(np.uint8)], axis=-1)  # (rows, nb, 34)
        return {"blocks": out.reshape(w.shape[0], -1)}

    def unpack(self, arrays, shape, rows=None, dtype=np.float32):
        blk = self.rows_of(arrays, rows)["blocks"]
        blk = blk.reshape(blk.shape[:-1] + (-1, self.type_size))
        d = _f16_from(blk[..., :2])
        q = _xp(blk).ascontiguousarray(blk[..., 2:]).view(np.int8).astype(np.float32)
        return (q * d).reshape(blk.shape[:-2] + (-1,)).astype(dtype, copy=False)

    def nbytes(self, shape):
        return shape[0] * shape[1] // BLOCK * self.type_size


class Q4_0(Format):
    name, block, main, kinds = "q4_0", BLOCK, "blocks", {"blocks": "codes"}
    type_size = 18

    def pack(self, w):
        return {"blocks": self.pack_codes(*self.scales_codes(w.astype(np.float32)))}

    @staticmethod
    def scales_codes(w):
        """GGML's round-to-nearest: the float32 d of each block and the codes 0..15."""
        xp = _xp(w)
        b = _blocks(w, BLOCK)
        imax = xp.abs(b).argmax(axis=-1)[..., None]
        m = xp.take_along_axis(b, imax, axis=-1)
        d = (m / np.float32(-8)).astype(np.float32)
        inv = xp.where(d == 0, np.float32(0), np.float32(1) / xp.where(d == 0, np.float32(1), d)).astype(np.float32)
        q = xp.trunc((b * inv).astype(np.float32) + np.float32(8.5)).astype(np.float32)
        return d, xp.clip(q, 0, 15).astype(np.uint8)

    @staticmethod
    def pack_codes(d, q):
        """d (rows, nb, 1) float32, q (rows, nb, 32) uint8 0..15 -> GGML blocks (rows, nb*18)."""
        xp = _xp(q)
        qs = q[..., :16] | (q[..., 16:] << np.uint8(4))
        out = xp.concatenate([_f16_bytes(d), qs], axis=-1)
        return out.reshape(q.shape[0], -1)

    def unpack(self, arrays, shape, rows=None, dtype=np.float32):
        blk = self.rows_of(arrays, rows)["blocks"]
        blk = blk.reshape(blk.shape[:-1] + (-1, self.type_size))
        xp = _xp(blk)
        d = _f16_from(blk[..., :2])
        qs = blk[..., 2:]
        q = xp.concatenate([qs & np.uint8(15), qs >> np.uint8(4)], axis=-1).astype(np.float32) - 8
        return (q * d).reshape(blk.shape[:-2] + (-1,)).astype(dtype, copy=False)

    def nbytes(self, shape):
        return shape[0] * shape[1] // BLOCK * self.type_size


def nf4_levels() -> np.ndarray:
    """The 16 NormalFloat levels, built as QLoRA describes: 8 positive and 7 negative
    quantiles of N(0, 1) (tail probability 1 - 0.9677 cut off on each side so the ends are
    finite), plus an exact zero, scaled into [-1, 1]."""
    nd, off = statistics.NormalDist(), 0.9677083
    pos = [nd.inv_cdf(p) for p in np.linspace(off, 0.5, 9)[:-1]]
    neg = [-nd.inv_cdf(p) for p in np.linspace(off, 0.5, 8)[:-1]]
    v = np.array(sorted(pos + [0.0] + neg), np.float64)
    return (v / np.abs(v).max()).astype(np.float32)


NF4_LEVELS = nf4_levels()


class NF4(Format):
    name, block, main = "nf4", NF4_BLOCK, "codes"
    kinds = {"codes": "codes", "absmax_q": "scales", "absmax_scale": "scales", "absmax_offset": "scales"}

    def pack(self, w):
        xp = _xp(w)
        rows, cols = w.shape
        b = _blocks(w.astype(np.float32), NF4_BLOCK)                     # (rows, nb, 64)
        absmax = xp.abs(b).max(axis=-1).reshape(-1)                       # (rows * nb,)
        qa, sc, off = self.double_quantize(absmax)
        am = self.absmax_of(qa, sc, off, xp.arange(absmax.size)).reshape(rows, -1, 1)
        norm = b / xp.where(am > 0, am, 1)
        levels = xp.asarray(NF4_LEVELS)
        mids = (levels[1:] + levels[:-1]) / 2
        codes = xp.searchsorted(mids, norm.reshape(-1)).astype(np.uint8).reshape(rows, cols)
        packed = codes[:, 0::2] | (codes[:, 1::2] << np.uint8(4))
        return {"codes": packed, "absmax_q": qa, "absmax_scale": sc, "absmax_offset": off}

    @staticmethod
    def double_quantize(absmax):
        xp = _xp(absmax)
        off = absmax.mean(dtype=np.float64).astype(np.float32).reshape(1)
        c = absmax - off
        n = c.size
        pad = (-n) % NF4_GROUP
        g = xp.concatenate([c, xp.zeros(pad, np.float32)]).reshape(-1, NF4_GROUP)
        sc = (xp.abs(g).max(axis=1) / np.float32(127)).astype(np.float32)
        inv = xp.where(sc > 0, 1 / xp.where(sc > 0, sc, 1), 0).astype(np.float32)
        qa = xp.clip(xp.rint(g * inv[:, None]), -127, 127).astype(np.int8).reshape(-1)[:n]
        return qa, sc, off.astype(np.float32)

    @staticmethod
    def absmax_of(qa, sc, off, blocks):
        """Dequantized absmax of the given flat block indices."""
        return qa[blocks].astype(np.float32) * sc[blocks // NF4_GROUP] + off[0]

    def unpack(self, arrays, shape, rows=None, dtype=np.float32):
        xp = _xp(arrays["codes"])
        idx = xp.arange(shape[0])[rows if rows is not None else slice(None)] \
            if rows is None or isinstance(rows, slice) else xp.asarray(rows)
        flat = idx.reshape(-1)
        nb = shape[1] // NF4_BLOCK
        packed = arrays["codes"][flat]                                     # (r, cols/2)
        codes = xp.stack([packed & np.uint8(15), packed >> np.uint8(4)], axis=-1).reshape(len(flat), -1)
        blocks = (flat[:, None] * nb + xp.arange(nb)).reshape(-1)
        am = self.absmax_of(arrays["absmax_q"], arrays["absmax_scale"], arrays["absmax_offset"], blocks)
        w = xp.asarray(NF4_LEVELS)[codes].reshape(len(flat), nb, NF4_BLOCK) * am.reshape(-1, nb, 1)
        return w.reshape(tuple(idx.shape) + (shape[1],)).astype(dtype, copy=False)

    def nbytes(self, shape):
        nblocks = shape[0] * shape[1] // NF4_BLOCK
        return shape[0] * shape[1] // 2 + nblocks + 4 * (-(-nblocks // NF4_GROUP)) + 4


FORMATS: dict[str, Format] = {f.name: f for f in (FP16(), BF16(), Int8(), Q8_0(), Q4_0(), NF4())}
STORAGE = {name: name for name in FORMATS} | {"gptq": "q4_0"}   # scheme -> storage format
SCHEMES = tuple(STORAGE)


def check_scheme(scheme: str) -> str:
    if scheme not in STORAGE:
        raise QuantError(f"unknown quantization scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
    return scheme


def format_of(scheme: str) -> Format:
    return FORMATS[STORAGE[check_scheme(scheme)]]


def bits_per_weight(scheme: str, shape=(4096, 4096)) -> float:
    return 8.0 * format_of(scheme).nbytes(shape) / (shape[0] * shape[1])


def _layout(fmt: str, shape) -> dict:
    """array name -> (shape, dtype) of a format's arrays for a (rows, cols) weight."""
    r, c = shape
    nb4 = r * c // NF4_BLOCK
    return {"fp16": {"data": ((r, c), np.float16)},
            "bf16": {"data": ((r, c), np.uint16)},
            "int8": {"codes": ((r, c), np.int8), "scale": ((r,), np.float32)},
            "q8_0": {"blocks": ((r, c // BLOCK * Q8_0.type_size), np.uint8)},
            "q4_0": {"blocks": ((r, c // BLOCK * Q4_0.type_size), np.uint8)},
            "nf4": {"codes": ((r, c // 2), np.uint8), "absmax_q": ((nb4,), np.int8),
                    "absmax_scale": ((-(-nb4 // NF4_GROUP),), np.float32),
                    "absmax_offset": ((1,), np.float32)}}[fmt]


# --------------------------------------------------------------------------- the container
class QuantizedTensor:
    """A packed weight of logical shape (rows, cols): its scheme and arrays, never the float W.

    ``data`` is the codes array (so ``get_array_module(w.data)`` finds the device); it is
    frozen: ``requires_grad`` is False and asking for a gradient is an error.
    """

    def __init__(self, scheme: str, shape, arrays: dict):
        self.scheme = check_scheme(scheme)
        self.format = format_of(scheme)
        self.shape = tuple(int(s) for s in shape)
        self.arrays = dict(arrays)
        self.validate()

    def validate(self, where: str = "") -> None:
        """Every array present, with the dtype and size the layout implies."""
        f, (r, c) = self.format, self.shape
        expect = _layout(f.name, self.shape)
        where = where or f"{self.scheme} weight {self.shape}"
        if c % f.block:
            raise QuantError(f"{where}: input size {c} is not a multiple of the {f.name} block {f.block}")
        missing = sorted(set(expect) - set(self.arrays))
        if missing:
            raise QuantError(f"{where}: missing array(s) {', '.join(missing)}")
        for k, (shape, dt) in expect.items():
            a = self.arrays[k]
            if tuple(a.shape) != shape or a.dtype != dt:
                raise QuantError(f"{where}: array {k!r} is {a.dtype}{tuple(a.shape)}, the {f.name} "
                                 f"layout needs {np.dtype(dt)}{shape} (a truncated or mismatched file?)")

    @classmethod
    def wrap(cls, scheme: str, shape, arrays: dict) -> "QuantizedTensor":
        """The container around arrays already checked (a layer's buffers): no validation."""
        t = cls.__new__(cls)
        t.scheme, t.format, t.shape, t.arrays = scheme, FORMATS[STORAGE[scheme]], tuple(shape), arrays
        return t

    @classmethod
    def empty(cls, scheme: str, shape) -> "QuantizedTensor":
        """Zero arrays of the layout's shapes (filled later by loading a file)."""
        f = format_of(scheme)
        f.check(shape)
        return cls(scheme, shape, {k: np.zeros(s, dt) for k, (s, dt) in _layout(f.name, shape).items()})

    # -- what a Tensor would answer
    @property
    def data(self):
        return self.arrays[self.format.main]

    @property
    def ndim(self):
        return 2

    @property
    def dtype(self):
        return np.dtype(np.float32)

    @property
    def requires_grad(self):
        return False

    @requires_grad.setter
    def requires_grad(self, flag):
        if flag:
            raise QuantError(f"a {self.scheme} quantized weight is frozen and has no gradient: train an "
                             f"adapter on top of it (minigrad.nn.lora) or dequantize() it first")

    @property
    def grad(self):
        return None

    @grad.setter
    def grad(self, value):
        if value is not None:
            raise QuantError(f"a {self.scheme} quantized weight is frozen and has no gradient")

    # -- values
    def dequantize(self, dtype=np.float32):
        """The float matrix (rows, cols): for tests, export, and small tiles; kernels never call it."""
        return self.format.unpack(self.arrays, self.shape, None, dtype)

    def dequantize_rows(self, rows, dtype=np.float32):
        """Float rows ``rows`` (an index array of any shape, or a slice): an embedding lookup."""
        return self.format.unpack(self.arrays, self.shape, rows, dtype)

    # -- bytes
    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values()))

    def bytes_by_kind(self) -> dict:
        """{"codes": bytes, "scales": bytes}; GGML blocks hold both (2 scale bytes per block)."""
        out = {"codes": 0, "scales": 0}
        for k, a in self.arrays.items():
            if k == "blocks":
                scale = 2 * a.nbytes // self.format.type_size
                out["scales"] += int(scale)
                out["codes"] += int(a.nbytes - scale)
            else:
                out[self.format.kinds[k]] += int(a.nbytes)
        return out

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / (self.shape[0] * self.shape[1])

    def to(self, device: str) -> "QuantizedTensor":
        return QuantizedTensor(self.scheme, self.shape,
                               {k: backend.to_device(a, device) for k, a in self.arrays.items()})

    def __repr__(self):
        return f"QuantizedTensor({self.scheme}, shape={self.shape}, {self.bits_per_weight:.2f} bits/weight)"


def quantize_tensor(w, scheme: str, what: str = "weight") -> QuantizedTensor:
    """Round-to-nearest quantization of a 2-D float array (GPTQ needs calibration: ``minigrad.gptq``)."""
    if scheme == "gptq":
        raise QuantError("gptq needs calibration data: use quantize_(model, 'gptq', calib=batches)")
    f = format_of(scheme)
    w = getattr(w, "data", w)
    f.check(w.shape, what)
    xp = _xp(w)
    return QuantizedTensor(scheme, w.shape, f.pack(xp.ascontiguousarray(w, dtype=np.float32)))


# --------------------------------------------------------------------------- model surgery
def _parent(model, name: str):
    parent = model
    *path, last = name.split(".")
    for p in path:
        parent = getattr(parent, p)
    return parent, last


def quantize_(model, scheme: str, exclude=None, calib=None, run=None, progress: bool = False,
              include=None, gptq_options: dict | None = None):
    """Replace the model's Linear layers by QuantLinear (packed ``scheme`` weights), in place.

    ``exclude``/``include``: module name patterns (``minigrad.calib.match``: a full name or its
    last components, e.g. ``"lm_head"``, ``"c_proj"``). An Embedding whose weight is tied to a
    quantized Linear (GPT's ``wte``/``lm_head``) becomes a QuantEmbedding reading the same
    codes. ``calib``: calibration batches for ``gptq`` (``run(model, batch)`` does one forward;
    default ``model(batch)``). Returns the model.
    """
    from .calib import match
    from .nn.layers import Linear

    check_scheme(scheme)
    linears = [(n, m) for n, m in model.named_modules()
               if n and type(m) is Linear and match(n, include) and not (exclude and match(n, exclude))]
    if not linears:
        raise QuantError(f"no Linear layer to quantize (include={include!r}, exclude={exclude!r})")
    bad = []
    for n, m in linears:
        try:
            format_of(scheme).check(m.weight.shape, n)
        except QuantError as e:
            bad.append(str(e))
    if bad:
        raise QuantError("cannot quantize:\n  " + "\n  ".join(bad))
    if scheme == "gptq" and calib is None:
        raise QuantError("gptq needs calibration batches (calib=...; lm.compress: --calib_data)")

    if scheme == "gptq":
        from .gptq import gptq_quantize
        packed = gptq_quantize(model, [n for n, _ in linears], calib, run=run, progress=progress,
                               **(gptq_options or {}))
    else:
        packed = {}
        it = linears
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(linears, desc=f"quantize {scheme}", unit="layer")
        for n, m in it:
            packed[n] = quantize_tensor(m.weight.data, scheme, n)

    return replace_linears_(model, packed)


def replace_linears_(model, packed: dict):
    """Swap each Linear named in ``packed`` ({name: QuantizedTensor}) for a QuantLinear, and
    an Embedding tied to one of them for a QuantEmbedding on the same codes."""
    from .nn.layers import Embedding
    from .nn.quantized import QuantEmbedding, QuantLinear

    modules = dict(model.named_modules())
    embeddings = {id(m.weight): n for n, m in modules.items() if type(m) is Embedding}
    for n, qt in packed.items():
        m = modules[n]
        q = QuantLinear.from_linear(m, qt)
        parent, last = _parent(model, n)
        setattr(parent, last, q)
        en = embeddings.get(id(m.weight))
        if en is not None:
            p2, l2 = _parent(model, en)
            setattr(p2, l2, QuantEmbedding(q))
    return model


def dequantize_(model):
    """The inverse surgery: every QuantLinear/QuantEmbedding back to float Linear/Embedding."""
    from .nn.layers import Embedding, Linear
    from .nn.module import Parameter
    from .nn.quantized import QuantEmbedding, QuantLinear

    made = {}
    for n, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            lin = Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight = Parameter(m.weight.dequantize())
            if m.bias is not None:
                lin.bias = Parameter(m.bias.data.copy())
            made[id(m)] = lin
            p, last = _parent(model, n)
            setattr(p, last, lin)
    for n, m in list(model.named_modules()):
        if isinstance(m, QuantEmbedding):
            emb = Embedding(m.num_embeddings, m.embedding_dim)
            src = made.get(id(m.linear))
            emb.weight = src.weight if src is not None else Parameter(m.linear.weight.dequantize())
            p, last = _parent(model, n)
            setattr(p, last, emb)
    return model


# --------------------------------------------------------------------------- reports
def bytes_report(model) -> dict:
    """Bytes a model holds, by kind and dtype: packed weight codes, their scales, float params.

    ``{"codes": n, "scales": n, "float": n, "total": n, "by_dtype": {"uint8": n, ...},
    "by_module": {name: {"scheme": s, "bytes": n}}}``; every array is counted once (ties).
    """
    from .nn.quantized import QuantLinear
    seen, out = set(), {"codes": 0, "scales": 0, "float": 0, "by_dtype": {}, "by_module": {}}

    def add(a, kind):
        if id(a) in seen:
            return 0
        seen.add(id(a))
        out[kind] += int(a.nbytes)
        dt = str(a.dtype)
        out["by_dtype"][dt] = out["by_dtype"].get(dt, 0) + int(a.nbytes)
        return int(a.nbytes)

    for n, m in model.named_modules():
        if isinstance(m, QuantLinear):
            qw = m.weight
            if any(id(a) in seen for a in qw.arrays.values()):
                continue
            for a in qw.arrays.values():
                seen.add(id(a))
                out["by_dtype"][str(a.dtype)] = out["by_dtype"].get(str(a.dtype), 0) + int(a.nbytes)
            kinds = qw.bytes_by_kind()
            for k, v in kinds.items():
                out[k] += v
            out["by_module"][n] = {"scheme": qw.scheme, "bytes": qw.nbytes, "shape": list(qw.shape)}
    for n, p in model.named_parameters():
        add(p.data, "float")
    out["total"] = out["codes"] + out["scales"] + out["float"]
    return out


def format_bytes_report(rep: dict) -> str:
    """PEFT-style one-liner: codes / scales / float parameters, and the share of each."""
    t = max(rep["total"], 1)
    parts = [f"{k}: {rep[k]:,} B ({100 * rep[k] / t:.1f}%)" for k in ("codes", "scales", "float")]
    return " || ".join(parts) + f" || total: {rep['total']:,} B"


def quant_plan(model) -> dict:
    """{module name: scheme} of the model's QuantLinear layers, and the embeddings tied to them."""
    from .nn.quantized import QuantEmbedding, QuantLinear
    names = {id(m): n for n, m in model.named_modules()}
    plan, ties = {}, {}
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear):
            plan[n] = m.weight.scheme
        elif isinstance(m, QuantEmbedding):
            ties[n] = names.get(id(m.linear))
    return {"modules": plan, "tied_embeddings": ties}


def plan_json(model) -> str:
    return json.dumps(quant_plan(model), sort_keys=True)
