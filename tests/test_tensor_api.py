"""The Tensor API's non-differentiable side: Python/NumPy protocols, in-place ops and their
version-counter errors, the dtype rules, factories, indices of sort/topk, argmax/any/all.
(The differentiable ops are in test_ops.py: numerical gradient and PyTorch, one line each.)"""
import numpy as np
import pytest

import minigrad as mg
from minigrad import functional as F

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is the reference")


# --------------------------------------------------------------------------- protocols
def test_bool_follows_pytorch():
    assert bool(mg.tensor([2.0])) and not bool(mg.tensor(0.0)) and bool(mg.tensor([[True]]))
    for t in (mg.ones(3), mg.zeros(0)):
        with pytest.raises(RuntimeError, match="ambiguous"):
            bool(t)
    with pytest.raises(RuntimeError, match="any"):
        if mg.ones(2) > 0:
            pass


def test_in_list_is_identity_or_raises():
    a, b = mg.ones(3), mg.ones(3)
    assert a in [a]                       # identity first, as for any Python object
    with pytest.raises(RuntimeError):     # PyTorch raises too: elementwise == has no truth value
        b in [a]  # noqa: B015


def test_array_protocol_and_scalar_conversions():
    t = mg.tensor([[1.5, 2.5]], requires_grad=True)
    a = np.asarray(t)
    assert a.dtype == np.float32 and a.shape == (1, 2) and a.dtype != object
    assert np.asarray(t, dtype=np.float64).dtype == np.float64
    assert np.array(t, copy=True) is not t.data
    assert float(t[0, 1]) == 2.5 and int(t[0, 0]) == 1
    i = mg.tensor([2])
    assert [10, 20, 30][i] == 30 and list(range(5))[mg.tensor(1):mg.tensor(3)] == [1, 2]
    with pytest.raises(TypeError, match="integer"):
        [1, 2][mg.tensor(1.0)]
    with pytest.raises(RuntimeError, match="2 elements"):
        float(t)


# --------------------------------------------------------------------------- in-place ops
def test_inplace_under_no_grad_changes_the_tensor():
    w = mg.tensor([1.0, 2.0, 3.0], requires_grad=True)
    before = w
    with mg.no_grad():
        w -= 1
        w *= 2
        w += mg.tensor([1.0, 1.0, 1.0])
        w /= 2
    assert w is before and w.requires_grad
    np.testing.assert_array_equal(w.numpy(), [0.5, 1.5, 2.5])
    with mg.no_grad():
        w.add_(1).sub_(0.5).mul_(2).div_(4)
    np.testing.assert_array_equal(w.numpy(), [0.5, 1.0, 1.5])
    with mg.no_grad():
        w.clamp_(0.75, 1.25)
        np.testing.assert_array_equal(w.numpy(), [0.75, 1.0, 1.25])
        w.copy_(np.array([4.0, 5.0, 6.0], np.float32))
        np.testing.assert_array_equal(w.numpy(), [4, 5, 6])
        w.fill_(7.0)
        np.testing.assert_array_equal(w.numpy(), [7, 7, 7])
        w.zero_()
    assert not w.numpy().any()


def test_inplace_on_tensor_without_grad_is_allowed():
    t = mg.zeros(2, 3)
    t += 1.0
    t.add_(mg.ones(3))                                      # broadcast into the tensor's shape
    np.testing.assert_array_equal(t.numpy(), np.full((2, 3), 2.0))
    ids = mg.tensor([1, 2])
    ids += 1
    assert ids.dtype == np.int64 and ids.tolist() == [2, 3]


@pytest.mark.parametrize("op", ["add_", "sub_", "mul_", "div_", "iadd", "fill_", "zero_", "copy_", "clamp_"])
def test_inplace_refused_while_recording(op):
    w = mg.tensor([1.0, 2.0], requires_grad=True)
    calls = {"add_": lambda: w.add_(1), "sub_": lambda: w.sub_(1), "mul_": lambda: w.mul_(2),
             "div_": lambda: w.div_(2), "iadd": lambda: w.__iadd__(1), "fill_": lambda: w.fill_(0.0),
             "zero_": lambda: w.zero_(), "copy_": lambda: w.copy_(np.zeros(2, np.float32)),
             "clamp_": lambda: w.clamp_(0, 1)}
    with pytest.raises(RuntimeError, match=r"in-place.*no_grad"):
        calls[op]()
    np.testing.assert_array_equal(w.numpy(), [1.0, 2.0])   # nothing changed
    y = w * 2                                               # a non-leaf of a recorded graph, too
    with pytest.raises(RuntimeError, match="graph"):
        y.add_(1)


def test_changed_input_makes_backward_refuse_not_lie():
    w = mg.tensor([1.0, 2.0], requires_grad=True)
    y = (w * w).sum()
    with mg.no_grad():
        w.add_(1.0)                                          # the optimizer step came too early
    with pytest.raises(RuntimeError, match="changed in place"):
        y.backward()


def test_changed_output_makes_backward_refuse():
    x = mg.tensor([0.5, 1.0], requires_grad=True)
    y = x.exp()                                              # Exp saves its output
    with mg.no_grad():
        y.mul_(2.0)
    with pytest.raises(RuntimeError, match="output"):
        y.sum().backward()


def test_detached_view_shares_the_version_counter():
    w = mg.tensor([1.0, 2.0], requires_grad=True)
    y = (w * w).sum()
    w.detach().add_(1.0)                                     # detach shares data, so it counts
    with pytest.raises(RuntimeError, match="changed in place"):
        y.backward()


def test_unchanged_graph_still_backprops_after_unrelated_inplace():
    w = mg.tensor([1.0, 2.0], requires_grad=True)
    other = mg.tensor([3.0, 4.0], requires_grad=True)
    y = (w * w).sum()
    with mg.no_grad():
        other.add_(1.0)
    y.backward()
    np.testing.assert_array_equal(w.grad.numpy(), [2.0, 4.0])


def test_inplace_dtype_and_shape_errors():
    t = mg.zeros(2, 3)
    with pytest.raises(TypeError, match="float32.*float64"):
        t.add_(np.ones(3))
    with pytest.raises(TypeError, match="float32.*float64"):
        t.copy_(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"add_.*\(4,\).*\(2, 3\)"):
        t.add_(mg.ones(4))
    with pytest.raises(ValueError, match="broadcast"):
        t.add_(mg.ones(2, 2, 3))
    ids = mg.tensor([1, 2])
    with pytest.raises(TypeError, match="float"):
        ids += 0.5
    with pytest.raises(TypeError, match="div_"):
        ids /= 2


@needs_torch
def test_inplace_matches_torch_values():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 4)), rng.standard_normal(4)
    m, t = mg.tensor(a), torch.tensor(a)
    m.add_(mg.tensor(b)).mul_(1.5).sub_(0.25).div_(3.0).clamp_(-0.2, 0.3)
    t.add_(torch.tensor(b)).mul_(1.5).sub_(0.25).div_(3.0).clamp_(-0.2, 0.3)
    np.testing.assert_allclose(m.numpy(), t.numpy(), rtol=1e-15)


def test_sgd_by_hand_with_inplace_update():
    w = mg.tensor([3.0, -2.0], requires_grad=True)
    for _ in range(50):
        loss = (w * w).sum()
        w.zero_grad()
        loss.backward()
        with mg.no_grad():
            w -= 0.1 * w.grad
    assert float(w.norm()) < 1e-3


# --------------------------------------------------------------------------- dtype rules
def test_float32_with_float64_array_raises():
    x = mg.ones(3)
    for f in (lambda: x * np.ones(3), lambda: np.ones(3) + x, lambda: x - np.float64(1.0) * np.ones(3),
              lambda: mg.where(np.ones(3, bool), x, np.zeros(3)), lambda: x @ np.ones(3)):
        with pytest.raises(TypeError, match=r"float(32|64).*float(64|32)"):
            f()
    assert (x * np.ones(3, np.float32)).dtype == np.float32
    assert (x * np.float64(2.0)).dtype == np.float32          # a scalar adapts (it is a Python float)


def test_integers_meeting_floats_give_float_dtype():
    i = mg.tensor([1, 2, 3])
    assert i.dtype == np.int64
    assert (i / 2).dtype == np.float32 and (i / i).dtype == np.float32 and (2 / i).dtype == np.float32
    assert (i + 0.5).dtype == np.float32 and (i * 1.5).dtype == np.float32 and (i ** 0.5).dtype == np.float32
    assert (i + mg.ones(3)).dtype == np.float32 and (mg.ones(3) * i).dtype == np.float32
    assert (i + mg.ones(3, dtype=np.float64)).dtype == np.float64
    assert (i + np.ones(3, np.float32)).dtype == np.float32
    assert (i + 1).dtype == np.int64 and (i * i).dtype == np.int64
    np.testing.assert_allclose((i / 2).numpy(), [0.5, 1.0, 1.5])
    mg.set_default_dtype(np.float64)
    try:
        assert (i / 2).dtype == np.float64 and (i + 0.5).dtype == np.float64
    finally:
        mg.set_default_dtype(np.float32)
    b = mg.tensor([True, False])
    assert (b * 2.0).dtype == np.float32


def test_float_tensor_times_int_tensor_keeps_gradient():
    x = mg.tensor([1.0, 2.0], requires_grad=True)
    y = (x * mg.tensor([3, 4])).sum()
    y.backward()
    assert y.dtype == np.float32 and x.grad.numpy().tolist() == [3.0, 4.0]


# --------------------------------------------------------------------------- factories
def test_factories():
    x = mg.randn(2, 3, dtype=np.float64)
    for f, v in ((mg.zeros_like, 0), (mg.ones_like, 1)):
        t = f(x)
        assert t.shape == (2, 3) and t.dtype == np.float64 and (t.numpy() == v).all()
    assert mg.zeros_like(x, dtype=np.float32).dtype == np.float32
    assert mg.ones_like(x, requires_grad=True).requires_grad
    assert mg.full((2, 2), 1.5).dtype == np.float32 and mg.full(3, 7).dtype == np.int64
    np.testing.assert_array_equal(mg.full((2, 2), 1.5).numpy(), np.full((2, 2), 1.5))
    np.testing.assert_array_equal(mg.eye(3).numpy(), np.eye(3))
    assert mg.eye(2, 3).shape == (2, 3) and mg.eye(2).dtype == np.float32
    np.testing.assert_allclose(mg.linspace(0, 1, 5).numpy(), [0, 0.25, 0.5, 0.75, 1.0])
    assert mg.linspace(0, 1, 5, dtype=np.float64).dtype == np.float64


@needs_torch
def test_factories_match_torch():
    np.testing.assert_allclose(mg.linspace(-2, 3, 7).numpy(), torch.linspace(-2, 3, 7).numpy(), rtol=1e-6)
    np.testing.assert_array_equal(mg.eye(3, 4).numpy(), torch.eye(3, 4).numpy())
    assert str(torch.full((2,), 7).dtype) == "torch.int64" and mg.full((2,), 7).dtype == np.int64


# --------------------------------------------------------------------------- non-differentiable results
@needs_torch
def test_argmax_argmin_any_all_match_torch():
    a = np.random.default_rng(0).standard_normal((3, 4, 5))
    m, t = mg.tensor(a), torch.tensor(a)
    assert m.argmax().item() == t.argmax().item()
    np.testing.assert_array_equal(m.argmax(axis=1).numpy(), t.argmax(dim=1).numpy())
    np.testing.assert_array_equal(m.argmin(axis=-1, keepdims=True).numpy(), t.argmin(dim=-1, keepdim=True).numpy())
    assert not m.argmax().requires_grad
    np.testing.assert_array_equal((m > 1).any(axis=2).numpy(), (t > 1).any(dim=2).numpy())
    np.testing.assert_array_equal((m > -3).all(axis=0).numpy(), (t > -3).all(dim=0).numpy())
    assert bool((m > 0).any()) and not bool((m > 10).any())


@needs_torch
def test_sort_and_topk_indices_match_torch():
    a = np.random.default_rng(1).standard_normal((4, 6))
    m, t = mg.tensor(a, requires_grad=True), torch.tensor(a)
    v, i = m.topk(3, axis=1)
    tv = t.topk(3, dim=1)
    np.testing.assert_array_equal(i.numpy(), tv.indices.numpy())
    assert i.dtype == np.int64 and not i.requires_grad and v.requires_grad
    v, i = m.sort(axis=0, descending=True)
    np.testing.assert_array_equal(i.numpy(), t.sort(dim=0, descending=True).indices.numpy())
    with pytest.raises(ValueError, match="topk"):
        m.topk(7)


def test_gather_errors():
    x = mg.randn(3, 4)
    with pytest.raises(IndexError, match="gather"):
        x.gather(1, np.array([[4]]))
    with pytest.raises(ValueError, match="gather"):
        x.gather(1, np.array([0, 1]))
    with pytest.raises(TypeError, match="integers"):
        x.gather(1, np.array([[0.5]]))


def test_cross_entropy_all_ignored_is_zero_with_zero_gradient():
    for fused in (True, False):
        x = mg.randn(3, 5, requires_grad=True)
        loss = F.cross_entropy(x, np.array([-100, -100, -100]), fused=fused)
        assert loss.item() == 0.0
        loss.backward()
        assert x.grad is None or not x.grad.numpy().any()
    with pytest.raises(ValueError, match="label_smoothing"):
        F.cross_entropy(x, np.array([0, 1, 2]), label_smoothing=1.5)


def test_logsumexp_nonfinite_values():
    x = mg.tensor([[-np.inf, -np.inf], [1.0, np.inf], [np.inf, np.inf], [0.0, 1.0]])
    with np.errstate(divide="ignore"):
        out = F.logsumexp(x).numpy()
    assert out[0] == -np.inf and out[1] == np.inf and out[2] == np.inf
    np.testing.assert_allclose(out[3], np.log(np.exp(0) + np.exp(1)), rtol=1e-6)


def test_div_gradient_with_tiny_denominator_is_finite():
    a = mg.tensor(np.array([1e-160]), requires_grad=True)
    b = mg.tensor(np.array([1e-170]), requires_grad=True)
    (a / b).sum().backward()
    assert np.isfinite(b.grad.numpy()).all()
    np.testing.assert_allclose(b.grad.numpy(), [-1e-160 / 1e-170 / 1e-170], rtol=1e-12)


def test_pow_zero_exponent_gradient_at_zero():
    x = mg.tensor(np.array([0.0, 2.0]), requires_grad=True)
    (x ** 0).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [0.0, 0.0])


def test_tensor_module_does_not_import_ops():
    import ast
    import inspect
    import minigrad.tensor as T
    tree = ast.parse(inspect.getsource(T))
    names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(m and "ops" in m for m in names), names


def test_kernels_import_nothing_from_the_engine():
    """kernels/ is array code: besides its own modules it may use ``backend`` (the array-module
    rule) and ``quant`` (format tables, NumPy only), never the autograd engine."""
    import ast
    import pathlib
    array_level = {"backend", "quant"}
    root = pathlib.Path(mg.__file__).parent / "kernels"
    for f in root.glob("*.py"):
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, ast.ImportFrom):
                assert not (n.module or "").startswith("minigrad"), (f.name, n.module)
                if n.level >= 2:
                    used = {n.module} if n.module else {a.name for a in n.names}
                    assert used <= array_level, (f.name, n.module, [a.name for a in n.names])
                assert n.level <= 2, (f.name, n.module)
    # and importing those modules loads no engine module (their surgery functions, such as
    # quant.quantize_, import the engine inside the function, when they are called)
    for name in array_level:
        tree = ast.parse((root.parent / f"{name}.py").read_text())
        for n in tree.body:
            if isinstance(n, ast.ImportFrom) and n.level >= 1:
                mods = {n.module} if n.module else {a.name for a in n.names}
                assert mods <= array_level, (name, mods)
