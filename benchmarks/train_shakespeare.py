"""Train the nanoGPT CPU configuration on Tiny Shakespeare and report the losses.

    python benchmarks/train_shakespeare.py --data /path/to/tinyshakespeare.txt

Configuration (nanoGPT's "I only have a macbook" run): character level, n_layer 4,
n_head 4, n_embd 128, block 64, batch 12, 2000 iterations, lr 1e-3 cosine-decayed to
1e-4 after 100 warmup steps, weight decay 0.1, beta2 0.99, grad clip 1.0, dropout 0,
90/10 split, and nanoGPT's model defaults: no biases, exact GELU. The target is the validation loss PyTorch reaches with it (1.886 on our
machine). Writes summary.json and report.md under --output_dir.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import minigrad as mg  # noqa: E402
from lm.config import Config, apply_overrides, validate  # noqa: E402
from lm.data import prepare_data  # noqa: E402
from lm.train import estimate_loss, train  # noqa: E402

NANOGPT_CPU = [
    "model.block_size=64", "model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.dropout=0.0",
    # nanoGPT's defaults, which its CPU command does not change: no biases, exact GELU (nn.GELU())
    "model.bias=false", "model.gelu=exact", "data.tokenizer=char", "data.val_fraction=0.1",
    "train.batch_size=12", "train.max_iters=2000", "train.learning_rate=1e-3", "train.min_lr=1e-4",
    "train.warmup_iters=100", "train.lr_decay_iters=2000", "train.weight_decay=0.1", "train.beta1=0.9",
    "train.beta2=0.99", "train.grad_clip=1.0", "train.eval_interval=250", "train.eval_iters=20",
]
REFERENCE_VAL = 1.886  # PyTorch (nanoGPT) on this configuration, measured on our 2-core machine


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="shakespeare", help="path to tinyshakespeare.txt (or 'shakespeare')")
    p.add_argument("--output_dir", default="benchmarks/results/shakespeare")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--final_eval_iters", type=int, default=200,
                   help="batches per split for a lower-noise final estimate")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = Config()
    apply_overrides(cfg, NANOGPT_CPU + [f"train.seed={args.seed}", "train.sample_tokens=300"] + args.overrides)
    cfg.data.corpus = args.data
    validate(cfg)
    t0 = time.perf_counter()
    summary = train(cfg, args.output_dir)
    wall = time.perf_counter() - t0
    # a second estimate on 200 batches per split, from the final weights, for less noise
    from lm.generate import load_model
    from lm.train import GPT  # noqa: F401
    import lm.train as lt
    from minigrad.io import load_file
    model = lt.GPT(cfg.model)
    ck = load_file(os.path.join(args.output_dir, "checkpoint.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in ck.items() if k.startswith("model.")})
    data = prepare_data(cfg.data.corpus, tokenizer_kind="char", val_fraction=0.1)
    cfg.train.eval_iters = args.final_eval_iters
    big = estimate_loss(model, data, cfg, seed=12345)
    rows = [
        ("final train loss (20 batches)", f"{summary['train_loss']:.4f}"),
        ("final val loss (20 batches)", f"{summary['val_loss']:.4f}"),
        (f"final train loss ({args.final_eval_iters} batches)", f"{big['train']:.4f}"),
        (f"final val loss ({args.final_eval_iters} batches)", f"{big['val']:.4f}"),
        ("PyTorch reference val loss", f"{REFERENCE_VAL}"),
        ("wall time (s, incl. evals)", f"{wall:.1f}"),
        ("median ms/step", f"{summary['ms_per_step']:.1f}"),
        ("tokens/s", f"{12 * 64 / summary['ms_per_step'] * 1e3:,.0f}"),
    ]
    report = "| metric | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    report += f"\n\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
              f"numpy {np.__version__}, minigrad {mg.__version__}\n"
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "report.md"), "w") as f:
        f.write(report)
    with open(os.path.join(args.output_dir, "bench.json"), "w") as f:
        json.dump({**summary, "final_big": big, "wall_total_s": wall}, f, indent=2)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
