"""Quantized weights: formats, their byte layouts, the kernels, QuantLinear and quantize_."""
import numpy as np
import pytest

import minigrad as mg
from minigrad import nn, quant
from minigrad.gradcheck import gradcheck
from minigrad.kernels import quant as qk
from minigrad.kernels import threads
from minigrad.nn.quantized import QuantEmbedding, QuantLinear
from minigrad.quant import NF4_LEVELS, QuantError, quantize_tensor

FORMATS = ("fp16", "bf16", "int8", "q8_0", "q4_0", "nf4")


def _w(rows=48, cols=128, seed=0):
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)


# --------------------------------------------------------------------------- formats
@pytest.mark.parametrize("scheme", FORMATS)
def test_round_trip_within_the_format_bound(scheme):
    w = _w()
    w[3] *= 100                                   # one loud row: scales are per row/block
    w[5, :] = 0                                   # an all-zero row: scale 0 must not give NaN
    qt = quantize_tensor(w, scheme)
    d = qt.dequantize()
    assert d.shape == w.shape and d.dtype == np.float32 and np.isfinite(d).all()
    err = np.abs(d - w)
    if scheme == "fp16":
        assert (err <= np.abs(w) * 2.0 ** -11 + 1e-7).all()
    elif scheme == "bf16":
        assert (err <= np.abs(w) * 2.0 ** -8).all()
    elif scheme == "int8":                        # half a step of absmax/127, per row
        assert (err <= np.abs(w).max(1, keepdims=True) / 127 * 0.5 + 1e-6).all()
    else:
        block = 64 if scheme == "nf4" else 32
        amax = np.abs(w).reshape(48, -1, block).max(-1, keepdims=True)
        # half a step, plus the codes' 127 (or 8) steps times the float16 rounding of the scale
        step = {"q8_0": amax / 127 * (0.5 + 127 * 2.0 ** -11), "q4_0": amax / 8 * (1 + 8 * 2.0 ** -11),
                "nf4": None}[scheme]
        if scheme == "nf4":     # half the widest gap of levels, plus the error of the int8 absmax
            a = qt.arrays
            am = quant.NF4.absmax_of(a["absmax_q"], a["absmax_scale"], a["absmax_offset"],
                                     np.arange(amax.size)).reshape(amax.shape)
            step = am * np.diff(NF4_LEVELS).max() / 2 + np.abs(am - amax)
        assert (err.reshape(48, -1, block) <= step + 1e-6).all()
    assert (d[5] == 0).all()


def test_bits_per_weight_and_container_bytes():
    for scheme, bpw in [("fp16", 16), ("bf16", 16), ("q8_0", 8.5), ("q4_0", 4.5), ("gptq", 4.5)]:
        assert quant.bits_per_weight(scheme) == bpw
    assert 4.12 < quant.bits_per_weight("nf4") < 4.14          # 4 + 8/64 + a little
    qt = quantize_tensor(_w(64, 256), "q8_0")
    assert qt.nbytes == 64 * 256 // 32 * 34 == qt.format.ggml_blocks(qt.arrays).nbytes
    assert qt.bytes_by_kind() == {"codes": 64 * 256, "scales": 64 * 256 // 32 * 2}


def test_q8_0_block_by_hand():
    x = np.arange(-16, 16, dtype=np.float32) * 0.5               # absmax 8 -> d = 8/127
    qt = quantize_tensor(x[None], "q8_0")
    blk = qt.format.ggml_blocks(qt.arrays)[0]
    assert blk.size == 34
    d = np.float32(8) / np.float32(127)
    assert blk[:2].tobytes() == np.float16(d).tobytes()
    q = blk[2:].view(np.int8)
    # round half away from zero of x/d: -8/d = -127 exactly, 0.5/d = 7.9375 -> 8
    expect = np.array([int(np.sign(v) * np.floor(abs(v) + 0.5)) for v in (x / d)], np.int8)
    assert (q == expect).all() and q[0] == -127 and q[17] == 8


def test_q4_0_block_by_hand():
    x = np.zeros(32, np.float32)
    x[0], x[1], x[16], x[31] = -4.0, 1.0, 2.0, -0.5   # largest magnitude -4 -> d = -4/-8 = 0.5
    qt = quantize_tensor(x[None], "q4_0")
    blk = qt.format.ggml_blocks(qt.arrays)[0]
    assert blk.size == 18 and blk[:2].tobytes() == np.float16(0.5).tobytes()
    codes = [min(15, int(v / 0.5 + 8.5)) for v in x]           # trunc(x/d + 8.5), clipped
    assert codes[0] == 0 and codes[1] == 10 and codes[16] == 12 and codes[31] == 7
    # GGML's nibble order: byte j = code j (low nibble) | code j+16 (high nibble)
    expect = [codes[j] | (codes[j + 16] << 4) for j in range(16)]
    assert blk[2:].tolist() == expect


def test_nf4_levels_and_block_by_hand():
    # QLoRA's table (Dettmers et al. 2023, appendix E), to 4 decimals
    paper = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
             0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]
    assert np.allclose(NF4_LEVELS, paper, atol=1e-4)
    x = np.zeros(64, np.float32)
    x[0], x[1], x[2], x[3] = 2.0, -2.0, 1.0, 0.05              # absmax 2
    qt = quantize_tensor(x[None], "nf4")
    codes = qt.arrays["codes"][0]
    assert codes.size == 32
    # even element in the low nibble: (x0 -> level 15, x1 -> level 0), (x2 -> 0.5 -> 0.4407 = 12, x3 -> 0.025 -> 0 = 7)
    assert codes[0] == (15 | (0 << 4)) and codes[1] == (12 | (7 << 4)) and codes[2] == (7 | (7 << 4))
    # one block, one group: offset is the absmax, so the int8 code of absmax - offset is 0
    assert qt.arrays["absmax_offset"][0] == 2.0 and qt.arrays["absmax_q"][0] == 0
    assert qt.dequantize()[0, 2] == pytest.approx(2.0 * NF4_LEVELS[12])


def test_nf4_double_quantization_over_many_blocks():
    w = _w(64, 512) * np.linspace(0.1, 3, 64)[:, None].astype(np.float32)
    qt = quantize_tensor(w, "nf4")
    nb = 64 * 512 // 64
    assert qt.arrays["absmax_q"].shape == (nb,) and qt.arrays["absmax_scale"].shape == (nb // 256,)
    true_absmax = np.abs(w).reshape(-1, 64).max(-1)
    got = quant.NF4.absmax_of(qt.arrays["absmax_q"], qt.arrays["absmax_scale"], qt.arrays["absmax_offset"],
                              np.arange(nb))
    assert np.abs(got - true_absmax).max() <= qt.arrays["absmax_scale"].max() * 0.5 + 1e-6


def test_bf16_rounds_to_nearest_even():
    u = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0x7FC00001], np.uint32)   # ties, above tie, NaN
    h = quant.bf16_from_f32(u.view(np.float32))
    assert h[:3].tolist() == [0x3F80, 0x3F82, 0x3F81] and np.isnan(quant.f32_from_bf16(h[3:])).all()


def test_gguf_package_gives_the_same_bytes():
    gguf = pytest.importorskip("gguf", reason="gguf is the byte-layout reference (pip install gguf)")
    w = _w(40, 256, seed=3)
    w[0, :32] = 0
    w[1, 5] = 1e-3
    for scheme, t in [("q8_0", gguf.GGMLQuantizationType.Q8_0), ("q4_0", gguf.GGMLQuantizationType.Q4_0)]:
        ref = gguf.quants.quantize(w, t)
        qt = quantize_tensor(w, scheme)
        assert np.array_equal(ref, qt.format.ggml_blocks(qt.arrays)), scheme
        back = qt.format.from_ggml(ref)
        assert all(np.array_equal(back[k], qt.arrays[k]) for k in qt.arrays)
        assert np.array_equal(gguf.quants.dequantize(ref, t), quantize_tensor(w, scheme).dequantize())
    ref = gguf.quants.quantize(w, gguf.GGMLQuantizationType.BF16)
    assert np.array_equal(ref.view(np.uint16).reshape(w.shape), quant.bf16_from_f32(w))


def test_block_rule_refuses_with_the_layer_name():
    with pytest.raises(QuantError, match="multiple of its block of 32"):
        quantize_tensor(_w(4, 48), "q4_0", "h.0.mlp.c_fc")
    with pytest.raises(QuantError, match="h.0.mlp.c_fc.*multiple of its block of 64"):
        quantize_tensor(_w(4, 96), "nf4", "h.0.mlp.c_fc")
    quantize_tensor(_w(4, 48), "int8")                         # per channel: any width
    with pytest.raises(QuantError, match="valid: fp16, bf16, int8, q8_0, q4_0, nf4, gptq"):
        quantize_tensor(_w(), "q5_k")


def test_mismatched_arrays_are_rejected():
    qt = quantize_tensor(_w(), "q4_0")
    with pytest.raises(QuantError, match="truncated or mismatched"):
        quant.QuantizedTensor("q4_0", (48, 128), {"codes": qt.arrays["codes"][:, :-1], "scales": qt.arrays["scales"]})
    with pytest.raises(QuantError, match="missing array"):
        quant.QuantizedTensor("int8", (48, 128), {"codes": np.zeros((48, 128), np.int8)})


# --------------------------------------------------------------------------- kernels
def test_half_conversion_of_every_finite_float16():
    h = np.arange(1 << 16, dtype=np.uint16)
    f = h.view(np.float16)
    h = h[np.isfinite(f)][None]
    out = np.empty(h.shape, np.float32)
    qk.dq_fp16(h, 0, out)
    assert np.array_equal(out, h.view(np.float16).astype(np.float32))


@pytest.mark.parametrize("scheme", FORMATS)
@pytest.mark.parametrize("n", [1, 3, 20])
def test_kernels_equal_dequantize_then_matmul(scheme, n):
    w = _w(96, 256, seed=1)
    qt = quantize_tensor(w, scheme)
    d = qt.dequantize()
    x = np.random.default_rng(2).standard_normal((n, 256)).astype(np.float32)
    y = qk.matmul(x, scheme, qt.arrays, qt.shape)
    assert y.shape == (n, 96) and np.allclose(y, x @ d.T, rtol=1e-5, atol=1e-4)
    g = np.random.default_rng(3).standard_normal((n, 96)).astype(np.float32)
    assert np.allclose(qk.matmul_t(g, scheme, qt.arrays, qt.shape), g @ d, rtol=1e-5, atol=1e-4)
    tile = np.empty((7, 256), np.float32)
    assert np.array_equal(qk.dequantize_tile(scheme, qt.arrays, 5, tile), d[5:12])


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("scheme", ["int8", "q8_0", "q4_0", "fp16", "bf16", "nf4"])
def test_pool_split_gives_the_serial_result(scheme, n, monkeypatch):
    qt = quantize_tensor(_w(512, 256, seed=4), scheme)
    x = np.random.default_rng(5).standard_normal((n, 256)).astype(np.float32)
    monkeypatch.setattr(qk, "MIN_POOL_BYTES", 0)
    monkeypatch.setattr(threads, "row_chunks", lambda n, m: threads.split(n, 2))
    split = qk.matvec(x, scheme, qt.arrays, 512)
    monkeypatch.setattr(qk, "MIN_POOL_BYTES", 1 << 40)
    assert np.array_equal(split, qk.matvec(x, scheme, qt.arrays, 512))


# --------------------------------------------------------------------------- QuantLinear
@pytest.mark.parametrize("scheme", ["fp16", "int8", "q8_0", "nf4"])
def test_quant_linear_forward_and_input_gradient(scheme):
    lin = nn.Linear(128, 40)
    q = QuantLinear.from_linear(lin, quantize_tensor(lin.weight.data, scheme))
    d = q.weight.dequantize()
    x = mg.tensor(np.random.default_rng(0).standard_normal((2, 5, 128)).astype(np.float32), requires_grad=True)
    y = q(x)
    ref = x.data @ d.T + lin.bias.data
    assert y.shape == (2, 5, 40) and np.allclose(y.data, ref, rtol=1e-5, atol=1e-5)
    gy = np.random.default_rng(1).standard_normal(y.shape).astype(np.float32)
    (y * mg.tensor(gy)).sum().backward()
    assert np.allclose(x.grad.data if hasattr(x.grad, "data") else x.grad, gy @ d, rtol=1e-5, atol=1e-5)
    assert q.bias.grad is None and q.weight.grad is None
    # float64 through the array path: the numerical gradient is the oracle
    q64 = QuantLinear.from_linear(lin, quantize_tensor(lin.weight.data, scheme)).to(np.float64)
    assert q64.weight.arrays[q64.weight.format.main].dtype == q.weight.data.dtype   # packed dtypes kept
    x64 = np.random.default_rng(2).standard_normal((3, 128))
    gradcheck(lambda t: q64(t), [x64])


def test_quant_weight_is_frozen():
    q = QuantLinear.from_linear(nn.Linear(64, 8), quantize_tensor(_w(8, 64), "q8_0"))
    with pytest.raises(QuantError, match="frozen"):
        q.weight.requires_grad = True
    with pytest.raises(QuantError, match="frozen"):
        q.weight.grad = np.zeros((8, 64), np.float32)
    assert [p for p in q.parameters() if p.requires_grad] == []


def _tiny_gpt(n_embd=64):
    from lm.config import ModelConfig
    from lm.model import GPT
    return GPT(ModelConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=n_embd))


def test_quantize_leaves_excluded_modules_alone_and_ties_the_embedding():
    model = _tiny_gpt()
    ids = np.random.default_rng(0).integers(0, 40, (2, 16))
    ref = model(ids, ids)[0].data
    fc = model.transformer.h[0].mlp.c_fc
    w_before = fc.weight.data.copy()
    assert quant.quantize_(model, "q8_0", exclude=["h.0.mlp.c_fc"]) is model
    assert model.transformer.h[0].mlp.c_fc is fc and np.array_equal(fc.weight.data, w_before)
    assert isinstance(model.transformer.h[1].mlp.c_fc, QuantLinear)
    assert isinstance(model.lm_head, QuantLinear)
    wte = model.transformer.wte
    assert isinstance(wte, QuantEmbedding) and wte.linear is model.lm_head
    out = model(ids, ids)[0].data
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()
    rep = quant.bytes_report(model)
    assert rep["total"] == rep["codes"] + rep["scales"] + rep["float"]
    assert rep["by_module"]["lm_head"]["scheme"] == "q8_0" and "transformer.wte" not in rep["by_module"]
    # exclude the head: the tied embedding stays float too
    m2 = quant.quantize_(_tiny_gpt(), "q4_0", exclude=["lm_head"])
    assert type(m2.lm_head) is nn.Linear and type(m2.transformer.wte) is nn.Embedding


def test_quantize_checks_every_layer_before_changing_any():
    model = _tiny_gpt(n_embd=32)               # 32 inputs: nf4's block of 64 does not fit
    with pytest.raises(QuantError, match="cannot quantize"):
        quant.quantize_(model, "nf4")
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    with pytest.raises(QuantError, match="calibration"):
        quant.quantize_(model, "gptq")


def test_dequantize_restores_float_layers():
    model = quant.quantize_(_tiny_gpt(), "fp16")
    q = model.transformer.h[0].attn.c_attn.weight.dequantize()
    quant.dequantize_(model)
    assert type(model.transformer.h[0].attn.c_attn) is nn.Linear
    assert np.array_equal(model.transformer.h[0].attn.c_attn.weight.data, q)
    assert model.transformer.wte.weight is model.lm_head.weight


# --------------------------------------------------------------------------- GPTQ
def test_gptq_has_lower_layer_output_error_than_round_to_nearest():
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((128, 128)) * 0.3 + np.eye(128)        # correlated input channels
    X = (rng.standard_normal((1024, 128)) @ mix * np.linspace(0.2, 3, 128)).astype(np.float32)
    model = nn.Sequential(nn.Linear(128, 64))
    W = model[0].weight.data.copy()
    rtn = quantize_tensor(W, "q4_0").dequantize()
    quant.quantize_(model, "gptq", calib=[X[i:i + 256] for i in range(0, 1024, 256)])
    q = model[0]
    assert isinstance(q, QuantLinear) and q.scheme == "gptq"
    g = q.weight.dequantize()
    err_rtn = np.linalg.norm(X @ (W - rtn).T)
    err_gptq = np.linalg.norm(X @ (W - g).T)
    assert err_gptq < 0.9 * err_rtn
    # the q4_0 layout: every block's scale is float16 and every code a nibble, so q4_0 reads it
    fmt = quant.FORMATS["q4_0"]
    assert np.array_equal(fmt.unpack(q.weight.arrays, q.weight.shape), g)


def test_gptq_act_order_matches_the_error_of_the_inputs_it_favours():
    """act_order quantizes the columns by decreasing Hessian diagonal; the blocks stay q4_0's."""
    from minigrad.gptq import gptq_weight
    rng = np.random.default_rng(1)
    X = (rng.standard_normal((2048, 96)) * np.exp(rng.standard_normal(96))).astype(np.float64)  # uneven channels
    W = rng.standard_normal((40, 96)).astype(np.float32)
    H = 2 * X.T @ X
    err = {}
    for ao in (False, True):
        d, q = gptq_weight(W, H, act_order=ao)
        g = quant.FORMATS["q4_0"].unpack(Q4_0_pack(d, q), W.shape)
        err[ao] = np.linalg.norm(X @ (W - g).T)
        assert q.max() <= 15 and np.all(np.isfinite(d))
    rtn = quantize_tensor(W, "q4_0").dequantize()
    assert err[True] < 0.9 * np.linalg.norm(X @ (W - rtn).T)
    assert err[True] < err[False]
    # off, the order is left to right: the result does not depend on the permutation code
    d0, q0 = gptq_weight(W, H)
    d1, q1 = gptq_weight(W, H, act_order=False)
    assert np.array_equal(q0, q1) and np.array_equal(d0, d1)


def Q4_0_pack(d, q):
    return quant.FORMATS["q4_0"].pack_codes(d, q)


@pytest.mark.parametrize("scheme", ["int8", "q8_0", "q4_0", "fp16", "bf16", "nf4"])
def test_decode_fast_path_equals_the_graph_path(scheme):
    """QuantLinear without a graph to record (decoding) calls the loop straight; same bits."""
    lin = nn.Linear(128, 72)
    q = QuantLinear.from_linear(lin, quantize_tensor(lin.weight.data, scheme))
    x = np.random.default_rng(0).standard_normal((1, 2, 128)).astype(np.float32)
    with mg.no_grad():
        fast = q(mg.tensor(x)).data
    graph = q(mg.tensor(x, requires_grad=True))
    assert graph.requires_grad and np.array_equal(fast, graph.data)
    # new codes (load_state_dict of another layer's) are seen: the prepared plan is rebuilt
    other = QuantLinear.from_linear(nn.Linear(128, 72), quantize_tensor(nn.Linear(128, 72).weight.data, scheme))
    q.load_state_dict(other.state_dict())
    with mg.no_grad():
        assert np.array_equal(q(mg.tensor(x)).data, other(mg.tensor(x, requires_grad=True)).data)


@pytest.mark.parametrize("scheme", FORMATS)
def test_array_path_equals_the_compiled_loops(scheme, monkeypatch):
    """The path CuPy arrays (and runs without Numba) take: tiles from ``unpack`` and xp.matmul."""
    lin = nn.Linear(128, 72)
    q = QuantLinear.from_linear(lin, quantize_tensor(lin.weight.data, scheme))
    x = np.random.default_rng(0).standard_normal((2, 3, 128)).astype(np.float32)
    fast = q(mg.tensor(x)).data
    monkeypatch.setattr(qk, "compiled", lambda *a: False)
    monkeypatch.setattr(qk, "TILE_ELEMS", 128 * 20)          # several tiles
    xt = mg.tensor(x, requires_grad=True)
    slow = q(xt)
    assert slow.data.dtype == np.float32 and np.allclose(slow.data, fast, rtol=1e-5, atol=1e-5)
    slow.sum().backward()
    g = xt.grad.data if hasattr(xt.grad, "data") else xt.grad
    assert np.allclose(g, np.ones((2, 3, 72), np.float32) @ q.weight.dequantize(), atol=1e-4)
