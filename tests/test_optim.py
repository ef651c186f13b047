"""Optimizers against torch.optim, gradient clipping, LR schedules and optimizer checkpoints."""
import json
import math

import numpy as np
import pytest

import minigrad as mg
from minigrad import nn
from minigrad.backend import to_device, to_numpy
from minigrad.io import load_file, load_metadata, save_file, load_module, save_module
from minigrad.optim import SGD, Adam, AdamW, WarmupCosine, clip_grad_norm_, cosine_lr

SHAPES = {"w1": (3, 4), "b1": (4,), "w2": (2, 3, 2), "s": ()}


def _params(backend, seed=0):
    rng = np.random.default_rng(seed)
    return [(n, nn.Parameter(to_device(rng.standard_normal(s), backend))) for n, s in SHAPES.items()]


def _grad_sequence(steps, seed=1):
    rng = np.random.default_rng(seed)
    return [{n: rng.standard_normal(s) for n, s in SHAPES.items()} for _ in range(steps)]


def _decay_groups(named):
    """AdamW the GPT way: weight matrices decay, biases and scalars do not."""
    named = list(named)
    return [{"params": [(n, p) for n, p in named if len(p.shape) >= 2], "weight_decay": 0.1},
            {"params": [(n, p) for n, p in named if len(p.shape) < 2], "weight_decay": 0.0}]


CASES = {
    "sgd": (SGD, "SGD", dict(lr=0.1)),
    "sgd-momentum": (SGD, "SGD", dict(lr=0.1, momentum=0.9)),
    "sgd-nesterov": (SGD, "SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
    "sgd-weight-decay": (SGD, "SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.05)),
    "adam": (Adam, "Adam", dict(lr=1e-2)),
    "adam-l2": (Adam, "Adam", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    "adamw": (AdamW, "AdamW", dict(lr=1e-2, weight_decay=0.1)),
    "adamw-groups": (AdamW, "AdamW", dict(lr=1e-2, betas=(0.9, 0.95))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_optimizer_matches_torch_for_ten_steps(case, backend):
    torch = pytest.importorskip("torch")
    cls, torch_name, kw = CASES[case]
    named = _params(backend)
    tparams = {n: torch.nn.Parameter(torch.from_numpy(to_numpy(p.data).copy())) for n, p in named}
    if case.endswith("groups"):
        groups = _decay_groups(named)
        opt = cls(groups, **kw)
        tgroups = [{"params": [tparams[n] for n, _ in g["params"]], "weight_decay": g["weight_decay"]}
                   for g in groups]
        topt = getattr(torch.optim, torch_name)(tgroups, **kw)
    else:
        opt = cls(named, **kw)
        topt = getattr(torch.optim, torch_name)(list(tparams.values()), **kw)

    for step, grads in enumerate(_grad_sequence(10)):
        if step == 5:  # an lr change mid-run (what a schedule does) must act the same way
            opt.set_lr(opt.lr / 2)
            for g in topt.param_groups:
                g["lr"] /= 2
        for n, p in named:
            p.grad = mg.Tensor(to_device(grads[n].copy(), backend))
            tparams[n].grad = torch.from_numpy(grads[n].copy())
        opt.step()
        topt.step()
        for n, p in named:
            np.testing.assert_allclose(to_numpy(p.data), tparams[n].detach().numpy(), rtol=1e-12,
                                       atol=1e-15, err_msg=f"{case}: {n} after step {step + 1}")
    assert all(p.dtype == np.float64 for _, p in named)


def test_adamw_weight_decay_is_decoupled_and_groups_can_skip_it():
    named = _params("cpu")
    before = {n: p.numpy().copy() for n, p in named}
    opt = AdamW(_decay_groups(named), lr=0.1)
    for n, p in named:
        p.grad = mg.Tensor(np.zeros(p.shape))  # zero gradient: only decay can move a parameter
    opt.step()
    for n, p in named:
        expect = before[n] * (1 - 0.1 * 0.1) if len(p.shape) >= 2 else before[n]
        np.testing.assert_allclose(p.numpy(), expect, rtol=1e-15, err_msg=n)


@pytest.mark.parametrize("make", [lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
                                  lambda ps: SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
                                  lambda ps: Adam(ps, lr=0.1, weight_decay=0.1),
                                  lambda ps: AdamW(ps, lr=0.1)])
def test_scalar_parameter_updates_like_a_one_element_one(make, backend):
    """0-d parameters (a learnable temperature) follow the same trajectory as shape (1,) ones."""
    p0 = nn.Parameter(to_device(np.array(0.5), backend))
    p1 = nn.Parameter(to_device(np.array([0.5]), backend))
    opt0, opt1 = make([("t", p0)]), make([("t", p1)])
    for g in [1.0, -2.0, 0.5, 3.0]:
        p0.grad = mg.Tensor(to_device(np.array(g), backend))
        p1.grad = mg.Tensor(to_device(np.array([g]), backend))
        opt0.step()
        opt1.step()
        assert p0.shape == () and float(to_numpy(p0.data)) == float(to_numpy(p1.data)[0])


def test_step_skips_parameters_without_gradient_or_frozen():
    named = _params("cpu")
    opt = Adam(named, lr=0.1)
    p_frozen = dict(named)["b1"]
    p_frozen.requires_grad = False
    p_frozen.grad = mg.Tensor(np.ones(4))
    dict(named)["w1"].grad = mg.Tensor(np.ones((3, 4)))
    before = {n: p.numpy().copy() for n, p in named}
    opt.step()
    assert list(opt.state) == ["w1"]
    for n, p in named:
        assert np.array_equal(p.numpy(), before[n]) == (n != "w1"), n


# --------------------------------------------------------------------------- clipping
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_matches_torch(max_norm, backend):
    torch = pytest.importorskip("torch")
    named = _params(backend)
    grads = _grad_sequence(1)[0]
    tparams = []
    for n, p in named:
        p.grad = mg.Tensor(to_device(grads[n].copy(), backend))  # clipping scales it in place
        tp = torch.nn.Parameter(torch.zeros(SHAPES[n], dtype=torch.float64))
        tp.grad = torch.from_numpy(grads[n].copy())
        tparams.append(tp)
    extra = nn.Parameter(np.ones(3))  # no gradient: ignored by both
    total = clip_grad_norm_([p for _, p in named] + [extra], max_norm)
    ttotal = torch.nn.utils.clip_grad_norm_(tparams + [torch.nn.Parameter(torch.ones(3))], max_norm)
    assert isinstance(total, float)
    assert total == pytest.approx(float(ttotal), rel=1e-12)
    assert total == pytest.approx(math.sqrt(sum((g ** 2).sum() for g in grads.values())), rel=1e-12)
    for (n, p), tp in zip(named, tparams):
        np.testing.assert_allclose(to_numpy(p.grad.data), tp.grad.numpy(), rtol=1e-12, err_msg=n)
    if max_norm > total:  # the no-clip case leaves gradients exactly as they were
        for n, p in named:
            np.testing.assert_array_equal(to_numpy(p.grad.data), grads[n])
    else:
        new = math.sqrt(sum(float((to_numpy(p.grad.data) ** 2).sum()) for _, p in named))
        assert new == pytest.approx(max_norm, rel=1e-5)
    assert extra.grad is None


def test_clip_grad_norm_float32_and_no_gradients():
    p = nn.Parameter(np.array([3.0, 4.0], np.float32))
    assert clip_grad_norm_([p], 1.0) == 0.0
    p.grad = mg.Tensor(np.array([3.0, 4.0], np.float32))
    assert clip_grad_norm_([p], 1.0) == pytest.approx(5.0)
    assert p.grad.dtype == np.float32
    np.testing.assert_allclose(p.grad.numpy(), [0.6, 0.8], rtol=1e-5)


# --------------------------------------------------------------------------- schedules
def test_cosine_lr_warmup_end_value_and_monotone_decay():
    base, warmup, max_steps, min_lr = 1e-3, 10, 100, 1e-4
    lrs = [cosine_lr(s, base, warmup, max_steps, min_lr) for s in range(max_steps + 5)]
    # warmup: linear from base/(warmup+1), increasing, below base
    assert lrs[:warmup] == pytest.approx([base * (s + 1) / (warmup + 1) for s in range(warmup)], rel=1e-12)
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup + 1]))
    assert lrs[warmup] == pytest.approx(base)
    # decay: non-increasing from base to min_lr, half-way at the middle
    decay = lrs[warmup:max_steps + 1]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert all(a > b for a, b in zip(decay[:-1], decay[1:-1]))   # strictly, before the end
    assert lrs[(warmup + max_steps) // 2] == pytest.approx((base + min_lr) / 2, rel=1e-12)
    assert lrs[max_steps] == pytest.approx(min_lr, rel=1e-12)
    assert lrs[max_steps:] == [min_lr] * 5
    assert all(min_lr <= lr <= base for lr in lrs[warmup:])
    assert cosine_lr(0, base, 0, max_steps, min_lr) == pytest.approx(base)   # no warmup


def test_warmup_cosine_drives_the_optimizer_and_round_trips():
    def make():
        opt = SGD(_params("cpu"), lr=0.5)
        return opt, WarmupCosine(opt, warmup=3, max_steps=20, min_lr=0.01)

    opt, sched = make()
    assert opt.lr == sched.lr_at(0) == cosine_lr(0, 0.5, 3, 20, 0.01)
    seen = [opt.lr] + [sched.step() for _ in range(7)]
    assert seen == [cosine_lr(s, 0.5, 3, 20, 0.01) for s in range(8)]
    assert opt.lr == seen[-1]
    sd = json.loads(json.dumps(sched.state_dict()))   # plain data: fits in checkpoint metadata

    opt2, sched2 = make()
    opt2.set_lr(123.0)  # a resumed run's schedule must not depend on the optimizer's lr at load
    sched2.load_state_dict(sd)
    assert sched2.last_step == sched.last_step and sched2.base_lr == 0.5
    assert opt2.lr == opt.lr
    assert [sched2.step() for _ in range(15)] == [sched.step() for _ in range(15)]
    assert opt2.lr == opt.lr == 0.01


# --------------------------------------------------------------------------- checkpoints
class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
        self.scale = nn.Parameter(np.float32(1.0))   # a 0-d parameter, saved as a 0-d tensor

    def forward(self, x):
        return self.mlp(x) * self.scale


def _model(seed):
    mg.manual_seed(seed)
    return Small()


def _batches(n):
    rng = np.random.default_rng(7)
    return [(rng.standard_normal((5, 3)).astype(np.float32), rng.standard_normal((5, 2)).astype(np.float32))
            for _ in range(n)]


OPTIMIZERS = {
    "adamw-groups": lambda m: AdamW(_decay_groups(m.named_parameters()), lr=1e-2, betas=(0.9, 0.95)),
    "adam": lambda m: Adam(m.named_parameters(), lr=1e-2, weight_decay=0.01),
    "sgd-nesterov": lambda m: SGD(m.named_parameters(), lr=0.05, momentum=0.9, nesterov=True),
}


def _train(model, opt, sched, batches, backend):
    for x, y in batches:
        loss = mg.F.mse_loss(model(mg.Tensor(x, device=backend)), mg.Tensor(y, device=backend))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def save_optimizer(opt, sched, path):
    """Arrays as tensors named state.<param>.<key>; numbers and groups as JSON metadata."""
    sd = opt.state_dict()
    arrays, numbers = {}, {}
    for pname, st in sd["state"].items():
        for k, v in st.items():
            if hasattr(v, "shape"):
                arrays[f"state.{pname}.{k}"] = v
            else:
                numbers.setdefault(pname, {})[k] = v
    save_file(arrays, path, metadata={"param_groups": sd["param_groups"], "step_count": sd["step_count"],
                                      "numbers": numbers, "scheduler": sched.state_dict()})


def load_optimizer(opt, sched, path):
    meta = {k: json.loads(v) for k, v in load_metadata(path).items()}
    state = {}
    for name, a in load_file(path).items():
        pname, key = name[len("state."):].rsplit(".", 1)   # parameter names contain dots
        state.setdefault(pname, {})[key] = a
    for pname, d in meta["numbers"].items():
        state.setdefault(pname, {}).update(d)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"],
                         "step_count": meta["step_count"]})
    sched.load_state_dict(meta["scheduler"])


@pytest.mark.parametrize("which", list(OPTIMIZERS))
def test_checkpoint_resume_is_bitwise_identical(which, backend, tmp_path):
    make_opt = OPTIMIZERS[which]
    batches = _batches(8)

    def fresh(seed):
        model = _model(seed).to(backend)
        opt = make_opt(model)
        return model, opt, WarmupCosine(opt, warmup=2, max_steps=8, min_lr=1e-3)

    ref, ref_opt, ref_sched = fresh(0)
    _train(ref, ref_opt, ref_sched, batches, backend)

    model, opt, sched = fresh(0)
    _train(model, opt, sched, batches[:5], backend)
    save_module(model, tmp_path / "model.safetensors")
    save_optimizer(opt, sched, tmp_path / "optim.safetensors")
    assert set(load_file(tmp_path / "optim.safetensors")) == {
        f"state.{n}.{k}" for n in opt.state for k, v in opt.state[n].items() if hasattr(v, "shape")}

    model2, opt2, sched2 = fresh(1)   # different init: everything must come from the files
    assert not np.array_equal(model2.mlp[0].weight.numpy(), model.mlp[0].weight.numpy())
    load_module(model2, tmp_path / "model.safetensors")
    load_optimizer(opt2, sched2, tmp_path / "optim.safetensors")
    assert opt2.lr == opt.lr and opt2.step_count == 5
    _train(model2, opt2, sched2, batches[5:], backend)

    for (n, a), b in zip(ref.named_parameters(), model2.parameters()):
        assert a.device == b.device == backend
        np.testing.assert_array_equal(to_numpy(a.data), to_numpy(b.data), err_msg=n)


def test_state_is_keyed_by_parameter_name():
    model = _model(0)
    opt = AdamW(model.named_parameters(), lr=1e-2)
    _train(model, opt, WarmupCosine(opt, 1, 4, 1e-3), _batches(1), "cpu")
    names = [n for n, _ in model.named_parameters()]
    assert names == ["scale", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"]
    assert list(opt.state) == names
    sd = opt.state_dict()
    assert list(sd["state"]) == names
    assert sd["param_groups"][0]["params"] == names
    assert set(sd["state"]["mlp.0.weight"]) == {"step", "exp_avg", "exp_avg_sq"}
    # plain parameters (no names) are named by position
    opt2 = SGD(list(model.parameters()), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = mg.Tensor(np.ones(p.shape, np.float32))
    opt2.step()
    assert list(opt2.state) == ["0", "1", "2", "3", "4"]


def _stepped_adam():
    named = _params("cpu")
    opt = Adam(named, lr=1e-2)
    for n, p in named:
        p.grad = mg.Tensor(np.ones(p.shape))
    opt.step()
    return opt


def _snapshot(opt):
    return ([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
            {n: {k: np.array(v) for k, v in s.items()} for n, s in opt.state.items()}, opt.step_count)


def _assert_unchanged(opt, snap):
    groups, state, count = snap
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups
    assert opt.step_count == count
    assert list(opt.state) == list(state)
    for n, s in state.items():
        for k, v in s.items():
            np.testing.assert_array_equal(opt.state[n][k], v)


def test_load_state_dict_unknown_parameter_name():
    opt = _stepped_adam()
    sd = opt.state_dict()
    sd["state"]["decoder.weight"] = {"step": 1}
    snap = _snapshot(opt)
    with pytest.raises(KeyError, match="decoder.weight"):
        opt.load_state_dict(sd)
    _assert_unchanged(opt, snap)


def test_load_state_dict_shape_mismatch_names_parameter_and_shapes():
    opt = _stepped_adam()
    sd = opt.state_dict()
    sd["state"] = {n: dict(s) for n, s in sd["state"].items()}
    sd["state"]["w1"]["exp_avg"] = np.zeros((4, 3))
    sd["param_groups"][0]["lr"] = 99.0
    snap = _snapshot(opt)
    with pytest.raises(ValueError) as e:
        opt.load_state_dict(sd)
    msg = str(e.value)
    assert "w1.exp_avg" in msg and "(4, 3)" in msg and "(3, 4)" in msg
    _assert_unchanged(opt, snap)   # a failed load changes nothing, not even the lr


def test_load_state_dict_group_mismatch():
    opt = _stepped_adam()
    sd = opt.state_dict()
    other = Adam(_decay_groups(_params("cpu")), lr=1e-2)
    with pytest.raises(ValueError, match="parameter groups"):
        other.load_state_dict(sd)
    sd["param_groups"][0]["params"] = list(reversed(sd["param_groups"][0]["params"]))
    with pytest.raises(ValueError, match="different parameters"):
        opt.load_state_dict(sd)


def test_loaded_state_is_a_copy():
    opt = _stepped_adam()
    sd = opt.state_dict()
    fresh = Adam(_params("cpu"), lr=1e-2)
    fresh.load_state_dict(sd)
    assert fresh.state["w1"]["exp_avg"] is not opt.state["w1"]["exp_avg"]
    sd["state"]["w1"]["exp_avg"] += 1.0
    assert not np.array_equal(fresh.state["w1"]["exp_avg"], sd["state"]["w1"]["exp_avg"])


def test_constructor_errors():
    named = _params("cpu")
    with pytest.raises(ValueError, match="empty"):
        SGD([], lr=0.1)
    with pytest.raises(ValueError, match="empty"):
        AdamW(iter(()), lr=0.1)
    with pytest.raises(ValueError, match="weight_dacay"):
        AdamW([{"params": named, "weight_dacay": 0.0}], lr=0.1)
    with pytest.raises(ValueError, match="'params'"):
        SGD([{"lr": 0.1}])
    with pytest.raises(ValueError, match="twice"):
        SGD(named + named[:1], lr=0.1)
    with pytest.raises(TypeError, match="ndarray"):
        SGD([("w", np.zeros(3))], lr=0.1)
    with pytest.raises(ValueError):
        SGD(named, lr=-1.0)
    with pytest.raises(ValueError):
        Adam(named, betas=(0.9, 1.0))


def test_adam_error_names_only_the_bad_value():
    import minigrad as _mg
    from minigrad import nn as _nn
    m = _nn.Linear(2, 2)
    groups = [{"params": list(m.named_parameters()), "weight_decay": 0.1}]
    with pytest.raises(ValueError) as e:
        _mg.optim.AdamW(groups, betas=(1.5, 0.99))
    assert "betas=(1.5, 0.99)" in str(e.value) and "weight_decay=" not in str(e.value)
