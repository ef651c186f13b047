"""An external memory bank: a kNN-LM datastore read at generation time, and a memory it can write to.

    python -m lm.knn build --model_dir output/model --data corpus.txt --out store/
    python -m lm.knn tune  --model_dir output/model --memory store/
    python -m lm.generate  --model_dir output/model --memory store/ --knn_lambda 0.25 --knn_k 32

The storage (keys, the datastore on disk, the writable memory) is ``lm.knn_store``, the search
``lm.knn_index``; this module mixes, tunes, and holds the flags and the command line, and
re-exports the storage names (``knn.Datastore``, ``knn.Memory``, ...).

Keys are the model's hidden state after ``ln_f`` (why that layer: ``lm.knn_store``); values
the next token.

**kNN-LM.** ``p = lam * p_kNN + (1 - lam) * p_LM`` with ``p_kNN(w) = sum over the k
neighbours whose next token is w of softmax(-d / temperature)`` (Khandelwal et al. 2020).
``tune`` picks lam, k and the temperature on held-out text and prints its search.

A datastore (``build_datastore``) is built from a corpus and memory-mapped from disk; a
writable ``Memory`` is filled at run time, by letting the model read a document: a model
"reads a document, then uses it" (Memorizing Transformers' memory, without training).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import numpy as np

from minigrad import backend
from minigrad.calib import capture
from minigrad.io import atomic_write_text

from .cli import add_debug_flag, run_tool
from minigrad.tensor import no_grad

from .knn_index import INDEXES, METRICS, merge  # noqa: F401  (METRICS re-exported)
from .knn_store import (KEY_DTYPES, KEY_MODULE, FORMAT, Datastore, Memory, StoreError,  # noqa: F401  (re-exported)
                        build_datastore, hidden_states, model_hash, windows)

# --------------------------------------------------------------------------- kNN-LM
def _weights(dist, temperature: float, metric: str):
    """softmax(-d / temperature) over the neighbours (softmax(ip / temperature) for inner products)."""
    z = (-dist if metric == "l2" else dist) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    w = np.exp(z)
    return w / w.sum(axis=-1, keepdims=True)


def knn_distribution(dist, next_tokens, vocab_size: int, temperature: float = 1.0, metric: str = "l2"):
    """p_kNN (Q, V): each neighbour's softmax weight added to the probability of its next token."""
    if temperature <= 0:
        raise ValueError(f"kNN temperature must be > 0, got {temperature}")
    w = _weights(np.asarray(dist, np.float64), temperature, metric)
    p = np.zeros((w.shape[0], vocab_size))
    np.add.at(p, (np.arange(w.shape[0])[:, None], next_tokens), w)
    return p


def interpolate(lm_logprobs, p_knn, lam: float):
    """log(lam * p_kNN + (1 - lam) * p_LM), computed in log space (lam = 0 returns p_LM's exactly)."""
    check_lambda(lam)
    with np.errstate(divide="ignore"):
        return np.logaddexp(np.log1p(-lam) + lm_logprobs, np.log(lam) + np.log(p_knn))


def check_lambda(lam: float) -> None:
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"knn_lambda must be in [0, 1] (the weight of the memory's distribution), got {lam}")


def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


class KNNLM:
    """The model's next-token distribution mixed with its memories' (a datastore and/or a Memory).

    ``generate_ids(..., knn=KNNLM(...))`` uses it at every step of every strategy: the hidden
    state of the last position is taken from the ``ln_f`` hook, its k nearest neighbours are
    searched in every source (results merged), and the mixed log-probabilities replace the logits.
    """

    def __init__(self, sources, lam: float = 0.25, k: int = 32, temperature: float = 1.0):
        self.sources = [s for s in (sources if isinstance(sources, (list, tuple)) else [sources]) if s is not None]
        check_lambda(lam)
        if k < 1:
            raise ValueError(f"knn_k must be >= 1, got {k}")
        if temperature <= 0:
            raise ValueError(f"knn_temperature must be > 0, got {temperature}")
        if not self.sources:
            raise ValueError("a kNN-LM needs a datastore or a memory")
        metrics = {s.metric for s in self.sources}
        if len(metrics) > 1:
            raise ValueError(f"the memories use different metrics {sorted(metrics)}")
        self.metric = metrics.pop()
        self.lam, self.k, self.temperature = lam, int(k), float(temperature)
        self._seen = None
        self.check_k()

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)

    def check_k(self) -> None:
        n = len(self)
        if n == 0:
            raise ValueError("the memory is empty: nothing has been added to it (read a document first)")
        if self.k > n:
            raise ValueError(f"knn_k={self.k} is larger than the memory ({n} positions): use knn_k <= {n}")

    def neighbours(self, queries, k: int | None = None):
        k = k or self.k
        res = [s.neighbours(queries, min(k, len(s))) for s in self.sources if len(s)]
        return res[0] if len(res) == 1 else merge(res, k, self.metric)

    @contextlib.contextmanager
    def reading(self, model):
        """Hook the model's ``ln_f`` so that ``mix`` can see the hidden state of each forward."""
        self.check_k()
        with capture(model, KEY_MODULE) as seen:
            self._seen = seen
            try:
                yield self
            finally:
                self._seen = None

    def mix(self, logits):
        """(B, V) logits of the last forward -> (B, V) kNN-LM log-probabilities."""
        if self._seen is None or KEY_MODULE not in self._seen:
            raise RuntimeError("KNNLM.mix needs the hidden state of a forward run inside `with knn.reading(model)`")
        h = self._seen[KEY_MODULE][:, -1, :]                                  # (B, C)
        lp = _log_softmax(np.asarray(logits, np.float64))
        if self.lam == 0:
            return lp
        d, tok = self.neighbours(h)
        return interpolate(lp, knn_distribution(d, tok, lp.shape[-1], self.temperature, self.metric), self.lam)

    def batch_loss(self, model, x, y) -> float:
        """Mean kNN-LM cross-entropy of a (B, T) batch with targets."""
        xp = backend.get_array_module(model.transformer.wte.weight.data)
        with no_grad(), capture(model, KEY_MODULE) as seen:
            logits, _ = model(xp.asarray(x), xp.asarray(y))
        z = backend.to_numpy(logits.data).astype(np.float64)
        y = np.asarray(y).reshape(-1)
        lp = np.take_along_axis(_log_softmax(z.reshape(len(y), -1)), y[:, None], axis=1)[:, 0]
        d, tok = self.neighbours(seen[KEY_MODULE].reshape(len(y), -1))
        return float(-mixed_logprob(lp, d, tok, y, self.lam, self.temperature, self.metric).mean())

    def estimate_loss(self, model, tokens, batch_size: int, block_size: int, eval_iters: int, seed: int,
                      log=None) -> float | None:
        """``lm.train``'s estimate on the same random batches (same seed), with the memory.

        None (and a note, once) when the weights are no longer those a datastore was built with:
        its keys would be stale.
        """
        from .data import get_batch
        stores = [s for s in self.sources if isinstance(s, Datastore)]
        if stores and any(s.meta.get("model_hash") != model_hash(model) for s in stores):
            if log is not None and not getattr(self, "_noted", False):
                log("memory: the weights changed since the datastore was built; its keys are stale, so the "
                    "validation loss with memory is not reported (rebuild it with python -m lm.knn build)")
            self._noted = True
            return None
        was_training = model.training
        model.eval()
        try:
            rng = np.random.default_rng(seed)
            return float(np.mean([self.batch_loss(model, *get_batch(tokens, batch_size, block_size, rng))
                                  for _ in range(eval_iters)]))
        finally:
            model.train(was_training)


def mixed_logprob(lm_lp_y, dist, next_tokens, y, lam: float, temperature: float, metric: str):
    """log p(y) under the kNN-LM for each position, from the LM's log p(y) and the neighbours."""
    w = _weights(np.asarray(dist, np.float64), temperature, metric)
    p_knn_y = (w * (next_tokens == np.asarray(y)[:, None])).sum(axis=1)
    with np.errstate(divide="ignore"):
        return np.logaddexp(np.log1p(-lam) + lm_lp_y, np.log(lam) + np.log(p_knn_y))


# --------------------------------------------------------------------------- tuning and evaluation
def score(model, sources, tokens, k: int, batch_size: int = 16, stride: int | None = None,
          progress: bool = False) -> dict:
    """Per position of ``tokens``: the LM's log p(next), the k nearest neighbours' distances and tokens."""
    knn = KNNLM(sources, 0.5, k)
    lp, d, tok, y, pending = [], [], [], [], []

    def search():   # one search per batch of windows: every pass over the keys serves many queries
        dd, tt = knn.neighbours(np.concatenate(pending), k)
        d.append(dd), tok.append(tt)
        pending.clear()

    for h, yy, lpy in hidden_states(model, tokens, batch_size, stride, logprobs=True, progress=progress,
                                    desc="score"):
        pending.append(h), lp.append(lpy), y.append(yy)
        if sum(map(len, pending)) >= 2048:
            search()
    if pending:
        search()
    return {"lm_lp": np.concatenate(lp), "dist": np.concatenate(d), "tok": np.concatenate(tok),
            "y": np.concatenate(y), "metric": knn.metric}


def loss_from_scores(s: dict, lam: float, k: int, temperature: float) -> float:
    return float(-mixed_logprob(s["lm_lp"], s["dist"][:, :k], s["tok"][:, :k], s["y"], lam, temperature,
                                s["metric"]).mean())


LAMBDAS = (0.0, 0.01, 0.02, 0.03, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
KS = (1, 4, 8, 16, 32, 64)
TEMPERATURE_SCALES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def tune(model=None, sources=None, tokens=None, scores: dict | None = None, lambdas=LAMBDAS, ks=KS,
         temperatures=None, batch_size: int = 16, log=print) -> dict:
    """Grid search of lam, k and the temperature on held-out ``tokens`` (or precomputed ``scores``).

    The model runs and the store is searched once (with the largest k); every grid point is
    then a cheap reweighting. Default temperatures are multiples of the median distance to the
    nearest neighbour, so the grid fits any model's scale. Prints one line per (k, temperature)
    with its best lam, and the winner.
    """
    if scores is None:
        scores = score(model, sources, tokens, max(ks), batch_size)
    n_keys = scores["dist"].shape[1]
    ks = [k for k in ks if k <= n_keys] or [n_keys]
    d1 = float(np.median(np.abs(scores["dist"][:, 0])))
    if temperatures is None:
        temperatures = [max(d1, 1e-6) * s for s in TEMPERATURE_SCALES]
    lm_loss = float(-scores["lm_lp"].mean())
    log(f"tune: {len(scores['y']):,} positions, LM alone {lm_loss:.4f} nats; median nearest distance {d1:.4g}")
    best = {"loss": lm_loss, "lambda": 0.0, "k": ks[0], "temperature": float(temperatures[0])}
    table = []
    for k in ks:
        for t in temperatures:
            losses = [loss_from_scores(scores, lam, k, t) for lam in lambdas]
            i = int(np.argmin(losses))
            table.append({"k": k, "temperature": float(t), "lambda": lambdas[i], "loss": losses[i], "curve": losses})
            log(f"  k={k:<3d} temperature={t:<10.4g} best lambda={lambdas[i]:<5} loss {losses[i]:.4f} "
                f"({losses[i] - lm_loss:+.4f})")
            if losses[i] < best["loss"]:
                best = {"loss": losses[i], "lambda": lambdas[i], "k": k, "temperature": float(t)}
    log(f"tune: best lambda={best['lambda']} k={best['k']} temperature={best['temperature']:.4g}: "
        f"{best['loss']:.4f} nats ({best['loss'] - lm_loss:+.4f} against the LM alone)")
    return {**best, "lm_loss": lm_loss, "lambdas": list(lambdas), "table": table}


def evaluate(model, sources, tokens, lam: float, k: int, temperature: float, batch_size: int = 16,
             scores: dict | None = None) -> dict:
    """Validation loss of the LM alone and of the kNN-LM on the same positions."""
    s = scores if scores is not None else score(model, sources, tokens, k, batch_size)
    return {"positions": len(s["y"]), "lm_loss": float(-s["lm_lp"].mean()),
            "knn_loss": loss_from_scores(s, lam, k, temperature)}


# --------------------------------------------------------------------------- flags shared by lm.generate / lm.train
def add_memory_args(p: argparse.ArgumentParser, writable: bool = True) -> None:
    """The memory flags, defined once for every tool that reads a memory."""
    g = p.add_argument_group("memory (kNN-LM, lm.knn)")
    g.add_argument("--memory", default=None, metavar="STORE", help="datastore folder built by python -m lm.knn build")
    g.add_argument("--knn_lambda", type=float, default=None,
                   help="weight of the memory's distribution in [0, 1] (default: the store's tuned value, else 0.25)")
    g.add_argument("--knn_k", type=int, default=None, help="neighbours per token (default: tuned, else 32)")
    g.add_argument("--knn_temperature", type=float, default=None,
                   help="softmax temperature over -distance (default: tuned, else 1)")
    g.add_argument("--knn_index", default="exact", choices=INDEXES, help="exact (NumPy), flat or ivf (faiss)")
    g.add_argument("--knn_nprobe", type=int, default=8, help="IVF cells visited per query")
    if writable:
        g.add_argument("--memory_add", default=None, metavar="FILE",
                       help="a text file the model reads into a writable memory before generating")
        g.add_argument("--memory_size", type=int, default=100_000,
                       help="writable memory size in positions (oldest evicted first)")


def check_memory_args(args) -> None:
    """Validate the memory flags before any work; a bad one raises StoreError (one error line in the CLIs)."""
    try:
        _check_memory_args(args)
    except StoreError:
        raise
    except ValueError as e:
        raise StoreError(str(e)) from None


def _check_memory_args(args) -> None:
    if args.knn_lambda is not None:
        check_lambda(args.knn_lambda)
    if args.knn_k is not None and args.knn_k < 1:
        raise ValueError(f"--knn_k must be >= 1, got {args.knn_k}")
    if args.knn_temperature is not None and args.knn_temperature <= 0:
        raise ValueError(f"--knn_temperature must be > 0, got {args.knn_temperature}")
    if args.knn_nprobe < 1:
        raise ValueError(f"--knn_nprobe must be >= 1, got {args.knn_nprobe}")
    add = getattr(args, "memory_add", None)
    if add is not None and not os.path.isfile(add):
        raise ValueError(f"--memory_add {add}: no such file")
    if getattr(args, "memory_size", 1) < 1:
        raise ValueError(f"--memory_size must be >= 1, got {args.memory_size}")
    if args.memory is not None and not os.path.isdir(args.memory):
        raise StoreError(f"--memory {args.memory}: no datastore there; build one with python -m lm.knn build "
                         f"--model_dir ... --out {args.memory}")


def knn_from_args(args, model, tokenizer=None, log=None) -> KNNLM | None:
    """The KNNLM the flags ask for (None without --memory / --memory_add); checks the store's model.

    Every bad input (store, flags, memory file) raises StoreError with a message to show as is.
    """
    try:
        return _knn_from_args(args, model, tokenizer, log)
    except StoreError:
        raise
    except ValueError as e:
        raise StoreError(str(e)) from None


def _knn_from_args(args, model, tokenizer, log):
    add = getattr(args, "memory_add", None)
    if args.memory is None and add is None:
        return None
    check_memory_args(args)
    sources, tuned = [], {}
    if args.memory is not None:
        store = Datastore.open(args.memory, model)
        if args.knn_index != "exact":
            store.use_index(args.knn_index, nprobe=args.knn_nprobe)
        tuned = store.meta.get("tuned") or {}
        sources.append(store)
    if add is not None:
        with open(add, encoding="utf-8") as f:
            ids = tokenizer.encode(f.read())
        mem = Memory(model.config.n_embd, args.memory_size)
        n = mem.read(model, ids)
        if log:
            log(f"memory: read {n:,} positions from {add}")
        sources.append(mem)
    lam = args.knn_lambda if args.knn_lambda is not None else tuned.get("lambda", 0.25)
    k = args.knn_k if args.knn_k is not None else tuned.get("k", 32)
    t = args.knn_temperature if args.knn_temperature is not None else tuned.get("temperature", 1.0)
    return KNNLM(sources, lam, k, t)


# --------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lm-knn", description="Build and tune a kNN-LM datastore.")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compute the keys of a corpus and write a datastore folder")
    t = sub.add_parser("tune", help="tune lambda, k and temperature on the first half of held-out text, "
                                    "evaluate on the second half, save the choice in the store")
    for q in (b, t):
        q.add_argument("--model_dir", default="output/model", help="folder written by lm.train")
        q.add_argument("--data", default=None, help="corpus (default: the one the model was trained on)")
        q.add_argument("--batch_size", type=int, default=16, help="windows per forward")
        q.add_argument("--device", default="cpu")
        q.add_argument("--no_progress", action="store_true")
        add_debug_flag(q)
    b.add_argument("--out", required=True, help="datastore folder to write")
    b.add_argument("--split", default="train", choices=("train", "val", "all"))
    b.add_argument("--key_dtype", default="float16", choices=KEY_DTYPES)
    b.add_argument("--stride", type=int, default=None, help="window stride (default: block_size, no overlap)")
    b.add_argument("--max_tokens", type=int, default=None, help="use only the first N tokens of the split")
    t.add_argument("--memory", required=True, metavar="STORE", help="datastore folder")
    t.add_argument("--split", default="val", choices=("train", "val"))
    t.add_argument("--max_tokens", type=int, default=None, help="use only the first N tokens of the split")
    return p


def _tokens(args, tok, model_dir: str):
    from .data import prepare_data
    from .loader import read_config
    dconf = read_config(model_dir).get("data") or {}
    corpus = args.data or dconf.get("corpus") or "python-docs"
    data = prepare_data(corpus, tokenizer=tok, val_fraction=float(dconf.get("val_fraction", 0.1)),
                        text_field=dconf.get("text_field", "text"), cache_dir=dconf.get("cache_dir"))
    arr = {"train": data.train, "val": data.val}.get(args.split)
    if arr is None:
        arr = np.concatenate([data.train, data.val])
    if args.max_tokens is not None:
        arr = arr[:args.max_tokens]
    return corpus, np.asarray(arr)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(lambda: _main(args), debug=args.debug)


def _main(args) -> int:
    from .loader import load_model
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    if getattr(args, "max_tokens", None) is not None and args.max_tokens < 2:
        raise ValueError(f"--max_tokens must be >= 2, got {args.max_tokens}")
    if args.cmd == "build":
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise StoreError(f"--out {args.out} is a file; give a folder for the datastore")
        if args.stride is not None and args.stride < 1:
            raise ValueError(f"--stride must be >= 1, got {args.stride}")
    else:
        Datastore.open(args.memory)            # a bad store fails before the model is loaded
    model, tok = load_model(args.model_dir, args.device)
    corpus, tokens = _tokens(args, tok, args.model_dir)
    if args.cmd == "build":
        store = build_datastore(model, tokens, args.out, args.key_dtype, args.batch_size, args.stride,
                                progress=not args.no_progress,
                                info={"corpus": corpus, "split": args.split, "model_dir": args.model_dir})
        m = store.meta
        print(f"store: {len(store):,} positions x {store.dim} ({m['key_dtype']} keys), "
              f"{store.bytes_per_position()} bytes/position, "
              f"{len(store) * store.bytes_per_position() / 2**20:.1f} MiB in {args.out}")
        print(f"built in {m['build_s']:.1f} s: {m['positions_per_s']:,.0f} positions/s")
        return 0
    store = Datastore.open(args.memory, model)
    half = len(tokens) // 2
    best = tune(model, store, tokens[:half], batch_size=args.batch_size)
    ev = evaluate(model, store, tokens[half:], best["lambda"], best["k"], best["temperature"], args.batch_size)
    print(f"held-out second half ({ev['positions']:,} positions): LM {ev['lm_loss']:.4f}, kNN-LM "
          f"{ev['knn_loss']:.4f} ({ev['knn_loss'] - ev['lm_loss']:+.4f} nats)")
    meta = dict(store.meta)
    meta["tuned"] = {k: best[k] for k in ("lambda", "k", "temperature")} | {
        "tune_loss": best["loss"], "eval_lm_loss": ev["lm_loss"], "eval_knn_loss": ev["knn_loss"]}
    atomic_write_text(os.path.join(args.memory, "store.json"), json.dumps(meta, indent=1))
    print(f"saved lambda={best['lambda']} k={best['k']} temperature={best['temperature']:.4g} in "
          f"{args.memory}/store.json (lm.generate --memory uses them by default)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
