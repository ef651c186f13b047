"""Knowledge distillation: a student learns from a frozen teacher's soft targets.

The loss of one batch is

    loss = alpha * CE(student, data) + (1 - alpha) * T^2 * D(teacher || student)

where both distributions are softmaxes at temperature ``T`` (``p = softmax(t / T)`` for the
teacher's logits ``t``, ``q = softmax(s / T)`` for the student's ``s``) and ``D`` is one of

- ``forward_kl``: KL(p || q) = sum p (log p - log q), Hinton et al.'s loss (mode-covering);
- ``reverse_kl``: KL(q || p), MiniLLM's choice (mode-seeking: the student puts its mass where
  the teacher's is, instead of spreading it over everything the teacher allows);
- ``jsd``: the Jensen-Shannon divergence, 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q) / 2.

**Normalisation (the one place it is written down).** ``D`` is summed over the vocabulary and
averaged over every position of the batch, N = B * T rows: PyTorch's ``kl_div(...,
reduction="batchmean")`` on logits reshaped to (N, V), not ``reduction="mean"`` (which also
divides by V) and not a sum over positions (which grows with the sequence length). CE is the
usual mean over the same N positions, so both terms are "nats per token" and ``alpha`` mixes
like with like; the loss does not change with B or T. Every position counts (lm.train's
batches have no padding, so there is no ignore_index here). The ``T^2`` factor keeps the soft term's
gradient, which scales as 1/T, at the size of CE's whatever the temperature: for forward KL,
d loss / d s = T (q - p) / N per position (times 1 - alpha).

``Divergence`` is one autograd node with a hand-written backward (the gradients are exact
closed forms; the composite from log_softmax would keep five (N, V) temporaries). Only the
student's logits get a gradient; the teacher's logits are a constant.

The teacher (``distill.teacher=<model folder>``) is any folder ``lm.loader.load_model`` opens
(minigrad, quantized, pruned, hf-gpt2, lora), may have another size, runs in eval mode under
``no_grad`` on ``distill.teacher_device`` (default: the student's), and is not given to the optimizer,
so it costs no optimizer state. Its tokenizer must be the student's (same ids for the same
tokens); a different one is an error before anything is written. The teacher runs on training
batches only: evaluations report the student's cross-entropy, as without distillation.
Cached top-k teacher logits are not implemented (the teachers here are small enough to run).
"""
from __future__ import annotations

import math
import os

import numpy as np

import minigrad as mg
from minigrad import backend
from minigrad.tensor import Function, Tensor

from .config import ConfigError

KINDS = ("forward_kl", "reverse_kl", "jsd")
_LOG2 = math.log(2.0)


def _log_softmax(z, xp):
    m = z.max(axis=-1, keepdims=True)
    z = z - m
    return z - xp.log(xp.exp(z).sum(axis=-1, keepdims=True))


class Divergence(Function):
    """T^2 * D(teacher || student) averaged over rows, for logits ``s`` (student) and ``t``
    (teacher) of shape (N, V); gradient to ``s`` only."""

    def __init__(self, kind: str = "forward_kl", temperature: float = 1.0):
        if kind not in KINDS:
            raise ValueError(f"distill kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"distill temperature must be a positive number, got {temperature!r}")
        self.kind, self.T = kind, float(temperature)

    def forward(self, s, t):
        xp = backend.get_array_module(s)
        T, N = self.T, s.shape[0]
        t = t.astype(s.dtype, copy=False)
        ls = _log_softmax(s / T, xp)          # log q
        lt = _log_softmax(t / T, xp)          # log p
        q = xp.exp(ls)
        if self.kind == "forward_kl":
            p = xp.exp(lt)
            d = (p * (lt - ls)).sum(axis=-1)                  # (N,)
            g = q - p                                           # d KL(p||q) / d (s/T)
        elif self.kind == "reverse_kl":
            r = ls - lt
            d = (q * r).sum(axis=-1)
            g = q * (r - d[:, None])                            # softmax Jacobian applied to log q - log p
        else:
            p = xp.exp(lt)
            lm = xp.logaddexp(lt, ls) - _LOG2                   # log m, m = (p + q) / 2
            d = 0.5 * (p * (lt - lm)).sum(axis=-1) + 0.5 * (q * (ls - lm)).sum(axis=-1)
            h = 0.5 * (ls - lm)                                 # d JSD / d q
            g = q * (h - (q * h).sum(axis=-1, keepdims=True))
        g *= T / N                                              # T^2 * (1/T) * (1/N)
        self.save_for_backward(g)
        return xp.asarray(T * T * d.sum() / N, dtype=s.dtype)

    def backward(self, gy):
        (g,) = self.saved
        return (g * gy).astype(g.dtype, copy=False), None


def divergence(student_logits, teacher_logits, kind: str = "forward_kl", temperature: float = 1.0):
    """T^2 * D(teacher || student), summed over the last axis, averaged over all other positions
    ("batchmean" over B * T rows). ``teacher_logits``: an array or Tensor (treated as constant)."""
    s = student_logits if isinstance(student_logits, Tensor) else Tensor(student_logits)
    t = teacher_logits.data if isinstance(teacher_logits, Tensor) else teacher_logits
    if tuple(s.shape) != tuple(t.shape):
        raise ValueError(f"distill: student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ "
                         f"in shape")
    V = s.shape[-1]
    return Divergence(kind, temperature)(s.reshape(-1, V), t.reshape(-1, V))


def distill_loss(student_logits, teacher_logits, ce, kind: str = "forward_kl", temperature: float = 1.0,
                 alpha: float = 0.5):
    """(loss, kd): alpha * ce + (1 - alpha) * kd, kd = ``divergence(...)``; ``ce`` is the student's
    cross-entropy on the data (a Tensor)."""
    kd = divergence(student_logits, teacher_logits, kind, temperature)
    if alpha == 1.0:
        return ce, kd
    if alpha == 0.0:
        return kd, kd
    return ce * alpha + kd * (1.0 - alpha), kd


# --------------------------------------------------------------------------- the teacher
def _tokenizer_key(tok):
    to_json = getattr(tok, "to_json", None)
    return (type(tok).__name__, to_json() if callable(to_json) else None, tok.vocab_size)


class Teacher:
    """A frozen model whose logits are the soft targets: eval mode, no_grad, no gradients."""

    def __init__(self, model, path: str = "", device: str | None = None):
        self.model, self.path = model, path
        self.device = device or model.device
        model.eval()
        for p in model.parameters():
            p.requires_grad = False

    def logits(self, x, y, like=None):
        """The teacher's logits (B, T, V) for input ids ``x`` as a raw array, on the device of
        ``like`` (the student's logits) when given."""
        with mg.no_grad():
            logits, _ = self.model(backend.to_device(x, self.device), backend.to_device(y, self.device))
        out = logits.data
        if like is not None and backend.device_of(out) != backend.device_of(like):
            out = backend.to_device(out, backend.device_of(like))
        return out


def load_teacher(dcfg, tokenizer, block_size: int, vocab_size: int, device: str = "cpu", log=print) -> Teacher:
    """Load and check ``dcfg.teacher`` (the ``distill`` config section) for a student with this
    tokenizer, context and vocabulary width; ConfigError on anything that does not fit."""
    from .loader import ModelDirError, load_model
    path = dcfg.teacher
    if not os.path.isdir(path):
        raise ConfigError(f"distill.teacher={path} is not a folder: pass the 'model' folder of a trained run "
                          f"(or any folder lm.generate opens)")
    dev = dcfg.teacher_device or device
    try:
        model, tok = load_model(path, dev)
    except (ModelDirError, ValueError, OSError) as e:
        raise ConfigError(f"distill.teacher={path}: {e}") from None
    if tok is None or _tokenizer_key(tok) != _tokenizer_key(tokenizer):
        what = f"{type(tok).__name__} with {tok.vocab_size} tokens" if tok is not None else "no tokenizer"
        raise ConfigError(f"distill.teacher={path} has another tokenizer ({what}) than the student "
                          f"({type(tokenizer).__name__} with {tokenizer.vocab_size} tokens): soft targets only "
                          f"mean something over the same vocabulary; train the student with the teacher's "
                          f"tokenizer (e.g. the same data.corpus and data.tokenizer)")
    t_cfg = model.config
    if t_cfg.vocab_size != vocab_size:
        raise ConfigError(f"distill.teacher={path} has {t_cfg.vocab_size} output logits, the student "
                          f"{vocab_size} (model.vocab_size): give them the same model.vocab_size")
    if t_cfg.block_size < block_size:
        raise ConfigError(f"distill.teacher={path} reads {t_cfg.block_size} tokens of context, fewer than the "
                          f"student's model.block_size={block_size}: use a student context <= "
                          f"{t_cfg.block_size}")
    n = sum(int(np.prod(p.shape)) for p in model.parameters())
    log(f"distillation: teacher {path} ({n / 1e6:.2f}M parameters, {t_cfg.n_layer} layers x {t_cfg.n_embd}), "
        f"{dcfg.kind}, temperature {dcfg.temperature:g}, alpha {dcfg.alpha:g}")
    return Teacher(model, path, dev)


def plain_loss(model, x, y):
    """The step loss without distillation: the model's cross-entropy, no extra terms."""
    _, loss = model(x, y)
    return loss, {}


def make_step_loss(dcfg=None, teacher: Teacher | None = None):
    """The training step's loss: ``fn(model, x, y) -> (loss, terms)``; ``terms`` is a dict of
    floats for metrics.jsonl ({"ce", "kd"} with a teacher, {} without)."""
    if teacher is None:
        return plain_loss
    kind, T, alpha = dcfg.kind, dcfg.temperature, dcfg.alpha

    def step_loss(model, x, y):
        logits, ce = model(x, y)                                         # (B, T, V), scalar
        loss, kd = distill_loss(logits, teacher.logits(x, y, like=logits.data), ce, kind, T, alpha)
        return loss, {"ce": ce.item(), "kd": kd.item()}

    return step_loss
