"""Do the tests catch real bugs? Plant one deliberate bug at a time and run the tests that should see it.

    python benchmarks/mutants.py                       # the tests of this checkout
    python benchmarks/mutants.py --tests-from 67b9648  # the tests of an older commit, same code
    python benchmarks/mutants.py --only M03,M10        # a few

Each mutant replaces one exact snippet of the source (a seed, a mask, a sign, an index) and runs
``pytest -x -q`` on the few test files that cover that code (the machine is shared: never the
whole suite). A mutant is *caught* when pytest fails. The source file is restored after each
run, whatever happens. ``--tests-from REF`` copies ``tests/`` (and the files tests read:
configs, notebooks, README, setup.cfg) of that commit into a temporary folder and runs those
against this checkout's code, which is how "before" counts are made.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (id, file, exact old snippet, replacement, test files, what the bug is)
MUTANTS = [
    ("M01", "lm/train.py", "    mg.manual_seed(t_cfg.seed)\n    model = GPT(m_cfg)",
     "    mg.manual_seed(0)\n    model = GPT(m_cfg)", ["test_lm.py"], "--seed ignored by the initialisation"),
    ("M02", "lm/train.py", "batch_rng = np.random.default_rng(t_cfg.seed)",
     "batch_rng = np.random.default_rng(0)", ["test_lm.py"], "--seed ignored by the batch order"),
    ("M03", "lm/generate.py", "        rng = np.random.default_rng(seed)",
     "        rng = np.random.default_rng(0)", ["test_lm.py"], "sampling ignores its seed"),
    ("M04", "lm/generate.py", "return self._out(self._prefill(np.asarray(seqs)[:, -keep:]))",
     "return self._out(self._prefill(np.asarray(seqs)[:, :keep]))", ["test_lm.py"],
     "KV-cache path re-reads the oldest tokens after the window overflows"),
    ("M05", "lm/train.py", '        a1.plot(steps, losses, lw=0.7, alpha=0.6, label="batch loss")',
     '        a1.plot([], [], lw=0.7, alpha=0.6, label="batch loss")', ["test_lm.py"],
     "loss.png without the loss curve"),
    ("M06", "minigrad/viz.py", '        ax.barh(pos[drawn], vals[drawn], color="C0")',
     '        ax.barh(pos[drawn][:0], vals[drawn][:0], color="C0")', ["test_viz.py"],
     "gradient-norm bar chart without bars"),
    ("M07", "minigrad/ops.py", "                sum_to(-gy, sb) if self.needs_input_grad[1] else None)",
     "                sum_to(gy, sb) if self.needs_input_grad[1] else None)", ["test_ops.py"],
     "a - b: wrong sign of the gradient of b"),
    ("M08", "minigrad/kernels/attention.py",
     "        fut = xp.arange(S)[None, :] > (row0 + xp.arange(R))[:, None]",
     "        fut = xp.arange(S)[None, :] > (row0 + xp.arange(R))[:, None] + 1", ["test_kernels.py", "test_lm.py"],
     "blocked attention's causal mask lets each query see one future key"),
    ("M09", "minigrad/functional.py", "    return x * (keep * (1.0 / (1.0 - p))).astype(x.dtype)",
     "    return x * keep.astype(x.dtype)", ["test_ops.py", "test_nn.py"],
     "dropout without the 1/(1-p) rescaling"),
    ("M10", "minigrad/checkpoint.py", "        for m, s in self.states:\n            backend.set_rng_state(s, m)",
     "        for m, s in self.states:\n            pass", ["test_checkpoint.py"],
     "checkpointed recompute does not replay the dropout masks"),
    ("M11", "minigrad/optim.py", "        bc1 = 1 - b1 ** t", "        bc1 = 1 - b1 ** (t + 1)", ["test_optim.py"],
     "Adam's bias correction off by one step"),
    ("M12", "minigrad/optim.py", "    if coef < 1.0:\n        for p in params:",
     "    if coef > 1.0:\n        for p in params:", ["test_optim.py"], "gradient clipping inverted"),
    ("M13", "lm/data.py", "    y = np.asarray(data[idx + 1], dtype=np.int64)",
     "    y = np.asarray(data[idx], dtype=np.int64)", ["test_data.py"], "targets are the inputs (no shift)"),
    ("M14", "lm/generate.py", "        logits[b, seen] = np.where(vals > 0, vals / penalty, vals * penalty)",
     "        logits[b, seen] = np.where(vals > 0, vals * penalty, vals / penalty)", ["test_lm.py"],
     "repetition penalty rewards repeats"),
    ("M15", "lm/train.py", "        rng = np.random.default_rng(seed)\n        losses = []",
     "        rng = np.random.default_rng()\n        losses = []", ["test_lm.py"],
     "evaluation batches not seeded (losses not comparable between evaluations)"),
    ("M16", "minigrad/backend.py", "    _seed = int(seed)\n    _rngs.clear()",
     "    _rngs.clear()", ["test_nn.py", "test_ops.py"], "minigrad.manual_seed ignored"),
    ("M17", "lm/generate.py", "    drop_sorted = (cum - probs) >= p", "    drop_sorted = cum >= p",
     ["test_lm.py"], "top-p drops the token that fills the nucleus"),
    ("M18", "minigrad/kernels/fused.py", "    bc1 = 1.0 - b1 ** step", "    bc1 = 1.0 - b1 ** (step + 1)",
     ["test_fused.py", "test_optim.py"], "fused AdamW's bias correction off by one step"),
]

NEEDS = ("tests", "configs", "notebooks", "README.md", "setup.cfg", "docs")


def tests_dir(ref: str | None, tmp: str) -> str:
    if ref is None:
        return os.path.join(ROOT, "tests")
    names = [n for n in NEEDS if subprocess.run(["git", "cat-file", "-e", f"{ref}:{n}"], cwd=ROOT,
                                                capture_output=True).returncode == 0]
    archive = subprocess.run(["git", "archive", ref, *names], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
    return os.path.join(tmp, "tests")


def run_one(mutant, tdir: str, timeout: int) -> tuple[str, float]:
    mid, rel, old, new, files, _ = mutant
    path = os.path.join(ROOT, rel)
    with open(path, encoding="utf-8") as f:
        src = f.read()
    if old is None:   # the unmutated baseline: must pass, or the counts mean nothing
        old = new = src
    elif src.count(old) != 1:
        return f"snippet found {src.count(old)} times", 0.0
    env = dict(os.environ, PYTHONPATH=ROOT, MPLBACKEND="Agg", PYTHONDONTWRITEBYTECODE="1")
    t0 = time.perf_counter()
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(src.replace(old, new))
        tests = [os.path.join(tdir, t) for t in files if os.path.isfile(os.path.join(tdir, t))]
        try:
            r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                               cwd=os.path.dirname(tdir), env=env, capture_output=True, text=True,
                               timeout=timeout)
            verdict = "caught" if r.returncode != 0 else "MISSED"
            if r.returncode not in (0, 1):
                verdict = f"caught (pytest rc {r.returncode})"
        except subprocess.TimeoutExpired:
            verdict = "timeout"
    finally:
        with open(path, "w", encoding="utf-8") as f:
            f.write(src)
    return verdict, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tests-from", default=None, help="git ref whose tests/ to run (default: this checkout's)")
    p.add_argument("--only", default=None, help="comma-separated mutant ids")
    p.add_argument("--timeout", type=int, default=600)
    args = p.parse_args(argv)
    chosen = [m for m in MUTANTS if args.only is None or m[0] in args.only.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tdir = tests_dir(args.tests_from, tmp)
        files = sorted({f for m in chosen for f in m[4]})
        verdict, dt = run_one(("M00", "lm/__init__.py", None, None, files, ""), tdir, args.timeout)
        print(f"M00  baseline (no mutant): {'passes' if verdict == 'MISSED' else 'FAILS: ' + verdict} "
              f"{dt:6.1f} s  [{', '.join(files)}]", flush=True)
        if verdict != "MISSED":
            return 1
        caught = 0
        for m in chosen:
            verdict, dt = run_one(m, tdir, args.timeout)
            caught += verdict.startswith("caught")
            print(f"{m[0]}  {verdict:<8} {dt:6.1f} s  {m[1]:<30} {m[5]}  [{', '.join(m[4])}]", flush=True)
        print(f"caught {caught} of {len(chosen)} mutants (tests: {args.tests_from or 'this checkout'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
