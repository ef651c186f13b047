"""Whole training runs of nanoGPT itself and of ours, side by side on one machine.

    git clone https://github.com/karpathy/nanoGPT ~/src/nanoGPT      # your own checkout; never vendored here
    python benchmarks/vs_nanogpt.py --nanogpt_dir ~/src/nanoGPT --data tinyshakespeare.txt
    python benchmarks/vs_nanogpt.py --nanogpt_dir ~/src/nanoGPT --data tinyshakespeare.txt --quick

What runs, unmodified, each in its own fresh process (whole-process wall time, as a user
sees it: imports, data, kernel caches, evaluations, checkpoints and our end-of-run sample):

* **nanoGPT's README CPU command**: ``train.py config/train_shakespeare_char.py --device=cpu
  --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12
  --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0``.
  Its checkout is copied (the Python files and ``config/`` only) into the output folder and
  its own ``data/shakespeare_char/prepare.py`` prepares ``--data`` there, so the user's
  checkout is left as it was.
* **Ours with the same settings**: ``python -m lm.train --config configs/default.yaml --data
  <the same text> train.eval_iters=20 model.bias=false model.gelu=exact``. nanoGPT's
  train.py defaults to no biases and nn.GELU (exact, erf); our defaults are GPT-2's (biases,
  tanh GELU), so the matched run switches them. ``--ours_defaults`` adds a row of ours as
  shipped, for information.
* **The baby GPT** (``--baby_steps``, default 60): nanoGPT's ``train_shakespeare_char.py``
  shape (6 layers x 6 heads x 384, context 256, dropout 0.2) at batch 8, a fixed number of
  steps and no evaluation after the first; median step time from each one's own log.

The runs alternate (A B A B, who goes first alternates) ``--runs`` times each. Median step
times come from each program's own log: nanoGPT's ``iter N: ... time X ms`` lines (it
times from one iteration's end to the next, batch loading included), ours from
``metrics.jsonl`` (``ms`` per step, the batch included, evaluations not). The final
validation loss is each one's own last evaluation (20 batches each split, the same
character vocabulary; the data splits are both the first 90% / last 10%).

Writes report.md and results.json under --output_dir. Another busy process on the machine
distorts every number here: run it on a quiet machine (``uptime``'s load near 0).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

NANO_CPU = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
            "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
            "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]
OURS_CPU = ["--config", "configs/default.yaml", "train.eval_iters=20"]
MATCH = ["model.bias=false", "model.gelu=exact"]      # nanoGPT train.py's defaults
# nanoGPT's baby GPT (train_shakespeare_char.py) at batch 8: one evaluation (iter 0), then steps only
NANO_BABY = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--batch_size=8",
             "--eval_interval=1000000", "--eval_iters=1", "--log_interval=1"]
OURS_BABY = ["--config", "configs/default.yaml", "model.block_size=256", "model.n_layer=6", "model.n_head=6",
             "model.n_embd=384", "model.dropout=0.2", "train.batch_size=8", "train.eval_interval=1000000",
             "train.eval_iters=1", "train.sample_tokens=0", "train.log_interval=1", "train.warmup_iters=100",
             "train.lr_decay_iters=5000"]

ITER_RE = re.compile(r"^iter (\d+): loss ([\d.]+), time ([\d.]+)ms")
EVAL_RE = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)")


def prepare_nanogpt(nanogpt_dir: str, data: str, work: str) -> str:
    """Copy nanoGPT's code (not its data or history) into ``work`` and prepare ``data`` there."""
    need = ["train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py",
            "data/shakespeare_char/prepare.py"]
    missing = [n for n in need if not os.path.isfile(os.path.join(nanogpt_dir, n))]
    if missing:
        raise SystemExit(f"error: --nanogpt_dir {nanogpt_dir} is not a nanoGPT checkout (missing "
                         f"{', '.join(missing)}); clone https://github.com/karpathy/nanoGPT")
    code = os.path.join(work, "nanoGPT")
    for n in ["train.py", "model.py", "configurator.py"]:
        os.makedirs(code, exist_ok=True)
        shutil.copy(os.path.join(nanogpt_dir, n), os.path.join(code, n))
    shutil.copytree(os.path.join(nanogpt_dir, "config"), os.path.join(code, "config"), dirs_exist_ok=True)
    ddir = os.path.join(code, "data", "shakespeare_char")
    os.makedirs(ddir, exist_ok=True)
    shutil.copy(os.path.join(nanogpt_dir, "data", "shakespeare_char", "prepare.py"), ddir)
    shutil.copy(data, os.path.join(ddir, "input.txt"))       # prepare.py downloads only when it is missing
    if not os.path.isfile(os.path.join(ddir, "val.bin")):
        subprocess.run([sys.executable, "prepare.py"], cwd=ddir, check=True, stdout=subprocess.DEVNULL)
    return code


def run_timed(cmd: list[str], cwd: str, log_path: str, env=None) -> tuple[float, str]:
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as f:
        p = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t0
    with open(log_path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if p.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[:3])} ... failed (exit {p.returncode}); its log: {log_path}\n"
                         + text[-2000:])
    return wall, text


def parse_nanogpt(text: str, skip: int = 1) -> dict:
    """Median iteration time (iterations >= ``skip``; iteration 0 holds start-up) and the last evaluation."""
    ms, val = [], None
    for line in text.splitlines():
        m = ITER_RE.match(line.strip())
        if m and int(m.group(1)) >= skip:
            ms.append(float(m.group(3)))
        e = EVAL_RE.match(line.strip())
        if e:
            val = float(e.group(3))
    return {"median_ms": statistics.median(ms) if ms else float("nan"), "val_loss": val, "steps_logged": len(ms)}


def parse_ours(out_dir: str, skip: int = 1) -> dict:
    ms, val = [], None
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r.get("kind") == "eval":
                val = r["val_loss"]
            elif r.get("step", 0) > skip:
                ms.append(r["ms"])
    return {"median_ms": statistics.median(ms) if ms else float("nan"), "val_loss": val, "steps_logged": len(ms)}


def contestants(code: str, data: str, out: str, quick: bool, ours_defaults: bool, baby_steps: int):
    """name -> (callable(run index) -> result dict)."""
    py = sys.executable
    iters = ["--max_iters=200", "--lr_decay_iters=200"] if quick else []
    our_iters = ["train.max_iters=200", "train.lr_decay_iters=200"] if quick else []
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def nano(args, tag):
        def go(r):
            d = os.path.join(out, f"{tag}-{r}")
            shutil.rmtree(d, ignore_errors=True)
            wall, text = run_timed([py, "train.py", *args, f"--out_dir={d}"], code, os.path.join(out, f"{tag}-{r}.log"))
            return {"wall_s": wall, **parse_nanogpt(text, skip=1 if "eval_interval=1000000" not in " ".join(args) else 3)}
        return go

    def ours(args, tag, skip=1):
        def go(r):
            d = os.path.join(out, f"{tag}-{r}")
            shutil.rmtree(d, ignore_errors=True)
            cmd = [py, "-m", "lm.train", *args[:2], "--data", data, "--output_dir", d, *args[2:]]
            wall, _ = run_timed(cmd, ROOT, os.path.join(out, f"{tag}-{r}.log"), env)
            return {"wall_s": wall, **parse_ours(d, skip)}
        return go

    c = {"nanoGPT (README CPU command)": nano(NANO_CPU + iters, "nano-cpu"),
         "ours, nanoGPT's settings (no bias, exact GELU)": ours(OURS_CPU + MATCH + our_iters, "ours-cpu")}
    if ours_defaults:
        c["ours as shipped (biases, tanh GELU)"] = ours(OURS_CPU + our_iters, "ours-cpu-defaults")
    if baby_steps:
        n = ["--max_iters=%d" % baby_steps]
        c["nanoGPT baby GPT, batch 8"] = nano(NANO_BABY + n, "nano-baby")
        c["ours baby GPT, batch 8"] = ours(OURS_BABY + MATCH + ["train.max_iters=%d" % baby_steps], "ours-baby", skip=3)
    return c


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nanogpt_dir", required=True, help="a local checkout of github.com/karpathy/nanoGPT")
    p.add_argument("--data", required=True, help="tinyshakespeare.txt (nanoGPT's shakespeare_char input)")
    p.add_argument("--runs", type=int, default=2, help="runs of each program, alternating (default 2)")
    p.add_argument("--baby_steps", type=int, default=60, help="steps of the baby-GPT comparison (0: skip it)")
    p.add_argument("--ours_defaults", action="store_true", help="also run ours with its own defaults")
    p.add_argument("--quick", action="store_true", help="200 steps instead of 2000 (a smoke run)")
    p.add_argument("--output_dir", default="benchmarks/results/vs_nanogpt")
    args = p.parse_args(argv)
    try:
        import torch  # noqa: F401
    except ImportError:
        print("error: nanoGPT needs PyTorch: pip install torch==2.13.0 (a CPU build)", file=sys.stderr)
        return 2
    if not os.path.isfile(args.data):
        print(f"error: --data {args.data}: no such file", file=sys.stderr)
        return 2
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    code = prepare_nanogpt(os.path.abspath(os.path.expanduser(args.nanogpt_dir)), os.path.abspath(args.data), out)
    runs = contestants(code, os.path.abspath(args.data), out, args.quick, args.ours_defaults, args.baby_steps)
    names = list(runs)
    res = {n: [] for n in names}
    with open("/proc/loadavg") if os.path.exists("/proc/loadavg") else open(os.devnull) as f:
        load_before = f.read().strip()
    pairs = [names[i:i + 2] for i in range(0, len(names), 2)]
    for r in range(args.runs):
        for pair in pairs:
            for n in (pair if r % 2 == 0 else pair[::-1]):
                print(f"run {r + 1}/{args.runs}: {n} ...", flush=True)
                res[n].append(runs[n](r))
                x = res[n][-1]
                print(f"  wall {x['wall_s']:.1f} s, median step {x['median_ms']:.1f} ms, val loss {x['val_loss']}",
                      flush=True)
    with open("/proc/loadavg") if os.path.exists("/proc/loadavg") else open(os.devnull) as f:
        load_after = f.read().strip()
    rows, summary = [], {}
    for n in names:
        w = [x["wall_s"] for x in res[n]]
        ms = [x["median_ms"] for x in res[n]]
        v = [x["val_loss"] for x in res[n] if x["val_loss"] is not None]
        summary[n] = {"wall_best": min(w), "wall_median": statistics.median(w), "step_median": statistics.median(ms),
                      "val_loss": v[-1] if v else None}
        rows.append(f"| {n} | {' / '.join(f'{x:.1f}' for x in w)} s | {min(w):.1f} s | {statistics.median(w):.1f} s "
                    f"| {' / '.join(f'{x:.1f}' for x in ms)} ms | {v[-1] if v else 'n/a'} |")
    ratios = []
    for a, b in pairs:
        if len((a, b)) == 2:
            sa, sb = summary[a], summary[b]
            ratios.append(f"| {b} / {a} | {sb['wall_best'] / sa['wall_best']:.3f}x | "
                          f"{sb['wall_median'] / sa['wall_median']:.3f}x | {sb['step_median'] / sa['step_median']:.3f}x |")
    if args.ours_defaults:
        a, b = names[0], "ours as shipped (biases, tanh GELU)"
        ratios.append(f"| {b} / {a} | {summary[b]['wall_best'] / summary[a]['wall_best']:.3f}x | "
                      f"{summary[b]['wall_median'] / summary[a]['wall_median']:.3f}x | "
                      f"{summary[b]['step_median'] / summary[a]['step_median']:.3f}x |")
    report = "\n".join([
        "# nanoGPT against ours: whole runs, same machine, alternating", "",
        f"{args.runs} runs each{' (quick: 200 steps)' if args.quick else ''}; load average before: {load_before}; "
        f"after: {load_after}.", "",
        "| program | whole run (each) | best | median | median step (each) | final val loss |",
        "|---|---|---|---|---|---|", *rows, "",
        "| ratio | whole run, best | whole run, median | median step |", "|---|---|---|---|", *ratios, ""])
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write(report)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"runs": res, "summary": summary, "load_before": load_before, "load_after": load_after}, f, indent=1)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
