"""Train the nanoGPT CPU configuration on Tiny Shakespeare and report the losses.

    python benchmarks/train_shakespeare.py --data /path/to/tinyshakespeare.txt

Configuration (nanoGPT's "I only have a macbook" run): character level, n_layer 4,
n_head 4, n_embd 128, block 64, batch 12, 2000 iterations, lr 1e-3 cosine-decayed to
1e-4 after 100 warmup steps, weight decay 0.1, beta2 0.99, grad clip 1.0, dropout 0,
90/10 split; GPT-2's biases and tanh GELU (nanoGPT's defaults, no biases and exact GELU, are
``model.bias=false model.gelu=exact``).

``--torch`` also trains the PyTorch twin of ``benchmarks/compare_torch.py`` from the same
initial weights on the same batches with the same schedule, and evaluates both on the same
batches: what is left between the two is then the engines, not the random streams. The target is the validation loss PyTorch reaches with it (1.886 on our
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
import lm.train as lt  # noqa: E402
from lm.train import estimate_loss, train  # noqa: E402

NANOGPT_CPU = [
    "model.block_size=64", "model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.dropout=0.0",
    "model.bias=true", "model.gelu=tanh", "data.tokenizer=char", "data.val_fraction=0.1",
    "train.batch_size=12", "train.max_iters=2000", "train.learning_rate=1e-3", "train.min_lr=1e-4",
    "train.warmup_iters=100", "train.lr_decay_iters=2000", "train.weight_decay=0.1", "train.beta1=0.9",
    "train.beta2=0.99", "train.grad_clip=1.0", "train.eval_interval=250", "train.eval_iters=20",
]
REFERENCE_VAL = 1.886  # PyTorch (nanoGPT) on this configuration, measured on our 2-core machine


def train_torch_twin(cfg: Config, data, eval_iters: int) -> dict:
    """Train the PyTorch twin exactly as lm.train trains ours; evaluate on the same batches."""
    import torch
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from compare_torch import torch_twin
    from lm.data import get_batch
    from minigrad.optim import cosine_lr
    t, m = cfg.train, cfg.model
    mg.manual_seed(t.seed)                          # the same initial weights as our run
    tm = torch_twin(lt.GPT(m))
    params = [p for p in tm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=t.learning_rate, betas=(t.beta1, t.beta2), eps=1e-8)
    rng = np.random.default_rng(t.seed)             # the same batches as our run
    t0 = time.perf_counter()
    for step in range(t.max_iters):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, t.learning_rate, t.warmup_iters, t.lr_decay_iters or t.max_iters, t.min_lr)
        x, y = get_batch(data.train, t.batch_size, m.block_size, rng)
        _, loss = tm(torch.from_numpy(x), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tm.parameters(), t.grad_clip)
        opt.step()
    wall = time.perf_counter() - t0
    out = {"wall_s": wall}
    with torch.no_grad():
        for split in ("train", "val"):
            r, losses = np.random.default_rng(12345), []   # the batches of our final estimate
            for _ in range(eval_iters):
                x, y = get_batch(data.split(split), t.batch_size, m.block_size, r)
                losses.append(tm(torch.from_numpy(x), torch.from_numpy(y))[1].item())
            out[split] = float(np.mean(losses))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="shakespeare", help="path to tinyshakespeare.txt (or 'shakespeare')")
    p.add_argument("--output_dir", default="benchmarks/results/shakespeare")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--final_eval_iters", type=int, default=200,
                   help="batches per split for a lower-noise final estimate")
    p.add_argument("--torch", action="store_true", help="also train the PyTorch twin side by side")
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
    from minigrad.io import load_file
    model = lt.GPT(cfg.model)
    ck = load_file(os.path.join(args.output_dir, "checkpoint.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in ck.items() if k.startswith("model.")})
    data = prepare_data(cfg.data.corpus, tokenizer_kind="char", val_fraction=0.1, cache_dir=cfg.data.cache_dir)
    cfg.train.eval_iters = args.final_eval_iters
    big = estimate_loss(model, data, cfg, seed=12345)
    torch_res = train_torch_twin(cfg, data, args.final_eval_iters) if args.torch else None
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
    if torch_res:
        rows += [(f"PyTorch twin, same init and batches: train loss ({args.final_eval_iters} batches)",
                  f"{torch_res['train']:.4f}"),
                 (f"PyTorch twin, same init and batches: val loss ({args.final_eval_iters} batches)",
                  f"{torch_res['val']:.4f}"),
                 ("PyTorch twin wall time (s)", f"{torch_res['wall_s']:.1f}")]
    report = "| metric | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    report += f"\n\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
              f"numpy {np.__version__}, minigrad {mg.__version__}\n"
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "report.md"), "w") as f:
        f.write(report)
    with open(os.path.join(args.output_dir, "bench.json"), "w") as f:
        json.dump({**summary, "final_big": big, "wall_total_s": wall, "torch": torch_res}, f, indent=2)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
