"""Module bookkeeping (names, state, hooks, modes, dtype) and the standard layers.

Layers are checked against PyTorch (float64, copied weights) when it is installed, and an
MLP must learn a non-linear toy problem end to end with AdamW.
"""
import math

import numpy as np
import pytest

import minigrad as mg
from minigrad import nn
from minigrad.backend import to_numpy
from minigrad.nn import StateDictError


def t(a, backend="cpu", requires_grad=False):
    return mg.Tensor(np.asarray(a), requires_grad=requires_grad, device=backend)


class Block(nn.Module):
    """A parameter, a sub-module, a buffer and another parameter, in that order."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(np.ones(3, dtype=np.float32))
        self.proj = nn.Linear(3, 2)
        self.register_buffer("mask", np.array([1, 0, 1], dtype=np.int64))
        self.register_buffer("stats", np.zeros(2, dtype=np.float32))
        self.register_buffer("cache", np.zeros(4, dtype=np.float32), persistent=False)
        self.shift = nn.Parameter(np.zeros(2, dtype=np.float32))

    def forward(self, x):
        return self.proj(x * self.scale) + self.shift


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 3)
        self.layers = nn.ModuleList([Block(), nn.Sequential(nn.Linear(2, 2), nn.Tanh())])
        self.head = nn.Linear(2, 1)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


# --------------------------------------------------------------------------- registration
def test_module_registers_parameters_submodules_buffers_in_assignment_order():
    b = Block()
    assert list(b._parameters) == ["scale", "shift"]
    assert list(b._modules) == ["proj"]
    assert list(b._buffers) == ["mask", "stats", "cache"]
    # own parameters first, then each sub-module's, depth first
    assert [n for n, _ in b.named_parameters()] == ["scale", "shift", "proj.weight", "proj.bias"]
    assert [n for n, *_ in b.named_buffers()] == ["mask", "stats", "cache"]
    assert list(b.state_dict()) == ["scale", "shift", "proj.weight", "proj.bias", "mask", "stats"]


def test_named_parameters_nested_dotted_names_depth_first():
    net = Net()
    assert [n for n, _ in net.named_parameters()] == [
        "embed.weight", "embed.bias",
        "layers.0.scale", "layers.0.shift", "layers.0.proj.weight", "layers.0.proj.bias",
        "layers.1.0.weight", "layers.1.0.bias",
        "head.weight", "head.bias",
    ]
    assert [n for n, _ in net.named_modules()] == [
        "", "embed", "layers", "layers.0", "layers.0.proj", "layers.1", "layers.1.0", "layers.1.1", "head"]
    assert net.layers[1][0] is list(net.layers[1])[0]
    assert len(net.layers) == 2 and len(net.layers[1]) == 2
    assert [p for _, p in net.named_parameters()] == list(net.parameters())


def test_reassigning_attributes_updates_registration():
    b = Block()
    b.shift = None                      # a parameter replaced by None is no longer a parameter
    assert "shift" not in dict(b.named_parameters())
    b.stats = np.ones(2, dtype=np.float32)  # a buffer given a new array stays a buffer
    assert "stats" in b.state_dict()
    np.testing.assert_array_equal(b.state_dict()["stats"], np.ones(2))
    del b.proj
    assert [n for n, _ in b.named_parameters()] == ["scale"]
    with pytest.raises(RuntimeError, match="super"):
        class Bad(nn.Module):
            def __init__(self):
                self.w = nn.Parameter(np.zeros(1))
        Bad()


def test_tied_parameter_listed_once_and_counted_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(10, 4)
            self.lm_head = nn.Linear(4, 10, bias=False)
            self.lm_head.weight = self.wte.weight  # weight tying, as in GPT-2

    m = Tied()
    names = [n for n, _ in m.named_parameters()]
    assert names == ["wte.weight"]
    assert m.num_parameters() == 40
    assert nn.count_parameters(m) == 40
    assert list(m.state_dict()) == ["wte.weight"]


def test_num_parameters_and_count_parameters_trainable_only():
    net = Net()
    sizes = {n: p.size for n, p in net.named_parameters()}
    total = (4 * 3 + 3) + (3 + 2 + 3 * 2 + 2) + (2 * 2 + 2) + (2 + 1)
    assert sum(sizes.values()) == total
    assert net.num_parameters() == total == nn.count_parameters(net)
    net.embed.requires_grad_(False)
    assert net.num_parameters(trainable_only=True) == total - 15
    assert nn.count_parameters(net, trainable_only=True) == total - 15
    assert net.num_parameters() == total


def test_zero_grad_clears_every_gradient(backend):
    net = Net().to(backend)
    net(t(np.ones((5, 4), np.float32), backend)).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())


# --------------------------------------------------------------------------- modes
def test_train_eval_recurse_and_dropout_honours_them(backend):
    net = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Dropout(0.5), nn.ReLU()))
    assert all(m.training for m in net.modules())
    assert net.eval() is net
    assert not any(m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())

    drop = nn.Dropout(0.5)
    x = t(np.ones((64, 64), np.float32), backend)
    y = to_numpy(drop(x).data)
    assert set(np.unique(y)) == {0.0, 2.0}          # inverted dropout: kept values scaled by 1/(1-p)
    assert 0.4 < (y == 0).mean() < 0.6
    drop.eval()
    np.testing.assert_array_equal(to_numpy(drop(x).data), 1.0)
    drop1 = nn.Dropout(1.0)
    assert (to_numpy(drop1(x).data) == 0).all()
    np.testing.assert_array_equal(to_numpy(drop1.eval()(x).data), 1.0)  # eval is identity even for p=1
    with pytest.raises(ValueError, match="p must be"):
        nn.Dropout(1.5)


def test_to_float64_converts_parameters_and_float_buffers_in_place(backend):
    b = Block()
    params_before = list(b.parameters())
    assert b.to(backend, dtype=np.float64) is b
    assert list(b.parameters()) == params_before   # same Parameter objects: optimizers stay valid
    assert all(p.dtype == np.float64 and p.device == backend for p in b.parameters())
    assert b.stats.dtype == np.float64 and b.cache.dtype == np.float64
    assert b.mask.dtype == np.int64                # integer buffers keep their dtype
    assert "cache" not in b.state_dict()           # and stay non-persistent
    assert mg.backend.device_of(b.stats) == backend and b.device == backend
    y = b(t(np.ones((2, 3)), backend).to(np.float64))
    assert y.dtype == np.float64
    b.to(np.float32)                               # a dtype alone, positionally
    assert all(p.dtype == np.float32 for p in b.parameters())


# --------------------------------------------------------------------------- hooks
def test_forward_pre_hook_and_forward_hook(backend):
    lin = nn.Linear(3, 2).to(backend)
    x = t(np.ones((4, 3), np.float32), backend)
    calls = []

    def pre(module, inputs):
        calls.append(("pre", module, inputs))
        return (inputs[0] * 2.0,)

    def post(module, inputs, output):
        calls.append(("post", module, inputs, output))
        return output * 0.0 + 7.0

    h1 = lin.register_forward_pre_hook(pre)
    h2 = lin.register_forward_hook(post)
    y = lin(x)
    assert [c[0] for c in calls] == ["pre", "post"]
    assert calls[0][1] is lin and calls[0][2][0] is x
    # the forward hook sees the inputs the pre-hook returned and the real output
    np.testing.assert_array_equal(to_numpy(calls[1][2][0].data), 2.0)
    expected = to_numpy(lin.weight.data).sum(1) * 2 + to_numpy(lin.bias.data)
    np.testing.assert_allclose(to_numpy(calls[1][3].data)[0], expected, rtol=1e-6)
    np.testing.assert_array_equal(to_numpy(y.data), 7.0)

    h1.remove()
    h2.remove()
    h2.remove()  # removing twice is harmless
    calls.clear()
    y = lin(x)
    assert calls == []
    np.testing.assert_allclose(to_numpy(y.data)[0], expected / 2 + to_numpy(lin.bias.data) / 2, rtol=1e-6)


def test_pre_hook_returning_a_single_value_and_none():
    lin = nn.Linear(2, 1)
    lin.register_forward_pre_hook(lambda m, inp: None)               # None: inputs unchanged
    lin.register_forward_pre_hook(lambda m, inp: inp[0] * 0.0)       # a bare value: the new input
    y = lin(mg.Tensor(np.ones((1, 2), np.float32)))
    np.testing.assert_allclose(y.numpy(), lin.bias.numpy()[None])


# --------------------------------------------------------------------------- state_dict
def test_state_dict_round_trip_copies_arrays(backend):
    src, dst = Net().to(backend), Net().to(backend)
    src.layers[0].stats = mg.backend.to_device(np.array([3.0, 4.0], np.float32), backend)
    sd = src.state_dict()
    assert set(sd) == {n for n, _ in src.named_parameters()} | {"layers.0.mask", "layers.0.stats"}
    missing, unexpected = dst.load_state_dict(sd)
    assert missing == [] and unexpected == []
    for (n, a), b in zip(sd.items(), dst.state_dict().values()):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b), err_msg=n)
        assert a is not b
    # loaded arrays are copies: changing the source afterwards leaves the model alone
    before = dst.head.weight.numpy().copy()
    src.head.weight.data += 1.0
    np.testing.assert_array_equal(dst.head.weight.numpy(), before)
    # and outputs agree
    x = t(np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32), backend)
    src.head.weight.data -= 1.0
    np.testing.assert_array_equal(to_numpy(src(x).data), to_numpy(dst(x).data))


def test_load_state_dict_accepts_numpy_from_another_device_and_tensors(backend):
    src, dst = Net(), Net().to(backend)
    sd = {k: (mg.Tensor(v) if i % 2 else v) for i, (k, v) in enumerate(src.state_dict().items())}
    dst.load_state_dict(sd)
    assert dst.device == backend
    for (n, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        np.testing.assert_array_equal(a, to_numpy(b), err_msg=n)


def test_load_state_dict_missing_key():
    m = Net()
    sd = dict(m.state_dict())
    del sd["head.bias"]
    with pytest.raises(StateDictError) as e:
        m.load_state_dict(sd)
    assert "missing keys: head.bias" in str(e.value)
    assert "unexpected keys: none" in str(e.value)


def test_load_state_dict_unexpected_key():
    m = Net()
    sd = dict(m.state_dict())
    sd["head.extra"] = np.zeros(2, np.float32)
    with pytest.raises(StateDictError, match=r"unexpected keys: head\.extra"):
        m.load_state_dict(sd)


def test_load_state_dict_shape_mismatch_names_key_and_both_shapes():
    m = Net()
    before = {k: np.array(v) for k, v in m.state_dict().items()}
    sd = {k: np.array(v) + 1 for k, v in m.state_dict().items()}
    sd["embed.weight"] = np.zeros((3, 5), np.float32)
    with pytest.raises(StateDictError) as e:
        m.load_state_dict(sd)
    msg = str(e.value)
    assert "embed.weight" in msg and "(3, 5)" in msg and "(3, 4)" in msg
    # nothing was loaded: a failed load does not leave a half-loaded model
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    with pytest.raises(StateDictError, match="embed.weight"):   # shape errors are fatal even non-strict
        m.load_state_dict(sd, strict=False)


def test_load_state_dict_non_strict_returns_missing_and_unexpected():
    m = Net()
    sd = {k: np.full(v.shape, 0.5, v.dtype) for k, v in m.state_dict().items()}
    del sd["head.bias"], sd["embed.weight"]
    sd["foo"] = np.zeros(1)
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert missing == ["embed.weight", "head.bias"]
    assert unexpected == ["foo"]
    np.testing.assert_array_equal(m.head.weight.numpy(), 0.5)   # present keys were loaded
    assert not (m.embed.weight.numpy() == 0.5).all()
    with pytest.raises(StateDictError) as e:
        m.load_state_dict(sd)
    assert "embed.weight, head.bias" in str(e.value) and "foo" in str(e.value)


# --------------------------------------------------------------------------- layers vs PyTorch
def _grads_equal(mg_params, torch_params, rtol=1e-12):
    for name, p in mg_params.items():
        np.testing.assert_allclose(to_numpy(p.grad.data), torch_params[name].grad.numpy(),
                                   rtol=rtol, atol=1e-13, err_msg=name)


def _same_as_torch(torch, ours, theirs, x, r, backend, rtol, atol, grad_rtol, grad_atol):
    """Forward and the gradient of sum(y * r) through both modules: outputs and x.grad agree."""
    xm = t(x, backend, requires_grad=True)
    y = ours(xm)
    (y * t(r, backend)).sum().backward()
    xt = torch.tensor(x, requires_grad=True)
    yt = theirs(xt)
    (yt * torch.from_numpy(r)).sum().backward()
    np.testing.assert_allclose(to_numpy(y.data), yt.detach().numpy(), rtol=rtol, atol=atol)
    np.testing.assert_allclose(to_numpy(xm.grad.data), xt.grad.numpy(), rtol=grad_rtol, atol=grad_atol)


def test_linear_matches_torch(backend):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    lin = nn.Linear(5, 3, dtype=np.float64)
    tl = torch.nn.Linear(5, 3, dtype=torch.float64)
    with torch.no_grad():
        tl.weight.copy_(torch.from_numpy(lin.weight.numpy()))
        tl.bias.copy_(torch.from_numpy(lin.bias.numpy()))
    lin.to(backend)
    for shape in [(5,), (4, 5), (2, 3, 5)]:
        x = rng.standard_normal(shape)
        r = rng.standard_normal(shape[:-1] + (3,))
        lin.zero_grad()
        tl.zero_grad()
        _same_as_torch(torch, lin, tl, x, r, backend, 1e-12, 1e-14, 1e-12, 1e-14)
        _grads_equal(dict(lin.named_parameters()), dict(tl.named_parameters()))


def test_linear_without_bias_matches_torch():
    torch = pytest.importorskip("torch")
    lin = nn.Linear(4, 2, bias=False, dtype=np.float64)
    assert [n for n, _ in lin.named_parameters()] == ["weight"]
    x = np.random.default_rng(2).standard_normal((3, 4))
    y = lin(mg.Tensor(x))
    yt = torch.nn.functional.linear(torch.from_numpy(x), torch.from_numpy(lin.weight.numpy()))
    np.testing.assert_allclose(y.numpy(), yt.numpy(), rtol=1e-12)


def test_layernorm_matches_torch(backend):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    ln = nn.LayerNorm(6, dtype=np.float64)
    ln.weight.data = rng.standard_normal(6)
    ln.bias.data = rng.standard_normal(6)
    tln = torch.nn.LayerNorm(6, eps=1e-5, dtype=torch.float64)
    with torch.no_grad():
        tln.weight.copy_(torch.from_numpy(ln.weight.numpy()))
        tln.bias.copy_(torch.from_numpy(ln.bias.numpy()))
    ln.to(backend)
    x = rng.standard_normal((2, 3, 6)) * 5 + 2
    r = rng.standard_normal((2, 3, 6))
    _same_as_torch(torch, ln, tln, x, r, backend, 1e-10, 1e-12, 1e-9, 1e-11)
    _grads_equal(dict(ln.named_parameters()), dict(tln.named_parameters()), rtol=1e-10)


def test_embedding_matches_torch_with_repeated_ids(backend):
    torch = pytest.importorskip("torch")
    emb = nn.Embedding(7, 3, dtype=np.float64)
    temb = torch.nn.Embedding(7, 3, dtype=torch.float64)
    with torch.no_grad():
        temb.weight.copy_(torch.from_numpy(emb.weight.numpy()))
    emb.to(backend)
    ids = np.array([[0, 3, 3], [6, 0, 3]], dtype=np.int64)   # repeats must accumulate
    r = np.random.default_rng(4).standard_normal((2, 3, 3))
    y = emb(mg.Tensor(ids, device=backend))
    (y * t(r, backend)).sum().backward()
    yt = temb(torch.from_numpy(ids))
    (yt * torch.from_numpy(r)).sum().backward()
    np.testing.assert_array_equal(to_numpy(y.data), yt.detach().numpy())
    np.testing.assert_allclose(to_numpy(emb.weight.grad.data), temb.weight.grad.numpy(), rtol=1e-12)
    with pytest.raises(IndexError, match=r"\[0, 7\)"):
        emb(mg.Tensor(np.array([7]), device=backend))


def test_linear_init_bounds_dtype_and_seed():
    mg.manual_seed(123)
    lin = nn.Linear(400, 50)
    bound = 1 / math.sqrt(400)
    w, b = lin.weight.numpy(), lin.bias.numpy()
    assert w.shape == (50, 400) and b.shape == (50,)
    assert w.dtype == np.float32 and b.dtype == np.float32
    assert np.abs(w).max() <= bound and np.abs(b).max() <= bound
    assert w.max() > 0.95 * bound and w.min() < -0.95 * bound     # uses the whole range
    assert abs(w.mean()) < 0.02 * bound
    assert abs(w.std() - bound / math.sqrt(3)) < 0.02 * bound       # std of U(-a, a) is a / sqrt(3)
    mg.manual_seed(123)
    np.testing.assert_array_equal(nn.Linear(400, 50).weight.numpy(), w)   # repeatable
    assert not np.array_equal(nn.Linear(400, 50).weight.numpy(), w)      # and not constant


# --------------------------------------------------------------------------- learning
def _mlp():
    return nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))


def _fit(model, x, y, steps, lr, backend):
    opt = mg.optim.AdamW(model.named_parameters(), lr=lr, weight_decay=0.0)
    xt, yt = t(x, backend), t(y, backend)
    losses = []
    for _ in range(steps):
        loss = mg.F.mse_loss(model(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, to_numpy(model(xt).data)


def test_mlp_learns_xor(backend):
    mg.manual_seed(0)
    model = _mlp().to(backend)
    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32) * 2 - 1
    y = np.array([[0], [1], [1], [0]], np.float32)
    losses, pred = _fit(model, x, y, steps=300, lr=1e-2, backend=backend)
    assert losses[-1] < 0.05 < losses[0], (losses[0], losses[-1])
    assert ((pred > 0.5) == (y > 0.5)).all(), pred.ravel()


def test_mlp_learns_two_moons(backend):
    rng = np.random.default_rng(0)
    n = 100
    a = rng.uniform(0, np.pi, n)
    upper = np.stack([np.cos(a), np.sin(a)], 1)
    lower = np.stack([1 - np.cos(a), 0.5 - np.sin(a)], 1)
    x = (np.concatenate([upper, lower]) + 0.05 * rng.standard_normal((2 * n, 2))).astype(np.float32)
    y = np.concatenate([np.zeros(n), np.ones(n)])[:, None].astype(np.float32)
    mg.manual_seed(0)
    model = _mlp().to(backend)
    losses, pred = _fit(model, x, y, steps=300, lr=1e-2, backend=backend)
    assert losses[-1] < 0.05, losses[-1]
    assert ((pred > 0.5) == (y > 0.5)).mean() >= 0.98
