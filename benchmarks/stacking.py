"""Growth by stacking against a tuned baseline: 2 -> 4 layers on Tiny Shakespeare.

    OPENBLAS_NUM_THREADS=1 python benchmarks/stacking.py --data /path/to/tinyshakespeare.txt [--jobs 2]
        [--steps 2000] [--lrs 2e-3,3e-3,4e-3,5e-3,6e-3,8e-3] [--grow_at 0.5,0.6,0.7,0.8,0.9] [--seeds 1338,1339]

The question (issue 15): does a 2 -> 4-layer grown run reach the from-scratch 4-layer run's
final validation loss in <= ``--budget`` (0.8) of its time? ``benchmarks/progressive.py``
answers it at the benchmark's one learning rate; this script answers it against the *best*
from-scratch run of a learning-rate sweep, so that growth gets no credit for a baseline whose
rate was merely too low. The model and data are ``benchmarks/progressive.py``'s (character
level, 4 layers x 4 heads x 128, context 256, batch 8, AdamW, LR warmup 50 steps, cosine decay
to 1e-4, clip 1), with evaluations every 100 steps on the same 10 validation batches.

1. **Baselines**: 4 layers from scratch for ``--steps`` steps (the LR decays over them), one
   per rate in ``--lrs``, seed 1337. The best baseline is the one with the lowest final val loss.
2. **Step costs**: one training step of 2 and of 4 layers, timed side by side in one process,
   alternating, median of 9 rounds (``benchmarks.progressive.step_costs``); stored in
   ``costs.json`` in the cache so that later calls keep the same horizons. The time budget is
   B = ``--budget`` x steps x (4-layer step).
3. **Grown runs** at the best baseline's learning rate (not tuned for them): 2 layers until step
   G, then 4 (``progressive.grow_init=identity``: function-preserving), for each G in
   ``--grow_at`` (fractions of ``--steps``: 0.5 to 0.9). Each run's horizon S (its ``max_iters``
   and ``lr_decay_iters``) is the most steps, a multiple of 10, whose side-by-side cost fits B:
   a grown run plans its own schedule for the same time budget, as a user who grows to save
   time would.
   Reported: the first evaluation at or below the best baseline's final val loss and its
   side-by-side time as a ratio of the baseline's; the final val loss at S. A control run has
   2 layers throughout, for the whole budget: does growing matter, or only the shallow model?
4. **Seeds**: the best baseline's rate, the grown run that reached the target soonest (the
   lowest final val loss if none did) and the control again at each of ``--seeds``: each grown
   seed against the baseline of the same seed (same initial weights and batches); mean +- sd.

Every run is an ``lm.train`` folder under ``$LM_BENCH_DIR/stacking-<hash>/``, reused by later
calls and resumed where it stopped. Runs train ``--jobs`` at a time in spawned processes of one
thread each; the verdict uses side-by-side step costs, so the load of the moment does not enter
it. Writes ``stacking.json``, ``stacking.md`` and ``stacking.png`` into ``--output_dir``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.progressive import eval_curve, read_metrics, step_costs, train_run  # noqa: E402
from benchmarks.reference import bench_dir, find_corpus  # noqa: E402

BASE = [
    "model.block_size=256", "model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.dropout=0.0",
    "data.tokenizer=char", "data.val_fraction=0.1", "train.batch_size=8", "train.min_lr=1e-4",
    "train.warmup_iters=50", "train.weight_decay=0.1", "train.beta1=0.9", "train.beta2=0.99",
    "train.grad_clip=1.0", "train.eval_interval=100", "train.eval_iters=10",
    "train.sample_tokens=0", "train.progress=false",
]


def baseline_job(lr: float, steps: int, seed: int) -> dict:
    return {"name": f"baseline-lr{lr:g}-s{seed}", "lr": lr, "seed": seed, "grow_at": None, "horizon": steps,
            "over": [f"train.learning_rate={lr:g}", f"train.seed={seed}"]}


def grown_job(lr: float, grow_at: int, horizon: int, seed: int) -> dict:
    return {"name": f"grown-g{grow_at}-h{horizon}-lr{lr:g}-s{seed}", "lr": lr, "seed": seed, "grow_at": grow_at,
            "horizon": horizon,
            "over": [f"train.learning_rate={lr:g}", f"train.seed={seed}", "model.n_layer=2",
                     "progressive.grow_init=identity", f"progressive.grow=[{{at: {grow_at}, n_layer: 4}}]"]}


def shallow_job(lr: float, horizon: int, seed: int) -> dict:
    """The control: 2 layers from scratch for the whole budget, never grown."""
    return {"name": f"shallow-h{horizon}-lr{lr:g}-s{seed}", "lr": lr, "seed": seed, "grow_at": None, "layers": 2,
            "horizon": horizon,
            "over": [f"train.learning_rate={lr:g}", f"train.seed={seed}", "model.n_layer=2"]}


def horizon(grow_at: int, budget_s: float, c2: float, c4: float) -> int:
    """The most steps (a multiple of 10) of a run grown at ``grow_at`` whose side-by-side cost fits."""
    if grow_at * c2 >= budget_s:
        return 0
    return grow_at + int((budget_s - grow_at * c2) / c4 // 10) * 10


def train_job(job: dict) -> dict:
    """Train (or resume, or reuse) one run in this process; {"name", "dir", "diverged"}."""
    r = train_run(job["name"], job["over"], job["horizon"], job["data"], job["root"], base=BASE)
    return {"name": job["name"], **r}


def run_all(jobs: list, root: str, data: str, n_jobs: int, log=print) -> dict:
    """{name: {"job", "diverged", "rows", "curve"}} of every job, training those not done yet."""
    for j in jobs:
        j["dir"], j["data"], j["root"] = os.path.join(root, j["name"]), data, root
    todo = [j for j in jobs if not os.path.isfile(os.path.join(j["dir"], "summary.json"))
            and not os.path.isfile(os.path.join(j["dir"], "diverged.json"))]
    done = {}
    if todo:
        log(f"training {len(todo)} run(s), {n_jobs} at a time: " + ", ".join(j["name"] for j in todo))
    if todo and n_jobs > 1:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(min(n_jobs, len(todo))) as pool:
            for i, r in enumerate(pool.imap_unordered(train_job, todo), 1):
                done[r["name"]] = r
                why = f" (diverged: {r['diverged']})" if r["diverged"] else ""
                log(f"  [{i}/{len(todo)}] {r['name']} done{why}")
    for j in jobs:      # the rest (cached ones, or all of them with --jobs 1)
        if j["name"] not in done:
            done[j["name"]] = train_job(j)
    out = {}
    for j in jobs:
        rows = read_metrics(os.path.join(j["dir"], "metrics.jsonl"))
        out[j["name"]] = {"job": j, "diverged": done[j["name"]]["diverged"], "rows": rows, "curve": eval_curve(rows)}
    return out


def cost_at(run: dict, step: int, c2: float, c4: float) -> float:
    """Side-by-side seconds of a run's first ``step`` steps."""
    g = run["job"]["grow_at"]
    if g is None:
        return step * (c2 if run["job"].get("layers") == 2 else c4)
    return min(step, g) * c2 + max(0, step - g) * c4


def first_at_or_below(run: dict, target: float):
    for step, _, v in run["curve"]:
        if step > 0 and v <= target:
            return step
    return None


def final(run: dict) -> float:
    return run["curve"][-1][2] if not run["diverged"] else math.inf


def mean_sd(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def figure(res: dict, base_names: list, grown_names: list, best: str, base_s: float, budget_s: float, costs: tuple,
           png: str):
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    c2, c4 = costs
    fig = Figure(figsize=(13, 4.6))
    axes = fig.subplots(1, 2)
    grown = [n for n in grown_names if res[n]["job"]["grow_at"] is not None]
    warm = colormaps["plasma"]
    for ax, zoom in zip(axes, (False, True)):
        for i, n in enumerate(base_names):
            r = res[n]
            xs = [cost_at(r, s, c2, c4) for s, _, _ in r["curve"][1:]]
            ax.plot(xs, [v for _, _, v in r["curve"][1:]], "-", lw=2.2 if n == best else 0.9,
                    color="black" if n == best else colormaps["Blues"](0.35 + 0.6 * i / max(1, len(base_names) - 1)),
                    label=f"4 layers, lr {r['job']['lr']:g}" + (" (best)" if n == best else ""))
        for n in grown_names:
            r = res[n]
            xs = [cost_at(r, s, c2, c4) for s, _, _ in r["curve"][1:]]
            if r["job"]["grow_at"] is None:
                ax.plot(xs, [v for _, _, v in r["curve"][1:]], "--", lw=1.4, color="gray",
                        label=f"2 layers throughout, {r['job']['horizon']} steps")
                continue
            k = grown.index(n)
            ax.plot(xs, [v for _, _, v in r["curve"][1:]], "o-", ms=2.5, lw=1.4,
                    color=warm(0.1 + 0.75 * k / max(1, len(grown) - 1)),
                    label=f"2 -> 4 at step {r['job']['grow_at']}, {r['job']['horizon']} steps")
        ax.axhline(final(res[best]), color="gray", ls=":", lw=1)
        ax.axvline(budget_s, color="red", ls="--", lw=0.9, label="time budget")
        ax.set_xlabel("side-by-side step time (s)")
        ax.set_ylabel("val loss")
        ax.grid(alpha=0.3)
        if zoom:
            t = final(res[best])
            low = min(final(res[n]) for n in grown_names + [best] if math.isfinite(final(res[n])))
            ax.set_xlim(0.55 * base_s, 1.03 * max(base_s, budget_s))
            ax.set_ylim(low - 0.02, t + 0.1)
            ax.set_title("(b) the end, enlarged (dotted: the best baseline's final loss)")
        else:
            ax.set_ylim(top=2.6)
            ax.set_title("(a) from-scratch learning-rate sweep and grown runs")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="path to tinyshakespeare.txt (default: the built-in name)")
    p.add_argument("--steps", type=int, default=2000, help="steps of each from-scratch run")
    p.add_argument("--lrs", default="2e-3,3e-3,4e-3,5e-3,6e-3,8e-3", help="learning rates of the baselines")
    p.add_argument("--grow_at", default="0.5,0.6,0.7,0.8,0.9",
                   help="growth points of the grown runs, as fractions of --steps (rounded to a multiple of 10)")
    p.add_argument("--budget", type=float, default=0.8, help="time budget as a fraction of the baseline's")
    p.add_argument("--seeds", default="1338,1339", help="more seeds for the best pair ('' for none)")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at a time (one thread each)")
    p.add_argument("--output_dir", default="benchmarks/results/stacking")
    args = p.parse_args(argv)
    try:
        lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
        fracs = [float(x) for x in args.grow_at.split(",") if x.strip()]
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError as e:
        print(f"error: --lrs, --grow_at and --seeds are comma-separated numbers ({e})", file=sys.stderr)
        return 2
    if not lrs or any(lr <= 0 for lr in lrs):
        print("error: --lrs needs at least one positive learning rate", file=sys.stderr)
        return 2
    if args.steps < 200 or args.steps % 100:
        print("error: --steps must be a multiple of 100, at least 200", file=sys.stderr)
        return 2
    if not fracs or any(not 0 < f < 1 for f in fracs):
        print("error: every --grow_at must be a fraction of --steps in (0, 1)", file=sys.stderr)
        return 2
    grow_at = sorted({max(10, int(round(f * args.steps / 10)) * 10) for f in fracs})
    if not 0 < args.budget <= 1.5:
        print("error: --budget must be in (0, 1.5]", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print("error: --jobs must be at least 1", file=sys.stderr)
        return 2
    if args.data is not None and not os.path.exists(args.data):
        print(f"error: --data {args.data} does not exist; pass the path of tinyshakespeare.txt", file=sys.stderr)
        return 2
    data = find_corpus(args.data)
    key = hashlib.sha256(json.dumps([BASE, args.steps]).encode()).hexdigest()[:10]
    root = os.path.join(bench_dir(), f"stacking-{key}")
    os.makedirs(root, exist_ok=True)
    os.makedirs(args.output_dir, exist_ok=True)

    # 1. the learning-rate sweep
    base_jobs = [baseline_job(lr, args.steps, 1337) for lr in lrs]
    res = run_all(base_jobs, root, data, args.jobs)
    best = min((j["name"] for j in base_jobs), key=lambda n: final(res[n]))
    best_lr, target = res[best]["job"]["lr"], final(res[best])
    print(f"best baseline: lr {best_lr:g}, final val loss {target:.4f}", flush=True)

    # 2. step costs, measured once per cache
    cpath = os.path.join(root, "costs.json")
    if os.path.isfile(cpath):
        with open(cpath, encoding="utf-8") as f:
            c = json.load(f)
    else:
        print("timing a 2-layer and a 4-layer step side by side (median of 9 alternating rounds)", flush=True)
        m = step_costs([(2, 256), (4, 256)], vocab=65, rounds=9)
        c = {"c2": m[(2, 256)], "c4": m[(4, 256)]}
        with open(cpath, "w", encoding="utf-8") as f:
            json.dump(c, f)
    c2, c4 = c["c2"], c["c4"]
    base_s = args.steps * c4
    budget_s = args.budget * base_s

    # 3. grown runs at the best rate, each planned for the budget
    grown_jobs = [grown_job(best_lr, g, horizon(g, budget_s, c2, c4), 1337) for g in grow_at]
    skipped = [j for j in grown_jobs if j["horizon"] <= j["grow_at"]]
    grown_jobs = [j for j in grown_jobs if j["horizon"] > j["grow_at"]]
    for j in skipped:
        print(f"skipping growth at {j['grow_at']}: no 4-layer step fits the budget after it", flush=True)
    shallow = shallow_job(best_lr, int(budget_s / c2 // 10) * 10, 1337)
    res.update(run_all(grown_jobs + [shallow], root, data, args.jobs))

    def verdict(g: str, b: str) -> dict:
        t = final(res[b])
        hit = first_at_or_below(res[g], t)
        d = {"final_val": final(res[g]), "target": t, "horizon": res[g]["job"]["horizon"],
             "horizon_ratio": cost_at(res[g], res[g]["job"]["horizon"], c2, c4) / base_s, "reached": hit is not None}
        if hit is not None:
            d.update(step=hit, ratio=cost_at(res[g], hit, c2, c4) / base_s)
        return d

    v = {j["name"]: verdict(j["name"], best) for j in grown_jobs}
    reached = [n for n in v if v[n]["reached"]]
    pick = min(reached, key=lambda n: v[n]["ratio"]) if reached else min(v, key=lambda n: v[n]["final_val"])

    # 4. the chosen pair at more seeds
    pj = res[pick]["job"]
    seed_jobs = [baseline_job(best_lr, args.steps, s) for s in seeds] + \
                [grown_job(best_lr, pj["grow_at"], pj["horizon"], s) for s in seeds] + \
                [shallow_job(best_lr, shallow["horizon"], s) for s in seeds]
    res.update(run_all(seed_jobs, root, data, args.jobs))
    triples = [(best, pick, shallow["name"])] + [
        (baseline_job(best_lr, args.steps, s)["name"], grown_job(best_lr, pj["grow_at"], pj["horizon"], s)["name"],
         shallow_job(best_lr, shallow["horizon"], s)["name"]) for s in seeds]
    per_seed = [{"seed": res[b]["job"]["seed"], "baseline_final": final(res[b]), "control_final": final(res[c]),
                 **verdict(g, b)} for b, g, c in triples]

    # the report
    lines = [f"Step costs side by side: 2 layers {1e3 * c2:.1f} ms, 4 layers {1e3 * c4:.1f} ms "
             f"(ratio {c2 / c4:.2f}). Baseline: {args.steps} steps = {base_s:.1f} s; budget "
             f"{args.budget:g} x = {budget_s:.1f} s.", "",
             "| from scratch, 4 layers | final val loss |", "|---|---|"]
    for j in base_jobs:
        r = res[j["name"]]
        lines.append(f"| lr {j['lr']:g}{' (best)' if j['name'] == best else ''} | "
                     f"{'diverged' if r['diverged'] else format(final(r), '.4f')} |")
    lines += ["", f"Grown 2 -> 4 layers (identity init) at lr {best_lr:g}, each planned for the budget, "
                  f"against the best baseline's {target:.4f}:", "",
              "| grown at step | horizon (steps; time ratio) | final val loss | reaches the target at | time ratio |",
              "|---|---|---|---|---|"]
    for j in grown_jobs:
        d = v[j["name"]]
        at = f"step {d['step']} | {d['ratio']:.2f}" if d["reached"] else "not reached | -"
        lines.append(f"| {j['grow_at']} | {d['horizon']} ({d['horizon_ratio']:.2f}) | {d['final_val']:.4f} | {at} |")
    d = verdict(shallow["name"], best)
    at = f"step {d['step']} | {d['ratio']:.2f}" if d["reached"] else "not reached | -"
    lines.append(f"| never (control: 2 layers throughout) | {d['horizon']} ({d['horizon_ratio']:.2f}) | "
                 f"{d['final_val']:.4f} | {at} |")
    v_shallow = d
    lines += ["", f"Seeds (grown at step {pj['grow_at']}, {pj['horizon']} steps, against the lr {best_lr:g} "
                  "baseline of the same seed; the 2-layer control of that seed too):", "",
              "| seed | baseline final val loss | grown final val loss | grown reaches it at | time ratio | "
              "control final val loss |", "|---|---|---|---|---|---|"]
    for d in per_seed:
        at = f"step {d['step']} | {d['ratio']:.2f}" if d["reached"] else "not reached | -"
        lines.append(f"| {d['seed']} | {d['baseline_final']:.4f} | {d['final_val']:.4f} | {at} | "
                     f"{d['control_final']:.4f} |")
    diffs = [d["baseline_final"] - d["final_val"] for d in per_seed]
    ratios = [d["ratio"] for d in per_seed if d["reached"]]
    md, sd = mean_sd(diffs)
    summary = (f"Over {len(per_seed)} seeds the grown run ends {md:+.4f} +- {sd:.4f} below the baseline "
               f"(positive: better) and reaches the baseline's final loss in {len(ratios)}/{len(per_seed)} seeds")
    if ratios:
        mr, sr = mean_sd(ratios)
        summary += f", at {mr:.2f} +- {sr:.2f} of its time"
    mc, sc = mean_sd([d["final_val"] - d["control_final"] for d in per_seed])
    summary += f"; the 2-layer control ends {mc:+.4f} +- {sc:.4f} below the grown run"
    lines += ["", summary + "."]
    table = "\n".join(lines)
    png = os.path.join(args.output_dir, "stacking.png")
    figure(res, [j["name"] for j in base_jobs], [j["name"] for j in grown_jobs] + [shallow["name"]], best, base_s,
           budget_s, (c2, c4), png)
    with open(os.path.join(args.output_dir, "stacking.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    with open(os.path.join(args.output_dir, "stacking.json"), "w", encoding="utf-8") as f:
        json.dump({"steps": args.steps, "budget": args.budget, "c2_s": c2, "c4_s": c4, "best": best, "best_lr": best_lr,
                   "target": target, "baselines": {j["name"]: final(res[j["name"]]) for j in base_jobs},
                   "grown": v, "shallow": v_shallow, "pick": pick, "seeds": per_seed, "cache": root}, f, indent=1,
                  default=lambda x: None if isinstance(x, float) and not math.isfinite(x) else x)
    print(table)
    print(f"\nruns: {root}; figure: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
