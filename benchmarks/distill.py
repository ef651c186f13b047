"""Knowledge distillation on Tiny Shakespeare: a small student with and without a teacher.

    OPENBLAS_NUM_THREADS=1 python benchmarks/distill.py --data /path/to/tinyshakespeare.txt
        [--teacher_dir DIR] [--student 2x128] [--steps 300] [--seeds 0,1,2] [--kinds forward_kl,reverse_kl]

The teacher is ``benchmarks/reference.py``'s model (4 layers x 4 heads x 256, 2000 steps, val
loss 1.579; trained once and cached, reused here instead of training a 6 x 256 one). The
student (default 2 layers x 4 heads x 128) is trained by ``lm.train`` on the same text with the
same tokenizer, once per seed with cross-entropy alone and once per seed and ``--kinds`` with
``distill.teacher`` (alpha ``--alpha``, temperature ``--temperature``): the same steps, batches
(``train.seed`` draws both the initial weights and the batches), learning-rate schedule and
evaluation for every run of one seed.

Every model is then measured on the same windows of the validation split, the whole split
(``lm.report.quality``: the teacher's logits computed once): validation loss per run, mean
± sd over the seeds, and DistilGPT2's three numbers for the forward-KL student of the first
seed against the teacher: x% smaller (parameters; bytes of model.safetensors), y x faster
decoding (tokens/s of greedy decoding with the KV cache at batch 1, teacher and student timed
alternately in this process, median of ``--repeats``; ``lm.report.decode_speed``) and z%
quality (teacher perplexity / student perplexity).

Each run is cached under ``$LM_BENCH_DIR/distill-<hash>/`` (its lm.train folder), so an
interrupted benchmark continues where it stopped. Writes ``results.json`` and ``report.md``
there (``-a<alpha>-T<temperature>``) and prints the table. Timings on a shared machine are noisy: only ratios taken in one
process, alternately, are reported.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.reference import bench_dir, find_corpus, reference_model_dir  # noqa: E402
from lm.config import Config, apply_overrides, validate  # noqa: E402
from lm.data import prepare_data  # noqa: E402
from lm.loader import load_model  # noqa: E402
from lm.report import decode_speed, folder_bytes, quality  # noqa: E402
from minigrad.io import atomic_write_text  # noqa: E402


def student_overrides(args) -> list[str]:
    n_layer, n_embd = (int(v) for v in args.student.lower().split("x"))
    return [
        "model.block_size=128", f"model.n_layer={n_layer}", "model.n_head=4", f"model.n_embd={n_embd}",
        "model.dropout=0.0", "data.tokenizer=char", "data.val_fraction=0.1",
        f"train.batch_size={args.batch_size}", f"train.max_iters={args.steps}",
        f"train.learning_rate={args.lr}", f"train.min_lr={args.lr / 10}", f"train.warmup_iters={args.warmup}",
        f"train.lr_decay_iters={args.steps}", "train.weight_decay=0.1", "train.beta1=0.9", "train.beta2=0.99",
        "train.grad_clip=1.0", f"train.eval_interval={args.steps}", "train.eval_iters=4",
        "train.sample_tokens=0", "train.progress=false",
    ]


def run_student(args, root: str, teacher_dir: str, seed: int, kind: str | None, log=print) -> str:
    """Train one student (cached); returns its lm.train folder."""
    from lm.train import train
    name = f"{kind}-a{args.alpha:g}-T{args.temperature:g}-s{seed}" if kind else f"ce-s{seed}"
    out = os.path.join(root, name)
    if os.path.isfile(os.path.join(out, "summary.json")):
        return out
    over = student_overrides(args) + [f"train.seed={seed}", f"data.corpus={find_corpus(args.data)}"]
    if kind:
        over += [f"distill.teacher={teacher_dir}", f"distill.kind={kind}",
                 f"distill.temperature={args.temperature}", f"distill.alpha={args.alpha}"]
    cfg = apply_overrides(Config(), over)
    validate(cfg)
    log(f"training student {name} ({args.steps} steps)")
    t0 = time.perf_counter()
    train(cfg, out, resume=os.path.isfile(os.path.join(out, "checkpoint.safetensors")), log=lambda *a: None)
    log(f"  {name}: {time.perf_counter() - t0:.0f} s")
    return out


def n_params(model) -> int:
    return sum(int(p.data.size) for p in model.parameters())


def mean_sd(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="path to tinyshakespeare.txt (default: the built-in name)")
    p.add_argument("--teacher_dir", default=None, help="teacher model folder (default: the reference model)")
    p.add_argument("--student", default="2x128", help="student shape LAYERSxWIDTH (4 heads)")
    p.add_argument("--steps", type=int, default=300, help="training steps of every student")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the students")
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--kinds", default="forward_kl,reverse_kl", help="distillation kinds to run")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--decode_tokens", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    kinds = [k for k in args.kinds.split(",") if k.strip()]
    teacher_dir = args.teacher_dir or reference_model_dir(args.data)
    key = hashlib.sha256(json.dumps([os.path.abspath(teacher_dir), student_overrides(args)]).encode()).hexdigest()[:10]
    root = os.path.join(bench_dir(), f"distill-{key}")
    os.makedirs(root, exist_ok=True)
    print(f"teacher {teacher_dir}; runs under {root}")
    t_start = time.perf_counter()
    runs = {}
    for seed in seeds:       # one seed's runs side by side: the same batches for each
        for kind in [None] + kinds:
            runs[(kind or "ce", seed)] = run_student(args, root, teacher_dir, seed, kind)
    train_s = time.perf_counter() - t_start

    teacher, tok = load_model(teacher_dir)
    data = prepare_data(find_corpus(args.data), tokenizer=tok, val_fraction=0.1)
    cache: dict = {}
    losses: dict = {}
    for (kind, seed), out in runs.items():
        student, _ = load_model(os.path.join(out, "model"))
        q = quality(teacher, student, data.val, 128, batch_size=16, cache=cache)
        losses.setdefault(kind, {})[seed] = q["loss_after"]
        teacher_loss = q["loss_before"]

    first = runs[(kinds[0] if kinds else "ce", seeds[0])]
    student, _ = load_model(os.path.join(first, "model"))
    prompt = tok.encode("ROMEO:\n")
    speed = decode_speed({"teacher": teacher, "student": student}, prompt, args.decode_tokens, args.repeats)
    tb, sb = folder_bytes(teacher_dir)["weights"], folder_bytes(os.path.join(first, "model"))["weights"]
    tp, sp = n_params(teacher), n_params(student)
    stats = {k: mean_sd(list(v.values())) for k, v in losses.items()}
    best = stats[kinds[0] if kinds else "ce"][0]
    res = {"teacher_dir": teacher_dir, "teacher_val_loss": teacher_loss, "student": args.student,
           "steps": args.steps, "seeds": seeds, "alpha": args.alpha, "temperature": args.temperature,
           "val_loss": losses, "val_loss_mean_sd": stats,
           "params": {"teacher": tp, "student": sp, "smaller_pct": 100 * (1 - sp / tp)},
           "bytes": {"teacher": tb, "student": sb, "smaller_pct": 100 * (1 - sb / tb)},
           "decode_tokens_per_s": speed, "decode_speedup": speed["student"] / speed["teacher"],
           "quality_pct": 100 * math.exp(teacher_loss - best), "train_wall_s": train_s,
           "wall_s": time.perf_counter() - t_start}
    tag = f"a{args.alpha:g}-T{args.temperature:g}"
    atomic_write_text(os.path.join(root, f"results-{tag}.json"), json.dumps(res, indent=1))
    lines = [f"Teacher {os.path.basename(os.path.dirname(teacher_dir))} (val loss {teacher_loss:.4f}, "
             f"perplexity {math.exp(teacher_loss):.3f}); student {args.student}, {args.steps} steps at batch "
             f"{args.batch_size}, lr {args.lr:g}; distillation alpha {args.alpha:g}, T {args.temperature:g}; "
             f"seeds {', '.join(map(str, seeds))}. Validation loss on the whole validation split.", "",
             "| student loss | val loss (mean ± sd) | per seed | perplexity | quality (teacher ppl / student ppl) |",
             "|---|---|---|---|---|"]
    for kind, (m, s) in stats.items():
        per = ", ".join(f"{losses[kind][sd]:.4f}" for sd in seeds)
        lines.append(f"| {'cross-entropy only' if kind == 'ce' else kind} | {m:.4f} ± {s:.4f} | {per} | "
                     f"{math.exp(m):.3f} | {100 * math.exp(teacher_loss - m):.1f}% |")
    lines += ["", "| DistilGPT2-style ({} student, seed {}) | teacher | student | |".format(
        kinds[0] if kinds else "ce", seeds[0]), "|---|---|---|---|",
        f"| parameters | {tp:,} | {sp:,} | {res['params']['smaller_pct']:.1f}% smaller |",
        f"| bytes (model.safetensors) | {tb:,} | {sb:,} | {res['bytes']['smaller_pct']:.1f}% smaller |",
        f"| decode tokens/s (batch 1, KV cache, greedy, median of {args.repeats}) | {speed['teacher']:.0f} | "
        f"{speed['student']:.0f} | {res['decode_speedup']:.2f}x faster |",
        f"| val perplexity (student: mean loss over the seeds) | {math.exp(teacher_loss):.3f} | {math.exp(best):.3f} | "
        f"{res['quality_pct']:.1f}% quality |",
        "", f"Training {train_s:.0f} s (cached runs: 0), whole benchmark {res['wall_s']:.0f} s."]
    text = "\n".join(lines)
    atomic_write_text(os.path.join(root, f"report-{tag}.md"), text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
