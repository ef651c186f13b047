"""Decode speed: a GPT-2-small-shaped model imported from Hugging Face, ours vs transformers' generate.

``python benchmarks/hf_generate.py`` builds ``GPT2LMHeadModel`` with GPT-2 small's shapes
(12 layers x 768, 12 heads, vocab 50257, 1024 positions) and random weights, saves it with
``save_pretrained`` (cached under ``~/.cache/minigrad-lm/bench/``), imports the folder with
``lm.loader.load_model`` and decodes ``--new_tokens`` greedy tokens from the same prompt with
our KV cache and with ``model.generate`` (its KV cache on), alternating, ``--repeats`` times each.
It checks both give the same tokens and prints tokens/s of each and the ratio (ours / theirs;
above 1.0 is faster). Writes the table to ``--out`` (default ``output/bench/hf_generate.md``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "minigrad-lm", "bench", "hf-gpt2-small-random")


def build_folder(path: str, seed: int = 0) -> str:
    import torch
    import transformers
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    torch.manual_seed(seed)
    conf = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    transformers.GPT2LMHeadModel(conf).save_pretrained(path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--prompt_tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--folder", default=CACHE)
    p.add_argument("--out", default="output/bench/hf_generate.md")
    p.add_argument("--profile", action="store_true", help="print our decode loop's cProfile top entries")
    args = p.parse_args(argv)

    import torch
    import transformers

    from lm.generate import generate_ids
    from lm.loader import load_model
    from minigrad import backend

    backend.keep_freed_memory()
    folder = build_folder(args.folder)
    ours, _ = load_model(folder)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    prompt = np.random.default_rng(0).integers(0, 50257, args.prompt_tokens).tolist()
    n = args.new_tokens
    idx = np.random.default_rng(1).integers(0, 50257, (1, 64))
    with torch.no_grad():
        ref = theirs(torch.from_numpy(idx)).logits.numpy()
    import minigrad as mg
    with mg.no_grad():
        mine = ours(idx, idx)[0].numpy()
    logit_diff = float(np.abs(mine - ref).max())

    def run_ours():
        t = time.perf_counter()
        out = generate_ids(ours, prompt, n, strategy="greedy")[0]
        return time.perf_counter() - t, out[len(prompt):]

    def run_theirs():
        t = time.perf_counter()
        with torch.no_grad():
            out = theirs.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  use_cache=True, pad_token_id=50256)[0].tolist()
        return time.perf_counter() - t, out[len(prompt):]

    run_ours(), run_theirs()                       # warm-up: compiled loops, allocator, thread pools
    print(f"imported logits within {logit_diff:.1e} of transformers'; warm-up done", flush=True)
    if args.profile:
        import cProfile
        import pstats
        pr = cProfile.Profile()
        pr.enable()
        run_ours()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(18)
    t_ours, t_theirs, same = [], [], True
    for _ in range(args.repeats):                  # alternating: both see the same machine load
        a, ids_a = run_ours()
        b, ids_b = run_theirs()
        t_ours.append(a)
        t_theirs.append(b)
        print(f"pair {len(t_ours)}: ours {n / a:.2f} tokens/s, transformers {n / b:.2f} tokens/s, "
              f"ratio {b / a:.2f}x", flush=True)
        same = same and ids_a == ids_b
    mo, mt = statistics.median(t_ours), statistics.median(t_theirs)
    rows = [
        f"GPT-2-small shape (12 x 768, vocab 50257), random weights, prompt {len(prompt)} tokens, "
        f"{n} new greedy tokens, median of {args.repeats} alternating runs; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}",
        "",
        "| decoder | tokens/s | s per run (all runs) |",
        "|---|---|---|",
        f"| ours, KV cache (lm.generate) | {n / mo:.1f} | {', '.join(f'{t:.2f}' for t in t_ours)} |",
        f"| transformers generate, KV cache | {n / mt:.1f} | {', '.join(f'{t:.2f}' for t in t_theirs)} |",
        "",
        f"ours / transformers tokens/s: **{mt / mo:.2f}x** (medians; median of the pairs' ratios "
        f"{statistics.median(b / a for a, b in zip(t_ours, t_theirs)):.2f}x); same tokens: {same}; imported logits "
        f"(64 positions x 50257) within {logit_diff:.1e} of transformers' (float32)",
    ]
    text = "\n".join(rows)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
