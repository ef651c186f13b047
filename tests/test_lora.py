"""LoRA adapters (minigrad.nn.lora): initialisation, merge, freezing, gradients, adapter files."""
import math

import numpy as np
import pytest

import minigrad as mg
from lm.config import ModelConfig
from lm.model import GPT
from minigrad import nn
from minigrad.gradcheck import gradcheck
from minigrad.memory import static_memory
from minigrad.nn.lora import (LoRAError, LoRALinear, apply_lora, has_lora, load_lora, lora_config,
                              lora_state_dict, mark_only_lora_as_trainable, merge_and_unload_, merge_lora,
                              save_lora, trainable_report, unmerge_lora)

TARGETS = ["c_attn", "c_proj", "c_fc"]


def tiny_gpt(seed=0, **kw):
    mg.manual_seed(seed)
    cfg = dict(vocab_size=23, block_size=16, n_layer=2, n_head=2, n_embd=32)
    cfg.update(kw)
    return GPT(ModelConfig(**cfg))


def batch(seed=1, B=3, T=16, V=23):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


def randomize_B(model, seed=5, scale=0.05):
    rng = np.random.default_rng(seed)
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_B.data[...] = rng.standard_normal(m.lora_B.shape) * scale


def test_fresh_adapter_gives_bit_identical_logits():
    m = tiny_gpt()
    x, y = batch()
    before = m(x, y)[0].numpy()
    apply_lora(m, r=4, alpha=8, targets=TARGETS)
    after = m(x, y)[0].numpy()
    assert after.tobytes() == before.tobytes()
    names = [n for n, _ in m.named_modules() if isinstance(_, LoRALinear)]
    assert len(names) == 2 * 4   # per block: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
    a = m.transformer.h[0].attn.c_attn
    assert np.all(a.lora_B.data == 0) and np.abs(a.lora_A.data).max() <= 1 / math.sqrt(32)
    assert np.abs(a.lora_A.data).max() > 0.5 / math.sqrt(32)   # a real Kaiming-uniform draw, not zeros
    # once B moves, the output moves
    randomize_B(m)
    assert not np.allclose(m(x, y)[0].numpy(), before)


def test_scaling_rslora_and_dropout_only_on_adapter():
    base = nn.Linear(8, 6)
    assert LoRALinear(base, r=4, alpha=8).scaling == 2.0
    assert LoRALinear(base, r=4, alpha=8, use_rslora=True).scaling == 4.0
    lo = LoRALinear(base, r=4, alpha=8, dropout=0.5)
    lo.lora_B.data[...] = 1.0
    x = mg.Tensor(np.ones((5, 8), dtype=np.float32))
    lo.eval()
    ref = lo(x).numpy()
    want = base(x).numpy() + 2.0 * (np.ones((5, 8)) @ lo.lora_A.data.T) @ lo.lora_B.data.T
    assert np.allclose(ref, want, atol=1e-5)
    lo.train()
    assert not np.allclose(lo(x).numpy(), ref)    # dropout acts in training


def test_merge_equals_unmerged_and_unmerge_restores():
    m = tiny_gpt()
    x, y = batch()
    w0 = {n: p.data.copy() for n, p in m.named_parameters()}
    apply_lora(m, r=4, alpha=8, targets=TARGETS)
    randomize_B(m)
    m.eval()
    ref = m(x, y)[0].numpy()
    merge_lora(m)
    merged = m(x, y)[0].numpy()
    assert np.abs(merged - ref).max() / np.abs(ref).max() < 1e-6
    assert not np.array_equal(m.transformer.h[0].attn.c_attn.base_layer.weight.data,
                              w0["transformer.h.0.attn.c_attn.weight"])
    unmerge_lora(m)
    w = m.transformer.h[0].mlp.c_fc.base_layer.weight.data
    w_orig = w0["transformer.h.0.mlp.c_fc.weight"]
    # float32 rounding of (W + D) - D: within one ulp of |W| + |D|
    d = m.transformer.h[0].mlp.c_fc.delta_weight()
    assert np.all(np.abs(w - w_orig) <= np.spacing(np.abs(w_orig) + np.abs(d)))
    assert np.abs(m(x, y)[0].numpy() - ref).max() / np.abs(ref).max() < 1e-6


def test_merge_and_unload_gives_a_plain_gpt_that_loads_with_the_base_names():
    m = tiny_gpt()
    x, y = batch()
    names = [n for n, _ in m.named_parameters()]
    apply_lora(m, r=4, targets=TARGETS)
    randomize_B(m)
    m.eval()
    ref = m(x, y)[0].numpy()
    merge_and_unload_(m)
    assert not has_lora(m) and [n for n, _ in m.named_parameters()] == names
    fresh = tiny_gpt(seed=9)
    fresh.load_state_dict(m.state_dict())
    assert np.abs(fresh.eval()(x, y)[0].numpy() - ref).max() / np.abs(ref).max() < 1e-6


def test_only_lora_parameters_change_after_a_step_and_frozen_get_no_grad():
    m = tiny_gpt()
    apply_lora(m, r=4, targets=TARGETS)
    mark_only_lora_as_trainable(m)
    before = {n: p.data.copy() for n, p in m.named_parameters()}
    opt = m.configure_optimizer(1e-2, 0.1, (0.9, 0.99))
    opt_names = {n for _, n, _ in opt.named_params()}
    assert opt_names == {n for n in before if ".lora_" in n}
    x, y = batch()
    for _ in range(2):
        _, loss = m(x, y)
        opt.zero_grad()
        loss.backward()
        for n, p in m.named_parameters():
            assert (p.grad is not None) == (".lora_" in n), n
        opt.step()
    for n, p in m.named_parameters():
        changed = not np.array_equal(p.data, before[n])
        assert changed == (".lora_" in n), n
    assert set(opt.state) == opt_names   # optimizer state only for the adapters


def test_backward_does_not_compute_frozen_weight_gradients():
    """The base Linear node is recorded with needs_input_grad False for its weight."""
    from minigrad import ops
    seen = []
    orig = ops.Linear.backward

    def spy(self, gy):
        seen.append(self.needs_input_grad)
        return orig(self, gy)

    m = tiny_gpt()
    apply_lora(m, r=2, targets=["c_fc"])
    mark_only_lora_as_trainable(m)
    x, y = batch()
    ops.Linear.backward = spy
    try:
        m(x, y)[1].backward()
    finally:
        ops.Linear.backward = orig
    # every backward that ran asked for no gradient of a frozen (base) weight
    base_calls = [s for s in seen if len(s) == 3]       # base layers have a bias input
    assert base_calls and all(not s[1] for s in base_calls)


def test_gradcheck_through_lora_linear():
    mg.manual_seed(0)
    base = nn.Linear(5, 4).to(dtype=np.float64)
    lo = LoRALinear(base, r=3, alpha=6)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5))
    A = lo.lora_A.data.copy()
    B = rng.standard_normal((4, 3))

    def f(x, a, b):
        lo.lora_A.data, lo.lora_B.data = a.data, b.data
        lo.lora_A.requires_grad = lo.lora_B.requires_grad = False
        out = lo.base_layer(x) + mg.linear(mg.linear(x, a) * lo.scaling, b)
        ref = lo(x)   # same arrays: the layer's own forward must equal the written-out formula
        assert np.allclose(ref.data, out.data)
        return out

    gradcheck(f, [x, A, B], name="lora")
    # and the layer itself: gradients of A and B from its own forward
    lo.lora_A.data, lo.lora_B.data = A.copy(), B.copy()
    lo.lora_A.requires_grad = lo.lora_B.requires_grad = True
    xt = mg.Tensor(x, requires_grad=True)
    w = rng.standard_normal((2, 3, 4))
    (lo(xt) * mg.Tensor(w)).sum().backward()
    g2 = w.reshape(-1, 4)
    h = x.reshape(-1, 5) @ A.T                       # (N, r)
    assert np.allclose(lo.lora_B.grad.data, lo.scaling * g2.T @ h)
    assert np.allclose(lo.lora_A.grad.data, lo.scaling * (g2 @ B).T @ x.reshape(-1, 5))
    assert base.weight.grad is not None   # base not frozen here: it trains too


def test_report_in_peft_form():
    m = tiny_gpt()
    apply_lora(m, r=4, targets=["c_attn"])
    mark_only_lora_as_trainable(m)
    n_lora = 2 * 4 * (32 + 96)
    total = sum(p.size for p in m.parameters())
    assert trainable_report(m) == (f"trainable params: {n_lora:,d} || all params: {total:,d} || "
                                   f"trainable%: {100 * n_lora / total:.4f}")


def test_target_errors():
    with pytest.raises(LoRAError, match="positive integer"):
        apply_lora(tiny_gpt(), r=0)
    with pytest.raises(LoRAError, match="positive integer"):
        apply_lora(tiny_gpt(), r=-2)
    with pytest.raises(LoRAError, match="'q_proj' matches no module.*c_attn"):
        apply_lora(tiny_gpt(), targets=["q_proj"])
    with pytest.raises(LoRAError, match="CausalSelfAttention"):
        apply_lora(tiny_gpt(), targets=["attn"])
    with pytest.raises(LoRAError, match="tied"):
        apply_lora(tiny_gpt(), targets=["lm_head"])
    m = apply_lora(tiny_gpt(), targets=["attn.c_proj"])   # the PEFT suffix rule: only attention's c_proj
    assert [n for n, x in m.named_modules() if isinstance(x, LoRALinear)] == \
        ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
    with pytest.raises(LoRAError, match="already"):
        apply_lora(m)


def test_adapter_round_trip_and_wrong_base(tmp_path):
    m = tiny_gpt()
    apply_lora(m, r=4, alpha=16, targets=["c_attn", "c_fc"], dropout=0.1)
    randomize_B(m)
    path = str(tmp_path / "adapter.safetensors")
    save_lora(m, path)
    full = str(tmp_path / "model.safetensors")
    mg.io.save_module(tiny_gpt(), full)
    import os
    assert os.path.getsize(path) < os.path.getsize(full)
    x, y = batch()
    ref = m.eval()(x, y)[0].numpy()
    # the same base weights + the file = the same model
    m2 = tiny_gpt()
    load_lora(m2, path)
    assert lora_config(m2) == lora_config(m) and lora_config(m2)["alpha"] == 16.0
    assert set(lora_state_dict(m2)) == set(lora_state_dict(m))
    assert np.array_equal(m2.eval()(x, y)[0].numpy(), ref)
    # a base of another width: a clear error naming the module and the shapes
    wide = tiny_gpt(n_embd=48)
    with pytest.raises(LoRAError, match="different base model"):
        load_lora(wide, path)
    deep = tiny_gpt(n_layer=1)
    with pytest.raises(LoRAError, match="different base model"):
        load_lora(deep, path)
    with pytest.raises(LoRAError, match="not a LoRA adapter"):
        load_lora(tiny_gpt(), full)


def test_static_memory_split_trainable_frozen():
    m = tiny_gpt()
    apply_lora(m, r=4, targets=TARGETS)
    mark_only_lora_as_trainable(m)
    opt = m.configure_optimizer(1e-2, 0.0, (0.9, 0.99))
    x, y = batch()
    m(x, y)[1].backward()
    opt.step()
    s = static_memory(m, opt)
    n_lora = sum(p.size for n, p in m.named_parameters() if ".lora_" in n)
    n_all = sum(p.size for p in m.parameters())
    assert s["parameters"] == {"trainable": 4 * n_lora, "frozen": 4 * (n_all - n_lora)}
    assert s["gradients"] == {"trainable": 4 * n_lora, "frozen": 0}
    assert s["optimizer"] == {"trainable": 8 * n_lora, "frozen": 0}


# --------------------------------------------------------------------------- QLoRA: adapters on a packed base
def quant_lora(scheme="nf4", seed=0, in_f=64, out_f=12, dtype=np.float64):
    from minigrad import quant
    from minigrad.nn.quantized import QuantLinear
    mg.manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    q = QuantLinear.from_linear(lin, quant.quantize_tensor(lin.weight.data, scheme))
    if dtype == np.float64:
        q.bias.data = q.bias.data.astype(np.float64)
    return q, LoRALinear(q, r=3, alpha=6)


@pytest.mark.parametrize("scheme", ["nf4", "q4_0"])
def test_qlora_gradients_match_a_float_base_dequantized_from_the_same_codes(scheme):
    q, lo = quant_lora(scheme)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 64))
    A = lo.lora_A.data.astype(np.float64)
    B = rng.standard_normal((12, 3))
    lo.lora_A.data, lo.lora_B.data = A.copy(), B.copy()
    # a float twin: Linear whose weight is the dequantized codes (float64), same adapter arrays
    twin = nn.Linear(64, 12)
    twin.weight.data = q.weight.dequantize(np.float64)
    twin.bias.data = q.bias.data.copy()
    tlo = LoRALinear(twin, r=3, alpha=6)
    tlo.lora_A.data, tlo.lora_B.data = A.copy(), B.copy()
    twin.requires_grad_(False)
    w = rng.standard_normal((2, 3, 12))
    grads = []
    for layer in (lo, tlo):
        xt = mg.Tensor(x, requires_grad=True)
        out = layer(xt)
        (out * mg.Tensor(w)).sum().backward()
        grads.append((out.numpy(), xt.grad.numpy(), layer.lora_A.grad.numpy(), layer.lora_B.grad.numpy()))
        layer.zero_grad()
    for a, b in zip(*grads):
        assert np.allclose(a, b, rtol=1e-10, atol=1e-12)
    assert not np.allclose(q.weight.dequantize(np.float64), 0)
    # and the numerical oracle, through the packed layer (gradients of x, A and B)

    def f(x, a, b):
        lo.lora_A.data, lo.lora_B.data = a.data, b.data
        return q(x) + mg.linear(mg.linear(x, a) * lo.scaling, b)
    gradcheck(f, [x, A, B], name=f"qlora-{scheme}")
    lo.lora_A.data, lo.lora_B.data = A.copy(), B.copy()
    assert np.allclose(lo(mg.Tensor(x)).numpy(), f(mg.Tensor(x), mg.Tensor(A), mg.Tensor(B)).numpy())


def test_qlora_gpt_trains_only_adapters_and_refuses_to_merge_into_codes():
    from minigrad import quant
    from minigrad.nn.quantized import QuantLinear
    m = tiny_gpt(n_embd=64)
    quant.quantize_(m, "nf4")
    apply_lora(m, r=4, targets=TARGETS)
    mark_only_lora_as_trainable(m)
    assert all(isinstance(x.base_layer, QuantLinear) for _, x in m.named_modules() if isinstance(x, LoRALinear))
    x, y = batch()
    before_codes = {n: b.copy() for n, _, _, b in m.named_buffers()}
    ref = m.eval()(x, y)[0].numpy()
    m.train()
    opt = m.configure_optimizer(1e-2, 0.0, (0.9, 0.99))
    assert {n for _, n, _ in opt.named_params()} == {n for n, _ in m.named_parameters() if ".lora_" in n}
    for _ in range(2):
        _, loss = m(x, y)
        opt.zero_grad()
        loss.backward()
        assert all((p.grad is not None) == (".lora_" in n) for n, p in m.named_parameters())
        opt.step()
    assert all(np.array_equal(b, before_codes[n]) for n, _, _, b in m.named_buffers())
    assert not np.allclose(m.eval()(x, y)[0].numpy(), ref)
    with pytest.raises(LoRAError, match="quantized base.*float base"):
        merge_lora(m)
    t, a = __import__("minigrad.nn.lora", fromlist=["x"]).count_parameters(m)
    assert a > 10 * t and "trainable%" in trainable_report(m)
    s = static_memory(m, opt)
    packed = sum(b.nbytes for _, _, _, b in m.named_buffers())
    assert packed > 0 and s["parameters"]["frozen"] >= packed
    assert s["optimizer"]["frozen"] == 0 and s["gradients"]["frozen"] == 0


def test_memory_plot_draws_frozen_weights_apart():
    from minigrad.memory import MemoryTracker
    m = tiny_gpt()
    apply_lora(m, r=4, targets=TARGETS)
    mark_only_lora_as_trainable(m)
    opt = m.configure_optimizer(1e-2, 0.0, (0.9, 0.99))
    x, y = batch()
    with MemoryTracker(m, opt) as mt:
        mt.mark("forward")
        _, loss = m(x, y)
        mt.mark("backward")
        loss.backward()
        opt.step()
        mt.mark("end")
    fig = mt.plot()
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:2] == ["frozen parameters", "trainable parameters"] or \
        set(labels) >= {"frozen parameters", "trainable parameters"}
    frozen = static_memory(m, opt)["parameters"]["frozen"] / 2 ** 20
    # the lowest band is the frozen weights: its top edge is their size in MiB
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert np.isclose(band.max(), frozen, rtol=1e-6)
