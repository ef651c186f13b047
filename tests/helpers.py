"""One helper that checks an op three ways (in the spirit of tinygrad's ``helper_test_op``).

``helper_test_op(shapes, mg_fn, torch_fn)`` builds float64 inputs, then checks

1. the gradient against central differences (``minigrad.gradcheck``, the oracle);
2. forward and gradients on ``device`` against the CPU result;
3. forward and gradients against PyTorch, when ``torch_fn`` is given.

Gradients are those of ``sum_i sum(out_i * w_i)`` with fixed random ``w_i``, so every
output element (and every output of a multi-output op) takes part.
"""
from __future__ import annotations

import numpy as np

import minigrad as mg
from minigrad.gradcheck import gradcheck


def make_inputs(shapes, low=-2.0, high=2.0, seed=0) -> list:
    """A tuple entry is a shape (uniform float64 in [low, high)); anything else is a value, copied."""
    rng = np.random.default_rng(seed)
    return [rng.uniform(low, high, s) if isinstance(s, tuple) else np.array(s) for s in shapes]


def _as_list(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _is_float(a) -> bool:
    return a.dtype.kind == "f"


def run_minigrad(fn, arrays, weights=None, device="cpu"):
    """Outputs, input gradients (zeros where none arrived) and the weights used, all as NumPy."""
    ts = [mg.Tensor(a, requires_grad=_is_float(a), device=device) for a in arrays]
    outs = _as_list(fn(*ts))
    if weights is None:
        rng = np.random.default_rng(1234)
        weights = [rng.standard_normal(o.shape) for o in outs]
    loss = None
    for o, w in zip(outs, weights):
        if o.requires_grad:
            term = (o * mg.Tensor(w, device=device)).sum()
            loss = term if loss is None else loss + term
    if loss is not None:
        loss.backward()
    grads = [None if not _is_float(a) else (np.zeros_like(a) if t.grad is None else t.grad.numpy())
             for a, t in zip(arrays, ts)]
    return [o.numpy() for o in outs], grads, weights


def run_torch(fn, arrays, weights):
    import torch
    ts = [torch.tensor(a, requires_grad=_is_float(a)) for a in arrays]
    outs = _as_list(fn(*ts))
    loss = None
    for o, w in zip(outs, weights):
        if o.requires_grad:
            term = (o * torch.from_numpy(np.asarray(w))).sum()
            loss = term if loss is None else loss + term
    if loss is not None:
        loss.backward()
    grads = [None if not _is_float(a) else (np.zeros_like(a) if t.grad is None else t.grad.numpy())
             for a, t in zip(arrays, ts)]
    return [o.detach().numpy() for o in outs], grads


def assert_close(actual, expected, what: str, atol=1e-8, rtol=1e-6) -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol, err_msg=what)


def _on_device(fn, device):
    """``fn`` run on ``device`` with CPU tensors in and out (ToDevice is differentiable)."""
    def wrapped(*ts):
        outs = fn(*[t.to(device) for t in ts])
        moved = [o.to("cpu") for o in _as_list(outs)]
        return moved if isinstance(outs, (tuple, list)) else moved[0]
    return wrapped


def helper_test_op(shapes, mg_fn, torch_fn=None, *, low=-2.0, high=2.0, device="cpu",
                   numerical=True, finite=True, atol=1e-8, rtol=1e-6, seed=0):
    """Check ``mg_fn``: numerical gradient (``numerical``), ``device`` vs CPU, and ``torch_fn`` if given.

    ``finite=False`` allows inf/nan outputs.
    """
    arrays = make_inputs(shapes, low, high, seed)
    outs, grads, weights = run_minigrad(mg_fn, arrays)
    for i, o in enumerate(outs):
        if _is_float(o):
            assert o.dtype == np.float64, f"output {i}: float64 inputs gave {o.dtype}"
            if finite:
                assert np.all(np.isfinite(o)), f"output {i} is not finite:\n{o}"
    if numerical:
        gradcheck(mg_fn if device == "cpu" else _on_device(mg_fn, device), arrays,
                  name=getattr(mg_fn, "__name__", "op"))
    if device != "cpu":
        outs_d, grads_d, _ = run_minigrad(mg_fn, arrays, weights, device=device)
        for i, (a, b) in enumerate(zip(outs_d, outs)):
            assert_close(a, b, f"output {i} on {device} vs cpu", atol, rtol)
        for i, (a, b) in enumerate(zip(grads_d, grads)):
            if b is not None:
                assert_close(a, b, f"gradient of input {i} on {device} vs cpu", atol, rtol)
    if torch_fn is not None:
        t_outs, t_grads = run_torch(torch_fn, arrays, weights)
        assert len(t_outs) == len(outs), f"{len(outs)} outputs, torch gives {len(t_outs)}"
        for i, (a, b) in enumerate(zip(outs, t_outs)):
            assert_close(a, b, f"output {i} vs torch", atol, rtol)
        for i, (a, b) in enumerate(zip(grads, t_grads)):
            if b is not None:
                assert_close(a, b, f"gradient of input {i} vs torch", atol, rtol)
    return outs, grads


def tiny_model_folder(root) -> None:
    """An untrained 2-layer, 64-wide char GPT saved as ``root/model``, with its corpus at
    ``root/corpus.txt`` (short sentences of a dozen words): the input of the lm.compress tests."""
    from lm.config import Config, apply_overrides
    from lm.model import GPT
    from lm.tokenizer import build_tokenizer
    from lm.train import save_model_dir
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home"]
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words, size=8)) + "." for _ in range(300)))
    tok = build_tokenizer("char", corpus.read_text())
    cfg = apply_overrides(Config(), ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=32",
                                     f"model.vocab_size={tok.vocab_size}", f"data.corpus={corpus}",
                                     f"data.cache_dir={root}/cache"])
    save_model_dir(str(root / "model"), GPT(cfg.model), tok, cfg)
