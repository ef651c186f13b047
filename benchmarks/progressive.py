"""Progressive training on Tiny Shakespeare: sequence-length warmup and growth by stacking.

    OPENBLAS_NUM_THREADS=1 python benchmarks/progressive.py --data /path/to/tinyshakespeare.txt

Ten runs of one model (character level, 4 layers x 4 heads x 128, context 256, batch 8, AdamW,
cosine decay over ``--steps`` steps to 1e-4, LR warmup 50 steps, clip 1, seed 1337), cached
under ``benchmarks.reference.bench_dir()/progressive-<hash>/<run>`` (a later call reuses them):

- ``baseline``: full length from step 0 (the from-scratch 4-layer run of (c) as well);
- ``seqlen``: sequence-length warmup 32 -> 256 (linear, multiples of 32) over half the steps;
- ``baseline_3x`` / ``seqlen_3x``: the same two at three times the learning rate;
- ``baseline_1.5x`` / ``baseline_2x`` / ``baseline_2.5x``: the baseline at 1.5, 2 and 2.5 times the
  learning rate, and ``seqlen_2.5x``: the warmup at 2.5 times (the best baseline's rate). The
  baseline's own rate is not the best one, so the runs are also measured against the **best
  baseline** (the lowest final val loss of the five baseline rates): time to *its* final loss,
  as a ratio of *its* side-by-side time.
- ``grown``: 2 layers until half the steps, then grown to 4 by stacking (G_stack);
- ``grown_identity``: the same growth with ``progressive.grow_init=identity`` (the copies'
  output projections start at zero: function-preserving, no loss jump).

Questions and how they are measured:

(a) does ``seqlen`` reach the baseline's final validation loss in <= 80% of the baseline's time?
(c) does ``grown`` (or ``grown_identity``) reach the from-scratch run's final validation loss in
    <= 80% of its time? (Here growth is at half the steps and the baselines share one schedule;
    ``benchmarks/stacking.py`` asks the same against a learning-rate sweep's best baseline, with
    later growth points, each grown run planned for the time budget, and a 2-layer control.)
    Two times are reported. **Training time**: metrics.jsonl's ``wall_s`` minus the time spent
    in evaluations (each eval row's ``wall_s`` minus the previous row's), the same for every run;
    checkpoint saves and the growth itself count. On a shared machine it carries the load of the
    moment each run trained in. **Side-by-side step time**: the sum, over the steps a run took,
    of the time of one step of its shape (layers x sequence length), every shape timed in one
    process, alternating, median of 5 rounds: the load-free comparison, used for the verdict. The learning-rate schedule of every run decays
    over ``--steps``; ``seqlen`` and ``grown`` may run up to 1.25x as many steps (at the final
    learning rate) to reach the target. Time-to-target: the training time of the first
    evaluation whose validation loss is <= the target (evaluations every 50 steps, the same
    10 full-length batches each time).
(b) at 3x the learning rate, does the baseline spike or diverge, and does the warmup run stay
    stable? Reported: whether the run diverged, the largest rise of the 20-step mean batch loss
    above its running minimum after step 100 (a spike), and the final validation loss.

The machine is usually shared: the runs go one after another, so their times carry the load of
that moment. The tokens each run trained on are reported too (load-free).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.reference import bench_dir, find_corpus  # noqa: E402

LR = 2e-3
BASE = [
    "model.block_size=256", "model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.dropout=0.0",
    "data.tokenizer=char", "data.val_fraction=0.1", "train.batch_size=8", "train.min_lr=1e-4",
    "train.warmup_iters=50", "train.weight_decay=0.1", "train.beta1=0.9", "train.beta2=0.99",
    "train.grad_clip=1.0", "train.eval_interval=50", "train.eval_iters=10", "train.seed=1337",
    "train.sample_tokens=0", "train.progress=false",
]


def runs(steps: int) -> dict:
    """{name: overrides} of the five runs."""
    half = steps // 2
    warm = ["progressive.seqlen_start=32", "progressive.seqlen_step=32", f"progressive.total_steps={half}",
            "progressive.schedule=linear"]
    return {
        "baseline": [f"train.learning_rate={LR}"],
        "seqlen": [f"train.learning_rate={LR}", *warm],
        "baseline_3x": [f"train.learning_rate={3 * LR}"],
        "baseline_1.5x": [f"train.learning_rate={1.5 * LR}"],
        "baseline_2x": [f"train.learning_rate={2 * LR}"],
        "baseline_2.5x": [f"train.learning_rate={2.5 * LR:g}"],
        "seqlen_2.5x": [f"train.learning_rate={2.5 * LR:g}", *warm],
        "seqlen_3x": [f"train.learning_rate={3 * LR}", *warm],
        "grown": [f"train.learning_rate={LR}", "model.n_layer=2", f"progressive.grow=[{{at: {half}, n_layer: 4}}]"],
        "grown_identity": [f"train.learning_rate={LR}", "model.n_layer=2",
                           f"progressive.grow=[{{at: {half}, n_layer: 4}}]", "progressive.grow_init=identity"],
    }


# the cache folder's name hashes the runs that existed when it was introduced; a run added later
# (grown_identity, baseline_1.5x, baseline_2x, baseline_2.5x, seqlen_2.5x) gets its own sub-folder there and leaves the others' cached results valid
_KEYED = ("baseline", "seqlen", "baseline_3x", "seqlen_3x", "grown")


def read_metrics(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def eval_curve(rows: list) -> list:
    """[(step, training seconds, val loss)] at each evaluation; evaluation time excluded."""
    out, excluded, last_wall = [], 0.0, 0.0
    for r in rows:
        if r.get("kind") == "eval":
            out.append((r["step"], last_wall - excluded, r["val_loss"]))
            excluded += r["wall_s"] - last_wall
        last_wall = r["wall_s"]
    return out


def time_to(curve: list, target: float):
    """(step, seconds) of the first evaluation at or below ``target``; None if never."""
    for step, t, v in curve:
        if step > 0 and v <= target:
            return step, t
    return None


def spike(rows: list, after: int = 100, window: int = 20) -> float:
    """Largest rise of the ``window``-step mean batch loss above its running minimum after ``after``."""
    loss = np.array([r["loss"] for r in rows if r.get("kind") != "eval"])
    if len(loss) < window + after:
        return float("nan")
    mean = np.convolve(loss, np.ones(window) / window, mode="valid")
    run_min = np.minimum.accumulate(mean)
    return float(np.max((mean - run_min)[after:]))


def step_costs(keys, vocab: int, rounds: int = 5) -> dict:
    """{(n_layer, seqlen): seconds of one training step}, measured side by side in this process:
    one warm-up round, then ``rounds`` rounds that time every shape once, alternating; the median."""
    import time

    import minigrad as mg
    from lm.config import ModelConfig
    from lm.model import GPT
    models = {}
    for n_layer in sorted({k[0] for k in keys}):
        mg.manual_seed(0)
        m = GPT(ModelConfig(vocab_size=vocab, block_size=256, n_layer=n_layer, n_head=4, n_embd=128))
        models[n_layer] = (m, m.configure_optimizer(1e-4, 0.1, (0.9, 0.99)))
    rng = np.random.default_rng(0)
    times = {k: [] for k in keys}
    for rnd in range(rounds + 1):
        for k in keys:
            m, opt = models[k[0]]
            x = rng.integers(0, vocab, (8, k[1]))
            t0 = time.perf_counter()
            _, loss = m(x, x)
            opt.zero_grad()
            loss.backward()
            mg.optim.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            if rnd:
                times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def modeled_time(rows: list, costs: dict, upto: int) -> float:
    """Seconds of the steps up to ``upto`` at the side-by-side per-step costs (load-free)."""
    return sum(costs[(r.get("n_layer", 4), r.get("seqlen", 256))] for r in rows
               if r.get("kind") != "eval" and r["step"] <= upto)


def train_run(name: str, over: list, steps: int, data: str, root: str, max_iters: int | None = None,
              base: list | None = None) -> dict:
    """Train (or resume, or reuse) one run of ``base`` (default ``BASE``) + ``over``, the LR decaying
    over ``steps``; {"dir", "diverged"}."""
    from lm.config import Config, apply_overrides, validate
    from lm.train import TrainingDiverged, train
    out = os.path.join(root, name)
    cfg = apply_overrides(Config(), (BASE if base is None else base) + over + [
        f"train.lr_decay_iters={steps}", f"train.max_iters={max_iters or steps}", f"data.corpus={find_corpus(data)}"])
    validate(cfg)
    summary = os.path.join(out, "summary.json")
    if os.path.isfile(summary):
        with open(summary, encoding="utf-8") as f:
            if json.load(f)["steps"] >= cfg.train.max_iters:
                return {"dir": out, "diverged": None}
    marker = os.path.join(out, "diverged.json")
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            return {"dir": out, "diverged": json.load(f)["message"]}
    resume = os.path.isfile(os.path.join(out, "checkpoint.safetensors"))
    print(f"[{name}] training {cfg.train.max_iters} steps into {out}", flush=True)
    try:
        train(cfg, out, resume=resume, log=lambda m: None)
    except TrainingDiverged as e:
        with open(marker, "w", encoding="utf-8") as f:
            json.dump({"message": str(e)}, f)
        return {"dir": out, "diverged": str(e)}
    return {"dir": out, "diverged": None}


def warm_up_kernels(data: str) -> None:
    """A few steps in this process first, so no timed run pays for compiling kernels."""
    import tempfile

    from lm.config import Config, apply_overrides
    from lm.train import train
    with tempfile.TemporaryDirectory() as tmp:
        cfg = apply_overrides(Config(), BASE + ["train.max_iters=3", "train.eval_iters=1", "train.eval_interval=3",
                                                "train.learning_rate=1e-3", f"data.corpus={find_corpus(data)}"])
        train(cfg, os.path.join(tmp, "w"), log=lambda m: None)


def figure(res: dict, png: str, steps: int, costs: dict) -> None:
    """(a), (c): val loss against side-by-side step time (load-free); (b): batch loss against step."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(15, 4.2))
    a1, a2, a3 = fig.subplots(1, 3)
    def xy(name):
        c = res[name]["curve"][1:]
        return [modeled_time(res[name]["rows"], costs, s) for s, _, _ in c], [v for _, _, v in c]
    for name, style, lab in (("baseline", "s-", "baseline"), ("seqlen", "o-", "seqlen"),
                             ("seqlen_2.5x", "v-", f"seqlen at lr {2.5 * LR:g}"), ("seqlen_3x", "^-", f"seqlen at lr {3 * LR:g}")):
        a1.plot(*xy(name), style, ms=3, label=lab)
    a1.axhline(res["baseline"]["final_val"], color="gray", ls=":", lw=1, label="baseline final")
    a1.set_xlabel("side-by-side step time (s)")
    a1.set_ylabel("val loss")
    a1.set_title("(a) sequence-length warmup")
    for name in ("baseline", "baseline_3x", "seqlen_3x"):
        rows = [r for r in res[name]["rows"] if r.get("kind") != "eval"]
        loss = np.array([r["loss"] for r in rows])
        k = 20
        if len(loss) > k:
            a2.plot(np.arange(k, len(loss) + 1), np.convolve(loss, np.ones(k) / k, mode="valid"),
                    label=f"{name} (lr {LR:g})" if name == "baseline" else name, lw=1 if name == "baseline" else 1.5,
                    ls=":" if name == "baseline" else "-")
    a2.set_xlabel("step")
    a2.set_ylabel("batch loss (20-step mean)")
    a2.set_title(f"(b) learning rate {3 * LR:g} (3x)")
    for name, style, label in (("baseline", "s-", "4 layers from scratch"), ("grown", "o-", "2 -> 4 layers (copy)"),
                               ("grown_identity", "^-", "2 -> 4 layers (identity init)")):
        a3.plot(*xy(name), style, ms=3, label=label)
    a3.axvline(modeled_time(res["grown"]["rows"], costs, steps // 2), color="k", ls="--", lw=0.8, label="grown")
    a3.axhline(res["baseline"]["final_val"], color="gray", ls=":", lw=1)
    a3.set_xlabel("side-by-side step time (s)")
    a3.set_title("(c) growth by stacking")
    for a in (a1, a2, a3):
        a.grid(alpha=0.3)
        a.legend()
    a2.set_ylim(top=min(a2.get_ylim()[1], 3.5))
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def tokens(rows: list, upto: int | None = None) -> int:
    return int(sum(8 * r["seqlen"] if "seqlen" in r else 8 * 256 for r in rows
                   if r.get("kind") != "eval" and (upto is None or r["step"] <= upto)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="path to tinyshakespeare.txt (default: the built-in name)")
    p.add_argument("--steps", type=int, default=800, help="steps of the baseline (the LR decays over them)")
    p.add_argument("--output_dir", default="benchmarks/results/progressive", help="where the PNG and JSON go")
    args = p.parse_args(argv)
    if args.steps < 200 or args.steps % 100:
        print("error: --steps must be a multiple of 100, at least 200", file=sys.stderr)
        return 2
    if args.data is not None and not os.path.exists(args.data):
        print(f"error: --data {args.data} does not exist; pass the path of tinyshakespeare.txt", file=sys.stderr)
        return 2
    keyed = {k: v for k, v in runs(args.steps).items() if k in _KEYED}
    key = hashlib.sha256(json.dumps([BASE, keyed, LR]).encode()).hexdigest()[:10]
    root = os.path.join(bench_dir(), f"progressive-{key}")
    os.makedirs(args.output_dir, exist_ok=True)
    warm_up_kernels(args.data)
    res = {}
    longer = args.steps * 5 // 4
    for name, over in runs(args.steps).items():
        r = train_run(name, over, args.steps, args.data, root)
        rows = read_metrics(os.path.join(r["dir"], "metrics.jsonl"))
        curve = eval_curve(rows)
        res[name] = {"dir": r["dir"], "diverged": r["diverged"], "rows": rows, "curve": curve,
                     "final_val": curve[-1][2], "time": curve[-1][1]}
    target = res["baseline"]["final_val"]
    for name in ("seqlen", "grown", "grown_identity"):   # not reached within --steps: continue at the final learning rate
        if time_to(res[name]["curve"], target) is None and not res[name]["diverged"]:
            r = train_run(name, runs(args.steps)[name], args.steps, args.data, root, max_iters=longer)
            rows = read_metrics(os.path.join(r["dir"], "metrics.jsonl"))
            res[name].update(rows=rows, curve=eval_curve(rows))
    base_t = res["baseline"]["time"]
    keys = sorted({(r.get("n_layer", 4), r.get("seqlen", 256)) for v in res.values() for r in v["rows"]
                   if r.get("kind") != "eval"})
    print(f"timing {len(keys)} step shapes side by side (median of 5 alternating rounds)", flush=True)
    costs = step_costs(keys, vocab=65)
    base_m = modeled_time(res["baseline"]["rows"], costs, args.steps)
    lines = ["| run | final val loss | reaches baseline's final val loss | training time to it (ratio) | "
             "side-by-side step time to it (ratio) | tokens to it |", "|---|---|---|---|---|---|"]
    out = {"target": target, "baseline_time_s": base_t, "baseline_modeled_s": base_m, "steps": args.steps,
           "step_costs_ms": {f"{k[0]}x{k[1]}": 1e3 * v for k, v in costs.items()}}
    for name, label in (("baseline", "baseline (4 x 128, full length)"), ("seqlen", "seqlen warmup 32 -> 256"),
                        ("grown", "grown 2 -> 4 layers"),
                        ("grown_identity", "grown 2 -> 4 layers, identity init"),
                        ("baseline_1.5x", f"baseline at lr {1.5 * LR:g}"), ("baseline_2x", f"baseline at lr {2 * LR:g}"),
                        ("baseline_2.5x", f"baseline at lr {2.5 * LR:g}"),
                        ("seqlen_2.5x", f"seqlen warmup at lr {2.5 * LR:g}"),
                        ("baseline_3x", f"baseline at lr {3 * LR:g}"),
                        ("seqlen_3x", f"seqlen warmup at lr {3 * LR:g}")):
        hit = time_to(res[name]["curve"], target)
        fv = res[name]["curve"][-1][2]
        if hit is None:
            within = longer if name in ("seqlen", "grown", "grown_identity") else args.steps
            mt = modeled_time(res[name]["rows"], costs, within)
            lines.append(f"| {label} | {fv:.4f} | not within {within} steps | - | ({within} steps: {mt:.1f} s, "
                         f"{mt / base_m:.2f}) | - |")
            out[name] = {**out.get(name, {}), "final_val": fv, "reached": False}
        else:
            mt = modeled_time(res[name]["rows"], costs, hit[0])
            lines.append(f"| {label} | {fv:.4f} | step {hit[0]} | {hit[1]:.1f} s ({hit[1] / base_t:.2f}) | "
                         f"{mt:.1f} s ({mt / base_m:.2f}) | {tokens(res[name]['rows'], hit[0]) / 1e6:.2f} M |")
            out[name] = {**out.get(name, {}), "final_val": fv, "reached": True, "step": hit[0], "time_s": hit[1],
                         "ratio": hit[1] / base_t, "modeled_s": mt, "modeled_ratio": mt / base_m,
                         "tokens": tokens(res[name]["rows"], hit[0])}
    lines += ["", f"| run at lr {3 * LR:g} | diverged | largest spike (20-step mean above its running min) | "
                  f"final val loss |", "|---|---|---|---|"]
    for name in ("baseline_3x", "seqlen_3x"):
        sp = spike(res[name]["rows"])
        fv = res[name]["curve"][-1][2]
        d = res[name]["diverged"]
        lines.append(f"| {name} | {'yes: ' + d.split(';')[0] if d else 'no'} | {sp:.3f} | {fv:.4f} |")
        out[name].update(diverged=d, spike=sp)
    # against the best baseline: the learning rate of ours is not the best one for this model
    bases = ("baseline", "baseline_1.5x", "baseline_2x", "baseline_2.5x", "baseline_3x")
    best = min(bases, key=lambda n: res[n]["curve"][-1][2])
    t_best = res[best]["curve"][-1][2]
    m_best = modeled_time(res[best]["rows"], costs, args.steps)
    lines += ["", f"Against the best baseline, {best} (final val loss {t_best:.4f}, side-by-side time {m_best:.1f} s):",
              "", "| run | reaches it | side-by-side step time to it (ratio) | tokens to it |", "|---|---|---|---|"]
    out["best_baseline"] = {"name": best, "final_val": t_best, "modeled_s": m_best, "runs": {}}
    for name in ("seqlen", "seqlen_2.5x", "seqlen_3x", "grown", "grown_identity"):
        hit = time_to(res[name]["curve"], t_best)
        if hit is None:
            lines.append(f"| {name} | no (final {res[name]['curve'][-1][2]:.4f}) | - | - |")
            out["best_baseline"]["runs"][name] = {"reached": False}
        else:
            mt = modeled_time(res[name]["rows"], costs, hit[0])
            lines.append(f"| {name} | step {hit[0]} | {mt:.1f} s ({mt / m_best:.2f}) | "
                         f"{tokens(res[name]['rows'], hit[0]) / 1e6:.2f} M |")
            out["best_baseline"]["runs"][name] = {"reached": True, "step": hit[0], "modeled_s": mt,
                                                  "modeled_ratio": mt / m_best}
    table = "\n".join(lines)
    png = os.path.join(args.output_dir, "progressive.png")
    figure(res, png, args.steps, costs)
    with open(os.path.join(args.output_dir, "progressive.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v)
    print(table)
    print("\nside-by-side step times (ms): " + ", ".join(f"{k[0]} layers x {k[1]}: {1e3 * v:.0f}"
                                                      for k, v in costs.items()))
    print(f"target (baseline final val loss) {target:.4f}, baseline training time {base_t:.1f} s; curves: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
