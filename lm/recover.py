"""Recovery fine-tuning after pruning or factorization: a few AdamW steps, distilled from the dense model.

``finetune(model, tokens, iters)`` trains the compressed model on the training split for a
few hundred steps so that the remaining weights make up for the removed ones. Pruning masks
stay in force (``minigrad.prune``: gradients are masked and the optimizer re-applies the
mask), so a 50% sparse model is still exactly 50% sparse afterwards, and a structured or
low-rank model keeps its shapes.

The loss is next-token cross-entropy, or, with ``teacher`` (an ``lm.distill.Teacher``: in
``lm.compress``, the model as it was before pruning), ``lm.distill``'s
alpha * CE + (1 - alpha) * T^2 * D(teacher || student): the compressed model is pulled back
towards the dense model's whole next-token distribution, not only its top token, which is
what the pruning recovery of Sheared-LLaMA and Minitron does.
"""
from __future__ import annotations

import math

import numpy as np

import minigrad as mg
from minigrad import backend

from .data import get_batch
from .distill import distill_loss


def finetune(model, tokens: np.ndarray, iters: int, lr: float = 3e-4, batch_size: int = 16,
             weight_decay: float = 0.1, warmup: int = 10, grad_clip: float = 1.0, seed: int = 0,
             progress: bool = False, teacher=None, kind: str = "forward_kl", temperature: float = 1.0,
             alpha: float = 0.5) -> list:
    """``iters`` AdamW steps on random windows of ``tokens``; returns the training losses.

    The learning rate warms up over ``warmup`` steps and decays by a cosine to lr / 10, the
    schedule of ``lm.train`` over a short run. With ``teacher`` (``lm.distill.Teacher``) the
    loss is the distillation loss of ``kind``, ``temperature``, ``alpha`` (see lm.distill)."""
    if iters < 0:
        raise ValueError(f"finetune: iters must be >= 0, got {iters}")
    losses = []
    if iters == 0:
        return losses
    block = model.config.block_size
    rng = np.random.default_rng(seed)
    opt = model.configure_optimizer(lr, weight_decay, (0.9, 0.99))
    model.train()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=iters, desc="recovery fine-tune", unit="step", dynamic_ncols=True)
    dev = model.device
    try:
        for step in range(iters):
            opt.set_lr(mg.optim.cosine_lr(step, lr, min(warmup, iters // 2), iters, lr / 10))
            x, y = get_batch(tokens, batch_size, block, rng)
            if dev != "cpu":
                x, y = backend.to_device(x, dev), backend.to_device(y, dev)
            logits, loss = model(x, y)
            if teacher is not None:
                loss, _ = distill_loss(logits, teacher.logits(x, y, like=logits.data), loss, kind, temperature,
                                       alpha)
            lossf = loss.item()
            if not math.isfinite(lossf):
                raise ValueError(f"recovery fine-tune diverged (loss {lossf}) at step {step}: try a lower lr")
            opt.zero_grad()
            loss.backward()
            if grad_clip > 0:
                mg.optim.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            losses.append(lossf)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{lossf:.4f}")
    finally:
        if bar is not None:
            bar.close()
        model.eval()
    return losses
