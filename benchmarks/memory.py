"""Training memory and step time against depth: plain, checkpointed, reversible, both.

    python benchmarks/memory.py [--output_dir benchmarks/results/memory] [--layers 2,4,8,16]

A GPT of fixed width (n_embd 128, n_head 4, block 128, batch 8, vocab 65, random tokens)
at each depth, in four variants that share their parameters:

- plain;
- checkpointed: ``model.checkpoint_every=1`` (each block recomputed in backward);
- reversible: ``model.reversible=true`` (one node keeps only the final two streams);
- reversible + checkpointed: ``reversible`` and ``checkpoint_every=1`` (the reversible stack
  cut after every block: two streams stored per block, inputs rebuilt over one block).

For each, one AdamW step is measured with ``minigrad.memory.MemoryTracker`` (after a
warm-up step, so the optimizer state exists): peak total bytes, each category at that
peak, and the maximum of the activation category (arrays saved for backward). Step time
is the fastest of ``--repeats`` steps taken without the tracker (on a shared machine the
fastest is the one least disturbed by other work), the variants of a depth interleaved so
machine load hits them alike; the median is in results.json. Prints a Markdown table and writes
``report.md``, ``results.json`` and ``activation_memory.png`` under ``--output_dir``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import minigrad as mg  # noqa: E402
from lm.config import ModelConfig  # noqa: E402
from lm.model import GPT  # noqa: E402
from minigrad.memory import CATEGORIES, MemoryTracker  # noqa: E402

MiB = 1024.0 ** 2
VARIANTS = {
    "plain": {},
    "checkpointed": {"checkpoint_every": 1},
    "reversible": {"reversible": True},
    "reversible+ckpt": {"reversible": True, "checkpoint_every": 1},
}


def make(n_layer: int, args, **switches):
    mg.manual_seed(0)
    cfg = ModelConfig(vocab_size=args.vocab, block_size=args.block, n_layer=n_layer, n_head=args.n_head,
                      n_embd=args.n_embd, dropout=args.dropout, **switches)
    model = GPT(cfg)
    opt = model.configure_optimizer(1e-3, 0.1, (0.9, 0.99))
    return model, opt


def step(model, opt, x, y, mt=None):
    mark = mt.mark if mt is not None else (lambda label: None)
    mark("forward")
    _, loss = model(x, y)
    opt.zero_grad()
    mark("backward")
    loss.backward()
    mark("optimizer")
    opt.step()
    mark("end")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", default="benchmarks/results/memory")
    p.add_argument("--layers", default="2,4,8,16")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=65)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per variant (the fastest is reported)")
    args = p.parse_args(argv)
    layers = [int(v) for v in args.layers.split(",")]
    variants = args.variants.split(",")
    rng = np.random.default_rng(0)
    x = rng.integers(0, args.vocab, (args.batch, args.block))
    y = rng.integers(0, args.vocab, (args.batch, args.block))

    results = []
    for n_layer in layers:
        built = {v: make(n_layer, args, **VARIANTS[v]) for v in variants}
        mem = {}
        for v, (model, opt) in built.items():
            step(model, opt, x, y)                     # warm-up: optimizer state, kernel compilation
            with MemoryTracker(model, opt, timeline=False) as mt:
                step(model, opt, x, y, mt)
            mem[v] = mt.summary()
        times = {v: [] for v in variants}
        for _ in range(args.repeats):                  # interleaved: load hits every variant alike
            for v, (model, opt) in built.items():
                t0 = time.perf_counter()
                step(model, opt, x, y)
                times[v].append(time.perf_counter() - t0)
        for v in variants:
            s = mem[v]
            results.append({"n_layer": n_layer, "variant": v, "peak_bytes": s["peak_bytes"],
                            "at_peak": s["at_peak"], "max": s["max"], "peak_label": s["peak_label"],
                            "ms": 1e3 * float(np.min(times[v])), "ms_median": 1e3 * float(np.median(times[v])),
                            "ms_all": [1e3 * t for t in times[v]]})
            r = results[-1]
            print(f"n_layer {n_layer:2d} {v:16s} peak {r['peak_bytes'] / MiB:8.2f} MiB  activations "
                  f"{r['max']['activations'] / MiB:7.2f} MiB  step {r['ms']:8.1f} ms", flush=True)
        del built

    report = make_report(results, layers, variants, args)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "report.md"), "w") as f:
        f.write(report)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({"settings": vars(args), "results": results}, f, indent=2)
    plot(results, layers, variants, os.path.join(args.output_dir, "activation_memory.png"))
    print()
    print(report)
    return 0


def _get(results, n_layer, variant):
    for r in results:
        if r["n_layer"] == n_layer and r["variant"] == variant:
            return r
    return None


def make_report(results, layers, variants, args) -> str:
    lines = [f"GPT n_embd {args.n_embd}, n_head {args.n_head}, block {args.block}, batch {args.batch}, "
             f"vocab {args.vocab}, dropout {args.dropout}; AdamW; one training step. MiB = 2^20 bytes. "
             "'activations' is the most the arrays saved for backward reached during the step; "
             "the category columns are the breakdown at the moment of the peak total.", "",
             "| n_layer | variant | peak total MiB | activations (max) MiB | act. vs plain | params | grads | "
             "optimizer | activations @peak | other @peak | peak during | step ms | time vs plain |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        base = _get(results, r["n_layer"], "plain")
        act = r["max"]["activations"]
        ra = f"{act / base['max']['activations']:.2f}x" if base else "n/a"
        rt = f"{r['ms'] / base['ms']:.2f}x" if base else "n/a"
        a = r["at_peak"]
        lines.append(f"| {r['n_layer']} | {r['variant']} | {r['peak_bytes'] / MiB:.2f} | {act / MiB:.2f} | {ra} | "
                     + " | ".join(f"{a[c] / MiB:.2f}" for c in CATEGORIES)
                     + f" | {r['peak_label']} | {r['ms']:.0f} | {rt} |")
    lines += ["", "Checks:"]
    lo, hi = min(layers), max(layers)

    def growth(v):
        a, b = _get(results, lo, v), _get(results, hi, v)
        return b["max"]["activations"] / a["max"]["activations"] if a and b else None

    for v in variants:
        g = growth(v)
        if g is not None:
            extra = ""
            if v == "reversible":
                extra = f" (target <= 1.2x: {'met' if g <= 1.2 else 'NOT met'})"
            lines.append(f"- {v}: activation memory n_layer {lo} -> {hi} grows {g:.2f}x{extra}")
    if 8 in layers and "checkpointed" in variants and "plain" in variants:
        c, b = _get(results, 8, "checkpointed"), _get(results, 8, "plain")
        cut = 1 - c["max"]["activations"] / b["max"]["activations"]
        lines.append(f"- checkpointed every block at n_layer 8: activation memory {cut:.0%} below plain "
                     f"(target >= 60%: {'met' if cut >= 0.6 else 'NOT met'})")
    if "reversible+ckpt" in variants and "plain" in variants:
        c, b = _get(results, hi, "reversible+ckpt"), _get(results, hi, "plain")
        cut = 1 - c["peak_bytes"] / b["peak_bytes"]
        lines.append(f"- reversible + checkpointed at n_layer {hi}: total peak training memory {cut:.0%} below "
                     f"plain (target >= 60%: {'met' if cut >= 0.6 else 'NOT met'})")
    for v in variants:
        if v != "plain":
            ratios = [_get(results, n, v)["ms"] / _get(results, n, "plain")["ms"] for n in layers
                      if _get(results, n, "plain")]
            if ratios:
                lines.append(f"- step time of {v}: {min(ratios):.2f}x to {max(ratios):.2f}x plain's")
    lines += ["", f"machine: {platform.machine()}, {os.cpu_count()} cores (shared, timings noisy), "
              f"numpy {np.__version__}, minigrad {mg.__version__}; step time = fastest of {args.repeats} "
              "interleaved untracked steps"]
    return "\n".join(lines) + "\n"


def plot(results, layers, variants, path) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    a1, a2 = fig.subplots(1, 2)
    for i, v in enumerate(variants):
        rs = [_get(results, n, v) for n in layers]
        a1.plot(layers, [r["max"]["activations"] / MiB for r in rs], "o-", color=f"C{i}", label=v)
        a2.plot(layers, [r["peak_bytes"] / MiB for r in rs], "o-", color=f"C{i}", label=v)
    a1.set_title("activation memory (saved for backward, max over the step)")
    a2.set_title("peak training memory (all categories)")
    for a in (a1, a2):
        a.set_xlabel("n_layer")
        a.set_ylabel("MiB")
        a.set_xticks(layers)
        a.grid(True, alpha=0.3)
        a.legend()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
