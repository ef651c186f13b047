"""Generate text from a trained GPT.

``python -m lm.generate --model_dir output/model --prompt "hello" --strategy top_p --top_p 0.9``

Strategies: ``greedy`` (argmax), ``sample`` (softmax with temperature), ``top_k``,
``top_p`` (nucleus) and ``beam`` (beam search on summed log-probabilities). A KV cache
keeps the keys and values of past positions, so each new token costs one position.
When the text outgrows the context window, the cached path re-reads the last
``block_size - block_size // 4`` tokens and goes on incrementally (the context never
shrinks below three quarters of the window); ``use_cache=False`` always re-reads the
last full window. Both give the same tokens while the text fits in the window. A model
with RoPE and a sliding window (``attn_window``) instead keeps a rolling cache of the last
``attn_window`` positions and never re-reads: it generates past block_size on that cache.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time

import numpy as np

import minigrad as mg
from minigrad import backend

from .cli import add_debug_flag, run_tool
from .model import GPT, KVCache
from .loader import ModelDirError, load_model  # noqa: F401  (re-exported: notebooks import it from here)
from .tokenizer import load_tokenizer

STRATEGIES = ("greedy", "sample", "top_k", "top_p", "beam")


# --------------------------------------------------------------------------- logits processing
def _log_softmax(z):
    xp = backend.get_array_module(z)
    z = z - z.max(axis=-1, keepdims=True)
    return z - xp.log(xp.exp(z).sum(axis=-1, keepdims=True))


def apply_repetition_penalty(logits, seqs, penalty: float):
    """Make tokens already present less likely (CTRL's rule: divide positive logits, multiply negative)."""
    if penalty == 1.0:
        return logits
    logits = logits.copy()
    for b in range(logits.shape[0]):
        seen = np.unique(np.asarray(seqs[b]))
        vals = logits[b, seen]
        logits[b, seen] = np.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def filter_top_k(logits, k: int):
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k, axis=-1)[:, -k][:, None]
    return np.where(logits < kth, -np.inf, logits)


def filter_top_p(logits, p: float):
    """Keep the smallest set of tokens whose probability sums to at least p."""
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, axis=-1)
    sorted_logits = np.take_along_axis(logits, order, axis=-1)
    probs = np.exp(_log_softmax(sorted_logits))
    cum = np.cumsum(probs, axis=-1)
    drop_sorted = (cum - probs) >= p          # tokens after the nucleus is already full
    drop = np.zeros_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, axis=-1)
    return np.where(drop, -np.inf, logits)


# --------------------------------------------------------------------------- decoding
class _Stepper:
    """Feeds tokens to the model, with or without a KV cache, cropping to the window.

    With ``attn_window`` the cache is a rolling buffer of that many positions; with RoPE
    as well (``model.unbounded``) it is never re-read: generation runs past block_size on
    a cache of ``attn_window`` positions, as Mistral-style models do.
    """

    def __init__(self, model: GPT, use_cache: bool, knn=None):
        self.model, self.use_cache = model, use_cache
        self.block = model.config.block_size
        self.window = model.config.attn_window
        self.rolling = getattr(model, "unbounded", False)
        self.cache = None
        self.knn = knn   # lm.knn.KNNLM: the logits become kNN-LM log-probabilities

    def _out(self, logits):
        z = backend.to_numpy(logits)
        return z if self.knn is None else self.knn.mix(z)

    def _prefill(self, seqs):
        ctx = np.asarray(seqs)[:, -self.block:]
        if not self.use_cache:
            return self.model.logits_last(ctx)
        self.cache = KVCache(self.model.config.n_layer, capacity=self.block, window=self.window)
        return self.model.logits_last(ctx, self.cache)

    def first(self, seqs):
        return self._out(self._prefill(seqs))

    def next(self, seqs, new_tokens):
        if not self.use_cache:
            return self._out(self.model.logits_last(np.asarray(seqs)[:, -self.block:]))
        if self.cache.pos + 1 > self.block and not self.rolling:
            keep = self.block - self.block // 4
            return self._out(self._prefill(np.asarray(seqs)[:, -keep:]))
        return self._out(self.model.logits_last(np.asarray(new_tokens)[:, None], self.cache))

    def reorder(self, index):
        if self.cache is not None:
            self.cache.reorder(index)


def check_decoding(strategy: str, temperature: float, top_k: int, top_p: float, num_beams: int,
                   repetition_penalty: float, max_new_tokens: int, num_return_sequences: int) -> None:
    """ValueError for any bad decoding option, whichever strategy uses it.

    Every option is checked every time (a bad ``--temperature`` is an error with ``greedy`` too,
    as a bad ``--top_p`` always was), so a typo never hides until the strategy changes.
    """
    def finite(v):
        return isinstance(v, (int, float)) and math.isfinite(v)

    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if not (finite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature} (for argmax decoding use strategy greedy)")
    if not (isinstance(top_k, (int, np.integer)) and top_k >= 1):
        raise ValueError(f"top_k must be >= 1, got {top_k} (for no top-k filtering use strategy sample)")
    if not (finite(top_p) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if not (finite(repetition_penalty) and repetition_penalty > 0):
        raise ValueError(f"repetition_penalty must be > 0 (1: off, above 1: fewer repeats), got {repetition_penalty}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be >= 1, got {num_return_sequences}")
    if strategy == "beam" and num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences ({num_return_sequences}) cannot exceed num_beams ({num_beams})")


@mg.no_grad()
def generate_ids(model: GPT, prompt_ids, max_new_tokens: int = 100, strategy: str = "top_p",
                 temperature: float = 1.0, top_k: int = 50, top_p: float = 0.9, num_beams: int = 4,
                 repetition_penalty: float = 1.0, num_return_sequences: int = 1, seed: int | None = None,
                 use_cache: bool = True, eos_id: int | None = None, knn=None) -> list[list[int]]:
    """Token ids of ``num_return_sequences`` continuations (prompt included).

    ``knn``: an ``lm.knn.KNNLM``; every strategy then decodes from the model's distribution
    mixed with its memory's (kNN-LM).
    """
    check_decoding(strategy, temperature, top_k, top_p, num_beams, repetition_penalty, max_new_tokens,
                   num_return_sequences)
    prompt_ids = list(prompt_ids)
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    was_training = model.training
    model.eval()
    hooked = contextlib.ExitStack()   # the kNN-LM's hook on ln_f, removed on the way out
    if knn is not None:
        hooked.enter_context(knn.reading(model))
    try:
        if strategy == "beam":
            return _beam_search(model, prompt_ids, max_new_tokens, num_beams, num_return_sequences,
                                repetition_penalty, use_cache, eos_id, knn)
        rng = np.random.default_rng(seed)
        n = num_return_sequences
        seqs = [list(prompt_ids) for _ in range(n)]
        stepper = _Stepper(model, use_cache, knn)
        logits = stepper.first(seqs) if max_new_tokens else None
        for i in range(max_new_tokens):
            z = apply_repetition_penalty(logits.astype(np.float64), seqs, repetition_penalty)
            if strategy == "greedy":
                nxt = z.argmax(axis=-1)
            else:
                z = z / temperature
                if strategy == "top_k":
                    z = filter_top_k(z, top_k)
                elif strategy == "top_p":
                    z = filter_top_p(z, top_p)
                probs = np.exp(_log_softmax(z))
                u = rng.random((n, 1))
                nxt = (probs.cumsum(axis=-1) < u).sum(axis=-1).clip(0, probs.shape[-1] - 1)
            for s, t in zip(seqs, nxt):
                s.append(int(t))
            if eos_id is not None and all(s[-1] == eos_id for s in seqs):
                break
            if i + 1 < max_new_tokens:
                logits = stepper.next(seqs, nxt)
        return seqs
    finally:
        model.train(was_training)
        hooked.close()


def _beam_search(model, prompt_ids, max_new_tokens, num_beams, num_return, penalty, use_cache, eos_id, knn=None):
    seqs = [list(prompt_ids)]
    scores = np.zeros(1)
    stepper = _Stepper(model, use_cache, knn)
    if max_new_tokens == 0:
        return [list(prompt_ids) for _ in range(num_return)]
    logits = stepper.first(seqs)
    for i in range(max_new_tokens):
        lp = _log_softmax(apply_repetition_penalty(logits.astype(np.float64), seqs, penalty))  # (beams, V)
        V = lp.shape[-1]
        cand = (scores[:, None] + lp).reshape(-1)
        top = np.argsort(-cand, kind="stable")[:num_beams]
        beam_idx, tok = top // V, top % V
        seqs = [seqs[b] + [int(t)] for b, t in zip(beam_idx, tok)]
        scores = cand[top]
        if eos_id is not None and all(s[-1] == eos_id for s in seqs):
            break
        if i + 1 < max_new_tokens:
            stepper.reorder(beam_idx)
            logits = stepper.next(seqs, tok)
    return seqs[:num_return]


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 200, **kw) -> list[str]:
    ids = tokenizer.encode(prompt)
    return [tokenizer.decode(s) for s in generate_ids(model, ids, max_new_tokens, **kw)]


# --------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lm-generate", description="Generate text with a trained GPT.")
    p.add_argument("--model_dir", default="output/model", help="folder written by lm.train (output_dir/model)")
    p.add_argument("--prompt", default="\n", help="text to continue")
    p.add_argument("--strategy", default="top_p", choices=STRATEGIES)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_k", type=int, default=50)
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--num_beams", type=int, default=4)
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--num_return_sequences", type=int, default=1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no_cache", action="store_true", help="recompute the whole context for every token")
    p.add_argument("--skip_unknown", action="store_true",
                   help="drop prompt characters the tokenizer does not know instead of stopping with an error")
    from .knn import add_memory_args
    add_memory_args(p)   # --memory --knn_lambda --knn_k --knn_temperature --knn_index --memory_add ...
    add_debug_flag(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(lambda: _main(args), debug=args.debug)


def _main(args) -> int:
    # every option first, then the device, then the model: nothing is loaded for a bad value
    from .knn import check_memory_args, knn_from_args
    check_decoding(args.strategy, args.temperature, args.top_k, args.top_p, args.num_beams,
                   args.repetition_penalty, args.max_new_tokens, args.num_return_sequences)
    check_memory_args(args)   # StoreError (a ValueError): one error line through run_tool
    try:
        device = backend.check_device(args.device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--device {args.device}: {e}") from None
    model, tok = load_model(args.model_dir, device)
    if tok is None:   # a Hugging Face GPT-2 folder without vocab.json + merges.txt
        raise ValueError(f"{args.model_dir} has no tokenizer files (vocab.json + merges.txt): copy "
                         f"them beside the weights")
    try:
        ids = tok.encode(args.prompt, errors="ignore") if args.skip_unknown else tok.encode(args.prompt)
    except TypeError:   # a tokenizer that knows every input (byte-level BPE) takes no errors=
        ids = tok.encode(args.prompt)
    except ValueError as e:
        raise ValueError(f"--prompt: {e}") from None
    knn = knn_from_args(args, model, tok, log=lambda m: print(m, file=sys.stderr))
    t0 = time.perf_counter()
    outs = generate_ids(model, ids, args.max_new_tokens, args.strategy, args.temperature, args.top_k,
                        args.top_p, args.num_beams, args.repetition_penalty, args.num_return_sequences,
                        args.seed, use_cache=not args.no_cache, knn=knn)
    dt = time.perf_counter() - t0
    for i, s in enumerate(outs):
        if len(outs) > 1:
            print(f"--- sequence {i + 1} ---")
        print(tok.decode(s))
    n_new = sum(len(s) - len(ids) for s in outs)
    print(f"[{n_new} tokens in {dt:.2f} s, {n_new / max(dt, 1e-9):.0f} tokens/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
