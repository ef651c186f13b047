"""Training steps on a quiet machine and next to one busy program, ours and PyTorch's, in one run.

    python benchmarks/contention.py                 # about 5 minutes on 2 cores
    python benchmarks/contention.py --reps 1 --steps 30   # a quicker look

The busy program is started and stopped by this script: ``python -c "while ...: pass"``
(one core, bounded to --competitor_s seconds, killed when the measurement ends). Each
measurement is a fresh process, so thread settings made through environment variables
take effect; the conditions alternate (quiet, busy, quiet, busy) and so do the contestants.

Contestants (the default config's GPT: 4 x 4 x 128, context 64, batch 12, random tokens,
AdamW and clipping as lm.train does):

* ``ours (as shipped)``: default threads with the thread governor (minigrad/kernels/cores.py)
  ticking once per step, as ``lm.train`` runs;
* ``ours, governor off``: MINIGRAD_ADAPT_THREADS=0, the old default (all cores, always);
* ``ours, our pool off``: MINIGRAD_THREADS=1 and the governor off: OpenBLAS still splits each
  product over all cores, but our own kernels (attention heads, fused ops) run in one thread.
  The difference to the previous row is what our kernels on the BLAS pool cost under load;
  the rest is the BLAS products' own;
* ``ours, 1 thread``: OPENBLAS_NUM_THREADS=1;
* ``PyTorch``: our PyTorch twin (benchmarks/compare_torch.py) with its default threads, and
  ``PyTorch, 1 thread``: torch.set_num_threads(1).

Reported: median step time per contestant and condition (after --warmup untimed steps; the
governor's first reading comes one second into the run) and the busy/quiet ratio. Writes
report.md and results.json under --output_dir.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONTESTANTS = {
    "ours (as shipped)": ("ours", {}),
    "ours, governor off": ("ours", {"MINIGRAD_ADAPT_THREADS": "0"}),
    "ours, our pool off": ("ours", {"MINIGRAD_ADAPT_THREADS": "0", "MINIGRAD_THREADS": "1"}),
    "ours, 1 thread": ("ours", {"OPENBLAS_NUM_THREADS": "1"}),
    "PyTorch": ("torch", {}),
    "PyTorch, 1 thread": ("torch1", {}),
}


def child(kind: str, steps: int, warmup: int, seed: int) -> dict:
    """Run ``steps`` training steps in this (fresh) process; median ms of the timed ones."""
    import numpy as np
    import minigrad as mg
    from lm.config import ModelConfig
    from lm.model import GPT
    rng = np.random.default_rng(seed)
    cfg = ModelConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=True)
    data = [rng.integers(0, 65, size=(12, 65)) for _ in range(warmup + steps)]
    mg.manual_seed(seed)
    model = GPT(cfg)
    times, threads_seen = [], []
    if kind == "ours":
        from minigrad.kernels.cores import Governor
        mg.backend.keep_freed_memory()
        opt = model.configure_optimizer(1e-3, 0.1, (0.9, 0.99))
        params = list(model.parameters())
        gov = Governor()
        for i, xy in enumerate(data):
            t0 = time.perf_counter()
            _, loss = model(xy[:, :-1], xy[:, 1:])
            loss.item()
            opt.zero_grad()
            loss.backward()
            mg.optim.clip_grad_norm_(params, 1.0)
            opt.step()
            threads_seen.append(gov.tick())
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        gov.close()
    else:
        import torch
        from benchmarks.compare_torch import torch_optimizer, torch_twin
        if kind == "torch1":
            torch.set_num_threads(1)
        tm = torch_twin(model)
        opt = torch_optimizer(tm)
        params = list(tm.parameters())
        for i, xy in enumerate(data):
            x, y = torch.from_numpy(xy[:, :-1].copy()), torch.from_numpy(xy[:, 1:].copy())
            t0 = time.perf_counter()
            _, loss = tm(x, y)
            loss.item()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        threads_seen = [torch.get_num_threads()]
    return {"median_ms": 1e3 * statistics.median(times), "threads_last": threads_seen[-1],
            "threads_min": min(threads_seen)}


def start_competitor(seconds: float) -> subprocess.Popen:
    """One busy loop; it ends after ``seconds``, or as soon as this script is gone (killed)."""
    code = (f"import os, time\nparent, t = {os.getpid()}, time.time()\n"
            f"while time.time() - t < {seconds} and os.getppid() == parent:\n    pass\n")
    return subprocess.Popen([sys.executable, "-c", code])


def measure(name: str, steps: int, warmup: int, seed: int) -> dict:
    kind, env_extra = CONTESTANTS[name]
    env = dict(os.environ, **env_extra)
    for k in ("OPENBLAS_NUM_THREADS", "MINIGRAD_THREADS", "MINIGRAD_ADAPT_THREADS"):
        if k not in env_extra:
            env.pop(k, None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", kind, "--steps", str(steps),
                          "--warmup", str(warmup), "--seed", str(seed)], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{name}: child failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="timed steps per measurement (default 60)")
    p.add_argument("--warmup", type=int, default=25, help="untimed steps first (default 25: the governor's "
                   "first decision falls in them)")
    p.add_argument("--reps", type=int, default=2, help="rounds of quiet + busy (default 2)")
    p.add_argument("--competitor_s", type=float, default=600, help="the busy program ends itself after this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="+", default=None, choices=list(CONTESTANTS), metavar="NAME")
    p.add_argument("--output_dir", default="benchmarks/results/contention")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))   # a kill runs the finally blocks too
    if args._child:
        print(json.dumps(child(args._child, args.steps, args.warmup, args.seed)))
        return 0
    try:
        import torch  # noqa: F401
        names = args.only or list(CONTESTANTS)
    except ImportError:
        names = [n for n in (args.only or CONTESTANTS) if not CONTESTANTS[n][0].startswith("torch")]
        print("PyTorch is not installed: its rows are skipped (pip install torch==2.13.0)")
    res = {n: {"quiet": [], "busy": []} for n in names}
    load = open("/proc/loadavg").read().strip() if os.path.exists("/proc/loadavg") else "n/a"
    for r in range(args.reps):
        for cond in ("quiet", "busy"):
            comp = start_competitor(args.competitor_s) if cond == "busy" else None
            try:
                if comp is not None:
                    time.sleep(0.5)
                for n in (names if r % 2 == 0 else names[::-1]):
                    x = measure(n, args.steps, args.warmup, args.seed)
                    res[n][cond].append(x)
                    print(f"round {r + 1} {cond:5s} {n:22s} {x['median_ms']:7.1f} ms/step "
                          f"(threads at the end {x['threads_last']}, fewest {x['threads_min']})", flush=True)
            finally:
                if comp is not None:
                    comp.kill()
                    comp.wait()
    med = {n: {c: statistics.median([x["median_ms"] for x in res[n][c]]) for c in ("quiet", "busy")} for n in names}
    def each(n, cond):
        return " / ".join("%.1f" % x["median_ms"] for x in res[n][cond])
    rows = [f"| {n} | {each(n, 'quiet')} | {each(n, 'busy')} | {med[n]['busy'] / med[n]['quiet']:.2f}x |"
            for n in names]
    checks = []
    if "ours (as shipped)" in med and "ours, 1 thread" in med:
        r1 = med["ours (as shipped)"]["busy"] / med["ours, 1 thread"]["busy"]
        checks.append(f"- busy: ours as shipped / ours 1 thread = {r1:.2f}x (target <= 1.3x: "
                      f"{'met' if r1 <= 1.3 else 'missed'})")
    if "ours (as shipped)" in med and "PyTorch" in med:
        so = med["ours (as shipped)"]["busy"] / med["ours (as shipped)"]["quiet"]
        st = med["PyTorch"]["busy"] / med["PyTorch"]["quiet"]
        checks.append(f"- slowdown busy/quiet: ours {so:.2f}x, PyTorch {st:.2f}x (target ours <= PyTorch's: "
                      f"{'met' if so <= st else 'missed'})")
        q = med["ours (as shipped)"]["quiet"] / med["PyTorch"]["quiet"]
        checks.append(f"- quiet: ours / PyTorch = {q:.2f}x")
    report = "\n".join(["# Training step, quiet and next to one busy program", "",
                        f"{args.reps} rounds; {args.steps} timed steps after {args.warmup} untimed; load average at "
                        f"the start: {load}. Median ms per step of each measurement.", "",
                        "| contestant | quiet (ms) | one busy program (ms) | busy / quiet |", "|---|---|---|---|",
                        *rows, "", *checks, ""])
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(report)
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"runs": res, "median": med, "load": load}, f, indent=1)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
