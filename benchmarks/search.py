"""What lm.search reaches: a better config than nanoGPT's CPU one, pruning, workers, TPE vs random.

    python benchmarks/search.py --data /path/to/tinyshakespeare.txt

1. **Search.** lm.search (TPE, median pruning, 3 workers x 1 thread) over the optimisation
   hyperparameters of nanoGPT's CPU configuration (``train_shakespeare.NANOGPT_CPU``: learning
   rate, min lr, warmup, weight decay, beta2, grad clip, dropout), model and batch fixed.
   Trials are short (``--trial_iters``, the cosine schedule compressed into them); the pruner
   sees each evaluation.
2. **Finalists.** The best ``--finalists`` trials trained for the full 2000 steps (seed 1337);
   the best of them then at seeds 1 and 2 too; the default config at the same 3 seeds.
   Every final loss is the 200-batch estimate of ``train_shakespeare.py`` (same batches).
3. **Pruning**: pruned fraction and steps run / steps without pruning, from the search.
4. **Workers**: a tiny search run for ``--worker_window`` seconds as 2 workers x 1 thread and
   as 1 worker x 2 threads, alternating, ``--worker_rounds`` times each; trials per hour.
5. **Sampler**: TPE against random search at ``--sampler_trials`` trials, 3 seeds, on a cheap
   objective (a 2-layer model, 150 steps); the median of each one's best.

Every phase caches its result under ``~/.cache/minigrad-lm/bench/search-<hash>/``, so a rerun
picks up where the last one stopped. Writes report.md and results.json under --output_dir.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
for _k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MINIGRAD_THREADS"):   # this process: one thread
    os.environ.setdefault(_k, "1")

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from lm.config import Config, apply_overrides  # noqa: E402
from train_shakespeare import NANOGPT_CPU, REFERENCE_VAL  # noqa: E402

SPACE = {
    "train.learning_rate": {"type": "float", "low": 3.0e-4, "high": 1.0e-2, "log": True},
    "train.min_lr": {"type": "float", "low": 1.0e-5, "high": 1.0e-3, "log": True},
    "train.warmup_iters": {"type": "int", "low": 0, "high": 300, "step": 25},
    "train.weight_decay": {"type": "float", "low": 0.0, "high": 0.3},
    "train.beta2": {"type": "categorical", "choices": [0.95, 0.98, 0.99, 0.999]},
    "train.grad_clip": {"type": "float", "low": 0.25, "high": 2.0},
    "model.dropout": {"type": "float", "low": 0.0, "high": 0.2},
}
FINAL_SEEDS = (1337, 1, 2)
TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=32", "train.batch_size=8"]


def base_dict(extra=()) -> dict:
    cfg = Config()
    apply_overrides(cfg, NANOGPT_CPU + ["train.lr_decay_iters=0", "train.sample_tokens=0"] + list(extra))
    d = cfg.to_dict()
    d["data"].pop("corpus")   # --data sets it
    return d


def write_search_config(path: str, base: dict, budget: dict, pruner: dict, sampler: dict) -> str:
    with open(path, "w") as f:
        yaml.safe_dump({"base": base, "search_space": SPACE, "objective": {"metric": "val_loss"},
                        "budget": budget, "sampler": sampler, "pruner": pruner}, f, sort_keys=False)
    return path


def load_json(path):
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return None


def save_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def load_state(cache: str) -> str:
    """What else ran on the machine: the load average and the busiest other processes."""
    la = os.getloadavg()
    try:
        out = subprocess.run(["ps", "-eo", "pcpu,comm", "--sort=-pcpu"], capture_output=True, text=True).stdout
        top = [ln.strip() for ln in out.splitlines()[1:6]]
    except OSError:
        top = []
    return f"load average {la[0]:.1f}/{la[1]:.1f}/{la[2]:.1f}; top: {'; '.join(top)}"


# --------------------------------------------------------------------------- 1. the search
def run_search(args, cache: str, log) -> dict:
    done = load_json(os.path.join(cache, "search.json"))
    if done:
        return done
    from lm import search as ls
    out = os.path.join(cache, "search")
    cfg = write_search_config(os.path.join(cache, "search.yaml"), base_dict(),
                              {"max_iters": args.trial_iters, "eval_interval": args.trial_iters // 5,
                               "eval_iters": 20},
                              {"type": "median", "n_startup_trials": 3, "n_warmup_steps": args.trial_iters // 5},
                              {"n_startup_trials": 5, "multivariate": True})
    argv = ["--config", cfg, "--data", args.data, "--output_dir", out, "--search_type", "optuna",
            "--n_trials", str(args.n_trials), "--seed", "0", "--n_workers", str(args.search_workers)]
    if os.path.exists(os.path.join(out, "study.db")):
        argv.append("--resume")
    log(f"search: {' '.join(argv)}")
    t0, la0 = time.time(), load_state(cache)
    parser = ls.build_parser()
    a = parser.parse_args(argv)
    sc, ok, n = ls.check_args(a)
    summary = ls.search(a, sc, ok, n, log=log)
    wall = time.time() - t0
    recs = sorted([r for r in _records(out) if r["state"] == "COMPLETE"], key=lambda r: r["value"])
    res = {k: summary[k] for k in ("n_finished", "n_complete", "n_pruned", "n_failed", "pruned_fraction",
                                   "steps_run", "steps_no_pruning", "compute_fraction")}
    res.update(wall_s=wall, load_before=la0, load_after=load_state(cache),
               leaders=[{"number": r["number"], "value": r["value"], "params": r["params"]} for r in recs],
               importances=summary["importances"], trial_iters=args.trial_iters, output_dir=out)
    save_json(os.path.join(cache, "search.json"), res)
    return res


def _records(out: str) -> list[dict]:
    import optuna
    from lm import search_storage as st
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name="lm-search", storage=st.open_storage(
        "sqlite:///" + os.path.join(out, "study.db")))
    return [st.record_from_frozen(t) for t in study.get_trials()]


# --------------------------------------------------------------------------- 2. full-length runs
def _final_run(job: dict) -> dict:
    """One 2000-step run and its 200-batch estimate (in a spawned process, one thread)."""
    from minigrad.io import load_file
    from lm.config import validate
    from lm.data import prepare_data
    import lm.train as lt
    cfg = Config()
    apply_overrides(cfg, NANOGPT_CPU + [f"train.seed={job['seed']}", "train.sample_tokens=0", "train.progress=false",
                                        f"train.max_iters={job['iters']}", f"train.lr_decay_iters={job['iters']}"]
                    + [f"{k}={v}" for k, v in job["params"].items()])
    cfg.data.corpus = job["data"]
    validate(cfg)
    t0 = time.time()
    resume = os.path.isfile(os.path.join(job["out"], lt.CHECKPOINT))   # a run killed midway goes on
    summary = lt.train(cfg, job["out"], log=lambda m: None, resume=resume)
    wall = time.time() - t0
    model = lt.GPT(cfg.model)
    ck = load_file(os.path.join(job["out"], "checkpoint.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in ck.items() if k.startswith("model.")})
    data = prepare_data(cfg.data.corpus, tokenizer_kind="char", val_fraction=0.1, cache_dir=cfg.data.cache_dir)
    cfg.train.eval_iters = job["eval_iters"]
    big = lt.estimate_loss(model, data, cfg, seed=12345)
    res = {"name": job["name"], "seed": job["seed"], "params": job["params"], "train": big["train"],
           "val": big["val"], "val20": summary["val_loss"], "wall_s": wall, "ms_per_step": summary["ms_per_step"]}
    save_json(job["out"] + ".json", res)
    return res


def final_runs(jobs: list[dict], log) -> list[dict]:
    """Runs not cached yet, two at a time in spawned processes of one thread each."""
    import multiprocessing as mp
    out = [load_json(j["out"] + ".json") for j in jobs]
    todo = [j for j, r in zip(jobs, out) if r is None]
    if todo:
        names = ", ".join(f"{j['name']}/s{j['seed']}" for j in todo)
        log(f"full-length runs: {len(todo)} to train ({names})")
        with mp.get_context("spawn").Pool(min(3, len(todo))) as pool:
            for r in pool.imap_unordered(_final_run, todo):
                log(f"  {r['name']} seed {r['seed']}: val {r['val']:.4f} (200 batches), {r['wall_s']:.0f} s")
    return [load_json(j["out"] + ".json") for j in jobs]


# --------------------------------------------------------------------------- 4. workers
def worker_rate(args, cache: str, mode: str, rnd: int, log) -> dict:
    path = os.path.join(cache, f"workers-{mode}-{rnd}.json")
    done = load_json(path)
    if done:
        return done
    out = os.path.join(cache, f"workers-{mode}-{rnd}")
    if os.path.isdir(out):
        import shutil
        shutil.rmtree(out)
    cfg = write_search_config(os.path.join(cache, "workers.yaml"), base_dict(TINY),
                              {"max_iters": 60, "eval_interval": 60, "eval_iters": 4}, {"type": "none"}, {})
    env = dict(os.environ)
    n_workers, threads = (2, 1) if mode == "2x1" else (1, 2)
    for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MINIGRAD_THREADS"):
        env[k] = str(threads)
    env["PYTHONPATH"] = ROOT
    cmd = [sys.executable, "-m", "lm.search", "--config", cfg, "--data", args.data, "--output_dir", out,
           "--search_type", "random", "--n_trials", "100000", "--timeout", str(args.worker_window), "--seed",
           str(rnd), "--n_workers", str(n_workers), "--no_progress"]
    la0 = load_state(cache)
    t0 = time.time()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    wall = time.time() - t0
    import csv
    with open(os.path.join(out, "trials.csv")) as f:
        n = sum(r["state"] == "COMPLETE" for r in csv.DictReader(f))
    res = {"mode": mode, "round": rnd, "complete": n, "wall_s": wall, "per_hour": n / wall * 3600,
           "load_before": la0, "load_after": load_state(cache)}
    log(f"  workers {mode} round {rnd}: {n} trials in {wall:.0f} s = {res['per_hour']:.0f}/h")
    save_json(path, res)
    import shutil
    shutil.rmtree(out, ignore_errors=True)
    return res


# --------------------------------------------------------------------------- 5. TPE vs random
def sampler_best(args, cache: str, kind: str, seed: int) -> dict:
    path = os.path.join(cache, f"sampler-{kind}-{seed}.json")
    done = load_json(path)
    if done:
        return done
    out = os.path.join(cache, f"sampler-{kind}-{seed}")
    cfg = write_search_config(os.path.join(cache, "sampler.yaml"), base_dict(TINY),
                              {"max_iters": 150, "eval_interval": 75, "eval_iters": 10}, {"type": "none"},
                              {"n_startup_trials": 5, "multivariate": True})
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "lm.search", "--config", cfg, "--data", args.data, "--output_dir", out,
           "--search_type", "optuna" if kind == "tpe" else "random", "--n_trials", str(args.sampler_trials),
           "--seed", str(seed), "--no_progress"]
    if os.path.exists(os.path.join(out, "study.db")):
        cmd.append("--resume")
    return {"cmd": cmd, "env": env, "out": out, "path": path, "kind": kind, "seed": seed}


def run_sampler_jobs(jobs: list[dict], log) -> None:
    """Two searches at a time (one thread each)."""
    todo = [j for j in jobs if "cmd" in j]
    while todo:
        batch, todo = todo[:2], todo[2:]
        procs = [(j, subprocess.Popen(j["cmd"], env=j["env"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE)) for j in batch]
        for j, p in procs:
            _, err = p.communicate()
            if p.returncode not in (0, 1):
                raise RuntimeError(f"{' '.join(j['cmd'])} failed: {err.decode()[-2000:]}")
            import csv
            with open(os.path.join(j["out"], "trials.csv")) as f:
                vals = [float(r["value"]) for r in csv.DictReader(f) if r["state"] == "COMPLETE"]
            res = {"kind": j["kind"], "seed": j["seed"], "best": min(vals), "n": len(vals)}
            save_json(j["path"], res)
            log(f"  sampler {j['kind']} seed {j['seed']}: best {res['best']:.4f} over {len(vals)} trials")


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="path to tinyshakespeare.txt")
    p.add_argument("--output_dir", default="benchmarks/results/search")
    p.add_argument("--n_trials", type=int, default=16)
    p.add_argument("--search_workers", type=int, default=3, help="lm.search --n_workers for the search")
    p.add_argument("--trial_iters", type=int, default=300, help="steps per search trial (the final runs: 2000)")
    p.add_argument("--final_iters", type=int, default=2000, help="steps of the full-length runs")
    p.add_argument("--final_eval_iters", type=int, default=200, help="batches per split of the final estimate")
    p.add_argument("--finalists", type=int, default=1, help="best trials trained at full length (seed 1337)")
    p.add_argument("--finalist_trials", default="", help="comma list of trial numbers to train at full length "
                                                         "instead of the best --finalists")
    p.add_argument("--worker_window", type=float, default=60.0)
    p.add_argument("--worker_rounds", type=int, default=2)
    p.add_argument("--sampler_trials", type=int, default=10)
    p.add_argument("--phases", default="search,default,final,sampler,workers",
                   help="which phases to run (the rest are read from the cache when there); two invocations "
                        "with different phases can run side by side")
    args = p.parse_args(argv)
    args.data = os.path.abspath(args.data)
    key = json.dumps([SPACE, NANOGPT_CPU, args.n_trials, args.trial_iters, args.search_workers,
                      os.path.getsize(args.data)])
    cache = os.path.expanduser(f"~/.cache/minigrad-lm/bench/search-{hashlib.sha1(key.encode()).hexdigest()[:10]}")
    # full-length runs depend only on the config, the seed and the data: shared by every search
    fkey = json.dumps([NANOGPT_CPU, args.final_iters, args.final_eval_iters, os.path.getsize(args.data)])
    final_dir = os.path.expanduser(f"~/.cache/minigrad-lm/bench/search-final-{hashlib.sha1(fkey.encode()).hexdigest()[:10]}")
    os.makedirs(cache, exist_ok=True)
    os.makedirs(final_dir, exist_ok=True)
    os.makedirs(args.output_dir, exist_ok=True)
    logf = open(os.path.join(cache, "log.txt"), "a")

    def log(msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        print(line, file=logf, flush=True)

    log(f"cache {cache}; {load_state(cache)}")
    phases = set(filter(None, args.phases.split(",")))
    res = {"cache": cache}
    default = [{"name": "default", "seed": sd, "params": {}, "data": args.data, "iters": args.final_iters,
                "eval_iters": args.final_eval_iters,
                "out": os.path.join(final_dir, f"default-s{sd}")} for sd in FINAL_SEEDS]
    if "default" in phases:
        final_runs(default, log)
    if "search" in phases or load_json(os.path.join(cache, "search.json")):
        s = res["search"] = run_search(args, cache, log)
        log(f"search: {s['n_finished']} trials, {s['n_pruned']} pruned ({100 * s['pruned_fraction']:.0f}%), "
            f"compute {s['steps_run']}/{s['steps_no_pruning']} steps ({100 * s['compute_fraction']:.0f}%), "
            f"{s['wall_s']:.0f} s")
        leaders = s["leaders"][:args.finalists]
        if args.finalist_trials:   # chosen earlier, e.g. the best trial when the final runs had to start
            want = [int(n) for n in args.finalist_trials.split(",")]
            leaders = [r for r in s["leaders"] if r["number"] in want]
        fin = [{"name": f"trial{r['number']}", "seed": 1337, "params": r["params"], "data": args.data,
                "iters": args.final_iters, "eval_iters": args.final_eval_iters,
                "out": os.path.join(cache, "final", f"trial{r['number']}-s1337")} for r in leaders]
        if "final" in phases or all(load_json(j["out"] + ".json") for j in fin):
            la0 = load_state(cache)
            os.makedirs(os.path.join(cache, "final"), exist_ok=True)
            if len(fin) == 1:   # no finalists to choose between: its three seeds side by side
                more = [{**fin[0], "seed": sd, "out": os.path.join(cache, "final", f"{fin[0]['name']}-s{sd}")}
                        for sd in FINAL_SEEDS[1:]]
                first, rest = final_runs(fin + more, log)[:1], final_runs(more, log)
            else:
                first = final_runs(fin, log)
                rest = None
            best = min(first, key=lambda r: r["val"])
            if rest is None:
                more = [{**j, "seed": sd, "out": os.path.join(cache, "final", f"{best['name']}-s{sd}")}
                        for j in fin if j["name"] == best["name"] for sd in FINAL_SEEDS[1:]]
                rest = final_runs(more, log)
            best_runs = [best] + rest
            default_runs = final_runs(default, log) if "default" in phases else \
                [load_json(j["out"] + ".json") for j in default]
            if None in default_runs:   # another invocation (--phases default) is still training them
                log("the default config's runs are not all done yet; rerun for the report when they are")
                return 0
            res["final"] = {"finalists": first, "best": best_runs, "default": default_runs,
                            "best_mean": float(np.mean([r["val"] for r in best_runs])),
                            "default_mean": float(np.mean([r["val"] for r in default_runs])),
                            "load_before": la0, "load_after": load_state(cache)}
    sjobs = [sampler_best(args, cache, k, sd) for sd in (0, 1, 2) for k in ("tpe", "random")]
    if "sampler" in phases or all("cmd" not in j for j in sjobs):
        run_sampler_jobs(sjobs, log)
        got = [sampler_best(args, cache, k, sd) for sd in (0, 1, 2) for k in ("tpe", "random")]
        res["sampler"] = {"runs": got, "tpe_median": float(np.median([g["best"] for g in got if g["kind"] == "tpe"])),
                          "random_median": float(np.median([g["best"] for g in got if g["kind"] == "random"])),
                          "trials": args.sampler_trials, "load": load_state(cache)}
    wpaths = [os.path.join(cache, f"workers-{m}-{r}.json") for r in range(args.worker_rounds) for m in ("2x1", "1x2")]
    if "workers" in phases or all(os.path.isfile(p) for p in wpaths):
        runs = []
        for rnd in range(args.worker_rounds):
            for mode in (("2x1", "1x2") if rnd % 2 == 0 else ("1x2", "2x1")):
                runs.append(worker_rate(args, cache, mode, rnd, log))
        r21 = float(np.median([r["per_hour"] for r in runs if r["mode"] == "2x1"]))
        r12 = float(np.median([r["per_hour"] for r in runs if r["mode"] == "1x2"]))
        res["workers"] = {"runs": runs, "2x1_per_hour": r21, "1x2_per_hour": r12, "ratio": r21 / r12}
    if "search" not in res:
        return 0
    report = make_report(res)
    with open(os.path.join(args.output_dir, "report.md"), "w") as f:
        f.write(report)
    save_json(os.path.join(args.output_dir, "results.json"), res)
    print(report)
    return 0


def make_report(res: dict) -> str:
    s = res["search"]
    L = ["| target | measured | goal | met |", "|---|---|---|---|"]
    if "final" in res:
        f = res["final"]
        seeds = ", ".join(str(r["seed"]) for r in f["best"])
        bv = ", ".join(f"{r['val']:.4f}" for r in f["best"])
        dv = ", ".join(f"{r['val']:.4f}" for r in f["default"])
        met = "yes" if f["best_mean"] < min(f["default_mean"], REFERENCE_VAL) else "no"
        L.append(f"| best config, mean val loss over seeds {seeds} (2000 steps, 200 batches) | "
                 f"**{f['best_mean']:.4f}** ({bv}) | < default {f['default_mean']:.4f} and < {REFERENCE_VAL} | {met} |")
        L.append(f"| default config, same seeds | {f['default_mean']:.4f} ({dv}) | | |")
    L.append(f"| pruned trials | {s['n_pruned']} of {s['n_finished']} = **{100 * s['pruned_fraction']:.0f}%** | "
             f">= 30% | {'yes' if s['pruned_fraction'] >= 0.3 else 'no'} |")
    L.append(f"| compute: steps run / steps without pruning | {s['steps_run']:,} / {s['steps_no_pruning']:,} = "
             f"**{100 * s['compute_fraction']:.0f}%** (saved {100 * (1 - s['compute_fraction']):.0f}%) | report | |")
    if "workers" in res:
        w = res["workers"]
        L.append(f"| trials/hour, 2 workers x 1 thread vs 1 worker x 2 threads | {w['2x1_per_hour']:.0f} vs "
                 f"{w['1x2_per_hour']:.0f} = **{w['ratio']:.2f}x** | >= 1.4x | {'yes' if w['ratio'] >= 1.4 else 'no'} |")
    if "sampler" in res:
        sm = res["sampler"]
        L.append(f"| best val loss at {sm['trials']} trials, median of 3 seeds: TPE vs random | "
                 f"**{sm['tpe_median']:.4f}** vs **{sm['random_median']:.4f}** | report | |")
    out = "\n".join(L) + "\n"
    if "final" in res:
        out += "\nFinalists (seed 1337, 2000 steps): " + ", ".join(
            f"{r['name']} {r['val']:.4f}" for r in res["final"]["finalists"]) + "\n"
        b = res["final"]["best"][0]
        out += "\nBest config: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in b["params"].items()) + "\n"
    out += f"\nSearch: {s['n_finished']} trials of {s['trial_iters']} steps, {s['wall_s']:.0f} s; machine: " \
           f"{s['load_before']}\n"
    return out


if __name__ == "__main__":
    sys.exit(main())
