"""The architecture switches against the plain GPT: what each buys and what it costs.

    python benchmarks/architecture.py --data /path/to/tinyshakespeare.txt

Every variant trains on Tiny Shakespeare (character level) with nanoGPT's CPU-size config
(4 layers x 4 heads x 128 wide, 64 characters of context, batch 12, AdamW 1e-3 cosine,
dropout 0), the same number of steps, the same seed and so the same batches; the variants
that decide a comparison run with 3 seeds. Only ``model.*`` switches differ:

| variant        | switch                                                         |
|----------------|----------------------------------------------------------------|
| mha            | none: the plain model                                          |
| gqa2           | n_kv_head = 2 (n_head / 2): grouped-query attention            |
| mqa            | n_kv_head = 1: multi-query attention                           |
| window32       | attn_window = 32 (block_size / 2)                              |
| rope           | position = rope                                                |
| rope_win_gqa2  | rope + attn_window 32 + n_kv_head 2 (the Mistral-style set)    |
| share1         | share_layers = 1: 4 layers, one block (ALBERT)                 |
| unshared1      | n_layer = 1: the unshared model with share1's parameter count   |
| lowrank{r}     | low_rank = r (MLP); lowrank{r}a: attention projections too     |

One table: parameters (non-embedding, as training prints), train step time (median of
interleaved steps in this process), peak training memory (``minigrad.memory``), KV-cache
bytes per cached position, decode tokens/s (batch 1, the cache near block_size), and
validation loss (mean +- std over seeds). Then the targets of issue 13, the attention kernel
with a window at T = 4096, and decode speed at the "baby GPT" shape (6 x 6 x 384, 256
context) for MHA, GQA and MQA. Training runs are cached under
``~/.cache/minigrad-lm/bench/architecture-<hash>/`` (a rerun only measures); the report goes
to --output_dir (report.md, results.json, loss_curves.png).

Timings on a shared machine are noisy: variants run interleaved in one process and the
fastest repetition is reported (a busy machine only ever adds time), medians beside it.
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
from minigrad import attention as mattn  # noqa: E402
from minigrad.memory import MemoryTracker  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory import step as train_step  # noqa: E402  (one training step with memory marks, shared)

SEEDS = (1337, 1338, 1339)
BASE = ["model.block_size=64", "model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.dropout=0.0",
        "data.tokenizer=char", "data.val_fraction=0.1", "train.batch_size=12", "train.learning_rate=1e-3",
        "train.min_lr=1e-4", "train.warmup_iters=100", "train.weight_decay=0.1", "train.beta2=0.99",
        "train.grad_clip=1.0", "train.eval_iters=25", "train.sample_tokens=0", "train.progress=false",
        "train.log_interval=100000"]
VARIANTS = {
    "mha": ([], 3),
    "gqa2": (["model.n_kv_head=2"], 3),
    "mqa": (["model.n_kv_head=1"], 3),
    "window32": (["model.attn_window=32"], 3),
    "rope": (["model.position=rope"], 3),
    "rope_win_gqa2": (["model.position=rope", "model.attn_window=32", "model.n_kv_head=2"], 1),
    "share1": (["model.share_layers=1"], 3),
    "unshared1": (["model.n_layer=1"], 3),
    "lowrank8": (["model.low_rank=8"], 1),
    "lowrank16": (["model.low_rank=16"], 1),
    "lowrank32": (["model.low_rank=32"], 1),
    "lowrank64": (["model.low_rank=64"], 1),
    "lowrank32a": (["model.low_rank=32", "model.low_rank_attn=true"], 1),
}
MiB = 1024.0 ** 2


def bench_dir() -> str:
    return os.environ.get("LM_BENCH_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "minigrad-lm", "bench")


def run_dir(args) -> str:
    key = hashlib.sha256(json.dumps([BASE, args.steps, os.path.abspath(args.data)]).encode()).hexdigest()[:10]
    return os.path.join(bench_dir(), f"architecture-{key}")


def make_cfg(args, variant: str, seed: int):
    from lm.config import Config, apply_overrides, validate
    over = BASE + [f"train.max_iters={args.steps}", f"train.lr_decay_iters={args.steps}",
                   f"train.eval_interval={max(1, args.steps // 2)}", f"train.seed={seed}",
                   f"data.corpus={args.data}"] + VARIANTS[variant][0]
    cfg = apply_overrides(Config(), over)
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------- training (cached)
def train_all(args, variants, log=print) -> dict:
    from lm.train import train
    root = run_dir(args)
    out = {}
    todo = [(v, seed) for seed in SEEDS[:args.seeds] for v in variants   # seed-major: every variant
            if seed in SEEDS[:VARIANTS[v][1]]]                                 # has one seed early
    for v, seed in todo:
        d = os.path.join(root, f"{v}-s{seed}")
        path = os.path.join(d, "summary.json")
        if not os.path.isfile(path):
            if args.no_train:
                continue
            log(f"training {v} seed {seed} ({args.steps} steps) -> {d}")
            resume = os.path.isfile(os.path.join(d, "checkpoint.safetensors"))
            train(make_cfg(args, v, seed), d, resume=resume, log=lambda m: None)
        with open(path) as f:
            s = json.load(f)
        curve = []
        with open(os.path.join(d, "metrics.jsonl")) as f:
            for line in f:
                r = json.loads(line)
                if r.get("kind") == "eval":
                    curve.append((r["step"], r["val_loss"]))
        out.setdefault(v, []).append({"seed": seed, "val_loss": s["val_loss"], "train_loss": s["train_loss"],
                                      "n_params": s["n_params"], "ms_train": s["ms_per_step"],
                                      "curve": curve, "model_dir": s["model_dir"]})
        log(f"  {v} seed {seed}: val loss {s['val_loss']:.4f}")
    return out


# --------------------------------------------------------------------------- measurements
def _build(cfg_model, dtype=np.float32):
    from lm.model import GPT
    mg.manual_seed(0)
    m = GPT(cfg_model)
    return m, m.configure_optimizer(1e-3, 0.1, (0.9, 0.99))


def _decode_tps(model, prompt_len: int, new: int, reps: int) -> list:
    """Tokens/s of greedy decoding with the KV cache, batch 1: the prompt of prompt_len is read
    first (not timed), then ``new`` tokens one at a time (timed), as lm.generate does."""
    from lm.model import KVCache
    c = model.config
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, c.vocab_size, (1, prompt_len))
    model.eval()
    out = []
    with mg.no_grad():
        for _ in range(reps):
            cache = KVCache(c.n_layer, capacity=c.block_size, window=c.attn_window)
            logits = model.logits_last(prompt, cache)
            t0 = time.perf_counter()
            for _ in range(new):
                tok = np.asarray(mg.backend.to_numpy(logits)).argmax(axis=-1)
                logits = model.logits_last(tok[:, None], cache)
            out.append(new / (time.perf_counter() - t0))
    model.train()
    return out


def kv_bytes_per_position(model) -> float:
    """Bytes the KV cache holds per cached position (float32), measured on a filled cache."""
    from lm.model import KVCache
    c = model.config
    cache = KVCache(c.n_layer, capacity=c.block_size, window=c.attn_window)
    with mg.no_grad():
        model.eval()
        model(np.zeros((1, c.block_size), dtype=np.int64), cache=cache)
    held = min(c.block_size, c.attn_window or c.block_size)
    return cache.nbytes() / held, cache.nbytes()


def measure(args, variants, vocab: int, log=print) -> dict:
    """Step time (interleaved), peak memory, KV bytes, decode tokens/s for each variant."""
    res = {}
    built = {}
    for v in variants:
        cfg = make_cfg(args, v, SEEDS[0]).model
        cfg.vocab_size = vocab
        built[v] = _build(cfg)
    rng = np.random.default_rng(0)
    x = rng.integers(0, vocab, (12, 64))
    y = rng.integers(0, vocab, (12, 64))
    for v, (m, opt) in built.items():
        train_step(m, opt, x, y)                                  # warm-up (compilation, optimizer state)
        with MemoryTracker(m, opt, timeline=False) as mt:
            train_step(m, opt, x, y, mt)
        s = mt.summary()
        per_pos, total = kv_bytes_per_position(m)
        m.train()
        res[v] = {"peak_bytes": s["peak_bytes"], "activations": s["max"]["activations"],
                  "kv_bytes_per_pos": per_pos, "kv_bytes_total": total, "step_ms": [], "decode_tps": []}
    for _ in range(args.reps):                               # interleaved: load hits all alike
        for v, (m, opt) in built.items():
            t0 = time.perf_counter()
            train_step(m, opt, x, y)
            res[v]["step_ms"].append(1e3 * (time.perf_counter() - t0))
    for _ in range(args.reps):
        for v, (m, opt) in built.items():
            res[v]["decode_tps"] += _decode_tps(m, 64 - 33, 32, 1)
    for v in variants:
        r = res[v]
        r["step_ms_median"] = float(np.median(r["step_ms"]))
        r["step_ms_min"] = float(np.min(r["step_ms"]))
        r["decode_tps_median"] = float(np.median(r["decode_tps"]))
        r["decode_tps_best"] = float(np.max(r["decode_tps"]))
        log(f"  {v:14s} step {r['step_ms_min']:7.1f} ms (min; median {r['step_ms_median']:.1f})  peak "
            f"{r['peak_bytes'] / MiB:6.2f} MiB  KV {r['kv_bytes_per_pos']:.0f} B/pos  decode "
            f"{r['decode_tps_best']:.0f} tok/s (best; median {r['decode_tps_median']:.0f})")
    return res


def decode_baby(args, log=print) -> dict:
    """Decode tokens/s at the baby GPT shape (6 layers, 6 heads, 384 wide, 256 context; random
    weights, batch 1): prompt block_size - 33, 32 new tokens, so the cache runs near 256."""
    from lm.config import ModelConfig
    out = {}
    shapes = {"mha": 6, "gqa3": 3, "mqa": 1}
    models = {}
    for name, nkv in shapes.items():
        mg.manual_seed(0)
        from lm.model import GPT
        models[name] = GPT(ModelConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384,
                                       n_kv_head=nkv))
        _decode_tps(models[name], 256 - 33, 8, 1)            # warm-up
        out[name] = []
    for _ in range(args.reps):
        for name, m in models.items():
            out[name] += _decode_tps(m, 256 - 33, 32, 1)
    res = {k: float(np.max(v)) for k, v in out.items()}                  # the fastest repetition
    res["median"] = {k: float(np.median(v)) for k, v in out.items()}
    res["kv_bytes_per_pos"] = {k: 2 * 6 * nkv * 64 * 4 for k, nkv in shapes.items()}
    log("  baby GPT decode tok/s: " + ", ".join(f"{k} {res[k]:.0f}" for k in shapes))
    return res


def attention_window_speed(args, log=print) -> dict:
    """Attention forward + backward (blocked kernel, float32), 1 x 4 heads x T = 4096 x 64:
    full causal against a window of 256, interleaved, median of reps."""
    rng = np.random.default_rng(0)
    T, H, D = args.attn_T, 4, 64
    q, k, v, do = (rng.standard_normal((1, H, T, D)).astype(np.float32) for _ in range(4))

    def run(window):
        qt, kt, vt = (mg.Tensor(a, requires_grad=True) for a in (q, k, v))
        t0 = time.perf_counter()
        y = mattn.attention(qt, kt, vt, causal=True, impl="blocked", window=window)
        y.backward(mg.Tensor(do))
        return time.perf_counter() - t0
    times = {"full": [], "window": []}
    run(0), run(args.attn_w)
    for _ in range(args.attn_reps):
        times["full"].append(run(0))
        times["window"].append(run(args.attn_w))
    full, win = float(np.min(times["full"])), float(np.min(times["window"]))   # fastest of reps
    log(f"  attention T={T} fwd+bwd: full {1e3 * full:.0f} ms, window {args.attn_w} {1e3 * win:.0f} ms, "
        f"{full / win:.1f}x")
    med = float(np.median(times["full"])) / float(np.median(times["window"]))
    return {"T": T, "w": args.attn_w, "full_ms": 1e3 * full, "window_ms": 1e3 * win, "speedup": full / win,
            "speedup_median": med,
            "full_all": times["full"], "window_all": times["window"]}


# --------------------------------------------------------------------------- report
def _stats(runs):
    vals = [r["val_loss"] for r in runs]
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")), len(vals)


def _paired(runs_a, runs_b):
    """Mean and spread of the per-seed differences a - b (same seed = same batches)."""
    b = {r["seed"]: r["val_loss"] for r in runs_b}
    d = [r["val_loss"] - b[r["seed"]] for r in runs_a if r["seed"] in b]
    if not d:
        return float("nan"), float("nan"), 0
    return float(np.mean(d)), (float(np.std(d, ddof=1)) if len(d) > 1 else float("nan")), len(d)


def make_report(args, trained, meas, baby, attn) -> tuple[str, list]:
    lines = ["| variant | params | step ms (min) | ratio | peak train MiB | activations MiB | KV B/pos | "
             "decode tok/s (best) | val loss (mean +- std, n) | Δ vs mha (paired) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    base_ms = meas.get("mha", {}).get("step_ms_min")
    for v in VARIANTS:
        if v not in trained and v not in meas:
            continue
        runs = trained.get(v, [])
        m = meas.get(v, {})
        mean, sd, n = _stats(runs) if runs else (float("nan"),) * 2 + (0,)
        dm, dsd, dn = _paired(runs, trained.get("mha", [])) if runs and v != "mha" else (float("nan"),) * 2 + (0,)
        params = runs[0]["n_params"] if runs else ""
        ratio = f"{m['step_ms_min'] / base_ms:.2f}" if m and base_ms else ""
        lines.append(
            f"| {v} | {params:,} | {m.get('step_ms_min', float('nan')):.1f} | {ratio} | "
            f"{m.get('peak_bytes', float('nan')) / MiB:.2f} | {m.get('activations', float('nan')) / MiB:.2f} | "
            f"{m.get('kv_bytes_per_pos', float('nan')):.0f} | {m.get('decode_tps_best', float('nan')):.0f} | "
            f"{mean:.4f} +- {sd:.4f} ({n}) | " + (f"{dm:+.4f} +- {dsd:.4f}" if dn else "") + " |")
    targets = []

    def target(name, value, ok, how):
        targets.append({"target": name, "value": value, "met": bool(ok), "how": how})

    def d(v, ref="mha"):
        return _paired(trained.get(v, []), trained.get(ref, []))[0]
    if "mqa" in meas and "mha" in meas:
        r = meas["mha"]["kv_bytes_per_pos"] / meas["mqa"]["kv_bytes_per_pos"]
        target("MQA KV-cache bytes / n_head", f"{r:.1f}x smaller (n_head = 4)", abs(r - 4) < 1e-9, "measured on a filled cache")
    if baby:
        for name in ("mqa", "gqa3"):
            r = baby[name] / baby["mha"]
            target(f"{name} decode tok/s >= MHA, baby GPT shape, T ~ 256",
                   f"{baby[name]:.0f} vs {baby['mha']:.0f} tok/s ({r:.2f}x; medians "
                   f"{baby['median'][name] / baby['median']['mha']:.2f}x)", r >= 1.0, "fastest rep, interleaved")
    if "mqa" in meas:
        r = meas["mqa"]["decode_tps_best"] / meas["mha"]["decode_tps_best"]
        rm = meas["mqa"]["decode_tps_median"] / meas["mha"]["decode_tps_median"]
        target("MQA decode tok/s >= MHA, training shape, T ~ 32..64", f"{r:.2f}x (medians {rm:.2f}x)", r >= 1.0,
               "fastest rep, interleaved")
    for v, lim, name in (("mqa", 0.03, "MQA val loss within 0.03 of MHA"),
                         ("gqa2", 0.02, "GQA (n_head/2) val loss within 0.02 of MHA"),
                         ("window32", 0.02, "window = block/2 val loss within 0.02 of full")):
        if v in trained and "mha" in trained:
            x = d(v)
            target(name, f"{x:+.4f} (mean of {len(trained[v])} seeds)", x <= lim, "paired by seed")
    if attn:
        target(f"window {attn['w']} at T={attn['T']} fwd+bwd >= 5x faster than full causal",
               f"{attn['speedup']:.1f}x ({attn['full_ms']:.0f} -> {attn['window_ms']:.0f} ms; medians "
               f"{attn['speedup_median']:.1f}x)",
               attn["speedup"] >= 5, "blocked kernel, float32, median")
    if "rope" in trained and "mha" in trained:
        x = d("rope")
        target("RoPE val loss <= learned positions", f"{x:+.4f}", x <= 0, "paired by seed")
    if "share1" in trained and "unshared1" in trained:
        x = d("share1", "unshared1")
        target("share1 (1/L of block params) beats unshared model of equal params",
               f"{x:+.4f} val loss vs unshared1", x < 0, "paired by seed")
    tl = ["| target | measured | met |", "|---|---|---|"]
    tl += [f"| {t['target']} | {t['value']} | {'yes' if t['met'] else 'NO'} |" for t in targets]
    extra = []
    if baby:
        extra.append("Decode at the baby GPT shape (6 x 6 x 384, block 256, random weights, batch 1, cache "
                     "223..255 positions): " + ", ".join(f"{k} {baby[k]:.0f} tok/s ({baby['kv_bytes_per_pos'][k]:,} "
                                                         f"KV B/pos)" for k in ("mha", "gqa3", "mqa")))
    if attn:
        extra.append(f"Attention fwd+bwd, 1 x 4 heads x {attn['T']} x 64, float32, blocked kernel: full causal "
                     f"{attn['full_ms']:.0f} ms, window {attn['w']} {attn['window_ms']:.0f} ms "
                     f"({attn['speedup']:.1f}x, fastest of {len(attn['full_all'])})")
    env = (f"{args.steps} steps, batch 12 x 64 characters, seeds {', '.join(map(str, SEEDS[:args.seeds]))} "
           f"(3 where the table says n = 3); machine {platform.machine()}, {os.cpu_count()} cores shared "
           f"with other jobs, numpy {np.__version__}")
    report = "\n".join(lines) + "\n\n" + "\n".join(tl) + "\n\n" + "\n\n".join(extra) + "\n\n" + env + "\n"
    return report, targets


def plot(trained, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    groups = [("attention", ["mha", "gqa2", "mqa", "window32", "rope", "rope_win_gqa2"]),
              ("sharing", ["mha", "share1", "unshared1"]),
              ("low rank", ["mha", "lowrank8", "lowrank16", "lowrank32", "lowrank64", "lowrank32a"])]
    for ax, (title, names) in zip(axes, groups):
        for v in names:
            if v not in trained:
                continue
            steps = [s for s, _ in trained[v][0]["curve"]]
            vals = np.mean([[l for _, l in r["curve"]] for r in trained[v]], axis=0)
            ax.plot(steps[1:], vals[1:], marker="o", label=f"{v} (n={len(trained[v])})")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats/char)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="Tiny Shakespeare .txt (default: the built-in 'shakespeare')")
    p.add_argument("--output_dir", default="benchmarks/results/architecture")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--reps", type=int, default=7, help="interleaved timing repetitions")
    p.add_argument("--attn_T", type=int, default=4096)
    p.add_argument("--attn_w", type=int, default=256)
    p.add_argument("--attn_reps", type=int, default=5)
    p.add_argument("--no_train", action="store_true", help="use only the cached training runs")
    p.add_argument("--skip", default="", help="comma-separated stages to skip: train, measure, baby, attn")
    args = p.parse_args(argv)
    args.data = args.data or "shakespeare"
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        print(f"error: unknown variant(s) {', '.join(bad)}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    if args.data != "shakespeare" and not os.path.isfile(args.data):
        print(f"error: --data {args.data} is not a file: pass the Tiny Shakespeare .txt", file=sys.stderr)
        return 2
    skip = set(args.skip.split(",")) - {""}
    from minigrad import backend
    backend.keep_freed_memory()
    print(f"training runs cached under {run_dir(args)}", flush=True)
    trained = {} if "train" in skip else train_all(args, variants, log=lambda m: print(m, flush=True))
    vocab = 65
    if trained:
        with open(os.path.join(next(iter(trained.values()))[0]["model_dir"], "config.json")) as f:
            vocab = json.load(f)["model"]["vocab_size"]
    meas = {} if "measure" in skip else measure(args, variants, vocab)
    baby = None if "baby" in skip else decode_baby(args)
    attn = None if "attn" in skip else attention_window_speed(args)
    report, targets = make_report(args, trained, meas, baby, attn)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "report.md"), "w") as f:
        f.write(report)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({"settings": vars(args), "trained": trained, "measured": meas, "baby_decode": baby,
                   "attention": attn, "targets": targets}, f, indent=2, default=float)
    if trained:
        plot(trained, os.path.join(args.output_dir, "loss_curves.png"))
    print()
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
