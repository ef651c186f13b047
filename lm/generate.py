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
import sys
import time

import numpy as np

import minigrad as mg
from minigrad import backend

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

    def __init__(self, model: GPT, use_cache: bool):
        self.model, self.use_cache = model, use_cache
        self.block = model.config.block_size
        self.window = model.config.attn_window
        self.rolling = getattr(model, "unbounded", False)
        self.cache = None

    def _prefill(self, seqs):
        ctx = np.asarray(seqs)[:, -self.block:]
        if not self.use_cache:
            return self.model.logits_last(ctx)
        self.cache = KVCache(self.model.config.n_layer, capacity=self.block, window=self.window)
        return self.model.logits_last(ctx, self.cache)

    def first(self, seqs):
        return backend.to_numpy(self._prefill(seqs))

    def next(self, seqs, new_tokens):
        if not self.use_cache:
            return backend.to_numpy(self.model.logits_last(np.asarray(seqs)[:, -self.block:]))
        if self.cache.pos + 1 > self.block and not self.rolling:
            keep = self.block - self.block // 4
            return backend.to_numpy(self._prefill(np.asarray(seqs)[:, -keep:]))
        return backend.to_numpy(self.model.logits_last(np.asarray(new_tokens)[:, None], self.cache))

    def reorder(self, index):
        if self.cache is not None:
            self.cache.reorder(index)


@mg.no_grad()
def generate_ids(model: GPT, prompt_ids, max_new_tokens: int = 100, strategy: str = "top_p",
                 temperature: float = 1.0, top_k: int = 50, top_p: float = 0.9, num_beams: int = 4,
                 repetition_penalty: float = 1.0, num_return_sequences: int = 1, seed: int | None = None,
                 use_cache: bool = True, eos_id: int | None = None) -> list[list[int]]:
    """Token ids of ``num_return_sequences`` continuations (prompt included)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if temperature <= 0 and strategy in ("sample", "top_k", "top_p"):
        raise ValueError(f"temperature must be > 0 for {strategy} (use strategy greedy for argmax), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 0 or num_return_sequences < 1:
        raise ValueError("max_new_tokens must be >= 0 and num_return_sequences >= 1")
    prompt_ids = list(prompt_ids)
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    was_training = model.training
    model.eval()
    try:
        if strategy == "beam":
            return _beam_search(model, prompt_ids, max_new_tokens, num_beams, num_return_sequences,
                                repetition_penalty, use_cache, eos_id)
        rng = np.random.default_rng(seed)
        n = num_return_sequences
        seqs = [list(prompt_ids) for _ in range(n)]
        stepper = _Stepper(model, use_cache)
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


def _beam_search(model, prompt_ids, max_new_tokens, num_beams, num_return, penalty, use_cache, eos_id):
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if num_return > num_beams:
        raise ValueError(f"num_return_sequences ({num_return}) cannot exceed num_beams ({num_beams})")
    seqs = [list(prompt_ids)]
    scores = np.zeros(1)
    stepper = _Stepper(model, use_cache)
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
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model, tok = load_model(args.model_dir, args.device)
        ids = tok.encode(args.prompt)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        outs = generate_ids(model, ids, args.max_new_tokens, args.strategy, args.temperature, args.top_k,
                            args.top_p, args.num_beams, args.repetition_penalty, args.num_return_sequences,
                            args.seed, use_cache=not args.no_cache)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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
