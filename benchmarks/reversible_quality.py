"""Does a reversible GPT learn as well as the plain one? Train both the same way and compare.

    python benchmarks/reversible_quality.py [--config configs/default.yaml] [KEY=VALUE ...]

Both runs use the same config (default: configs/default.yaml: python-docs, char level,
2000 steps), the same seed, the same batches; only ``model.reversible`` differs. The
reversible model has exactly the same parameters (F = ln_1 + attn, G = ln_2 + mlp on two
residual streams), so the comparison is of the architecture and its memory-saving
backward, not of model size. Target: final validation loss within 0.05 of the plain run.
Writes report.md and results.json under --output_dir (default
benchmarks/results/reversible_quality) and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import minigrad as mg  # noqa: E402
from lm.config import apply_overrides, load_config, validate  # noqa: E402
from lm.train import train  # noqa: E402

TARGET = 0.05


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--output_dir", default="benchmarks/results/reversible_quality")
    p.add_argument("--variants", default="plain,reversible",
                   help="comma-separated: plain, reversible, reversible_ckpt (reversible cut every block)")
    p.add_argument("--report_only", action="store_true",
                   help="train nothing; build the report from the runs already under --output_dir "
                        "(to run the variants as separate processes, e.g. in parallel)")
    p.add_argument("overrides", nargs="*", help="config overrides for both runs, e.g. train.max_iters=200")
    args = p.parse_args(argv)
    switches = {"plain": ["model.reversible=false"],
                "reversible": ["model.reversible=true"],
                "reversible_ckpt": ["model.reversible=true", "model.checkpoint_every=1"]}
    names = args.variants.split(",")
    if not args.report_only:
        for name in names:
            cfg = load_config(args.config)
            apply_overrides(cfg, ["train.progress=false"] + args.overrides + switches[name])
            validate(cfg)
            train(cfg, os.path.join(args.output_dir, name),
                  log=lambda m, name=name: print(f"[{name}] {m}", flush=True))
    results = {}
    for name in ("plain", "reversible", "reversible_ckpt"):
        path = os.path.join(args.output_dir, name, "summary.json")   # written by lm.train.train
        if os.path.isfile(path):
            with open(path) as f:
                s = json.load(f)
            results[name] = {k: s[k] for k in ("val_loss", "train_loss", "best_val_loss", "ms_per_step",
                                                "wall_s", "steps")}
    base = results.get("plain")
    lines = ["| model | steps | final train loss | final val loss | Δ val vs plain | median ms/step | wall s |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        d = f"{r['val_loss'] - base['val_loss']:+.4f}" if base else "n/a"
        lines.append(f"| {name} | {r['steps']} | {r['train_loss']:.4f} | {r['val_loss']:.4f} | {d} | "
                     f"{r['ms_per_step']:.1f} | {r['wall_s']:.0f} |")
    report = "\n".join(lines)
    if base:
        for name, r in results.items():
            if name != "plain":
                gap = r["val_loss"] - base["val_loss"]
                verdict = "meets" if gap <= TARGET else "misses"
                report += f"\n\n{name}: validation loss {gap:+.4f} from plain ({verdict} the target of +{TARGET})"
    report += (f"\n\nconfig {args.config}, overrides {args.overrides or 'none'}; machine "
               f"{platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}, minigrad {mg.__version__}\n")
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "report.md"), "w") as f:
        f.write(report)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
