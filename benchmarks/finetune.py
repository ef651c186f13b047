"""Fine-tuning three ways: full, LoRA and QLoRA, side by side (issue 14's Must-reach numbers).

    python benchmarks/finetune.py --data /path/to/tinyshakespeare.txt [--steps 200] [--lora_lr 6e-3] [--output_dir ...]

The base model is pretrained once on the built-in Python documentation (the reference shape:
character level, 4 layers x 4 heads x 256 wide, 128 characters of context, 800 steps) and cached
under ``$LM_BENCH_DIR`` (default ``~/.cache/minigrad-lm/bench``) in a folder named after a hash
of its config. It is then fine-tuned on Tiny Shakespeare (less the characters the base has no
token for: '$') for the same number of steps on the same batches (same seed), by ``lm.train``:

- ``full``: every weight trains (AdamW lr 1e-3);
- ``lora``: r = 8, alpha = 16 on c_attn, c_proj, c_fc, base frozen (lr 6e-3, ``--lora_lr``:
  LoRA's usual larger step);
- ``lora-attn``: the same on attention only (c_attn, attn.c_proj), the smaller optimizer state;
- ``qlora``: ``lora`` on an NF4 base (when ``minigrad.nn.quantized`` is there).

Measured: validation loss at the end (8 batches of 8 x 128 per split, the same batches for every
run); parameters + gradients + optimizer state after a step (``minigrad.memory.static_memory``,
split trainable / frozen); the step time of every variant (one process, alternating steps on
the same batch, median); and the correctness checks: logits at B = 0, merged vs unmerged,
adapter file size. Prints a Markdown table and writes ``report.md`` and ``results.json``.
Fine-tuning runs are cached too (by config hash); ``--fresh`` retrains them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.reference import bench_dir  # noqa: E402


BASE = [
    "model.block_size=128", "model.n_layer=4", "model.n_head=4", "model.n_embd=256", "model.dropout=0.0",
    "model.bias=true", "model.gelu=tanh", "data.corpus=python-docs", "data.tokenizer=char",
    "data.val_fraction=0.1", "train.batch_size=16", "train.max_iters=800", "train.learning_rate=1e-3",
    "train.min_lr=1e-4", "train.warmup_iters=100", "train.lr_decay_iters=800", "train.weight_decay=0.1",
    "train.beta1=0.9", "train.beta2=0.99", "train.grad_clip=1.0", "train.eval_interval=400",
    "train.eval_iters=20", "train.seed=1337", "train.sample_tokens=0",
]


def base_model_dir(log=print) -> str:
    """The cached base model folder (``.../model``), pretrained on python-docs first if missing."""
    from lm.config import Config, apply_overrides, validate
    from lm.train import train
    key = hashlib.sha256(json.dumps(BASE).encode()).hexdigest()[:10]
    out = os.path.join(bench_dir(), f"finetune-base-{key}")
    model_dir = os.path.join(out, "model")
    if os.path.isfile(os.path.join(out, "summary.json")):
        return model_dir
    cfg = apply_overrides(Config(), list(BASE) + ["train.progress=false"])
    validate(cfg)
    log(f"pretraining the base model on python-docs into {out} (once; later runs reuse it)")
    train(cfg, out, resume=os.path.isfile(os.path.join(out, "checkpoint.safetensors")), log=log)
    return model_dir


FT = ["train.batch_size=8", "train.warmup_iters=10", "train.min_lr=1e-4", "train.weight_decay=0.0",
      "train.beta1=0.9", "train.beta2=0.99", "train.grad_clip=1.0", "train.eval_iters=8", "train.seed=7",
      "train.sample_tokens=0", "train.progress=false", "train.log_interval=50"]
RUNS = {
    "full": ["train.learning_rate=1e-3"],
    "lora": ["train.learning_rate=3e-3", "lora.r=8", "lora.alpha=16", "lora.targets=[c_attn, c_proj, c_fc]"],
    "lora-attn": ["train.learning_rate=3e-3", "lora.r=8", "lora.alpha=16", "lora.targets=[c_attn, attn.c_proj]"],
    "qlora": ["train.learning_rate=3e-3", "lora.r=8", "lora.alpha=16", "lora.targets=[c_attn, c_proj, c_fc]",
              "lora.quantize_base=nf4"],
}
MiB = 1024.0 ** 2


def finetune_text(data: str, base_dir: str) -> str:
    """The fine-tuning corpus without the characters the base has no token for (cached copy)."""
    from lm.data import load_corpus
    from lm.tokenizer import load_tokenizer
    tok = load_tokenizer(os.path.join(base_dir, "tokenizer.json"))
    text = load_corpus(data)
    drop = sorted(set(text) - set(tok.stoi))
    key = hashlib.sha256((text + "|" + "".join(tok.chars)).encode()).hexdigest()[:10]
    path = os.path.join(bench_dir(), f"finetune-text-{key}.txt")
    if not os.path.isfile(path):
        clean = text.translate({ord(c): None for c in drop})
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(clean)
        os.replace(path + ".tmp", path)
    return path, drop


def run(name, base_dir, text, steps, fresh, log, lora_lr=None):
    from lm.config import Config, apply_overrides, validate
    from lm.train import train
    runs = RUNS[name] + ([f"train.learning_rate={lora_lr}"] if lora_lr and name != "full" else [])
    over = FT + runs + [f"train.max_iters={steps}", f"train.eval_interval={steps}",
                              f"train.init_from={base_dir}", f"data.corpus={text}"]
    key = hashlib.sha256(json.dumps(over).encode()).hexdigest()[:10]
    out = os.path.join(bench_dir(), f"finetune-{name}-{key}")
    if fresh and os.path.isdir(out):
        shutil.rmtree(out)
    if not os.path.isfile(os.path.join(out, "summary.json")):
        cfg = apply_overrides(Config(), over)
        validate(cfg)
        log(f"fine-tuning: {name} ({steps} steps) into {out}")
        train(cfg, out, log=lambda m: None)
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    curve = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["val_loss"]) for r in rows if r.get("kind") == "eval"]
    return {"name": name, "dir": out, "val_loss": summary["val_loss"], "start_val": evals[0][1],
            "curve": curve, "evals": evals, "ms_per_step_in_run": summary["ms_per_step"]}


def measure(base_dir, text, rounds, names, log):
    """Step time (alternating, median, one batch) and parameters + gradients + optimizer state
    after a step (``minigrad.memory.static_memory``, split trainable / frozen) of each variant."""
    import minigrad as mg
    from lm.data import get_batch, prepare_data
    from lm.finetune import quantize_base_
    from lm.loader import load_model
    from minigrad.memory import static_memory
    from minigrad.nn.lora import apply_lora, mark_only_lora_as_trainable
    targets = {"lora": ["c_attn", "c_proj", "c_fc"], "qlora": ["c_attn", "c_proj", "c_fc"],
               "lora-attn": ["c_attn", "attn.c_proj"]}
    models, tok = {}, None
    for name in names:
        m, tok = load_model(base_dir)
        if name != "full":
            if name == "qlora":
                quantize_base_(m, "nf4")
            apply_lora(m, 8, 16, targets=targets[name])
            mark_only_lora_as_trainable(m)
        m.train()
        models[name] = (m, m.configure_optimizer(1e-3, 0.0, (0.9, 0.99)))
    data = prepare_data(text, tokenizer=tok)
    x, y = get_batch(data.train, 8, m.config.block_size, np.random.default_rng(0))
    times = {k: [] for k in models}

    def step(m, opt):
        t0 = time.perf_counter()
        _, loss = m(x, y)
        opt.zero_grad()
        loss.backward()
        mg.optim.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        return time.perf_counter() - t0
    order = list(models)
    for i in range(rounds + 1):
        for name in (order if i % 2 == 0 else order[::-1]):
            dt = step(*models[name])
            if i >= 1:   # one warm-up round (the optimizer state appears in it)
                times[name].append(dt)
    mem = {}
    for name, (m, opt) in models.items():
        sm = static_memory(m, opt)
        mem[name] = {f"{c}_{side}": v for c, d in sm.items() for side, v in d.items()}
    return {k: 1e3 * float(np.median(v)) for k, v in times.items()}, mem


def correctness(base_dir, lora_dir):
    """B = 0 logits, merged vs unmerged, adapter size."""
    import minigrad as mg
    from lm.finetune import merged_model
    from lm.loader import load_model
    from minigrad.nn.lora import apply_lora
    base, _ = load_model(base_dir)
    x = np.random.default_rng(0).integers(0, base.config.vocab_size, (4, base.config.block_size))
    with mg.no_grad():
        ref = base(x, x)[0].numpy()
        apply_lora(base, 8, 16, targets=["c_attn", "c_proj", "c_fc"])
        fresh = base(x, x)[0].numpy()
        adapted, _ = load_model(os.path.join(lora_dir, "model"))
        a = adapted(x, x)[0].numpy()
        merged = merged_model(base_dir, os.path.join(lora_dir, "model", "adapter.safetensors"))
        b = merged.eval()(x, x)[0].numpy()
    return {"b0_bit_identical": bool(fresh.tobytes() == ref.tobytes()),
            "b0_max_abs_diff": float(np.abs(fresh - ref).max()),
            "merge_rel_diff": float(np.abs(a - b).max() / np.abs(a).max()),
            "merge_rel_fro": float(np.linalg.norm(a - b) / np.linalg.norm(a)),
            "adapter_bytes": os.path.getsize(os.path.join(lora_dir, "model", "adapter.safetensors")),
            "model_bytes": os.path.getsize(os.path.join(base_dir, "model.safetensors"))}


def total(mem, side=None):
    cats = ("parameters", "gradients", "optimizer")
    sides = ("trainable", "frozen") if side is None else (side,)
    return sum(mem.get(f"{c}_{s}", 0) for c in cats for s in sides)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Full fine-tuning vs LoRA vs QLoRA, side by side.")
    p.add_argument("--data", default="/work/shared/data/tinyshakespeare.txt" if os.path.isfile(
        "/work/shared/data/tinyshakespeare.txt") else "shakespeare", help="the fine-tuning text")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lora_lr", type=float, default=6e-3,
                   help="learning rate of the adapter runs (3e-3 and 1e-2 were tried too: README)")
    p.add_argument("--rounds", type=int, default=5, help="timed steps per variant")
    p.add_argument("--runs", default="full,lora,qlora,lora-attn")
    p.add_argument("--output_dir", default="benchmarks/results/finetune")
    p.add_argument("--fresh", action="store_true", help="retrain the fine-tuning runs")
    p.add_argument("--train_only", action="store_true",
                   help="train (and cache) the --runs, then stop: several processes can fill the cache at once")
    args = p.parse_args(argv)
    log = print
    base_dir = base_model_dir(log)
    text, dropped = finetune_text(args.data, base_dir)
    log(f"base: {base_dir}; fine-tuning text {text} (dropped {dropped})")
    names = [n for n in args.runs.split(",") if n]
    if "qlora" in names:
        try:
            import minigrad.nn.quantized  # noqa: F401
        except ImportError:
            log("qlora: skipped (this build has no minigrad.nn.quantized)")
            names.remove("qlora")
    res = {}
    for n in names:
        res[n] = run(n, base_dir, text, args.steps, args.fresh, log, args.lora_lr)
        log(f"  {n}: val loss {res[n]['start_val']:.4f} -> {res[n]['val_loss']:.4f}")
    if args.train_only:
        return 0
    ms, mems = measure(base_dir, text, args.rounds, list(res), log)
    for n in res:
        res[n]["memory"] = mems[n]
    chk = correctness(base_dir, res["lora"]["dir"]) if "lora" in res else {}
    full_mem = res["full"]["memory"]
    lines = [f"Base: 4 x 256 GPT pretrained on python-docs; fine-tuned {args.steps} steps on {os.path.basename(args.data)}, "
             "batch 8 x 128, same batches for every run.", "",
             "| run | trainable params | val loss (start -> end) | vs full | params+grads+optim (MiB) | vs full "
             "| optimizer state (MiB) | vs full |", "|---|---|---|---|---|---|---|---|"]
    for n, r in res.items():
        m = r["memory"]
        tr = m.get("parameters_trainable", 0) // 4
        lines.append(f"| {n} | {tr:,} | {r['start_val']:.4f} -> {r['val_loss']:.4f} | "
                     f"{r['val_loss'] - res['full']['val_loss']:+.4f} | {total(m) / MiB:.2f} | "
                     f"{100 * total(m) / total(full_mem):.1f}% | "
                     f"{(m['optimizer_trainable'] + m['optimizer_frozen']) / MiB:.3f} | "
                     f"{100 * (m['optimizer_trainable'] + m['optimizer_frozen']) / (full_mem['optimizer_trainable'] + full_mem['optimizer_frozen']):.2f}% |")
    lines += ["", f"Step time (median of {args.rounds}, alternating, same batch of 8 x 128): "
              + ", ".join(f"{n} {v:.0f} ms ({v / ms['full']:.2f}x full)" for n, v in ms.items())
              + "; other processes were loading the machine."]
    if chk:
        lines += ["", f"B = 0: logits bit-identical to the base: {chk['b0_bit_identical']} "
                  f"(max |diff| {chk['b0_max_abs_diff']:.1e}); merged vs unmerged logits: max |diff| / max |logit| "
                  f"{chk['merge_rel_diff']:.2e}, ||diff|| / ||logits|| {chk['merge_rel_fro']:.2e}; "
                  f"adapter file {chk['adapter_bytes']:,} B = {100 * chk['adapter_bytes'] / chk['model_bytes']:.2f}% "
                  f"of the model file ({chk['model_bytes']:,} B)."]
    report = "\n".join(lines)
    print(report)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "report.md"), "w") as f:
        f.write(report + "\n")
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({"runs": {n: {k: v for k, v in r.items()} for n, r in res.items()}, "step_ms": ms,
                   "correctness": chk, "steps": args.steps}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
