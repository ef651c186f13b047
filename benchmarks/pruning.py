"""Pruning and low rank on the trained Tiny Shakespeare reference model: every case through lm.compress.

    python benchmarks/pruning.py --data /path/to/tinyshakespeare.txt [--model_dir DIR]
        [--finetune_iters 200] [--parts unstructured,nm,structured,lowrank,combined]

The model is ``benchmarks/reference.py``'s (4 layers x 4 heads x 256, 2000 training steps), the
one the quantization benchmark measures. Each case is one ``python -m lm.compress`` run (its
flags are printed in the table), saved to a folder, loaded back through ``lm.loader`` and
measured with ``lm.report.quality`` against the dense model on the same validation windows:
validation loss, KL divergence and same-top-1. Recovery fine-tuning is ``--finetune_iters``
steps (default 200 = 10% of the 2000 training steps) of plain cross-entropy at batch
``--finetune_batch_size`` (default 8: half the training batch, so 5% of its tokens), plain
cross-entropy unless ``--finetune_distill forward_kl`` (distillation from the dense model, the
default of lm.compress since the distillation issue; the README tables were measured without).

- ``unstructured``: 50% magnitude vs 50% Wanda, before and after recovery, and the control:
  the dense model fine-tuned the same way (``dense-ft``).
- ``nm``: 2:4 magnitude vs Wanda, before and after recovery (every group checked).
- ``structured``: each ``--structured`` spec (default heads=0.25,mlp=0.4; several with ``;``): block parameters, decode
  tokens/s at batch 1 with the KV cache (``lm.report.decode_speed``: the two models timed
  alternately, median of ``--repeats``), perplexity ratio dense / pruned before and after recovery.
- ``lowrank``: ``--rank`` for each of ``--ranks``: parameters, delta loss before/after recovery,
  training step time (dense and factorized steps alternated, median).
- ``combined``: 50% Wanda (recovered) + q4_0, structured (recovered) + q4_0, structured + 50%
  Wanda + q4_0 without and with a second recovery: bytes on disk against the float32 file, and quality.

Every case is cached (its folder and a JSON of its numbers under ``$LM_BENCH_DIR/pruning-*``), so
an interrupted run resumes, and ``--parts`` can run in separate processes. Writes ``report.md`` and
``results.json`` under ``--output_dir``. Timings on a shared machine are noisy: only ratios taken in
one process, alternately, are reported.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.reference import bench_dir, reference_model_dir  # noqa: E402
from lm import compress as lc  # noqa: E402
from lm.data import get_batch, prepare_data  # noqa: E402
from lm.loader import load_model  # noqa: E402
from lm.report import decode_speed, quality  # noqa: E402
from lm.structured import block_parameters  # noqa: E402
from minigrad.io import atomic_write_text  # noqa: E402
from minigrad.prune import check_nm, sparsity_of  # noqa: E402

PARTS = ("unstructured", "nm", "structured", "lowrank", "combined")


class Bench:
    def __init__(self, args):
        self.args = args
        self.ref = args.model_dir or reference_model_dir(args.data)
        key = [os.path.abspath(self.ref), args.finetune_iters, args.finetune_batch_size, args.eval_batches, args.seed]
        if args.finetune_distill != "none":   # the cross-entropy runs keep their (earlier) cache folders
            key.append(args.finetune_distill)
        key = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:10]
        self.work = os.path.join(bench_dir(), f"pruning-{key}")
        os.makedirs(self.work, exist_ok=True)
        self.dense, self.tok = load_model(self.ref)
        self.data = prepare_data(args.data or json.load(open(os.path.join(self.ref, "config.json")))["data"]["corpus"],
                                 tokenizer=self.tok)
        self.float_bytes = os.path.getsize(os.path.join(self.ref, "model.safetensors"))

    def folder(self, name):
        return os.path.join(self.work, name)

    def case(self, name, flags, source=None, extra=None):
        """Run lm.compress once (cached) and measure the folder it wrote against the dense model."""
        path = os.path.join(self.work, name + ".json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        out = self.folder(name)
        shutil.rmtree(out, ignore_errors=True)
        src = source or self.ref
        argv = ["--model_dir", src, "--output_dir", out, "--data", self.args.data or self.data.source,
                "--seed", str(self.args.seed), "--finetune_batch_size", str(self.args.finetune_batch_size),
                "--finetune_distill", self.args.finetune_distill, "--finetune_teacher", self.ref, "--no_report", "--no_progress", *flags]
        print(f"[{time.strftime('%H:%M:%S')}] {name}: lm.compress {' '.join(flags)}", flush=True)
        t0 = time.perf_counter()
        if lc.main(argv) != 0:
            raise SystemExit(f"lm.compress failed for {name}")
        wall = time.perf_counter() - t0
        model, _ = load_model(out)
        q = quality(self.dense, model, self.data.val, self.dense.config.block_size, 16, self.args.eval_batches)
        res = {"name": name, "flags": " ".join(flags), "source": os.path.basename(src), "compress_s": wall,
               "loss_dense": q["loss_before"], "loss": q["loss_after"], "delta": q["loss_after"] - q["loss_before"],
               "ppl_ratio": math.exp(q["loss_before"] - q["loss_after"]), "kl": q["kl_divergence"],
               "same_top1": q["same_top1"], "tokens": q["tokens"],
               "bytes": os.path.getsize(os.path.join(out, "model.safetensors")),
               "params": model.num_parameters(), "block_params": block_parameters(model)}
        res["size_ratio"] = res["bytes"] / self.float_bytes
        try:
            res["sparsity"] = sparsity_of(model, ["c_attn", "c_proj", "c_fc"])["total"]
        except ValueError:   # no plain Linear left (all factorized)
            res["sparsity"] = 0.0
        if extra:
            res.update(extra(model))
        atomic_write_text(path, json.dumps(res, indent=1))
        print(f"    delta loss {res['delta']:+.4f}, ppl ratio {res['ppl_ratio']:.4f}, "
              f"{res['bytes']:,} B ({100 * res['size_ratio']:.1f}% of float32)", flush=True)
        return res

    def ft(self):
        return ["--finetune_iters", str(self.args.finetune_iters)]

    # ------------------------------------------------------------------ parts
    def unstructured(self):
        # the control: the dense model fine-tuned the same way (the reference is not fully trained,
        # so part of any "recovery" is just more training)
        rows = [self.case("dense-ft", self.ft())]
        for method in ("magnitude", "wanda"):
            for ft in (False, True):
                rows.append(self.case(f"{method}50{'-ft' if ft else ''}",
                                      ["--prune", method, "--sparsity", "0.5", *(self.ft() if ft else [])]))
        return rows

    def nm(self):
        def valid(model):
            ws = [m.weight.data for n, m in model.named_modules() if n.endswith(("c_attn", "c_proj", "c_fc"))]
            return {"every_group_2_of_4": all(check_nm(w, 2, 4) for w in ws)}
        rows = []
        for method in ("magnitude", "wanda"):
            for ft in (False, True):
                rows.append(self.case(f"{method}24{'-ft' if ft else ''}",
                                      ["--prune", method, "--pattern", "2:4", *(self.ft() if ft else [])], extra=valid))
        return rows

    @staticmethod
    def slug(spec):
        return "structured-" + spec.replace("heads=", "h").replace("mlp=", "m").replace(",", "-")

    def structured(self):
        rows = []
        for spec in self.args.structured:
            rows += self._structured(spec)
        return rows

    def _structured(self, spec):
        name = self.slug(spec)
        rows = [self.case(name, ["--structured", spec]),
                self.case(name + "-ft", ["--structured", spec, *self.ft()])]
        path = os.path.join(self.work, name + "-speed.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                speed = json.load(f)
        else:
            pruned, _ = load_model(self.folder(name + "-ft"))
            prompt = [int(t) for t in np.asarray(self.data.val[:1])]
            new = self.dense.config.block_size - len(prompt)
            s = decode_speed({"dense": self.dense, "structured": pruned}, prompt, new, self.args.repeats)
            speed = {"dense_tok_s": s["dense"], "structured_tok_s": s["structured"],
                     "speedup": s["structured"] / s["dense"], "new_tokens": new, "repeats": self.args.repeats,
                     "dense_block_params": block_parameters(self.dense)}
            atomic_write_text(path, json.dumps(speed, indent=1))
        for r in rows:
            r.update(speed)
            r["block_params_removed"] = 1 - r["block_params"] / speed["dense_block_params"]
        return rows

    def _step_ms(self, models, steps=5):
        """Median ms of a training step (batch --finetune_batch_size) per model, taken alternately."""
        rng = np.random.default_rng(0)
        T = self.dense.config.block_size
        opts = {k: m.configure_optimizer(1e-5, 0.0, (0.9, 0.99)) for k, m in models.items()}
        times = {k: [] for k in models}
        for i in range(steps + 1):
            x, y = get_batch(self.data.train, self.args.finetune_batch_size, T, rng)
            for k, m in models.items():
                m.train()
                t0 = time.perf_counter()
                _, loss = m(x, y)
                opts[k].zero_grad()
                loss.backward()
                opts[k].step()
                if i:
                    times[k].append(1e3 * (time.perf_counter() - t0))
        return {k: statistics.median(v) for k, v in times.items()}

    def lowrank(self):
        rows = []
        for r in self.args.ranks:
            for ft in (False, True):
                rows.append(self.case(f"rank{r}{'-ft' if ft else ''}", ["--rank", str(r), *(self.ft() if ft else [])]))
        path = os.path.join(self.work, "lowrank-steps.json")
        steps = {}
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                steps = json.load(f)
        if not all(f"rank{r}" in steps for r in self.args.ranks):   # timed together, in one run
            dense, _ = load_model(self.ref)
            models = {"dense": dense}
            models.update({f"rank{r}": load_model(self.folder(f"rank{r}"))[0] for r in self.args.ranks})
            steps = self._step_ms(models)
            atomic_write_text(path, json.dumps(steps, indent=1))
        for row in rows:
            key = row["name"].replace("-ft", "")
            row["step_ms"], row["dense_step_ms"] = steps[key], steps["dense"]
        return rows

    def combined(self):
        rows = [self.case("q4_0", ["--quantize", "q4_0"])]
        if not os.path.isfile(os.path.join(self.work, "wanda50-ft.json")):
            self.unstructured()
        st = self.slug(self.args.structured[0]) + "-ft"
        if not os.path.isfile(os.path.join(self.work, st + ".json")):
            self._structured(self.args.structured[0])
        rows.append(self.case("wanda50-ft+q4_0", ["--quantize", "q4_0"], source=self.folder("wanda50-ft")))
        rows.append(self.case("wanda50-ft+q4_0+f16", ["--quantize", "q4_0", "--rest_dtype", "float16"],
                              source=self.folder("wanda50-ft")))
        rows.append(self.case(st + "+q4_0", ["--quantize", "q4_0"], source=self.folder(st)))
        rows.append(self.case(st + "+q4_0+f16", ["--quantize", "q4_0", "--rest_dtype", "float16"], source=self.folder(st)))
        rows.append(self.case(st + "+wanda50+q4_0", ["--prune", "wanda", "--sparsity", "0.5", "--quantize", "q4_0"],
                              source=self.folder(st)))
        rows.append(self.case(st + "+wanda50-ft+q4_0", ["--prune", "wanda", "--sparsity", "0.5", *self.ft(),
                                                        "--quantize", "q4_0"], source=self.folder(st)))
        return rows


# --------------------------------------------------------------------------- report
def _row(r, cols):
    return "| " + " | ".join(c(r) for c in cols) + " |"


def report(results: dict, args, bench: Bench) -> str:
    L = ["# Pruning and low rank on the Tiny Shakespeare reference model", "",
         f"Model: `{bench.ref}` (dense validation loss {next(iter(results.values()))[0]['loss_dense']:.4f} on "
         f"{next(iter(results.values()))[0]['tokens']:,} tokens, {bench.float_bytes:,} B float32). Recovery: "
         f"{args.finetune_iters} steps at batch {args.finetune_batch_size}, loss "
         + ("cross-entropy (no distillation)." if args.finetune_distill == "none" else
            f"0.5 CE + 0.5 {args.finetune_distill} from the dense model."),
         "Every case is `python -m lm.compress --model_dir <source> --data <tinyshakespeare> <flags>`.", ""]
    q = [lambda r: r["name"], lambda r: f"`{r['flags']}`", lambda r: f"{r['loss']:.4f}", lambda r: f"{r['delta']:+.4f}",
         lambda r: f"{r['ppl_ratio']:.4f}", lambda r: f"{r['kl']:.4f}", lambda r: f"{100 * r['same_top1']:.1f}%",
         lambda r: f"{r['bytes'] / 2**20:.2f} MiB ({100 * r['size_ratio']:.1f}%)"]
    head = "| case | flags | val loss | delta | ppl ratio dense/pruned | KL | same top-1 | on disk (% of float32) |"
    sep = "|---|---|---|---|---|---|---|---|"
    for part, title in (("unstructured", "50% unstructured"), ("nm", "2:4"), ("structured", "Structured"),
                        ("lowrank", "Low rank (every untied Linear by truncated SVD)"), ("combined", "Combined")):
        rows = results.get(part)
        if not rows:
            continue
        L += [f"## {title}", "", head, sep] + [_row(r, q) for r in rows] + [""]
        if part == "nm":
            L.append("Every group of 4 inputs holds at most 2 non-zeros: "
                     + ", ".join(f"{r['name']} {r['every_group_2_of_4']}" for r in rows) + ".")
            L.append("")
        for r in (rows if part == "structured" else []):
            if not r["name"].endswith("-ft"):
                continue
            L.append(f"Block parameters {r['dense_block_params']:,} -> {r['block_params']:,} "
                     f"({100 * r['block_params_removed']:.1f}% fewer). Decode at batch 1 with the KV cache, "
                     f"{r['new_tokens']} new tokens, median of {r['repeats']} alternate runs: dense "
                     f"{r['dense_tok_s']:.1f} tok/s, structured {r['structured_tok_s']:.1f} tok/s, "
                     f"**{r['speedup']:.2f}x** ({r['name']}).")
            L.append("")
        if part == "lowrank":
            L += ["| rank | parameters | delta before recovery | delta after | ppl ratio after | train step ms (dense) |",
                  "|---|---|---|---|---|---|"]
            by = {r["name"]: r for r in rows}
            ok = []
            for rk in args.ranks:
                a, b = by[f"rank{rk}"], by[f"rank{rk}-ft"]
                L.append(f"| {rk} | {a['params']:,} | {a['delta']:+.4f} | {b['delta']:+.4f} | {b['ppl_ratio']:.4f} | "
                         f"{a['step_ms']:.0f} ({a['dense_step_ms']:.0f}) |")
                if b["ppl_ratio"] >= 0.95:
                    ok.append(b)
            L.append("")
            dense_p = bench.dense.num_parameters()
            if ok:
                best = min(ok, key=lambda r: r["params"])
                L.append(f"Lowest parameter count with perplexity ratio >= 0.95 after recovery: "
                         f"**{best['params']:,}** ({best['name']}; dense {dense_p:,}).")
            else:
                L.append(f"No rank tried keeps perplexity ratio >= 0.95 after recovery (dense {dense_p:,} parameters).")
            L.append("")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="tinyshakespeare.txt (default: the reference model's corpus)")
    p.add_argument("--model_dir", default=None, help="measure this model instead of the reference one")
    p.add_argument("--output_dir", default="benchmarks/results/pruning")
    p.add_argument("--finetune_iters", type=int, default=200)
    p.add_argument("--finetune_batch_size", type=int, default=8)
    p.add_argument("--finetune_distill", default="none", choices=("none", "forward_kl", "reverse_kl", "jsd"),
                   help="recovery loss (lm.compress --finetune_distill; the tables in README: none)")
    p.add_argument("--eval_batches", type=int, default=8, help="validation batches of 16 x block_size")
    p.add_argument("--structured", default="heads=0.25,mlp=0.4", type=lambda s: s.split(";"),
                   help="one or more specs separated by ';' (the first is combined with q4_0)")
    p.add_argument("--ranks", default="32,64,128", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", default=",".join(PARTS), type=lambda s: [x for x in s.split(",") if x])
    args = p.parse_args(argv)
    bad = sorted(set(args.parts) - set(PARTS))
    if bad:
        print(f"error: unknown part(s) {bad}; valid: {', '.join(PARTS)}", file=sys.stderr)
        return 2
    bench = Bench(args)
    results = {part: getattr(bench, part)() for part in PARTS if part in args.parts}
    md = report(results, args, bench)
    os.makedirs(args.output_dir, exist_ok=True)
    atomic_write_text(os.path.join(args.output_dir, "report.md"), md)
    atomic_write_text(os.path.join(args.output_dir, "results.json"), json.dumps(results, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
