"""The memory bank's storage: hidden states, the datastore on disk, and the writable memory.

**What is stored.** For every position t of a corpus, a key, the model's hidden state at t,
and a value, the token at t + 1. The key is the output of the final LayerNorm
(``transformer.ln_f``), the vector the language-model head reads: the model's own prediction
is a linear function of it (logits = wte @ h), so contexts whose keys are close are contexts
the model already treats alike, and the nearest neighbours' next tokens are a prediction in
the same space. (Khandelwal et al. found the input of the last block's feed-forward layer
slightly better for a 16-layer model; in our pre-LayerNorm GPT ``ln_f`` is the one place where
every block has contributed, it is scale-normalised, so distances between keys of different
positions are comparable, and it is the same module name in every model folder kind.) The
keys come through ``minigrad.calib.capture``, the calibration collector's forward hook.

**Datastore** (``build_datastore``/``Datastore.open``): a folder of ``keys.npy`` (N, dim),
float16 or float32; ``values.npy`` (N,) int32; ``sqnorms.npy`` (N,) float32, the ``|key|^2``
that L2 search needs; ``store.json``, metadata written last (so a folder without it is an
unfinished build) with a hash of the model's weights: opening a store with another model is
an error. Keys are memory-mapped: searching reads them block by block, and
``release_pages=True`` hands each block's pages back after use so resident memory stays at
one block whatever the store's size.

**Writable memory** (``Memory``): keys added at run time (``read`` a document: the model
computes its keys as it reads), ``reset()`` between documents, a size limit with
first-in-first-out eviction.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import time

import numpy as np

from minigrad import backend
from minigrad.calib import capture
from minigrad.io import atomic_write, atomic_write_text
from minigrad.tensor import no_grad

from .knn_index import INDEXES, METRICS, ExactIndex, FaissIndex

KEY_MODULE = "transformer.ln_f"
FORMAT = "minigrad-knn-1"
KEY_DTYPES = ("float16", "float32")


class StoreError(ValueError):
    """A datastore that cannot be used: the message says which file and what to do."""


def model_hash(model) -> str:
    """sha256 of the model's weights (names, dtypes, shapes, bytes): ties a store to its model."""
    h = hashlib.sha256()
    for name, a in sorted(model.state_dict().items()):
        a = np.ascontiguousarray(backend.to_numpy(getattr(a, "data", a)))
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- hidden states
def windows(n_tokens: int, block_size: int, stride: int | None = None):
    """``[(start, keep)]``: windows ``tokens[start:start+T]`` that, keeping each window's
    positions from ``keep`` on, predict every position ``0..n_tokens-2`` exactly once.

    ``stride`` (default T: non-overlapping, like ``lm.data.iter_eval_batches``) smaller than T
    gives every kept position at least ``T - stride`` tokens of context.
    """
    n = n_tokens - 1                       # positions that have a next token
    if n < 1:
        return []
    T = min(block_size, n)
    S = stride or T
    if not 1 <= S <= T:
        raise ValueError(f"stride must be in [1, {T}], got {S}")
    out, done, s = [], 0, 0
    while done < n:
        s = min(s, n - T)                  # the last window ends at the last position
        out.append((s, done - s))
        done = s + T
        s += S
    return out


@no_grad()
def hidden_states(model, tokens, batch_size: int = 16, stride: int | None = None,
                  logprobs: bool = False, progress: bool = False, desc: str = "keys"):
    """Yield ``(keys, next_tokens[, lm_logprob_of_next])`` for every position of ``tokens``, in order.

    keys (n, C) float32 are the ``ln_f`` outputs captured by a forward hook; with ``logprobs``
    the forward also computes every position's logits and the LM's log-probability of the
    actual next token is returned (for evaluation; a build skips the head).
    """
    tokens = np.asarray(tokens)
    T = model.config.block_size
    wins = windows(len(tokens), T, stride)
    if not wins:
        return
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(tokens) - 1, desc=desc, unit="pos", unit_scale=True, dynamic_ncols=True)
    xp = backend.get_array_module(model.transformer.wte.weight.data)
    was_training = model.training
    model.eval()
    try:
        with capture(model, KEY_MODULE) as seen:
            for b in range(0, len(wins), batch_size):
                group = wins[b:b + batch_size]
                W = min(T, len(tokens) - 1)
                idx = np.array([s for s, _ in group])[:, None] + np.arange(W)
                x = np.asarray(tokens[idx], dtype=np.int64)
                y = np.asarray(tokens[idx + 1], dtype=np.int64)
                if logprobs:
                    logits, _ = model(xp.asarray(x), xp.asarray(y))
                    z = backend.to_numpy(logits.data).astype(np.float64)          # (B, W, V)
                    z -= z.max(axis=-1, keepdims=True)
                    lse = np.log(np.exp(z).sum(axis=-1))
                    lp = np.take_along_axis(z, y[..., None], axis=-1)[..., 0] - lse  # (B, W)
                else:
                    model(xp.asarray(x))
                h = seen[KEY_MODULE]                                              # (B, W, C)
                for r, (_, keep) in enumerate(group):
                    out = (np.asarray(h[r, keep:], dtype=np.float32), y[r, keep:])
                    yield out + ((lp[r, keep:],) if logprobs else ())
                    if bar is not None:
                        bar.update(W - keep)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()


# --------------------------------------------------------------------------- the datastore on disk
def _open_npy(path: str, what: str):
    """A read-only memory map of a .npy file, with a clear error when it is missing or truncated."""
    if not os.path.isfile(path):
        raise StoreError(f"{path} is missing: the datastore is incomplete; rebuild it with python -m lm.knn build")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = reader(f)
        except Exception as e:
            raise StoreError(f"{path} is not a valid .npy file ({e}); rebuild the datastore") from None
        offset = f.tell()
        count = int(np.prod(shape))
        need = offset + count * dtype.itemsize
        if size < need or fortran:
            raise StoreError(f"{path} is truncated: {size:,} bytes on disk, its header promises {need:,} "
                             f"({what} of shape {shape}); rebuild the datastore with python -m lm.knn build")
        if count == 0:
            return np.empty(shape, dtype), None, offset
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mm, dtype, count=count, offset=offset).reshape(shape), mm, offset


class Datastore:
    """Keys (memory-mapped), next-token values and key norms of a built store; see the module doc."""

    def __init__(self, keys, values, sqnorms, meta: dict, path: str | None = None, mm=None, key_offset: int = 0):
        self.keys, self.values, self.sqnorms, self.meta, self.path = keys, values, sqnorms, meta, path
        self._mm, self._key_offset = mm, key_offset
        self.metric = meta.get("metric", "l2")
        self.release_pages = False
        self.index = ExactIndex(keys, self.metric, sqnorms, on_block=self._release)

    @classmethod
    def open(cls, path: str, model=None, release_pages: bool = False) -> "Datastore":
        """Open a store folder; with ``model``, check that it was built by these weights."""
        if not os.path.isdir(path):
            raise StoreError(f"no datastore at {path}: build one with python -m lm.knn build --model_dir ... "
                             f"--data ... --out {path}")
        meta_path = os.path.join(path, "store.json")
        if not os.path.isfile(meta_path):
            raise StoreError(f"{path} is not a datastore (no store.json): an unfinished build, or the wrong "
                             f"folder; build one with python -m lm.knn build")
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StoreError(f"{meta_path} is not valid JSON ({e}); rebuild the datastore") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise StoreError(f"{meta_path} is not a {FORMAT} datastore; rebuild it with this version")
        n, dim = int(meta["n"]), int(meta["dim"])
        if n == 0:
            raise StoreError(f"the datastore at {path} is empty (0 positions): build it from a longer corpus")
        keys, mm, off = _open_npy(os.path.join(path, "keys.npy"), "keys")
        values, _, _ = _open_npy(os.path.join(path, "values.npy"), "values")
        sqnorms, _, _ = _open_npy(os.path.join(path, "sqnorms.npy"), "key norms")
        if keys.shape != (n, dim) or values.shape != (n,) or sqnorms.shape != (n,):
            raise StoreError(f"{path}: keys {keys.shape}, values {values.shape}, norms {sqnorms.shape} do not "
                             f"match store.json's {n} x {dim}; rebuild the datastore")
        store = cls(keys, values, sqnorms, meta, path, mm, off)
        store.release_pages = release_pages
        if model is not None:
            store.check_model(model)
        return store

    def check_model(self, model) -> None:
        """A clear error unless ``model`` has the weights this store was built with."""
        h = model_hash(model)
        if h != self.meta.get("model_hash"):
            raise StoreError(f"the datastore {self.path or ''} was built by another model (weights hash "
                             f"{str(self.meta.get('model_hash'))[:12]}, from {self.meta.get('model_dir')}); this "
                             f"model's is {h[:12]}: its keys would be meaningless here; rebuild it with "
                             f"python -m lm.knn build --model_dir <this model>")

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def memory_mapped(self) -> bool:
        """True when the keys are read from the file on demand (not loaded into memory)."""
        return self._mm is not None

    @property
    def dim(self) -> int:
        return self.keys.shape[1]

    def bytes_per_position(self) -> int:
        return self.keys.dtype.itemsize * self.dim + self.values.dtype.itemsize + self.sqnorms.dtype.itemsize

    def _release(self, start: int, stop: int) -> None:
        # after a block is searched, drop its pages from this process (the OS keeps them cached)
        if not self.release_pages or self._mm is None:
            return
        row = self.keys.dtype.itemsize * self.dim
        a = (self._key_offset + start * row) // mmap.PAGESIZE * mmap.PAGESIZE
        b = self._key_offset + stop * row
        self._mm.madvise(mmap.MADV_DONTNEED, a, b - a)

    def subset(self, n: int) -> "Datastore":
        """The first ``n`` positions (a store built from the first part of the corpus), no copy."""
        n = int(n)
        if not 1 <= n <= len(self):
            raise ValueError(f"subset of {n} positions from a store of {len(self)}")
        sub = Datastore(self.keys[:n], self.values[:n], self.sqnorms[:n], {**self.meta, "n": n}, self.path,
                        self._mm, self._key_offset)
        sub.release_pages = self.release_pages
        return sub

    def use_index(self, kind: str = "exact", nlist: int | None = None, nprobe: int = 8, **kw) -> "Datastore":
        """Search with ``exact`` (ours, the default), faiss ``flat`` or faiss ``ivf``; returns self."""
        if kind not in INDEXES:
            raise ValueError(f"unknown index {kind!r}; choose one of {', '.join(INDEXES)}")
        if kind == "exact":
            self.index = ExactIndex(self.keys, self.metric, self.sqnorms, on_block=self._release, **kw)
        else:
            self.index = FaissIndex(self.keys, self.metric, kind, nlist=nlist, nprobe=nprobe, **kw)
        return self

    def search(self, queries, k: int):
        """(dist, ids) of the k nearest keys, best first (see ``lm.knn_index``)."""
        return self.index.search(queries, k)

    def neighbours(self, queries, k: int):
        """(dist, next tokens) of the k nearest keys; cells IVF left unfilled get an infinite distance."""
        d, i = self.search(queries, k)
        tok = self.values[np.maximum(i, 0)].astype(np.int64)
        if (i < 0).any():
            d = np.where(i < 0, np.inf if self.metric == "l2" else -np.inf, d)
        return d, tok


def build_datastore(model, tokens, out: str, key_dtype: str = "float16", batch_size: int = 16,
                    stride: int | None = None, progress: bool = True, info: dict | None = None) -> Datastore:
    """Compute the keys of every position of ``tokens`` and write a store folder at ``out``.

    Runs under ``no_grad`` in batches of ``batch_size`` windows; keys go straight into a
    memory-mapped file, so memory stays at one batch whatever the corpus size. ``info`` is
    added to the metadata (corpus name, split, model folder).
    """
    if key_dtype not in KEY_DTYPES:
        raise ValueError(f"key_dtype must be one of {', '.join(KEY_DTYPES)}, got {key_dtype!r}")
    if len(tokens) < 2:
        raise StoreError(f"the corpus has {len(tokens)} token(s): a datastore needs at least 2 (a position and "
                         f"its next token)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise StoreError(f"--out {out} is a file; give a folder for the datastore")
    n, dim = len(tokens) - 1, model.config.n_embd
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, ".keys.npy.tmp")
    t0 = time.perf_counter()
    keys = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(key_dtype), shape=(n, dim))
    values = np.empty(n, np.int32)
    sqnorms = np.empty(n, np.float32)
    try:
        p = 0
        for h, y in hidden_states(model, tokens, batch_size, stride, progress=progress, desc="datastore"):
            m = len(y)
            keys[p:p + m] = h
            # norms of the stored (possibly float16-rounded) keys, so L2 distances are exact for them
            stored = np.asarray(keys[p:p + m], dtype=np.float32)
            sqnorms[p:p + m] = np.einsum("ij,ij->i", stored, stored)
            values[p:p + m] = y
            p += m
        assert p == n, (p, n)
        keys.flush()
        del keys
        os.replace(tmp, os.path.join(out, "keys.npy"))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    atomic_write(os.path.join(out, "values.npy"), lambda f: np.save(f, values, allow_pickle=False))
    atomic_write(os.path.join(out, "sqnorms.npy"), lambda f: np.save(f, sqnorms, allow_pickle=False))
    dt = time.perf_counter() - t0
    meta = {"format": FORMAT, "n": n, "dim": dim, "key_dtype": key_dtype, "value_dtype": "int32",
            "metric": "l2", "key": f"output of {KEY_MODULE} (final hidden state, the input of lm_head)",
            "model_hash": model_hash(model), "vocab_size": model.config.vocab_size,
            "block_size": model.config.block_size, "stride": stride or model.config.block_size,
            "build_s": dt, "positions_per_s": n / max(dt, 1e-9), **(info or {})}
    atomic_write_text(os.path.join(out, "store.json"), json.dumps(meta, indent=1))
    return Datastore.open(out)


# --------------------------------------------------------------------------- the writable memory
class Memory:
    """Keys added at run time, searched exactly; at most ``max_size``, the oldest evicted first."""

    def __init__(self, dim: int, max_size: int = 100_000, metric: str = "l2", key_dtype: str = "float32"):
        if max_size < 1:
            raise ValueError(f"memory size must be >= 1, got {max_size}")
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        self.dim, self.max_size, self.metric, self.key_dtype = dim, int(max_size), metric, np.dtype(key_dtype)
        self.reset()

    def reset(self) -> None:
        """Forget everything (between documents)."""
        self._keys = np.empty((0, self.dim), self.key_dtype)
        self._values = np.empty(0, np.int32)
        self._sqnorms = np.empty(0, np.float32)
        self._ids = np.empty(0, np.int64)          # insertion number of each slot
        self.size = 0                              # filled slots
        self.n_added = 0                           # ever added since the last reset

    def __len__(self) -> int:
        return self.size

    @property
    def n_evicted(self) -> int:
        return self.n_added - self.size

    def _grow(self, need: int) -> None:
        cap = len(self._keys)
        if need <= cap:
            return
        cap = min(self.max_size, max(need, 2 * cap))
        for name in ("_keys", "_values", "_sqnorms", "_ids"):
            old = getattr(self, name)
            new = np.empty((cap,) + old.shape[1:], old.dtype)
            new[:len(old)] = old
            setattr(self, name, new)

    def add(self, keys, values) -> None:
        """Append (key, next token) pairs; past ``max_size`` the oldest are overwritten (FIFO)."""
        keys = np.asarray(keys, dtype=self.key_dtype).reshape(-1, self.dim)
        values = np.asarray(values).reshape(-1)
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys but {len(values)} values")
        if len(keys) > self.max_size:             # only the newest max_size can survive
            self.n_added += len(keys) - self.max_size
            keys, values = keys[-self.max_size:], values[-self.max_size:]
        m = len(keys)
        slots = (self.n_added + np.arange(m)) % self.max_size   # slots fill in order, then wrap
        self._grow(min(self.max_size, self.n_added + m))
        self._keys[slots] = keys
        stored = self._keys[slots].astype(np.float32)
        self._sqnorms[slots] = np.einsum("ij,ij->i", stored, stored)
        self._values[slots] = values
        self._ids[slots] = self.n_added + np.arange(m)
        self.n_added += m
        self.size = min(self.max_size, self.n_added)

    def read(self, model, tokens, batch_size: int = 16, stride: int | None = None, progress: bool = False) -> int:
        """Let the model read ``tokens`` (ids) and add each position's key and next token; returns the count."""
        n = 0
        for h, y in hidden_states(model, tokens, batch_size, stride, progress=progress, desc="memory"):
            self.add(h, y)
            n += len(y)
        return n

    def search(self, queries, k: int):
        """(dist, ids) of the k nearest stored keys; ids are insertion numbers (0 = first added)."""
        d, j = ExactIndex(self._keys[:self.size], self.metric, self._sqnorms[:self.size]).search(queries, k)
        return d, self._ids[j]

    def neighbours(self, queries, k: int):
        d, j = ExactIndex(self._keys[:self.size], self.metric, self._sqnorms[:self.size]).search(queries, k)
        return d, self._values[j].astype(np.int64)
