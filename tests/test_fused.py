"""Each fused node equals the composite it replaces, in value and gradient (float64)."""
import numpy as np
import pytest

import minigrad as mg
from minigrad import functional as F
from minigrad.gradcheck import gradcheck


def _both(fn_fused, fn_comp, *arrays, int_args=()):
    outs = []
    for fn in (fn_fused, fn_comp):
        ts = [mg.Tensor(a.copy(), requires_grad=True) for a in arrays]
        y = fn(*ts, *int_args)
        w = np.random.default_rng(9).standard_normal(y.shape)
        (y * mg.Tensor(w)).sum().backward()
        outs.append((y.data, [t.grad.data for t in ts]))
    (ya, ga), (yb, gb) = outs
    np.testing.assert_allclose(ya, yb, rtol=1e-10, atol=1e-12)
    for a, b in zip(ga, gb):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)


rng = np.random.default_rng(0)


@pytest.mark.parametrize("shape", [(5,), (3, 7), (2, 3, 8)])
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_fused_equals_composite(shape, approximate):
    x = rng.standard_normal(shape) * 3
    _both(lambda t: F.gelu(t, approximate, fused=True), lambda t: F.gelu(t, approximate, fused=False), x)
    assert gradcheck(lambda t: F.gelu(t, approximate, fused=True), [x])


@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
def test_layer_norm_fused_equals_composite(affine):
    x = rng.standard_normal((2, 3, 6)) * 5 + 2
    w, b = rng.standard_normal(6), rng.standard_normal(6)
    if affine == "both":
        args, f = (x, w, b), lambda fused: (lambda a, c, d: F.layer_norm(a, c, d, fused=fused))
    elif affine == "weight":
        args, f = (x, w), lambda fused: (lambda a, c: F.layer_norm(a, c, None, fused=fused))
    elif affine == "bias":
        args, f = (x, b), lambda fused: (lambda a, d: F.layer_norm(a, None, d, fused=fused))
    else:
        args, f = (x,), lambda fused: (lambda a: F.layer_norm(a, fused=fused))
    _both(f(True), f(False), *args)
    assert gradcheck(f(True), list(args))


@pytest.mark.parametrize("ignore", [None, -100, 2])
def test_cross_entropy_fused_equals_composite(ignore):
    z = rng.standard_normal((4, 6, 5)) * 4
    t = rng.integers(0, 5, (4, 6))
    t[0, :2] = -100 if ignore == -100 else t[0, :2]
    _both(lambda a: F.cross_entropy(a, t, ignore_index=ignore, fused=True),
          lambda a: F.cross_entropy(a, t, ignore_index=ignore, fused=False), z)
    assert gradcheck(lambda a: F.cross_entropy(a, t, ignore_index=ignore, fused=True), [z])


def test_cross_entropy_fused_large_logits_and_retain_graph():
    z = mg.Tensor(rng.standard_normal((3, 4)) * 1000, requires_grad=True)
    t = np.array([0, 1, 3])
    loss = F.cross_entropy(z, t)
    assert np.isfinite(loss.item())
    loss.backward(retain_graph=True)
    g1 = z.grad.data.copy()
    loss.backward()
    np.testing.assert_allclose(z.grad.data, 2 * g1)


def test_fused_keep_float32():
    x = mg.Tensor(rng.standard_normal((2, 4)).astype(np.float32), requires_grad=True)
    w = mg.Tensor(np.ones(4, np.float32), requires_grad=True)
    y = F.gelu(F.layer_norm(x, w))
    loss = F.cross_entropy(y, np.array([1, 2]))
    loss.backward()
    assert y.dtype == np.float32 and loss.dtype == np.float32 and x.grad.dtype == np.float32


@pytest.mark.parametrize("cls,wd", [(mg.optim.AdamW, 0.1), (mg.optim.Adam, 0.1), (mg.optim.AdamW, 0.0)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_compiled_adam_step_equals_array_code(monkeypatch, cls, wd, dtype):
    def run(use_kernel):
        if not use_kernel:
            monkeypatch.setattr(mg.optim, "adam_step_inplace", lambda *a: False)
        r = np.random.default_rng(3)
        p = mg.nn.Parameter(r.standard_normal((5, 4)).astype(dtype))
        opt = cls([("w", p)], lr=1e-2, betas=(0.9, 0.99), weight_decay=wd)
        for _ in range(6):
            p.grad = mg.Tensor(r.standard_normal((5, 4)).astype(dtype))
            opt.step()
        monkeypatch.undo()
        return p.data.copy(), opt.state["w"]["exp_avg_sq"].copy()
    (pa, va), (pb, vb) = run(True), run(False)
    tol = 1e-13 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(pa, pb, rtol=tol, atol=tol)
    np.testing.assert_allclose(va, vb, rtol=tol, atol=tol)
