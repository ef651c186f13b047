"""The one compression report: a compressed model measured against the model it came from.

Every technique (quantization, pruning, low rank, a merged LoRA) is judged the same way,
by ``lm.compress`` and by the benchmarks, with ``compare_models``:

- bytes on disk of the two weight files (and of the whole folders);
- validation loss before and after, on the same windows of the validation split;
- the KL divergence KL(P_before || P_after) of the next-token distributions, averaged
  over every position, and the same-top-1 rate (how often both models rank the same
  token first): llama.cpp's quality metrics for quantized models;
- decode speed: tokens/s of greedy decoding with the KV cache at batch 1, the two models
  timed alternately, median of ``repeats`` runs, after one warm-up run each.

``write_report(folder, report)`` writes ``compress_report.json`` and ``compress_report.md``
and returns the Markdown text (``format_report``), which ``lm.compress`` prints.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time

import numpy as np

import minigrad as mg
from minigrad import backend
from minigrad.io import atomic_write_text

REPORT_JSON, REPORT_MD = "compress_report.json", "compress_report.md"


def folder_bytes(model_dir: str | None) -> dict:
    """{"weights": bytes of model.safetensors, "folder": bytes of every file in the folder}."""
    if not model_dir or not os.path.isdir(model_dir):
        return {"weights": None, "folder": None}
    total = 0
    for name in os.listdir(model_dir):
        p = os.path.join(model_dir, name)
        if os.path.isfile(p) and not name.startswith("compress_report"):
            total += os.path.getsize(p)
    w = os.path.join(model_dir, "model.safetensors")
    return {"weights": os.path.getsize(w) if os.path.isfile(w) else None, "folder": total}


def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@mg.no_grad()
def quality(before, after, val_tokens, block_size: int, batch_size: int = 16, max_batches: int | None = None,
            progress: bool = False) -> dict:
    """Loss of both models, KL(before || after) and same-top-1 over windows of ``val_tokens``."""
    from .data import iter_eval_batches
    batches = list(iter_eval_batches(np.asarray(val_tokens), batch_size, block_size, max_batches))
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="evaluate", unit="batch")
    sums = {"nll_before": 0.0, "nll_after": 0.0, "kl": 0.0, "top1": 0.0}
    n = 0
    for x, y in batches:
        zb, za = _logits(before, x), _logits(after, x)
        for r in range(len(y)):                        # one row at a time: (T, V) float64 each
            lb, la = _log_softmax(zb[r].astype(np.float64)), _log_softmax(za[r].astype(np.float64))
            idx = y[r][:, None]
            sums["nll_before"] -= float(np.take_along_axis(lb, idx, -1).sum())
            sums["nll_after"] -= float(np.take_along_axis(la, idx, -1).sum())
            sums["kl"] += float((np.exp(lb) * (lb - la)).sum())
            sums["top1"] += float((lb.argmax(-1) == la.argmax(-1)).sum())
        n += y.size
    if n == 0:
        raise ValueError("the validation split has no full window to evaluate")
    out = {k: v / n for k, v in sums.items()}
    return {"loss_before": out["nll_before"], "loss_after": out["nll_after"], "kl_divergence": out["kl"],
            "same_top1": out["top1"], "tokens": n}


def _logits(model, x) -> np.ndarray:
    model.eval()
    xp = backend.get_array_module(next(iter(model.state_dict().values())))
    logits, _ = model(xp.asarray(x), xp.asarray(x))       # targets given: logits at every position
    return backend.to_numpy(logits.data)


def decode_speed(models: dict, prompt_ids, new_tokens: int = 128, repeats: int = 3) -> dict:
    """{name: tokens/s} of greedy decoding with the KV cache at batch 1, timed alternately."""
    from .generate import generate_ids
    times = {k: [] for k in models}
    for rep in range(repeats + 1):                     # round 0 warms up (compiles, caches)
        for k, m in models.items():
            t0 = time.perf_counter()
            out = generate_ids(m, prompt_ids, new_tokens, strategy="greedy", use_cache=True)
            dt = time.perf_counter() - t0
            if rep:
                times[k].append((len(out[0]) - len(prompt_ids)) / dt)
    return {k: statistics.median(v) for k, v in times.items()}


def compare_models(before, after, val_tokens, *, before_dir=None, after_dir=None, steps=(),
                   batch_size: int = 16, max_batches: int | None = None, decode_tokens: int = 128,
                   repeats: int = 3, prompt_ids=None, progress: bool = False) -> dict:
    """The report dict of ``after`` against ``before`` (see the module docstring)."""
    from minigrad.quant import bytes_report
    block = before.config.block_size
    q = quality(before, after, val_tokens, block, batch_size, max_batches, progress)
    prompt = list(prompt_ids) if prompt_ids is not None else [int(t) for t in np.asarray(val_tokens[:1])]
    new = max(1, min(decode_tokens, block - len(prompt)))
    speed = decode_speed({"before": before, "after": after}, prompt, new, repeats)
    disk_b, disk_a = folder_bytes(before_dir), folder_bytes(after_dir)
    mem_b, mem_a = bytes_report(before), bytes_report(after)
    rep = {
        "steps": list(steps),
        "before": {"model_dir": before_dir, "bytes_on_disk": disk_b["weights"], "folder_bytes": disk_b["folder"],
                   "bytes_in_memory": mem_b["total"], "val_loss": q["loss_before"],
                   "perplexity": math.exp(q["loss_before"]), "decode_tokens_per_s": speed["before"]},
        "after": {"model_dir": after_dir, "bytes_on_disk": disk_a["weights"], "folder_bytes": disk_a["folder"],
                  "bytes_in_memory": mem_a["total"], "bytes_by_kind": {k: mem_a[k] for k in ("codes", "scales", "float")},
                  "bytes_by_dtype": mem_a["by_dtype"], "val_loss": q["loss_after"],
                  "perplexity": math.exp(q["loss_after"]), "decode_tokens_per_s": speed["after"]},
        "delta_val_loss": q["loss_after"] - q["loss_before"],
        "ppl_ratio": math.exp(q["loss_before"] - q["loss_after"]),        # float / compressed
        "kl_divergence": q["kl_divergence"],
        "same_top1": q["same_top1"],
        "tokens_evaluated": q["tokens"],
        "decode_new_tokens": new,
        "speedup": speed["after"] / speed["before"],
    }
    if disk_b["weights"] and disk_a["weights"]:
        rep["size_ratio"] = disk_a["weights"] / disk_b["weights"]
    else:
        rep["size_ratio"] = mem_a["total"] / max(mem_b["total"], 1)
    return rep


def _mb(n):
    return "-" if n is None else f"{n / 2**20:.2f} MiB"


def format_report(rep: dict) -> str:
    """Markdown, in the shape of llama.cpp's quantization table."""
    b, a = rep["before"], rep["after"]
    steps = ", ".join(s if isinstance(s, str) else s.get("name", str(s)) for s in rep["steps"]) or "none"
    lines = [
        f"# Compression report: {steps}",
        "",
        f"before: `{b['model_dir']}`  ",
        f"after: `{a['model_dir']}`",
        "",
        "| | before | after | change |",
        "|---|---|---|---|",
        f"| bytes on disk (weights) | {_mb(b['bytes_on_disk'])} | {_mb(a['bytes_on_disk'])} | "
        f"{100 * rep['size_ratio']:.1f}% of before |",
        f"| bytes in memory | {_mb(b['bytes_in_memory'])} | {_mb(a['bytes_in_memory'])} | |",
        f"| validation loss (nats) | {b['val_loss']:.4f} | {a['val_loss']:.4f} | {rep['delta_val_loss']:+.4f} |",
        f"| perplexity | {b['perplexity']:.3f} | {a['perplexity']:.3f} | ratio float/compressed {rep['ppl_ratio']:.4f} |",
        f"| KL divergence from before | | {rep['kl_divergence']:.5f} | |",
        f"| same top-1 | | {100 * rep['same_top1']:.2f}% | |",
        f"| decode tokens/s (batch 1, {rep['decode_new_tokens']} new) | {b['decode_tokens_per_s']:.1f} | "
        f"{a['decode_tokens_per_s']:.1f} | {rep['speedup']:.2f}x |",
        "",
        f"{rep['tokens_evaluated']:,} validation tokens evaluated.",
    ]
    kinds = a.get("bytes_by_kind")
    if kinds:
        t = max(sum(kinds.values()), 1)
        lines.append("After, in memory: " + " || ".join(f"{k}: {v:,} B ({100 * v / t:.1f}%)" for k, v in kinds.items()))
    return "\n".join(lines) + "\n"


def write_report(folder: str, rep: dict) -> str:
    os.makedirs(folder, exist_ok=True)
    atomic_write_text(os.path.join(folder, REPORT_JSON), json.dumps(rep, indent=2) + "\n")
    md = format_report(rep)
    atomic_write_text(os.path.join(folder, REPORT_MD), md)
    return md
