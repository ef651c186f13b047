"""The seed's four claims, measured on one reference model: size, memory, speed, quality.

    python benchmarks/claims.py --data /path/to/tinyshakespeare.txt            # the baby reference
    python benchmarks/claims.py --data ... --model_dir <a trained model folder>  # another reference
    python benchmarks/claims.py --quick --model_dir <tiny model> --data <text>   # minutes, a smoke run

The claims: model size -50 to -80%, memory usage -60 to -90%, inference speed +30 to 50%,
quality 90 to 95% preserved. The reference is ``benchmarks.reference.baby_reference_dir``
(6 x 6 x 384, context 256, 2000 steps, dropout 0.1, trained once and cached).

**Recipes** (one row each; ``--recipes`` picks some). Each is a chain of stages on the
reference: an ``lm.compress`` run (its flags, ``--no_report``: the folder is measured here), or
a distillation run of ``lm.train`` (``distill.teacher=<reference>``, ``lm.distill``):

- ``q8_0``; ``nf4``; ``gptq4`` (GPTQ, 4-bit, calibrated on the training text);
- ``wanda50+q4_0``: 50% Wanda pruning, a short recovery fine-tune, then q4_0 (kept values only);
- ``structured+distill+q4_0``: heads and MLP channels removed (``--structured``), recovered by
  distillation from the reference, then q4_0;
- ``student+q4_0``: a smaller model (half the width, 2/3 of the depth) trained from scratch by
  distillation from the reference, then q4_0;
- ``student2x192+q4_0``: the student ``benchmarks/distill.py`` found best (2 x 4 x 192, 2000
  steps at batch 16, lr 2e-3, forward KL), then q4_0;
- ``mqa+q4_0``: the reference made multi-query (``lm.compress --kv_heads 1``: each layer's key
  and value heads mean-pooled into one, Ainslie et al. 2023), uptrained by distillation from the
  reference for 300 steps (15% of its 2000; lr 1e-3 cosine to 1e-4), then q4_0.

A recipe whose technique is not installed (``TECHNIQUES``) is an error before any work.

**Measured**, for each form: bytes on disk of ``model.safetensors``; quality against the
reference with ``lm.report.quality`` (perplexity ratio reference / form, KL divergence,
same-top-1); decode tokens/s at batch 1 with the KV cache (``lm.report.decode_speed``, the form
and the reference alternated) and prompt throughput (one forward over a full-context prompt).
Every quality and speed figure is measured with ``--seeds`` seeds (default 3): seed ``s`` runs the
compression with ``--seed s`` (calibration batches, recovery batches) and evaluates on
validation windows shifted by ``s``; timings are a fresh alternated run each. Distillation
trainings run once (seed 0) and are cached: the seeds vary what follows them. Figures are the
mean and a 95% interval (Student t, n - 1 degrees of freedom); a claim is "met" only when the
whole interval is inside the claimed range or beyond it on the good side.

Memory: peak training memory by component (``minigrad.memory.MemoryTracker`` over one step, the
step of ``benchmarks/memory.py``) for float32 AdamW against reversible blocks, checkpointing,
8-bit AdamW and all three; fine-tuning parameters + gradients + optimizer state, full against
LoRA against QLoRA (``benchmarks/finetune.measure``); inference weights + KV cache at full
context, float32 MHA against 4-bit + MQA (``benchmarks/architecture.kv_bytes_per_position``).

Writes ``report.md``, ``results.json``, ``size_quality.png`` and ``speed.png`` under
``--output_dir``. The compressed folders are cached under ``--work_dir``.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1024.0 ** 2

# technique -> the module that implements it (a recipe naming one that does not import is refused)
TECHNIQUES = {
    "quantize": "minigrad.quant", "gptq": "minigrad.gptq", "wanda": "minigrad.prune",
    "structured": "lm.structured", "distill": "lm.distill", "finetune": "lm.recover",
    "reversible": "minigrad.nn.reversible", "checkpoint": "minigrad.checkpoint",
    "adamw8bit": "minigrad.optim8bit", "lora": "minigrad.nn.lora", "kv_heads": "lm.kv_heads",
}

CLAIMS = {   # name: (low, high) of the claimed range, as fractions; "good side" is above high
    "model size": (0.50, 0.80),
    "memory usage": (0.60, 0.90),
    "training memory": (0.60, 0.90),   # the target for memory: the training run's peak
    "inference speed": (0.30, 0.50),
    "quality": (0.90, 0.95),
}
TARGETS = {"model size": 0.80, "memory usage": 0.60, "training memory": 0.60, "inference speed": 0.30,
           "quality": 0.90}


@dataclass
class Recipe:
    name: str
    needs: tuple
    stages: list            # ("compress", [flags]) | ("distill", {"kind": "student"|"recover", ...})
    note: str = ""


def recipes(quick: bool, data: str) -> dict:
    fi = 8 if quick else 100           # Wanda's recovery fine-tune steps (batch 8)
    di = 6 if quick else 200           # distillation steps (recovery of the structured model)
    si = 8 if quick else 400           # distillation steps (the student from scratch)
    q4 = ["--quantize", "q4_0"]
    rs = [
        Recipe("q8_0", ("quantize",), [("compress", ["--quantize", "q8_0"])]),
        Recipe("nf4", ("quantize",), [("compress", ["--quantize", "nf4"])]),
        Recipe("gptq4", ("quantize", "gptq"), [("compress", ["--quantize", "gptq", "--calib_data", data,
                                                             "--calib_batches", "2" if quick else "8"])]),
        Recipe("wanda50+q4_0", ("wanda", "finetune", "quantize"),
               [("compress", ["--prune", "wanda", "--sparsity", "0.5", "--finetune_iters", str(fi),
                              "--finetune_batch_size", "8", *q4])]),
        Recipe("structured+distill+q4_0", ("structured", "distill", "quantize"),
               [("compress", ["--structured", "heads=0.34,mlp=0.5"]),
                ("distill", {"kind": "recover", "iters": di}), ("compress", q4)]),
        Recipe("student+q4_0", ("distill", "quantize"),
               [("distill", {"kind": "student", "iters": si}), ("compress", q4)]),
        # the student that benchmarks/distill.py found best: 2 layers x 4 heads x 192 (71% fewer
        # parameters than the 4 x 256 reference), 2000 steps at batch 16, lr 2e-3
        Recipe("student2x192+q4_0", ("distill", "quantize"),
               [("distill", {"kind": "student", "iters": 8 if quick else 2000, "shape": (2, 4, 192),
                             "batch": 4 if quick else 16, "lr": 2e-3}), ("compress", q4)]),
        # multi-query attention from the reference: pooled, uptrained (distilled), then 4-bit
        Recipe("mqa+q4_0", ("kv_heads", "distill", "quantize"),
               [("compress", ["--kv_heads", "1"]),
                ("distill", {"kind": "recover", "iters": 6 if quick else 300, "lr": 1e-3}), ("compress", q4)]),
    ]
    return {r.name: r for r in rs}


class ClaimsError(ValueError):
    """Bad input: the message says what to do."""


def check_installed(rs) -> None:
    for r in rs:
        for t in r.needs:
            mod = TECHNIQUES[t]
            try:
                importlib.import_module(mod)
            except ImportError as e:
                raise ClaimsError(f"recipe {r.name!r} needs {t} ({mod}), which is not installed here ({e}); "
                                  f"drop it from --recipes or install the branch that adds {mod}") from None


# --------------------------------------------------------------------------- statistics
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def ci(values) -> dict:
    v = np.asarray(values, float)
    m = float(v.mean())
    if v.size < 2:
        return {"mean": m, "lo": m, "hi": m, "n": int(v.size), "values": v.tolist()}
    half = T95.get(v.size - 1, 1.96) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return {"mean": m, "lo": m - half, "hi": m + half, "n": int(v.size), "values": v.tolist()}


# --------------------------------------------------------------------------- building the forms
def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _run_compress(src: str, flags: list, out: str, seed: int, data: str, quick: bool) -> str:
    from lm.compress import build_parser, compress
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    tmp = out + ".tmp"
    if os.path.isdir(tmp):
        import shutil
        shutil.rmtree(tmp)
    args = build_parser().parse_args(["--model_dir", src, "--output_dir", tmp, "--data", data, "--seed", str(seed),
                                      "--no_report", "--no_progress", *flags]
                                     + (["--calib_batches", "2", "--calib_batch_size", "4",
                                         "--finetune_batch_size", "4"] if quick and "--calib_batches" not in flags
                                        else []))
    compress(args, log=lambda *a: None)
    os.replace(tmp, out)
    return out


def _student_shape(conf: dict, quick: bool) -> list:
    m = conf["model"]
    n_head = max(1, m["n_head"] // 2) if m["n_embd"] // 2 >= 32 else m["n_head"]
    n_embd = max(32, (m["n_embd"] // 2) // n_head * n_head)
    n_layer = max(1, round(m["n_layer"] * 2 / 3))
    return [f"model.n_layer={n_layer}", f"model.n_head={n_head}", f"model.n_embd={n_embd}",
            f"model.block_size={m['block_size']}", f"model.bias={str(m.get('bias', True)).lower()}",
            "model.dropout=0.0"]


def _run_distill(src: str, ref_dir: str, spec: dict, out: str, data: str, quick: bool) -> str:
    from lm.config import Config, apply_overrides, validate
    from lm.loader import read_config
    from lm.train import train
    model_dir = os.path.join(out, "model")
    if os.path.isfile(os.path.join(out, "summary.json")):
        return model_dir
    conf = read_config(ref_dir)
    iters = spec["iters"]
    over = [f"data.corpus={data}", "data.tokenizer=char", f"data.val_fraction={conf['data'].get('val_fraction', 0.1)}",
            f"distill.teacher={ref_dir}", "distill.alpha=0.5", "distill.temperature=1.0",
            f"train.max_iters={iters}", f"train.eval_interval={iters}", "train.eval_iters=2" if quick else
            "train.eval_iters=10", "train.warmup_iters=" + str(max(1, iters // 20)), "train.seed=0",
            "train.progress=false", "train.sample_tokens=0", "train.weight_decay=0.1",
            "train.batch_size=4" if quick else "train.batch_size=8"]
    if spec["kind"] == "student" and spec.get("shape") and not quick:
        n_layer, n_head, n_embd = spec["shape"]
        over += [f"model.n_layer={n_layer}", f"model.n_head={n_head}", f"model.n_embd={n_embd}",
                 f"model.block_size={conf['model']['block_size']}",
                 f"model.bias={str(conf['model'].get('bias', True)).lower()}", "model.dropout=0.0",
                 f"train.learning_rate={spec['lr']}", f"train.min_lr={spec['lr'] / 10}",
                 f"train.batch_size={spec['batch']}"]
    elif spec["kind"] == "student":
        over += _student_shape(conf, quick) + ["train.learning_rate=1e-3", "train.min_lr=1e-4"]
    else:   # recover the pruned model: fine-tune every weight, the teacher's soft targets
        lr = spec.get("lr", 3e-4)
        over += [f"train.init_from={src}", f"train.learning_rate={lr}", f"train.min_lr={lr / 10}"]
    cfg = apply_overrides(Config(), over)
    validate(cfg)
    train(cfg, out, resume=os.path.isfile(os.path.join(out, "checkpoint.safetensors")), log=lambda *a: None)
    return model_dir


def build_form(recipe: Recipe, ref_dir: str, work: str, seed: int, data: str, quick: bool, log=print) -> str:
    """The folder of ``recipe`` applied to the reference with ``seed`` (cached stage by stage)."""
    src = ref_dir
    chain = []
    # a distillation is trained once: it and the stages before it run with seed 0, the rest with ``seed``
    last = max([i for i, (k, _) in enumerate(recipe.stages) if k == "distill"], default=-1)
    for i, (kind, spec) in enumerate(recipe.stages):
        s = seed if i > last else 0
        chain.append([kind, spec, s])
        out = os.path.join(work, f"{recipe.name}-{_key(ref_dir, chain)}")
        if kind == "compress":
            log(f"  {recipe.name} seed {s}: lm.compress {' '.join(spec)}")
            src = _run_compress(src, spec, out, s, data, quick)
        else:
            log(f"  {recipe.name}: distillation ({spec['kind']}, {spec['iters']} steps)")
            src = _run_distill(src, ref_dir, spec, out, data, quick)
    return src


# --------------------------------------------------------------------------- measuring the forms
def prompt_speed(models: dict, prompt, repeats: int = 3, warmup: int = 2) -> dict:
    """{name: tokens/s} of reading ``prompt`` (1, T) into a fresh KV cache, alternated: the
    fastest of ``repeats`` after ``warmup`` rounds (the first calls of a shape are slower; on a
    shared machine the fastest run is the one least disturbed by other work)."""
    import minigrad as mg
    from lm.model import KVCache
    times = {k: [] for k in models}
    with mg.no_grad():
        for rep in range(repeats + warmup):
            for k, m in models.items():
                m.eval()
                c = m.config
                cache = KVCache(c.n_layer, capacity=c.block_size, window=c.attn_window)
                t0 = time.perf_counter()
                m.logits_last(prompt, cache)
                if rep >= warmup:
                    times[k].append(prompt.shape[1] / (time.perf_counter() - t0))
    return {k: float(np.max(v)) for k, v in times.items()}


def measure_forms(ref_dir: str, forms: dict, data: str, seeds: int, args, log=print) -> dict:
    """forms: {name: [folder per seed]} -> quality, size and speed per form, per seed."""
    from lm.loader import load_model
    from lm.compress import Context, build_parser
    from lm.loader import detect_kind, read_config
    from lm.report import decode_speed, folder_bytes, quality
    ref, tok = load_model(ref_dir)
    ctx = Context(args=build_parser().parse_args(["--output_dir", "-", "--data", data]), model_dir=ref_dir,
                  conf=read_config(ref_dir), kind=detect_kind(ref_dir), tokenizer=tok)
    val = np.asarray(ctx.corpus().val)
    T = ref.config.block_size
    ref_bytes = folder_bytes(ref_dir)["weights"]
    caches = [dict() for _ in range(seeds)]
    res = {}
    for name, dirs in forms.items():
        rows = []
        for s, d in enumerate(dirs):
            m, _ = load_model(d)
            off = (s * T) // max(seeds, 1)          # validation windows shifted by the seed
            q = quality(ref, m, val[off:], T, args.batch_size, args.eval_batches, cache=caches[s])
            rng = np.random.default_rng(s)
            start = int(rng.integers(0, len(val) - T))
            pl = max(1, T // 8)
            new = max(1, min(args.decode_tokens, T - pl))
            dec = decode_speed({"reference": ref, "form": m}, [int(t) for t in val[start:start + pl]], new,
                               args.decode_repeats)
            pr = prompt_speed({"reference": ref, "form": m}, val[None, start:start + T].astype(np.int64))
            rows.append({"seed": s, "dir": d, "bytes": folder_bytes(d)["weights"],
                         "loss_ref": q["loss_before"], "loss": q["loss_after"],
                         "ppl_ratio": math.exp(q["loss_before"] - q["loss_after"]),
                         "kl": q["kl_divergence"], "top1": q["same_top1"],
                         "decode_ref": dec["reference"], "decode": dec["form"], "decode_speedup": dec["form"] / dec["reference"],
                         "prompt_ref": pr["reference"], "prompt": pr["form"], "prompt_speedup": pr["form"] / pr["reference"]})
            del m
        sizes = [r["bytes"] for r in rows]
        res[name] = {
            "runs": rows, "bytes": float(np.mean(sizes)), "size_reduction": ci([1 - b / ref_bytes for b in sizes]),
            "ppl_ratio": ci([r["ppl_ratio"] for r in rows]), "kl": ci([r["kl"] for r in rows]),
            "top1": ci([r["top1"] for r in rows]), "decode_speedup": ci([r["decode_speedup"] - 1 for r in rows]),
            "prompt_speedup": ci([r["prompt_speedup"] - 1 for r in rows]),
            "decode_tps": ci([r["decode"] for r in rows]), "prompt_tps": ci([r["prompt"] for r in rows]),
        }
        r = res[name]
        log(f"{name:26s} size {100 * (1 - r['size_reduction']['mean']):5.1f}% of ref  quality {r['ppl_ratio']['mean']:.3f}  "
            f"decode x{1 + r['decode_speedup']['mean']:.2f}  prompt x{1 + r['prompt_speedup']['mean']:.2f}")
    return {"reference": {"dir": ref_dir, "bytes": ref_bytes, "val_loss": float(np.mean(
        [r["loss_ref"] for v in res.values() for r in v["runs"]])) if res else None,
        "decode_tps": ci([r["decode_ref"] for v in res.values() for r in v["runs"]]) if res else None},
        "forms": res}


# --------------------------------------------------------------------------- memory
def training_memory(conf_model: dict, batch: int, quick: bool) -> dict:
    """Peak bytes of one training step by component, each variant at the reference's shape."""
    import minigrad as mg
    from benchmarks.memory import step
    from lm.config import ModelConfig
    from lm.model import GPT
    from minigrad.memory import MemoryTracker
    variants = {"float32 AdamW": ({}, "adamw"), "reversible": ({"reversible": True}, "adamw"),
                "checkpointing": ({"checkpoint_every": 1}, "adamw"), "8-bit AdamW": ({}, "adamw8bit"),
                "reversible + 8-bit AdamW": ({"reversible": True}, "adamw8bit"),
                "reversible + checkpointing + 8-bit AdamW": ({"reversible": True, "checkpoint_every": 1}, "adamw8bit")}
    keep = {k: v for k, v in conf_model.items() if k in ModelConfig.__dataclass_fields__}
    rng = np.random.default_rng(0)
    V, T = keep["vocab_size"], keep["block_size"]
    x, y = rng.integers(0, V, (batch, T)), rng.integers(0, V, (batch, T))
    out = {}
    for name, (sw, opt_name) in variants.items():
        mg.manual_seed(0)
        model = GPT(ModelConfig(**{**keep, **sw}))
        opt = model.configure_optimizer(1e-3, 0.1, (0.9, 0.99), optimizer=opt_name)
        step(model, opt, x, y)                         # the optimizer state exists from here on
        with MemoryTracker(model, opt, timeline=False) as mt:
            step(model, opt, x, y, mt)
        s = mt.summary()
        out[name] = {"peak": s["peak_bytes"], "at_peak": s["at_peak"], "max": s["max"]}
        del model, opt
    base = out["float32 AdamW"]["peak"]
    for v in out.values():
        v["reduction"] = 1 - v["peak"] / base
    return {"batch": batch, "block": T, "variants": out}


def finetune_memory(ref_dir: str, data: str) -> dict:
    from benchmarks.finetune import measure, total
    _, mem = measure(ref_dir, data, 1, ["full", "lora", "qlora"], log=lambda *a: None)
    out = {k: {"bytes": total(v), "detail": v} for k, v in mem.items()}
    for v in out.values():
        v["reduction"] = 1 - v["bytes"] / out["full"]["bytes"]
    return out


def inference_memory(conf_model: dict) -> dict:
    """Weights + KV cache (batch 1, full context): float32 MHA against q4_0 + MQA (random weights)."""
    import minigrad as mg
    from benchmarks.architecture import kv_bytes_per_position
    from lm.config import ModelConfig
    from lm.model import GPT
    from minigrad.quant import bytes_report, quantize_
    keep = {k: v for k, v in conf_model.items() if k in ModelConfig.__dataclass_fields__}
    out = {}
    for name, sw, scheme in (("float32 MHA", {"n_kv_head": 0}, None), ("q4_0 + MQA", {"n_kv_head": 1}, "q4_0"),
                             ("q4_0 MHA", {"n_kv_head": 0}, "q4_0")):
        mg.manual_seed(0)
        m = GPT(ModelConfig(**{**keep, **sw, "dropout": 0.0}))
        if scheme:
            quantize_(m, scheme)
        _, kv = kv_bytes_per_position(m)
        w = bytes_report(m)["total"]
        out[name] = {"weights": int(w), "kv_cache": int(kv), "total": int(w + kv)}
    base = out["float32 MHA"]["total"]
    for v in out.values():
        v["reduction"] = 1 - v["total"] / base
    return out


# --------------------------------------------------------------------------- claims and report
def _status(c, claim) -> str:
    lo, hi = CLAIMS[claim]
    if c is None:
        return "not measured"
    if c["lo"] >= lo:
        return "met" if c["hi"] <= hi else "met (beyond the range)"
    if c["hi"] < lo:
        return f"missed by {100 * (lo - c['mean']):.1f} points"
    return "not met (the interval straddles the range's edge)"


def claims_table(res: dict) -> list:
    forms = res["quality"]["forms"]
    good = {k: v for k, v in forms.items() if v["ppl_ratio"]["lo"] >= 0.90}
    rows = []
    if good:
        k = max(good, key=lambda n: good[n]["size_reduction"]["mean"])
        rows.append(("model size", k, good[k]["size_reduction"], good[k]["ppl_ratio"]))
        k2 = max(good, key=lambda n: good[n]["decode_speedup"]["mean"])
        rows.append(("inference speed", k2, good[k2]["decode_speedup"], good[k2]["ppl_ratio"]))
    else:
        rows.append(("model size", "(no recipe keeps 90% quality)", None, None))
        rows.append(("inference speed", "(no recipe keeps 90% quality)", None, None))
    mem = []
    tm = res.get("training_memory")
    if tm:   # the best combination of the three training-memory techniques
        n = max((k for k in tm["variants"] if "+" in k), key=lambda k: tm["variants"][k]["reduction"])
        v = tm["variants"][n]["reduction"]
        mem.append((f"training: {n}", {"mean": v, "lo": v, "hi": v, "n": 1}))
    fm = res.get("finetune_memory")
    if fm:
        v = fm["qlora"]["reduction"]
        mem.append(("fine-tuning: QLoRA against full", {"mean": v, "lo": v, "hi": v, "n": 1}))
    im = res.get("inference_memory")
    if im:
        v = im["q4_0 + MQA"]["reduction"]
        mem.append(("inference: q4_0 + MQA against float32 MHA", {"mean": v, "lo": v, "hi": v, "n": 1}))
    if mem:
        rows.append(("memory usage", *max(mem, key=lambda t: t[1]["mean"]), None))
    if tm:
        rows.append(("training memory", *mem[0], None))
    if forms:
        k3 = max(forms, key=lambda n: forms[n]["ppl_ratio"]["mean"] if forms[n]["size_reduction"]["mean"] >= 0.5
                 else -1)
        rows.append(("quality", f"{k3} (best of the recipes at -50% size or smaller)", forms[k3]["ppl_ratio"],
                     forms[k3]["ppl_ratio"]))
    return [{"claim": c, "recipe": r, "figure": f, "quality": q, "status": _status(f, c),
             "target": TARGETS[c], "target_met": (f is not None and f["lo"] >= TARGETS[c])} for c, r, f, q in rows]


def _claim_range(c) -> str:
    lo, hi = CLAIMS[c]
    if c == "quality":
        return f"{100 * lo:.0f} to {100 * hi:.0f}% preserved"
    if c == "inference speed":
        return f"+{100 * lo:.0f} to +{100 * hi:.0f}%"
    return f"-{100 * lo:.0f} to -{100 * hi:.0f}%"


def _fig(c, f) -> str:
    if f is None:
        return "-"
    if c == "quality":
        return f"{100 * f['mean']:.1f}% [{100 * f['lo']:.1f}, {100 * f['hi']:.1f}]"
    k = 100.0 if c == "inference speed" else -100.0      # reductions are shown as negative changes
    a, b = sorted((k * f["lo"], k * f["hi"]))
    if f["n"] == 1:
        return f"{k * f['mean']:+.1f}%"
    return f"{k * f['mean']:+.1f}% [{a:+.1f}, {b:+.1f}]"


def format_claims(claims: list, link: str = "") -> str:
    lines = ["| claim | claimed | our best figure (mean [95% interval]) | recipe | quality in that recipe | status | issue target |",
             "|---|---|---|---|---|---|---|"]
    for r in claims:
        t = r["target"]
        tgt = (f"{'+' if r['claim'] == 'inference speed' else '' if r['claim'] == 'quality' else '-'}"
               f"{100 * t:.0f}%{' or better' if r['claim'] != 'quality' else ' or more'}: "
               f"{'met' if r['target_met'] else 'missed'}")
        lines.append(f"| {r['claim']} | {_claim_range(r['claim'])} | {_fig(r['claim'], r['figure'])} | {r['recipe']} | "
                     f"{_fig('quality', r['quality']) if r['quality'] else '-'} | {r['status']} | {tgt} |")
    return "\n".join(lines) + "\n"


def make_report(res: dict, args) -> str:
    q = res["quality"]
    ref = q["reference"]
    L = ["# The seed's claims, measured", "",
         f"Reference: `{ref['dir']}` ({ref['bytes'] / MiB:.2f} MiB of weights, validation loss "
         f"{ref['val_loss']:.4f} on the windows measured){'; QUICK MODE: a smoke run, not a claim' if args.quick else ''}.",
         f"{args.seeds} seeds per quality and speed figure (mean [95% interval]); {platform.machine()}, "
         f"{os.cpu_count()} cores, load average {res.get('load_start', float('nan')):.1f} at the start and "
         f"{res.get('load_end', float('nan')):.1f} at the end (other processes count in it). "
         f"Wall time {res['wall_s'] / 60:.1f} min.", "",
         "## Claims", "", format_claims(res["claims"]), "",
         "## Every recipe", "",
         "| recipe | bytes on disk | size | quality (ppl ratio ref/form) | KL | same top-1 | decode speed | prompt speed |",
         "|---|---|---|---|---|---|---|---|",
         f"| reference (float32) | {ref['bytes'] / MiB:.2f} MiB | - | 1 | 0 | 100% | "
         f"{ref['decode_tps']['mean']:.0f} tok/s | - |" if ref["decode_tps"] else ""]
    for name, r in q["forms"].items():
        L.append(f"| {name} | {r['bytes'] / MiB:.2f} MiB | -{100 * r['size_reduction']['mean']:.1f}% | "
                 f"{_fig('quality', r['ppl_ratio'])} | {r['kl']['mean']:.4f} | {100 * r['top1']['mean']:.1f}% | "
                 f"{_fig('inference speed', r['decode_speedup'])} ({r['decode_tps']['mean']:.0f} tok/s) | "
                 f"{_fig('inference speed', r['prompt_speedup'])} ({r['prompt_tps']['mean']:.0f} tok/s) |")
    for name, why in res.get("skipped", {}).items():
        L.append(f"| {name} | not measured: {why} | | | | | | |")
    tm = res.get("training_memory")
    if tm:
        L += ["", f"## Training memory (one step, batch {tm['batch']}, context {tm['block']}; peak and each component at the peak)", "",
              "| variant | peak | weights | gradients | optimizer state | activations | other | change |",
              "|---|---|---|---|---|---|---|---|"]
        for n, v in tm["variants"].items():
            a = v["at_peak"]
            L.append(f"| {n} | {v['peak'] / MiB:.1f} MiB | {a.get('parameters', 0) / MiB:.1f} | "
                     f"{a.get('gradients', 0) / MiB:.1f} | {a.get('optimizer', 0) / MiB:.1f} | "
                     f"{a.get('activations', 0) / MiB:.1f} | {a.get('other', 0) / MiB:.1f} | {-100 * v['reduction']:+.1f}% |")
    fm = res.get("finetune_memory")
    if fm:
        L += ["", "## Fine-tuning memory (parameters + gradients + optimizer state)", "",
              "| form | bytes | change |", "|---|---|---|"]
        for n, v in fm.items():
            L.append(f"| {n} | {v['bytes'] / MiB:.2f} MiB | {-100 * v['reduction']:+.1f}% |")
    im = res.get("inference_memory")
    if im:
        L += ["", "## Inference memory (weights + KV cache at full context, batch 1; MQA with random weights)", "",
              "| form | weights | KV cache | total | change |", "|---|---|---|---|---|"]
        for n, v in im.items():
            L.append(f"| {n} | {v['weights'] / MiB:.2f} MiB | {v['kv_cache'] / MiB:.2f} MiB | "
                     f"{v['total'] / MiB:.2f} MiB | {-100 * v['reduction']:+.1f}% |")
    L += ["", "Figures: `size_quality.png` (size against quality), `speed.png` (decode and prompt speed)."]
    return "\n".join(x for x in L if x is not None) + "\n"


def plot(res: dict, out_dir: str) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    forms = res["quality"]["forms"]
    names = list(forms)
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    xs = [100 * (1 - forms[n]["size_reduction"]["mean"]) for n in names]
    ys = [100 * forms[n]["ppl_ratio"]["mean"] for n in names]
    err = [[100 * (forms[n]["ppl_ratio"]["mean"] - forms[n]["ppl_ratio"]["lo"]) for n in names],
           [100 * (forms[n]["ppl_ratio"]["hi"] - forms[n]["ppl_ratio"]["mean"]) for n in names]]
    ax.errorbar(xs, ys, yerr=err, fmt="o", capsize=3)
    ax.scatter([100], [100], marker="*", s=120, color="k", label="reference")
    # the forms cluster at 5-30% of the size: numbers at the points (a key beside the axes) and
    # a log axis keep them apart
    for i, (x, y) in enumerate(zip(xs, ys)):
        ax.annotate(str(i + 1), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=8)
    ax.text(1.02, 1.0, "\n".join(f"{i + 1}  {n}" for i, n in enumerate(names)), transform=ax.transAxes,
            va="top", fontsize=8, family="monospace")
    ax.axhspan(90, 95, color="g", alpha=0.1, label="claimed quality")
    ax.axvspan(20, 50, color="b", alpha=0.07, label="claimed size")
    ax.set_xscale("log")
    ax.set_xlabel("size on disk, % of the reference (log scale)")
    ax.set_ylabel("quality: perplexity ratio ref/form, %")
    ax.legend(fontsize=8)
    ax.set_title("Size against quality")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "size_quality.png"), dpi=110)
    plt.close(fig)
    fig2, ax2 = plt.subplots(figsize=(7, 4))
    w = 0.38
    idx = np.arange(len(names))
    for j, (key, lab) in enumerate((("decode_speedup", "decode (batch 1, KV cache)"), ("prompt_speedup", "prompt"))):
        m = [100 * forms[n][key]["mean"] for n in names]
        e = [[100 * (forms[n][key]["mean"] - forms[n][key]["lo"]) for n in names],
             [100 * (forms[n][key]["hi"] - forms[n][key]["mean"]) for n in names]]
        ax2.bar(idx + (j - 0.5) * w, m, w, yerr=e, capsize=3, label=lab)
    ax2.axhspan(30, 50, color="g", alpha=0.1, label="claimed")
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set_xticks(idx)
    ax2.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax2.set_ylabel("speed change against the reference, %")
    ax2.legend(fontsize=8)
    fig2.tight_layout()
    fig2.savefig(os.path.join(out_dir, "speed.png"), dpi=110)
    plt.close(fig2)
    return {"scatter": (xs, ys), "bars": names, "fig_size": fig, "fig_speed": fig2}


def run(args, log=print) -> dict:
    t0 = time.time()
    load_start = os.getloadavg()[0]
    fill_defaults(args)
    from lm.loader import read_config
    from benchmarks.reference import find_corpus
    from lm.data import BUILTIN_CORPORA
    data = find_corpus(args.data)
    if data not in BUILTIN_CORPORA and not os.path.exists(data):
        raise ClaimsError(f"--data {data}: no such file or folder; pass the Tiny Shakespeare text "
                          f"(or a built-in name: {', '.join(BUILTIN_CORPORA)})")
    all_r = recipes(args.quick, data)
    names = [n.strip() for n in args.recipes.split(",") if n.strip()] if args.recipes else list(all_r)
    unknown = [n for n in names if n not in all_r]
    if unknown:
        raise ClaimsError(f"--recipes: unknown recipe(s) {', '.join(unknown)}; valid: {', '.join(all_r)}")
    chosen = [all_r[n] for n in names]
    check_installed(chosen)
    for n in ("seeds", "eval_batches", "decode_repeats", "decode_tokens", "batch_size"):
        if getattr(args, n) < 1:
            raise ClaimsError(f"--{n} must be >= 1, got {getattr(args, n)}")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = sorted(set(parts) - {"forms", "training", "finetune", "inference"})
    if bad:
        raise ClaimsError(f"--parts {','.join(bad)}: valid parts are forms, training, finetune, inference")
    prev = None
    if args.previous:
        try:
            with open(args.previous) as f:
                prev = json.load(f)
        except (OSError, ValueError) as e:
            raise ClaimsError(f"--previous {args.previous}: cannot read it ({e})") from None
    if args.model_dir:
        ref_dir = args.model_dir
        if not os.path.isfile(os.path.join(ref_dir, "model.safetensors")):
            raise ClaimsError(f"--model_dir {ref_dir} holds no model.safetensors: pass a float model folder lm.train wrote")
    else:
        from benchmarks.reference import baby_reference_dir
        ref_dir = baby_reference_dir(data, log=log)
    conf = read_config(ref_dir)
    from benchmarks.reference import bench_dir
    work = args.work_dir or os.path.join(bench_dir(), f"claims-{_key(os.path.abspath(ref_dir), data, args.quick)}")
    os.makedirs(work, exist_ok=True)
    os.makedirs(args.output_dir, exist_ok=True)
    res = {"reference_dir": ref_dir, "quick": args.quick, "seeds": args.seeds, "recipes": names,
           "load_start": load_start}
    forms = {}
    if "forms" in parts:
        for r in chosen:
            log(f"building {r.name}")
            forms[r.name] = [build_form(r, ref_dir, work, s, data, args.quick, log) for s in range(args.seeds)]
        log("measuring")
        res["quality"] = measure_forms(ref_dir, forms, data, args.seeds, args, log)
    else:
        res["quality"] = {"reference": {"dir": ref_dir, "bytes": 0, "val_loss": float("nan"), "decode_tps": None},
                          "forms": {}}
    batch = 2 if args.quick else 8
    if "training" in parts:
        log("training memory")
        res["training_memory"] = training_memory(conf["model"], batch, args.quick)
    if "finetune" in parts:
        log("fine-tuning memory")
        res["finetune_memory"] = finetune_memory(ref_dir, data)
    if "inference" in parts:
        log("inference memory")
        res["inference_memory"] = inference_memory(conf["model"])
    if prev and "forms" in parts and "quality" in prev:   # recipes measured before and not now: theirs
        for name, f in prev["quality"]["forms"].items():
            res["quality"]["forms"].setdefault(name, f)
    if prev:
        for part, key in (("forms", "quality"), ("training", "training_memory"), ("finetune", "finetune_memory"),
                          ("inference", "inference_memory")):
            if part not in parts and key in prev:
                res[key] = prev[key]
    res["claims"] = claims_table(res)
    res["wall_s"] = time.time() - t0
    res["load_end"] = os.getloadavg()[0]
    text = make_report(res, args)
    with open(os.path.join(args.output_dir, "report.md"), "w") as f:
        f.write(text)
    if res["quality"]["forms"]:
        res["_plots"] = plot(res, args.output_dir)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({k: v for k, v in res.items() if not k.startswith("_")}, f, indent=2, default=str)
    log(text)
    return res


def fill_defaults(args):
    """The defaults that depend on --quick."""
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    if args.eval_batches is None:
        args.eval_batches = 2 if args.quick else 12
    if args.decode_repeats is None:
        args.decode_repeats = 1 if args.quick else 3
    if args.decode_tokens is None:
        args.decode_tokens = 16 if args.quick else 128
    return args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="Tiny Shakespeare text (default: the built-in name)")
    p.add_argument("--model_dir", default=None, help="the reference model folder (default: the cached baby reference)")
    p.add_argument("--quick", action="store_true", help="a smoke run: short recoveries and distillations, 1 seed")
    p.add_argument("--recipes", default="", help="comma-separated recipe names (default: all)")
    p.add_argument("--parts", default="forms,training,finetune,inference")
    p.add_argument("--seeds", type=int, default=None, help="seeds per quality/speed figure (default 3; --quick: 1)")
    p.add_argument("--eval_batches", type=int, default=None, help="validation batches per quality figure")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per validation batch")
    p.add_argument("--decode_tokens", type=int, default=None, help="new tokens per decode-speed run")
    p.add_argument("--decode_repeats", type=int, default=None,
                   help="timed decode runs per seed, median (default 3; --quick: 1)")
    p.add_argument("--output_dir", default=os.path.join(ROOT, "benchmarks", "results", "claims"))
    p.add_argument("--work_dir", default=None, help="where the compressed folders are cached")
    p.add_argument("--previous", default=None,
                   help="an earlier results.json: the parts not in --parts are taken from it")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except ClaimsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
