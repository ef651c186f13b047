"""Nearest-neighbour search for the memory bank: an exact NumPy search, and faiss behind the same interface.

Every index answers ``search(queries, k) -> (dist, ids)``, best first, shaped (Q, k):

- ``metric="l2"``: ``dist`` are squared Euclidean distances, ascending (what faiss's
  ``IndexFlatL2`` returns);
- ``metric="ip"``: ``dist`` are inner products, descending (faiss's ``IndexFlatIP``).

The exact search is the reference and the oracle. It walks the keys in blocks: one matmul of
the queries against a block, an ``argpartition`` that keeps each query's k best of the block,
and a merge with the k best so far. Only one block of scores (Q x block) and one block of keys
converted to float32 exist at a time, so memory is bounded by ``block_bytes`` whatever the
number of keys, and keys may be a memory-mapped float16 array. For L2,
``|q - x|^2 = |q|^2 - 2 q.x + |x|^2`` turns the distance into the same matmul; the key norms
``|x|^2`` can be stored beside the keys so that a search never recomputes them.

faiss (optional: ``pip install faiss-cpu``, the ``knn`` extra) is an accelerator, never a
dependency: ``IndexFlatL2``/``IndexFlatIP`` are exact (the tests check they return the same
neighbours as ours), and IVF (``nlist`` k-means cells, ``nprobe`` of them visited per query)
trades a little recall for a search that reads a few cells instead of every key.
"""
from __future__ import annotations

import numpy as np

METRICS = ("l2", "ip")
INDEXES = ("exact", "flat", "ivf")     # ours; faiss IndexFlat*; faiss IndexIVFFlat


def _check(queries, n_keys: int, k: int, metric: str):
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if n_keys == 0:
        raise ValueError("the store is empty: it holds no keys to search (build or add some first)")
    if not 1 <= k <= n_keys:
        raise ValueError(f"k={k} neighbours asked of a store of {n_keys} keys: k must be in [1, {n_keys}]")
    q = np.asarray(queries)
    if q.ndim != 2:
        raise ValueError(f"queries must be (Q, dim), got shape {q.shape}")
    return q


def _topk_rows(cost, k: int):
    """Column indices of the k smallest entries of each row, in no particular order."""
    if cost.shape[1] <= k:
        return np.broadcast_to(np.arange(cost.shape[1]), cost.shape)
    return np.argpartition(cost, k - 1, axis=1)[:, :k]


def exact_search(queries, keys, k: int, metric: str = "l2", key_sqnorms=None,
                 block_bytes: int = 64 << 20, on_block=None):
    """The k nearest keys of each query, exactly: (dist, ids), each (Q, k), best first.

    ``keys``: (N, dim), any float dtype, memory-mapped or not. ``key_sqnorms``: optional
    (N,) ``|x|^2`` (L2 only). ``block_bytes`` bounds the scores and converted keys held at
    once. ``on_block(start, stop)`` is called after each block (the datastore uses it to hand
    the block's pages back to the OS). Computed in float64 when queries and keys both are,
    else float32.
    """
    q = _check(queries, len(keys), k, metric)
    dt = np.float64 if (q.dtype == np.float64 and keys.dtype == np.float64) else np.float32
    q = np.ascontiguousarray(q, dtype=dt)
    Q, C = q.shape
    if keys.shape[1] != C:
        raise ValueError(f"queries have {C} dimensions but the keys {keys.shape[1]}")
    N = len(keys)
    item = np.dtype(dt).itemsize
    block = int(max(k, min(N, block_bytes // max(1, item * (Q + C)))))
    best_c = np.empty((Q, 0), dt)                 # cost to minimise: |x|^2 - 2 q.x (l2) or -q.x (ip)
    best_i = np.empty((Q, 0), np.int64)
    for s in range(0, N, block):
        e = min(N, s + block)
        kb = np.asarray(keys[s:e], dtype=dt)      # one block in the compute dtype (a copy for float16)
        cost = q @ kb.T                           # (Q, b)
        if metric == "l2":
            kn = (np.asarray(key_sqnorms[s:e], dtype=dt) if key_sqnorms is not None
                  else np.einsum("ij,ij->i", kb, kb))
            cost *= -2
            cost += kn[None, :]
        else:
            np.negative(cost, out=cost)
        j = _topk_rows(cost, k)                                         # (Q, <=k) within the block
        cand_c = np.concatenate([best_c, np.take_along_axis(cost, j, axis=1)], axis=1)
        cand_i = np.concatenate([best_i, j + s], axis=1)
        keep = _topk_rows(cand_c, k)
        best_c = np.take_along_axis(cand_c, keep, axis=1)
        best_i = np.take_along_axis(cand_i, keep, axis=1)
        if on_block is not None:
            on_block(s, e)
    order = np.lexsort((best_i, best_c))          # by cost, ties by id: the same for every block size
    best_c = np.take_along_axis(best_c, order, axis=1)
    best_i = np.take_along_axis(best_i, order, axis=1)
    if metric == "l2":
        qn = np.einsum("ij,ij->i", q, q)
        return np.maximum(best_c + qn[:, None], 0), best_i      # rounding can dip below 0
    return -best_c, best_i


class ExactIndex:
    """``exact_search`` over fixed keys (the reference; no copy of the keys is made)."""

    kind = "exact"

    def __init__(self, keys, metric: str = "l2", key_sqnorms=None, block_bytes: int = 64 << 20, on_block=None):
        self.keys, self.metric, self.key_sqnorms = keys, metric, key_sqnorms
        self.block_bytes, self.on_block = block_bytes, on_block

    def __len__(self):
        return len(self.keys)

    def search(self, queries, k: int):
        return exact_search(queries, self.keys, k, self.metric, self.key_sqnorms, self.block_bytes, self.on_block)


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except Exception:        # a broken wheel raises more than ImportError
        return False
    return True


def _faiss():
    try:
        import faiss
    except Exception as e:
        raise ValueError(f"this index needs faiss, which is not usable here ({e}); install it with "
                         f"`pip install faiss-cpu` (or `pip install minigrad-lm[knn]`), or use the exact "
                         f"index") from None
    return faiss


class FaissIndex:
    """faiss ``IndexFlatL2``/``IndexFlatIP`` (``kind="flat"``) or ``IndexIVFFlat`` (``kind="ivf"``).

    faiss keeps its own float32 copy of the keys (4 * dim bytes per key), added block by block
    so that a memory-mapped float16 store is never converted whole. IVF trains its ``nlist``
    centroids on at most ``train_size`` keys spread over the store (default ``64 * nlist``) and
    visits ``nprobe`` cells per query.
    """

    def __init__(self, keys, metric: str = "l2", kind: str = "flat", nlist: int | None = None,
                 nprobe: int = 8, train_size: int | None = None, block: int = 65536, seed: int = 0):
        faiss = _faiss()
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        if kind not in ("flat", "ivf"):
            raise ValueError(f"unknown faiss index kind {kind!r}; choose flat or ivf")
        n, dim = keys.shape
        if n == 0:
            raise ValueError("the store is empty: it holds no keys to index")
        self.kind, self.metric = kind, metric
        fmetric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
        if kind == "flat":
            self.index = faiss.IndexFlatL2(dim) if metric == "l2" else faiss.IndexFlatIP(dim)
        else:
            nlist = int(nlist or max(1, min(4096, round(4 * np.sqrt(n)))))
            if nlist > n:
                raise ValueError(f"IVF with nlist={nlist} cells needs at least that many keys; the store has {n}")
            quantizer = faiss.IndexFlatL2(dim) if metric == "l2" else faiss.IndexFlatIP(dim)
            self.index = faiss.IndexIVFFlat(quantizer, dim, nlist, fmetric)
            m = min(n, train_size or 64 * nlist)
            pick = np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))
            self.index.train(np.ascontiguousarray(keys[pick], dtype=np.float32))
            self.index.nprobe = int(min(nprobe, nlist))
        self._quantizer = None if kind == "flat" else quantizer   # faiss does not own it from Python
        for s in range(0, n, block):
            self.index.add(np.ascontiguousarray(keys[s:s + block], dtype=np.float32))

    def __len__(self):
        return int(self.index.ntotal)

    @property
    def nprobe(self) -> int:
        return int(self.index.nprobe) if self.kind == "ivf" else 0

    @nprobe.setter
    def nprobe(self, v: int) -> None:
        if self.kind == "ivf":
            self.index.nprobe = int(v)

    def search(self, queries, k: int):
        q = _check(queries, len(self), k, self.metric)
        d, i = self.index.search(np.ascontiguousarray(q, dtype=np.float32), k)
        # IVF can find fewer than k keys in the visited cells: faiss pads with id -1
        return d, i.astype(np.int64)


def merge(results, k: int, metric: str):
    """The k best of several (dist, payload) pairs searched with one metric, best first."""
    d = np.concatenate([r[0] for r in results], axis=1)
    p = np.concatenate([r[1] for r in results], axis=1)
    cost = d if metric == "l2" else -d
    k = min(k, d.shape[1])
    j = _topk_rows(cost, k)
    order = np.argsort(np.take_along_axis(cost, j, axis=1), axis=1, kind="stable")
    j = np.take_along_axis(j, order, axis=1)
    return np.take_along_axis(d, j, axis=1), np.take_along_axis(p, j, axis=1)
