"""Compact storage of pruned weights: a bitmask plus the kept values, or N:M values plus indices.

Two layouts, each a pack/unpack pair on NumPy arrays:

- ``bitmask`` (unstructured): one bit per weight, row-major, least significant bit first
  (``np.packbits(..., bitorder="little")``), then the non-zero values in the same order.
  Bytes: ``ceil(n / 8) + nnz * itemsize``. Why not CSR: CSR stores a column index per non-zero
  (16 bits here at least) plus row pointers, so it beats one bit per weight only below 1/16
  density; the sparsities that keep a model usable (50-80%) are far above that.
- ``N:M`` (``2:4``, ``4:8``): every group of M consecutive inputs of a row keeps exactly N values,
  stored as ``(out, in * N / M)`` values plus each one's position in its group, in
  ``ceil(log2 M)`` bits (2 bits for 2:4, the layout sparse tensor cores read), packed
  least significant bit first. Bytes: ``nnz * itemsize + ceil(nnz * bits / 8)``.

**With quantization** (``lm.compress --prune ... --quantize q4_0``: prune, then quantize), the
kept values themselves are stored in a block format of ``minigrad.quant`` (``q4_0``/``q8_0``,
blocks of 32 consecutive kept values, flattened row-major, the last block zero-padded; its arrays
as ``name.q_codes`` and ``name.q_scales``):
``bitmask+q4_0`` costs 1 + 4.5 * density bits per weight, ``2:4+q4_0`` costs 1 + 2.25 (2-bit
positions for half the weights, 4.5 bits per value), both 3.25 bits at 50%, 10.2% of float32.
A weight with no mask can be stored as ``q4_0``/``q8_0`` alone (the tied embedding).

``save_sparse`` writes a state dict to one safetensors file with the chosen weights packed
(``name.sparse_bitmask`` + ``name.sparse_values``, or ``name.nm_values`` + ``name.nm_indices``)
and the layout in the metadata; ``load_sparse`` gives the dense state dict back, with the
ordinary names. The matmuls run dense after loading: there is no sparse kernel here, so the
saving is on disk only, and ``stored_bytes`` says exactly how much.
"""
from __future__ import annotations

import json
import math

import numpy as np

from . import backend
from .io import load_file, load_metadata, save_file

LAYOUT_KEY = "sparse_layout"
PACKED_SUFFIXES = (".sparse_bitmask", ".sparse_values", ".nm_values", ".nm_indices", ".q_codes", ".q_scales")


def _np(a) -> np.ndarray:
    return backend.to_numpy(getattr(a, "data", a))


# --------------------------------------------------------------------------- bitmask
def pack_bitmask(w) -> dict:
    """``{"bitmask": uint8 bits of w != 0, "values": the non-zeros in row-major order}``."""
    w = _np(w)
    keep = w != 0
    return {"bitmask": np.packbits(keep.ravel(), bitorder="little"), "values": w[keep]}


def unpack_bitmask(bitmask, values, shape) -> np.ndarray:
    n = int(np.prod(shape))
    keep = np.unpackbits(np.asarray(bitmask, dtype=np.uint8), count=n, bitorder="little").astype(bool)
    if int(keep.sum()) != values.size:
        raise ValueError(f"bitmask has {int(keep.sum())} set bits but {values.size} values were stored")
    out = np.zeros(n, dtype=values.dtype)
    out[keep] = values
    return out.reshape(shape)


# --------------------------------------------------------------------------- N:M
def index_bits(m: int) -> int:
    return max(1, math.ceil(math.log2(m)))


def _pack_uint(idx: np.ndarray, bits: int) -> np.ndarray:
    b = ((idx.astype(np.uint16)[:, None] >> np.arange(bits, dtype=np.uint16)) & 1).astype(np.uint8)
    return np.packbits(b.ravel(), bitorder="little")


def _unpack_uint(packed: np.ndarray, count: int, bits: int) -> np.ndarray:
    b = np.unpackbits(np.asarray(packed, dtype=np.uint8), count=count * bits, bitorder="little")
    return (b.reshape(count, bits).astype(np.int64) << np.arange(bits)).sum(axis=1)


def pack_nm(w, n: int, m: int) -> dict:
    """``{"values": (out, in*n/m), "indices": packed positions}`` of a weight in the N:M pattern.

    A group with fewer than ``n`` non-zeros stores zeros at its lowest free positions; a group
    with more is an error (the weight is not N:M)."""
    w = _np(w)
    out, inp = w.shape
    if inp % m:
        raise ValueError(f"pattern {n}:{m} needs the input size to be a multiple of {m}, got {inp}")
    g = w.reshape(out, inp // m, m)
    nz = g != 0
    if int(nz.sum(axis=-1).max(initial=0)) > n:
        raise ValueError(f"the weight is not {n}:{m} sparse: a group of {m} holds more than {n} non-zeros")
    # non-zeros first (stable: by position), then zeros, keep the first n positions, in order
    order = np.argsort(~nz, axis=-1, kind="stable")[..., :n]
    order = np.sort(order, axis=-1)
    values = np.take_along_axis(g, order, axis=-1).reshape(out, -1)
    return {"values": values, "indices": _pack_uint(order.ravel(), index_bits(m))}


def unpack_nm(values, indices, shape, n: int, m: int) -> np.ndarray:
    out, inp = shape
    groups = inp // m
    idx = _unpack_uint(indices, out * groups * n, index_bits(m)).reshape(out, groups, n)
    g = np.zeros((out, groups, m), dtype=values.dtype)
    np.put_along_axis(g, idx, values.reshape(out, groups, n), axis=-1)
    return g.reshape(shape)


# --------------------------------------------------------------------------- files
# --------------------------------------------------------------------------- quantized values
VALUE_SCHEMES = ("q4_0", "q8_0")


def _pack_values(v: np.ndarray, scheme: str) -> dict:
    """The arrays of ``scheme`` (e.g. q4_0's ``codes`` and ``scales``) for ``v`` flattened, padded to 32."""
    from .quant import BLOCK, format_of
    flat = np.ascontiguousarray(v, dtype=np.float32).ravel()
    pad = (-flat.size) % BLOCK
    flat = np.concatenate([flat, np.zeros(pad, np.float32)])
    return {k: np.asarray(a) for k, a in format_of(scheme).pack(flat.reshape(1, -1)).items()}


def _unpack_values(arrays: dict, count: int, scheme: str) -> np.ndarray:
    from .quant import BLOCK, format_of
    n = count + (-count) % BLOCK
    return np.asarray(format_of(scheme).unpack(arrays, (1, n)))[0, :count]


def _put_values(out: dict, name: str, v: np.ndarray, scheme: str) -> list:
    packed = _pack_values(v, scheme)
    for k, a in packed.items():
        out[f"{name}.q_{k}"] = a
    return sorted(packed)


def _get_values(arrays: dict, name: str, keys, count: int, scheme: str) -> np.ndarray:
    return _unpack_values({k: arrays[f"{name}.q_{k}"] for k in keys}, count, scheme)


def split_format(fmt: str):
    """``"2:4+q4_0"`` -> ("2:4", "q4_0"); ``"bitmask"`` -> ("bitmask", None); ``"q4_0"`` -> (None, "q4_0")."""
    if fmt in VALUE_SCHEMES:
        return None, fmt
    base, _, scheme = fmt.partition("+")
    if scheme and scheme not in VALUE_SCHEMES:
        raise ValueError(f"values can be stored as {', '.join(VALUE_SCHEMES)}, not {scheme!r}")
    return base, scheme or None


def dequantized(w, fmt: str) -> np.ndarray:
    """What ``fmt`` gives back for ``w`` (the model is given these values before it is saved)."""
    a, meta = pack_state({"w": w}, {"w": fmt})
    return unpack_state(a, meta)["w"]


def pack_state(state: dict, layout: dict) -> tuple[dict, dict]:
    """``(arrays, layout metadata)``: the state dict with each weight of ``layout`` packed.

    ``layout``: ``{name: "bitmask" | "N:M"}``; other entries are stored as they are."""
    arrays, meta = {}, {}
    for name, a in state.items():
        fmt = layout.get(name)
        a = _np(a)
        if fmt is None:
            arrays[name] = a
            continue
        base, scheme = split_format(fmt)
        info = {"format": fmt, "shape": list(a.shape), "dtype": str(a.dtype)}
        if base is None:
            values = a
        elif base == "bitmask":
            p = pack_bitmask(a)
            arrays[name + ".sparse_bitmask"], values = p["bitmask"], p["values"]
            if not scheme:
                arrays[name + ".sparse_values"] = values
        else:
            n, m = (int(s) for s in base.split(":"))
            p = pack_nm(a, n, m)
            arrays[name + ".nm_indices"], values = p["indices"], p["values"]
            if not scheme:
                arrays[name + ".nm_values"] = values
        if scheme:
            info["q_keys"] = _put_values(arrays, name, values, scheme)
            info["count"] = int(values.size)
        meta[name] = info
    missing = sorted(set(layout) - set(state))
    if missing:
        raise KeyError(f"layout names weights that are not in the state dict: {missing[:3]}")
    return arrays, meta


def unpack_state(arrays: dict, meta: dict) -> dict:
    """The dense state dict of ``pack_state``'s output (ordinary names)."""
    out = {k: v for k, v in arrays.items() if not k.endswith(PACKED_SUFFIXES)}
    for name, info in meta.items():
        shape = tuple(info["shape"])
        base, scheme = split_format(info["format"])
        dt = np.dtype(info.get("dtype", "float32"))
        vals = _get_values(arrays, name, info["q_keys"], info["count"], scheme).astype(dt) if scheme else None
        if base is None:
            out[name] = vals.reshape(shape)
        elif base == "bitmask":
            out[name] = unpack_bitmask(arrays[name + ".sparse_bitmask"],
                                       vals if scheme else arrays[name + ".sparse_values"], shape)
        else:
            n, m = (int(s) for s in base.split(":"))
            out[name] = unpack_nm(vals if scheme else arrays[name + ".nm_values"], arrays[name + ".nm_indices"],
                                  shape, n, m)
    return out


def save_sparse(state: dict, path: str, layout: dict, metadata: dict | None = None) -> None:
    """Write ``state`` to a safetensors file with the weights of ``layout`` packed (atomically)."""
    arrays, meta = pack_state(state, layout)
    save_file(arrays, path, dict(metadata or {}) | {LAYOUT_KEY: json.dumps(meta)})


def load_sparse(path: str) -> dict:
    """The dense state dict of a file written by ``save_sparse`` (a plain file loads as it is)."""
    meta = json.loads(load_metadata(path).get(LAYOUT_KEY, "{}"))
    return unpack_state(load_file(path), meta)


def stored_bytes(state: dict, layout: dict) -> dict:
    """Bytes of the tensor data, dense vs packed: ``{"dense": n, "packed": n}`` (headers excluded)."""
    arrays, _ = pack_state(state, layout)
    return {"dense": int(sum(_np(a).nbytes for a in state.values())),
            "packed": int(sum(a.nbytes for a in arrays.values()))}


def layout_for(model, pattern: str = "unstructured", min_sparsity: float = 0.0) -> dict:
    """``{state-dict name: format}`` for every weight of ``model`` that carries a pruning mask (or,
    without masks, every 2-D weight with zeros above ``min_sparsity``). N:M needs the pattern."""
    fmt = "bitmask" if pattern == "unstructured" else pattern
    out = {}
    for name, p in model.named_parameters():
        if p.ndim != 2:
            continue
        if getattr(p, "mask", None) is not None or (min_sparsity > 0 and float((_np(p) == 0).mean()) >= min_sparsity):
            out[name] = fmt
    return out
