"""Graph semantics of the engine: how gradients flow, accumulate, are hooked and are freed."""
import numpy as np
import pytest

import minigrad as mg
from minigrad import functional as F


def leaf(values, device="cpu", dtype=np.float64):
    return mg.Tensor(np.array(values, dtype=dtype), requires_grad=True, device=device)


def creators(t):
    """Every Function in the graph that produced ``t``."""
    out, stack, seen = [], [t.creator], set()
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        out.append(fn)
        stack.extend(x.creator for x in fn.inputs)
    return out


# ---------------------------------------------------------------------------- gradient flow
def test_tensor_used_twice(backend):
    x = leaf([1.0, -2.0, 3.0], backend)
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [2.0, -4.0, 6.0])
    x.zero_grad()
    (x + x).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [2.0, 2.0, 2.0])


def test_diamond(backend):
    x = leaf([1.0, 2.0], backend)
    a, b = x * 2.0, x * 3.0
    (a * b).sum().backward()                       # d(6 x^2)/dx = 12 x
    np.testing.assert_allclose(x.grad.numpy(), [12.0, 24.0])


@pytest.mark.parametrize("order", ["b_first", "a_first"])
def test_producer_also_consumed_by_a_later_node(order, backend):
    # b feeds both the root and a = 3b: b's gradient must wait for a's (topological order)
    x = leaf([1.0, 2.0], backend)
    b = x * 2.0
    a = b * 3.0
    y = b + a if order == "b_first" else a + b
    y.sum().backward()                             # y = 8 x
    np.testing.assert_allclose(x.grad.numpy(), [8.0, 8.0])


def test_deep_chain_no_recursion_error():
    x = leaf([1.0])
    y = x
    for _ in range(10_000):
        y = y * 1.0001 + 0.0
    y.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [1.0001 ** 10_000], rtol=1e-9)
    del y  # freeing a 20,000-node graph must not overflow the C stack either


def test_multi_output_with_unused_output(backend):
    x = leaf(np.arange(6.0), backend)
    a, b, c = mg.split(x, 3)
    (b * 2.0).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [0, 0, 2, 2, 0, 0])


def test_only_some_inputs_require_grad(backend):
    x = leaf([1.0, 2.0], backend)
    c = mg.tensor(np.array([3.0, 4.0]), device=backend)
    (x * c).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [3.0, 4.0])
    assert c.grad is None


# ---------------------------------------------------------------------------- no_grad, detach
def test_no_grad(backend):
    x = leaf([1.0, 2.0], backend)
    with mg.no_grad():
        y = x * 2.0
        assert not mg.is_grad_enabled()
    assert mg.is_grad_enabled()
    assert y.creator is None and not y.requires_grad and y.is_leaf
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.sum().backward()


def test_detach(backend):
    x = leaf([1.0, 2.0], backend)
    y = x * 3.0
    d = y.detach()
    assert d.creator is None and not d.requires_grad
    np.testing.assert_array_equal(d.numpy(), y.numpy())
    (x * y.detach()).sum().backward()              # the detached factor is a constant
    np.testing.assert_allclose(x.grad.numpy(), [3.0, 6.0])


# ---------------------------------------------------------------------------- backward twice
def test_retain_graph_allows_second_backward_and_accumulates(backend):
    x = leaf([1.0, 2.0], backend)
    y = (x * x).sum()
    y.backward(retain_graph=True)
    assert all(fn.saved is not None for fn in creators(y))
    y.backward()
    np.testing.assert_allclose(x.grad.numpy(), [4.0, 8.0])


def test_second_backward_without_retain_graph_raises(backend):
    x = leaf([1.0, 2.0], backend)
    y = (x.exp() * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        y.backward()


def test_saved_arrays_released_after_backward(backend):
    x, w = leaf(np.ones((2, 3)), backend), leaf(np.ones((4, 3)), backend)
    y = F.cross_entropy(F.gelu(mg.linear(x, w)).exp().log(), np.array([0, 3]))
    fns = creators(y)
    assert any(fn.saved for fn in fns)             # something was saved for backward ...
    y.backward()
    assert all(fn.saved is None for fn in fns), [fn for fn in fns if fn.saved is not None]


def test_gradients_accumulate_across_backward_calls(backend):
    x = leaf([1.0, 2.0], backend)
    (x * 2.0).sum().backward()
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [4.0, 6.0])


# ---------------------------------------------------------------------------- hooks, retain_grad
def test_register_hook_sees_gradient_and_can_replace_it(backend):
    x = leaf([1.0, 2.0], backend)
    y = x * 3.0
    seen = []
    handle = y.register_hook(lambda g: seen.append(g.numpy().copy()) or g * 10.0)
    (y * y).sum().backward(retain_graph=True)      # dL/dy = 2y = [6, 12]
    np.testing.assert_allclose(seen[0], [6.0, 12.0])
    np.testing.assert_allclose(x.grad.numpy(), [180.0, 360.0])   # 10 * 2y * 3
    handle.remove()
    x.zero_grad()
    (y * y).sum().backward()
    assert len(seen) == 1                          # removed: not called again
    np.testing.assert_allclose(x.grad.numpy(), [18.0, 36.0])


def test_hook_on_leaf(backend):
    x = leaf([1.0, 2.0], backend)
    seen = []
    x.register_hook(lambda g: seen.append(g.numpy().copy()))
    (x * x).sum().backward()
    np.testing.assert_allclose(seen[0], [2.0, 4.0])   # called once with the total gradient
    assert len(seen) == 1


def test_retain_grad_on_non_leaf(backend):
    x = leaf([1.0, 2.0], backend)
    y = x * 2.0
    z = x * 4.0
    y.retain_grad()
    (y * y + z).sum().backward()
    np.testing.assert_allclose(y.grad.numpy(), [4.0, 8.0])
    assert z.grad is None                          # non-leaves keep no gradient by default


# ---------------------------------------------------------------------------- dtypes
def test_python_floats_default_to_float32():
    assert mg.tensor(1.0).dtype == np.float32
    assert mg.tensor([1.0, 2.0]).dtype == np.float32
    assert mg.tensor([1, 2]).dtype == np.int64
    assert mg.tensor(np.array([1.0])).dtype == np.float64      # arrays keep their dtype
    assert mg.tensor([0.1], dtype=np.float64).item() == 0.1    # not rounded through float32


def test_python_scalars_take_the_tensor_dtype(backend):
    x = mg.ones(3, device=backend)
    for y in (x * 2.0, 2.0 * x, x + 1, 1 - x, x / 3.0, x ** 2.0, 2.0 ** x):
        assert y.dtype == np.float32, y
    x64 = mg.ones(3, dtype=np.float64, device=backend)
    assert (x64 * 0.1).dtype == np.float64
    assert (x64 * 0.1).numpy()[0] == 0.1                       # exact, not via float32


def test_integer_tensor_cannot_require_grad():
    with pytest.raises(TypeError, match="floating-point"):
        mg.tensor([1, 2], requires_grad=True)


# ---------------------------------------------------------------------------- aliasing
def test_leaf_grads_do_not_alias(backend):
    a, b = leaf([1.0, 2.0], backend), leaf([3.0, 4.0], backend)
    (a + b).sum().backward()
    a.grad.data += 5.0                             # an optimizer may update .grad in place
    np.testing.assert_allclose(b.grad.numpy(), [1.0, 1.0])


def test_leaf_grad_does_not_alias_given_gradient(backend):
    a, b = leaf([1.0, 2.0], backend), leaf([3.0, 4.0], backend)
    g = mg.tensor(np.array([1.0, 1.0]), device=backend)
    (a + b).backward(g)
    a.grad.data += 5.0
    np.testing.assert_allclose(b.grad.numpy(), [1.0, 1.0])
    np.testing.assert_allclose(g.numpy(), [1.0, 1.0])


def test_retained_grad_does_not_alias_leaf_grad(backend):
    a = leaf([1.0, 2.0], backend)
    y = a + 0.0
    y.retain_grad()
    y.backward(np.array([1.0, 1.0]))
    a.grad.data += 5.0
    np.testing.assert_allclose(y.grad.numpy(), [1.0, 1.0])


# ---------------------------------------------------------------------------- backward() errors
def test_backward_on_non_scalar_needs_gradient(backend):
    y = leaf([1.0, 2.0], backend) * 2.0
    with pytest.raises(RuntimeError, match=r"scalar.*\(2,\)"):
        y.backward()


def test_backward_gradient_shape_must_match(backend):
    y = leaf([1.0, 2.0], backend) * 2.0
    with pytest.raises(ValueError, match=r"\(3,\).*\(2,\)"):
        y.backward(np.ones(3))


# ---------------------------------------------------------------------------- conversions
def test_item_and_numpy(backend):
    t = mg.tensor(np.array([[3.5]]), device=backend)
    assert t.item() == 3.5 and isinstance(t.item(), float)
    assert mg.tensor(np.array([1, 2]), device=backend)[1].item() == 2
    with pytest.raises(ValueError, match="one element"):
        mg.ones(2, device=backend).item()
    x = mg.tensor(np.arange(6.0).reshape(2, 3), device=backend)
    a = x.numpy()
    assert isinstance(a, np.ndarray) and a.shape == (2, 3)
    np.testing.assert_array_equal(a, np.arange(6.0).reshape(2, 3))
    assert isinstance((x.sum()).numpy(), np.ndarray)


# ---------------------------------------------------------------------------- randomness
def test_manual_seed_repeats_randn_and_dropout(backend):
    mg.manual_seed(123)
    a = mg.randn(3, 4, device=backend).numpy()
    m1 = F.dropout(mg.ones(100, device=backend), 0.5).numpy()
    mg.manual_seed(123)
    b = mg.randn(3, 4, device=backend).numpy()
    m2 = F.dropout(mg.ones(100, device=backend), 0.5).numpy()
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(m1, m2)
    assert a.dtype == np.float32
    mg.manual_seed(124)
    assert not np.array_equal(mg.randn(3, 4, device=backend).numpy(), a)


def test_no_grad_fast_path_records_nothing_and_computes_the_same():
    """Under no_grad, Function.__call__ skips its bookkeeping: the outputs equal the recorded run's,
    are leaves without gradient, and nothing is saved; tuples (split) and scalar inputs work too."""
    rng = np.random.default_rng(0)
    a = mg.Tensor(rng.standard_normal((3, 4)), requires_grad=True)
    b = mg.Tensor(rng.standard_normal((3, 4)), requires_grad=True)
    with_grad = [(a * b + 2.0).data, mg.ops.split(a, [1, 3], axis=1)[1].data, mg.ops.matmul(a, b.T).data]
    with mg.no_grad():
        y = a * b + 2.0
        parts = mg.ops.split(a, [1, 3], axis=1)
        z = mg.ops.matmul(a, b.T)
    for t in (y, z, *parts):
        assert not t.requires_grad and t.creator is None and t.is_leaf
    assert len(parts) == 3 and [p._out_index for p in parts] == [0, 1, 2]
    for got, want in zip((y.data, parts[1].data, z.data), with_grad):
        np.testing.assert_array_equal(got, want)
