"""Pruning masks (minigrad.prune), compact storage (minigrad.sparse) and SVD factorization.

Masks must give exact sparsities and valid N:M groups, survive AdamW with weight decay, and
leave the state dict with the model's ordinary names; Wanda's score is checked by hand.
"""
import numpy as np
import pytest

import minigrad as mg
from minigrad import nn
from minigrad.calib import collect
from minigrad.nn.lowrank import LowRankLinear, factorize_
from minigrad.prune import check_nm, make_permanent, masked_parameters, prune_, restore_masks_, sparsity_of
from minigrad.sparse import (load_sparse, pack_bitmask, pack_nm, save_sparse, stored_bytes, unpack_bitmask,
                             unpack_nm)


class MLP(nn.Module):
    def __init__(self, d=16, h=32):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(mg.relu(self.fc1(x)))


def batches(n=3, d=16, seed=0):
    rng = np.random.default_rng(seed)
    # channels of very different scales, so that Wanda and magnitude disagree
    scale = np.geomspace(0.05, 20.0, d)
    return [mg.Tensor((rng.standard_normal((8, d)) * scale).astype(np.float32)) for _ in range(n)]


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_exact_sparsity(method, scope):
    m = MLP()
    prune_(m, method, sparsity=0.5, scope=scope, calib=batches())
    s = sparsity_of(m)
    assert s["total"] == 0.5
    if scope == "layer":
        assert s["fc1"] == 0.5 and s["fc2"] == 0.5
        if method == "wanda":  # compared within each output row: every row keeps half
            for lin in (m.fc1, m.fc2):
                assert ((lin.weight.data == 0).sum(axis=1) == lin.in_features // 2).all()


@pytest.mark.parametrize("pattern,n,mm", [("2:4", 2, 4), ("4:8", 4, 8)])
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_nm_pattern(pattern, n, mm, method):
    m = MLP()
    prune_(m, method, pattern=pattern, calib=batches())
    for lin in (m.fc1, m.fc2):
        w = lin.weight.data
        assert check_nm(w, n, mm)
        assert ((w.reshape(w.shape[0], -1, mm) != 0).sum(-1) == n).all()  # exactly n kept
    # within each group the largest |w| survive (magnitude)
    if method == "magnitude":
        m2 = MLP()
        w0 = m2.fc1.weight.data.copy()
        prune_(m2, "magnitude", pattern=pattern)
        g = np.abs(w0).reshape(w0.shape[0], -1, mm)
        kept = (m2.fc1.weight.data.reshape(g.shape) != 0)
        assert (np.sort(g, -1)[..., -n:].sum(-1) == pytest.approx((g * kept).sum(-1))), "wrong weights kept"


def test_wanda_score_by_hand():
    lin = nn.Linear(4, 2, bias=False)
    lin.weight.data[...] = np.array([[1.0, -2.0, 3.0, 0.5], [4.0, 1.0, -1.0, 2.0]], dtype=np.float32)
    x = np.array([[1.0, 0.1, 0.2, 10.0], [1.0, 0.1, 0.2, 10.0]], dtype=np.float32)
    model = nn.Sequential(lin)
    prune_(model, "wanda", sparsity=0.5, calib=[mg.Tensor(x)])
    # ||X_j|| = sqrt(2) * (1, .1, .2, 10); scores row 0: (1, .2, .6, 5) -> keep cols 0 and 3
    # row 1: (4, .1, .2, 20) -> keep cols 0 and 3; magnitude would keep cols 1, 2 in row 0
    np.testing.assert_array_equal(lin.weight.data != 0, [[True, False, False, True], [True, False, False, True]])
    lin2 = nn.Linear(4, 2, bias=False)
    lin2.weight.data[...] = np.array([[1.0, -2.0, 3.0, 0.5], [4.0, 1.0, -1.0, 2.0]], dtype=np.float32)
    prune_(nn.Sequential(lin2), "magnitude", sparsity=0.5)
    np.testing.assert_array_equal(lin2.weight.data != 0, [[False, True, True, False], [True, False, False, True]])


def test_wanda_uses_the_calibration_collector():
    m = MLP()
    data = batches()
    stats = collect(m, data, modules=["fc1", "fc2"], want=("sqnorm",))
    a, b = MLP(), MLP()
    b.load_state_dict(m.state_dict())
    a.load_state_dict(m.state_dict())
    prune_(a, "wanda", sparsity=0.5, calib=stats)
    prune_(b, "wanda", sparsity=0.5, calib=data)
    np.testing.assert_array_equal(a.fc1.weight.data, b.fc1.weight.data)
    np.testing.assert_array_equal(a.fc2.weight.data, b.fc2.weight.data)


def test_mask_survives_adamw_with_weight_decay():
    m = MLP()
    opt = mg.optim.AdamW(m.named_parameters(), lr=1e-2, weight_decay=0.1)
    data = batches(4)

    def step():
        for x in data:
            opt.zero_grad()
            loss = ((m(x) - x * 0.5) ** 2).mean()
            loss.backward()
            mg.optim.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()

    step()  # dense training first: Adam's moments are non-zero everywhere
    prune_(m, "magnitude", sparsity=0.6)
    pruned = {n: (p.data == 0).copy() for n, p in m.named_parameters() if p.ndim == 2}
    m.zero_grad()
    m.fc1(data[0]).sum().backward()
    assert (m.fc1.weight.grad.data[pruned["fc1.weight"]] == 0).all(), "gradient not masked"
    for _ in range(5):
        step()
    for n, p in m.named_parameters():
        if p.ndim == 2:
            assert (p.data[pruned[n]] == 0).all(), f"{n}: a pruned weight was revived"
            assert (p.data[~pruned[n]] != 0).all()
    # make_permanent: plain weights, zeros kept, training may move them again
    make_permanent(m)
    assert masked_parameters(m) == {}
    assert (m.fc1.weight.data[pruned["fc1.weight"]] == 0).all()
    step()
    assert (m.fc1.weight.data[pruned["fc1.weight"]] != 0).any()


def test_state_dict_has_ordinary_names_both_ways():
    m = MLP()
    names = list(m.state_dict())
    prune_(m, "magnitude", sparsity=0.5)
    assert list(m.state_dict()) == names  # no weight_orig / weight_mask
    fresh = MLP()
    fresh.load_state_dict(m.state_dict())
    np.testing.assert_array_equal(fresh.fc1.weight.data, m.fc1.weight.data)
    other = MLP()
    m.load_state_dict(other.state_dict())     # an unpruned state into the pruned model
    np.testing.assert_array_equal(m.fc2.weight.data, other.fc2.weight.data)
    restore_masks_(fresh)
    assert set(masked_parameters(fresh)) == {"fc1.weight", "fc2.weight"}


def test_repruning_keeps_earlier_zeros():
    m = MLP()
    prune_(m, "magnitude", sparsity=0.3)
    z1 = m.fc1.weight.data == 0
    prune_(m, "magnitude", sparsity=0.6)
    assert (m.fc1.weight.data[z1] == 0).all()
    assert sparsity_of(m)["fc1"] == round(0.6 * 512) / 512
    z2 = m.fc1.weight.data == 0
    prune_(m, "wanda", sparsity=0.75, calib=batches())  # per row: rows already past 75% keep theirs
    assert (m.fc1.weight.data[z2] == 0).all()
    assert ((m.fc1.weight.data == 0).sum(axis=1) >= 12).all()


def test_tied_weights_are_left_alone_by_default():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(8, 4)
            self.body = nn.Linear(4, 4)
            self.head = nn.Linear(4, 8, bias=False)
            self.head.weight = self.emb.weight

    t = Tied()
    prune_(t, "magnitude", sparsity=0.5)
    assert (t.emb.weight.data != 0).all() and (t.body.weight.data == 0).mean() == 0.5


@pytest.mark.parametrize("kw,msg", [
    (dict(sparsity=1.0), "sparsity must be in"),
    (dict(sparsity=-0.1), "sparsity must be in"),
    (dict(sparsity=0.5, pattern="3:3"), "unknown pattern"),
    (dict(sparsity=0.5, pattern="dense"), "unknown pattern"),
    (dict(pattern="2:4", sparsity=0.7), "means sparsity 0.5"),
    (dict(pattern="4:32"), "multiple of 32"),
    (dict(method="wanda", sparsity=0.5), "Wanda needs calibration data"),
    (dict(method="random", sparsity=0.5), "unknown pruning method"),
    (dict(sparsity=0.5, targets=["nothing"]), "no Linear module matches"),
])
def test_bad_input(kw, msg):
    kw = dict({"method": "magnitude"}, **kw)
    with pytest.raises(ValueError, match=msg):
        prune_(MLP(), **kw)


# --------------------------------------------------------------------------- compact storage
def test_bitmask_round_trip_and_bytes(tmp_path):
    m = MLP()
    prune_(m, "magnitude", sparsity=0.5)
    w = m.fc1.weight.data
    p = pack_bitmask(w)
    assert p["bitmask"].nbytes == w.size // 8 and p["values"].size == w.size // 2
    np.testing.assert_array_equal(unpack_bitmask(p["bitmask"], p["values"], w.shape), w)
    # the bit order is documented: least significant bit first, row-major
    assert (p["bitmask"][0] & 1) == (w.ravel()[0] != 0)
    layout = {"fc1.weight": "bitmask", "fc2.weight": "bitmask"}
    path = str(tmp_path / "m.safetensors")
    save_sparse(m.state_dict(), path, layout)
    back = load_sparse(path)
    assert set(back) == set(m.state_dict())
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(back[k], v)
    b = stored_bytes(m.state_dict(), layout)
    n = 2 * 16 * 32
    assert b["dense"] - b["packed"] == n * 4 - (n // 8 + n // 2 * 4)


@pytest.mark.parametrize("n,mm,bits", [(2, 4, 2), (4, 8, 3)])
def test_nm_round_trip(n, mm, bits):
    m = MLP()
    prune_(m, "magnitude", pattern=f"{n}:{mm}")
    w = m.fc2.weight.data
    p = pack_nm(w, n, mm)
    assert p["values"].shape == (w.shape[0], w.shape[1] * n // mm)
    assert p["indices"].nbytes == int(np.ceil(w.size * n // mm * bits / 8))
    np.testing.assert_array_equal(unpack_nm(p["values"], p["indices"], w.shape, n, mm), w)
    w2 = w.copy()
    w2[0, :mm] = 1.0
    with pytest.raises(ValueError, match="not"):
        pack_nm(w2, n, mm)


def test_nm_indices_by_hand():
    w = np.array([[0, 5, 0, 7, 1, 0, 0, 2]], dtype=np.float32)
    p = pack_nm(w, 2, 4)
    np.testing.assert_array_equal(p["values"], [[5, 7, 1, 2]])
    # positions 1, 3, 0, 3 in 2 bits each, LSB first: 01 11 00 11 -> 0b11001101
    assert p["indices"].tolist() == [0b11001101]


# --------------------------------------------------------------------------- low rank
def test_factorize_is_eckart_young():
    m = MLP(16, 32)
    w = m.fc1.weight.data.astype(np.float64).copy()
    s = np.linalg.svd(w, compute_uv=False)
    factorize_(m, rank=4, targets=["fc1"])
    assert isinstance(m.fc1, LowRankLinear) and isinstance(m.fc2, nn.Linear)
    err = np.linalg.norm(w - m.fc1.dense_weight().astype(np.float64))
    assert err == pytest.approx(np.sqrt((s[4:] ** 2).sum()), rel=1e-5)
    assert m.low_rank_ranks == {"fc1": 4}
    x = batches(1)[0]
    assert m(x).shape == (8, 16)


def test_factorize_energy_and_errors():
    m = MLP(16, 32)
    s = np.linalg.svd(m.fc1.weight.data.astype(np.float64), compute_uv=False)
    e = np.cumsum(s ** 2) / (s ** 2).sum()
    factorize_(m, energy=0.5)
    r = m.fc1.rank
    assert e[r - 1] >= 0.5 > (e[r - 2] if r > 1 else 0)
    with pytest.raises(ValueError, match="below min"):
        factorize_(MLP(16, 32), rank=16)
    with pytest.raises(ValueError, match="exactly one"):
        factorize_(MLP(), rank=2, energy=0.5)
    with pytest.raises(ValueError, match="energy must be"):
        factorize_(MLP(), energy=1.5)


def test_factorized_layer_trains():
    m = MLP(16, 32)
    factorize_(m, rank=4)
    opt = mg.optim.AdamW(m.named_parameters(), lr=1e-2)
    x = batches(1)[0]
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = ((m(x) - x) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.data))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("fmt,bits", [("bitmask+q4_0", 1 + 4.5 / 2), ("2:4+q4_0", 1 + 4.5 / 2),
                                      ("bitmask+q8_0", 1 + 8.5 / 2), ("q4_0", 4.5)])
def test_quantized_values_round_trip(fmt, bits):
    from minigrad.quant import quantize_tensor
    from minigrad.sparse import dequantized, pack_state, unpack_state
    m = MLP(64, 128)
    if fmt != "q4_0":
        prune_(m, "magnitude", sparsity=0.5 if fmt.startswith("bitmask") else None,
               pattern="2:4" if fmt.startswith("2:4") else "unstructured", scope="layer")
    w = m.fc1.weight.data
    arrays, meta = pack_state({"w": w}, {"w": fmt})
    back = unpack_state(arrays, meta)["w"]
    assert (back[w == 0] == 0).all()
    assert sum(a.nbytes for a in arrays.values()) * 8 / w.size == pytest.approx(bits, abs=1e-9)
    np.testing.assert_array_equal(dequantized(w, fmt), back)
    scheme = fmt.split("+")[-1]
    if fmt == "q4_0":   # the same numbers as the quantization issue's q4_0 of the dense matrix
        np.testing.assert_array_equal(back, quantize_tensor(w, "q4_0").dequantize())
    else:               # the kept values, in their order, are q4_0/q8_0 blocks of 32
        kept = w[w != 0]
        ref = quantize_tensor(kept.reshape(1, -1), scheme).dequantize()[0]
        np.testing.assert_array_equal(back[w != 0], ref)
