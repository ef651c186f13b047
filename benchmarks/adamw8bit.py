"""8-bit AdamW against float32 AdamW: state bytes, step time, validation loss.

    python benchmarks/adamw8bit.py --data /path/to/tinyshakespeare.txt [--parts state,speed,loss]
                                   [--seeds 1,2,3] [--output_dir benchmarks/results/adamw8bit]

The model is nanoGPT's CPU config: ``configs/default.yaml`` (4 x 4 x 128, context 64, batch 12,
2000 steps, lr 1e-3 cosine to 1e-4, weight decay 0.1, beta2 0.99, clip 1) with ``model.bias=false``,
nanoGPT's own default (its train.py has ``bias = False``, which neither
config/train_shakespeare_char.py nor the README's CPU command changes; our default.yaml keeps
biases). The state bytes are also given for default.yaml as it is and for the baby-GPT shape:

- ``state``: bytes of the optimizer state after one step (``minigrad.memory.static_memory``),
  both optimizers on the same model;
- ``speed``: one training step (forward, backward, clip, optimizer) of two copies of the model,
  one per optimizer, alternated in this process, median of ``--steps`` each (after warm-up);
- ``loss``: ``lm.train`` for 2000 steps with each optimizer and each seed (on ``--data``),
  sequentially, cached under ``$LM_BENCH_DIR/adamw8bit-<hash>/``: the final validation loss,
  mean over seeds. A killed run resumes from its checkpoint when this is run again.

Writes ``report.md`` and ``results.json`` under ``--output_dir`` and prints the table.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import minigrad as mg  # noqa: E402
from benchmarks.reference import bench_dir, find_corpus  # noqa: E402
from lm.config import apply_overrides, load_config, validate  # noqa: E402
from lm.model import GPT  # noqa: E402
from minigrad.memory import static_memory  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "default.yaml")
NANOGPT = ["model.bias=false"]     # nanoGPT's CPU config = default.yaml without biases


def nanogpt_config():
    return apply_overrides(load_config(CONFIG), list(NANOGPT))
OPTIMIZERS = ("adamw", "adamw8bit")


def model_and_optimizers(cfg):
    """Two identical models (one seed), one optimizer each."""
    out = {}
    for name in OPTIMIZERS:
        mg.manual_seed(0)
        m = GPT(cfg.model)
        t = cfg.train
        out[name] = (m, m.configure_optimizer(t.learning_rate, t.weight_decay, (t.beta1, t.beta2), optimizer=name))
    return out


def train_step(model, opt, x, y, clip):
    opt.zero_grad()
    _, loss = model(x, y)
    loss.backward()
    mg.optim.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return float(loss.data)


def batches(cfg, n, seed=0):
    rng = np.random.default_rng(seed)
    B, T, V = cfg.train.batch_size, cfg.model.block_size, cfg.model.vocab_size
    return [(rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))) for _ in range(n)]


def measure_state(cfg) -> dict:
    pair = model_and_optimizers(cfg)
    (x, y), = batches(cfg, 1)
    out = {}
    for name, (m, opt) in pair.items():
        train_step(m, opt, x, y, cfg.train.grad_clip)
        out[name] = static_memory(m, opt)["optimizer"]["trainable"]
    n8 = sum(p.size for _, _, p in pair["adamw8bit"][1].named_params() if pair["adamw8bit"][1].is_8bit(p))
    n = sum(p.size for _, _, p in pair["adamw"][1].named_params())
    return {"bytes": out, "reduction": 1.0 - out["adamw8bit"] / out["adamw"], "n_params": n,
            "n_params_8bit": n8}


def measure_speed(cfg, steps: int, warmup: int = 5) -> dict:
    pair = model_and_optimizers(cfg)
    data = batches(cfg, steps + warmup, seed=1)
    times = {k: [] for k in pair}
    for i, (x, y) in enumerate(data):
        for name in (OPTIMIZERS if i % 2 == 0 else OPTIMIZERS[::-1]):   # alternate who goes first
            m, opt = pair[name]
            t0 = time.perf_counter()
            train_step(m, opt, x, y, cfg.train.grad_clip)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    # the optimizer step alone, same alternation
    opt_times = {k: [] for k in pair}
    for i in range(steps):
        for name in (OPTIMIZERS if i % 2 == 0 else OPTIMIZERS[::-1]):
            m, opt = pair[name]
            t0 = time.perf_counter()
            opt.step()
            opt_times[name].append(time.perf_counter() - t0)
    med = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    fast = {k: 1e3 * float(np.min(v)) for k, v in times.items()}
    omed = {k: 1e3 * float(np.median(v)) for k, v in opt_times.items()}
    omin = {k: 1e3 * float(np.min(v)) for k, v in opt_times.items()}
    return {"ms_per_step": med, "ratio": med["adamw8bit"] / med["adamw"], "ms_per_step_min": fast,
            "ratio_min": fast["adamw8bit"] / fast["adamw"], "optimizer_ms": omed, "optimizer_ms_min": omin,
            "steps": steps}


def run_dir(data: str, seed: int, optimizer: str) -> str:
    key = hashlib.sha256(json.dumps([open(CONFIG).read(), os.path.abspath(data), NANOGPT]).encode()).hexdigest()[:10]
    return os.path.join(bench_dir(), f"adamw8bit-{key}", f"{optimizer}-s{seed}")


def measure_loss(data: str, seeds, log=print) -> dict:
    from lm.train import train
    rows = {k: {} for k in OPTIMIZERS}
    for seed in seeds:
        for name in OPTIMIZERS:
            out = run_dir(data, seed, name)
            summ = os.path.join(out, "summary.json")
            if not os.path.isfile(summ):
                cfg = nanogpt_config()
                apply_overrides(cfg, [f"data.corpus={data}", f"train.seed={seed}", f"train.optimizer={name}",
                                      "train.sample_tokens=0", "train.progress=false"])
                validate(cfg)
                log(f"training {name} seed {seed} into {out}")
                train(cfg, out, resume=os.path.isfile(os.path.join(out, "checkpoint.safetensors")),
                      log=lambda *a: None)
            s = json.load(open(summ))
            rows[name][seed] = {"val_loss": s["val_loss"], "ms_per_step": s["ms_per_step"]}
            log(f"{name} seed {seed}: val loss {s['val_loss']:.4f} ({s['ms_per_step']:.1f} ms/step)")
    mean = {k: float(np.mean([r["val_loss"] for r in v.values()])) for k, v in rows.items()}
    return {"runs": rows, "mean_val_loss": mean, "diff": mean["adamw8bit"] - mean["adamw"]}


def report(res: dict) -> str:
    lines = ["# 8-bit AdamW against float32 AdamW", "",
             f"nanoGPT's CPU config: configs/default.yaml with model.bias=false (4 x 4 x 128, context 64, "
             f"batch 12); {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores, load average {res.get('load', float('nan')):.1f} when it ended "
             f"(other processes count in it).", "",
             "| measure | AdamW (float32) | AdamW8bit | result | target |", "|---|---|---|---|---|"]
    if "state" in res:
        b = res["state"]["bytes"]
        lines.append(f"| optimizer state | {b['adamw']:,} B | {b['adamw8bit']:,} B | "
                     f"{-100 * res['state']['reduction']:.2f}% | -74% or better: "
                     f"{'met' if res['state']['reduction'] >= 0.74 else 'missed'} |")
    for name, st in res.get("state_other", {}).items():
        b = st["bytes"]
        lines.append(f"| optimizer state, {name} | {b['adamw']:,} B | {b['adamw8bit']:,} B | "
                     f"{-100 * st['reduction']:.2f}% | |")
    if "speed" in res:
        s = res["speed"]
        lines.append(f"| training step (median of {s['steps']}, alternating) | {s['ms_per_step']['adamw']:.1f} ms | "
                     f"{s['ms_per_step']['adamw8bit']:.1f} ms | x{s['ratio']:.3f} | x1.1 or less: "
                     f"{'met' if s['ratio'] <= 1.1 else 'missed'} |")
        lines.append(f"| training step, fastest of {s['steps']} | {s['ms_per_step_min']['adamw']:.1f} ms | "
                     f"{s['ms_per_step_min']['adamw8bit']:.1f} ms | x{s['ratio_min']:.3f} | |")
        om, on = s["optimizer_ms"], s["optimizer_ms_min"]
        lines.append(f"| optimizer step alone, median (fastest) | {om['adamw']:.2f} ({on['adamw']:.2f}) ms | "
                     f"{om['adamw8bit']:.2f} ({on['adamw8bit']:.2f}) ms | "
                     f"x{om['adamw8bit'] / om['adamw']:.2f} (x{on['adamw8bit'] / on['adamw']:.2f}) | |")
    if "loss" in res:
        lo = res["loss"]
        seeds = sorted(lo["runs"]["adamw"])
        per = lambda k: ", ".join(f"{lo['runs'][k][s]['val_loss']:.4f}" for s in seeds)  # noqa: E731
        lines.append(f"| val loss after 2000 steps (seeds {', '.join(map(str, seeds))}) | "
                     f"{lo['mean_val_loss']['adamw']:.4f} ({per('adamw')}) | {lo['mean_val_loss']['adamw8bit']:.4f} "
                     f"({per('adamw8bit')}) | {lo['diff']:+.4f} | within 0.01: "
                     f"{'met' if abs(lo['diff']) <= 0.01 else 'missed'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="Tiny Shakespeare text (for the loss runs; default: built-in name)")
    p.add_argument("--parts", default="state,speed,loss", help="comma-separated: state, speed, loss")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--steps", type=int, default=30, help="timed steps per optimizer (speed)")
    p.add_argument("--output_dir", default=os.path.join(ROOT, "benchmarks", "results", "adamw8bit"))
    args = p.parse_args(argv)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    bad = sorted(set(parts) - {"state", "speed", "loss"})
    if bad:
        print(f"error: --parts {','.join(bad)}: valid parts are state, speed, loss", file=sys.stderr)
        return 2
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        print(f"error: --seeds {args.seeds!r}: give integers separated by commas, e.g. 1,2,3", file=sys.stderr)
        return 2
    data = find_corpus(args.data)
    cfg = nanogpt_config()
    cfg.model.vocab_size = 65
    res = {}
    if "state" in parts:
        res["state"] = measure_state(cfg)
        # the same count for default.yaml as it is (with biases: 6,912 bias and gain values stay
        # float32, tensors under 4,096 values) and for the baby-GPT shape (6 x 6 x 384)
        other = {}
        for name, over in (("configs/default.yaml (bias=true)", []),
                           ("6 x 6 x 384, context 256, bias=true", ["model.n_layer=6", "model.n_head=6",
                                                                    "model.n_embd=384", "model.block_size=256"])):
            c = apply_overrides(load_config(CONFIG), over)
            c.model.vocab_size = 65
            other[name] = measure_state(c)
        res["state_other"] = other
    if "speed" in parts:
        res["speed"] = measure_speed(cfg, args.steps)
    if "loss" in parts:
        res["loss"] = measure_loss(data, seeds)
    os.makedirs(args.output_dir, exist_ok=True)
    res["load"] = os.getloadavg()[0]
    text = report(res)
    with open(os.path.join(args.output_dir, "report.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(res, f, indent=2, default=str)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
