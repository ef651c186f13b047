"""minigrad.viz: every plot returns a Figure and writes a non-empty PNG; bad input fails clearly."""

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

import minigrad
from minigrad import nn, viz
from matplotlib.figure import Figure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == PNG_MAGIC


def _mlp_with_grads():
    minigrad.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    x = minigrad.randn(5, 3)
    model(x).sum().backward()
    return model


# --------------------------------------------------------------------------- plot_loss
def test_plot_loss_writes_png(tmp_path):
    steps = np.arange(50)
    train = 2.0 * np.exp(-steps / 20) + 0.1
    fig = viz.plot_loss(steps, train, val=train[::10] + 0.05, val_steps=steps[::10],
                        path=tmp_path / "loss.png", logy=True, smooth=0.5, title="t")
    assert isinstance(fig, Figure)
    assert _is_png(tmp_path / "loss.png")


def test_plot_loss_into_given_ax_and_default_steps(tmp_path):
    from matplotlib.figure import Figure as F
    fig = F()
    ax = fig.add_subplot()
    out = viz.plot_loss(None, [3.0, 2.0, 1.5], val=[3.1, 2.2, 1.7], ax=ax, path=str(tmp_path / "a" / "l.png"))
    assert out is fig
    assert len(ax.lines) == 2
    assert _is_png(tmp_path / "a" / "l.png")


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(steps=[], losses=[]), ValueError, "empty"),
    (dict(steps=[0, 1], losses=[1.0]), ValueError, "2 steps but 1 losses"),
    (dict(steps=[0, 1], losses=[1.0, 2.0], val=[1.0]), ValueError, "val_steps"),
    (dict(steps=[0, 1], losses=[1.0, -2.0], logy=True), ValueError, "positive"),
    (dict(steps=[0, 1], losses=["a", "b"]), TypeError, "numbers"),
    (dict(steps=[0, 1], losses=[1.0, 2.0], smooth=1.0), ValueError, "smooth"),
])
def test_plot_loss_bad_input(kwargs, err, match):
    with pytest.raises(err, match=match):
        viz.plot_loss(**kwargs)


# --------------------------------------------------------------------------- grad norms
def test_grad_norms_match_numpy():
    model = _mlp_with_grads()
    norms = viz.grad_norms(model)
    names = [n for n, _ in model.named_parameters()]
    assert list(norms) == names
    for n, p in model.named_parameters():
        assert norms[n] == pytest.approx(float(np.linalg.norm(p.grad.numpy().astype(np.float64))))


def test_grad_norms_on_each_backend(backend):
    minigrad.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(backend)
    model(minigrad.randn(6, 3, device=backend)).sum().backward()
    norms = viz.grad_norms(model)
    assert all(isinstance(v, float) for v in norms.values())
    for n, p in model.named_parameters():
        assert norms[n] == pytest.approx(float(np.linalg.norm(p.grad.numpy().astype(np.float64))))


def test_grad_norms_skips_params_without_grad_and_errors_when_none():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="backward"):
        viz.grad_norms(model)
    model[1](minigrad.ones(1, 2)).sum().backward()
    assert set(viz.grad_norms(model)) == {"1.weight", "1.bias"}


def test_plot_grad_norms_one_step(tmp_path):
    norms = viz.grad_norms(_mlp_with_grads())
    fig = viz.plot_grad_norms(norms, path=tmp_path / "g.png")
    assert isinstance(fig, Figure)
    assert _is_png(tmp_path / "g.png")


def test_plot_grad_norms_non_finite_and_zero(tmp_path):
    fig = viz.plot_grad_norms({"a": 0.0, "b": float("nan"), "c": float("inf"), "d": 1.0},
                              path=tmp_path / "g.png")
    assert isinstance(fig, Figure)
    assert _is_png(tmp_path / "g.png")


def test_plot_grad_norms_over_steps(tmp_path):
    records = [{"w": 1.0 / (s + 1), "b": 0.5} for s in range(10)]
    records[3].pop("b")  # a step where a parameter had no gradient: a gap, not an error
    fig = viz.plot_grad_norms(records, steps=range(0, 100, 10), path=tmp_path / "g.png")
    assert isinstance(fig, Figure)
    assert _is_png(tmp_path / "g.png")


@pytest.mark.parametrize("arg, kwargs, err, match", [
    ({}, {}, ValueError, "empty"),
    ([], {}, ValueError, "empty"),
    ([{}, {}], {}, ValueError, "empty"),
    ({"w": -1.0}, {}, ValueError, "negative"),
    ({"w": "big"}, {}, TypeError, "not a number"),
    ([{"w": 1.0}, 3], {}, TypeError, r"named_norms\[1\]"),
    ([{"w": 1.0}], {"steps": [0, 1]}, ValueError, "2 steps but 1 records"),
    (3.0, {}, TypeError, "expected a dict"),
])
def test_plot_grad_norms_bad_input(arg, kwargs, err, match):
    with pytest.raises(err, match=match):
        viz.plot_grad_norms(arg, **kwargs)


# --------------------------------------------------------------------------- memory timeline
def _timeline():
    mib = 1024 ** 2
    tl = []
    for t in range(20):
        phase = "forward" if t < 10 else "backward"
        act = (t if t < 10 else 20 - t) * mib
        tl.append({"t": t, "label": phase, "params": 4 * mib, "activations": act,
                   **({"grads": (t - 9) * mib} if t >= 10 else {})})
    return tl


def test_plot_memory_timeline(tmp_path):
    fig = viz.plot_memory_timeline(_timeline(), path=tmp_path / "m.png")
    assert isinstance(fig, Figure)
    assert _is_png(tmp_path / "m.png")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["grads", "activations", "params"]


def test_plot_memory_timeline_any_categories_and_order(tmp_path):
    tl = [{"t": 0.0, "label": "load", "weights_int8": 100, "kv_cache": 0},
          {"t": 0.5, "label": "gen", "weights_int8": 100, "kv_cache": 50},
          {"t": 1.0, "weights_int8": 100, "kv_cache": 80}]
    fig = viz.plot_memory_timeline(tl, categories=["kv_cache", "weights_int8"], step=None,
                                   path=tmp_path / "m.png")
    assert _is_png(tmp_path / "m.png")
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["weights_int8", "kv_cache"]


@pytest.mark.parametrize("tl, err, match", [
    ([], ValueError, "empty"),
    ({"t": 0, "a": 1}, TypeError, "list of dicts"),
    ([{"t": 0, "label": "x"}], ValueError, "no category"),
    ([{"label": "x", "a": 1}], ValueError, "no 't'"),
    ([{"t": "0", "a": 1}], TypeError, "number"),
    ([{"t": 0, "a": -5}], ValueError, "negative"),
    ([{"t": 0, "a": "lots"}], TypeError, "byte count"),
    ([{"t": 1, "a": 1}, {"t": 0, "a": 1}], ValueError, "decrease"),
    ([3], TypeError, "entry 0"),
])
def test_plot_memory_timeline_bad_input(tl, err, match):
    with pytest.raises(err, match=match):
        viz.plot_memory_timeline(tl)


def test_import_minigrad_does_not_import_matplotlib():
    import subprocess
    import sys
    code = "import sys, minigrad, minigrad.viz; print('matplotlib' in sys.modules)"
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "False"


def test_plot_grad_norms_smoothed_lines(tmp_path):
    rng = np.random.default_rng(0)
    records = [{"w": float(v), "b": float("nan") if i == 5 else 0.1} for i, v in enumerate(rng.uniform(0.5, 2, 40))]
    fig = viz.plot_grad_norms(records, smooth=0.9, path=tmp_path / "g.png")
    ax = fig.axes[0]
    w_line = ax.lines[0].get_ydata()
    assert np.ptp(w_line) < np.ptp([r["w"] for r in records])  # smoothing narrows the range
    assert np.isnan(ax.lines[1].get_ydata()[5])                 # a non-finite point stays visible as a gap
    with pytest.raises(ValueError, match="smooth"):
        viz.plot_grad_norms(records, smooth=1.5)


# --------------------------------------------------------------------------- what was drawn
def _bars(ax):
    from matplotlib.patches import Rectangle
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def test_grad_norm_bars_have_the_norms_as_lengths():
    norms = viz.grad_norms(_mlp_with_grads())
    fig = viz.plot_grad_norms(norms)
    ax = fig.axes[0]
    bars = _bars(ax)
    assert len(bars) == len(norms)
    # one bar per parameter, first parameter on top (y = 0), its width the norm
    by_y = sorted(bars, key=lambda b: b.get_y() + b.get_height() / 2)
    np.testing.assert_allclose([b.get_width() for b in by_y], list(norms.values()), rtol=1e-12)
    assert [t.get_text() for t in ax.get_yticklabels()] == list(norms)


def test_grad_norm_bars_skip_only_what_a_log_axis_cannot_show():
    fig = viz.plot_grad_norms({"a": 0.0, "b": float("nan"), "c": 2.0, "d": 1.0})
    ax = fig.axes[0]
    assert sorted(b.get_width() for b in _bars(ax)) == [1.0, 2.0]
    assert {t.get_text().strip() for t in ax.texts} == {"0", "nan"}


def test_grad_norm_lines_over_steps_carry_the_values():
    records = [{"w": 1.0 / (s + 1), "b": 0.5} for s in range(10)]
    fig = viz.plot_grad_norms(records, steps=range(0, 100, 10))
    lines = {ln.get_label(): ln for ln in fig.axes[0].lines}
    np.testing.assert_allclose(lines["w"].get_ydata(), [1.0 / (s + 1) for s in range(10)])
    np.testing.assert_allclose(lines["w"].get_xdata(), list(range(0, 100, 10)))


def test_grad_flow_bars_for_one_record():
    from minigrad.gradstats import plot_grad_flow
    rec = {"step": 1, "grad_norm": {"h.0": 0.5, "h.1": 2.0}, "update_ratio": {"h.0": 1e-3, "h.1": 4e-3}}
    fig = plot_grad_flow(rec)
    a1, a2 = fig.axes[:2]
    assert sorted(b.get_width() for b in _bars(a1)) == [0.5, 2.0]
    assert sorted(b.get_width() for b in _bars(a2)) == pytest.approx([1e-3, 4e-3])


def test_loss_curve_lines_carry_the_values():
    steps = np.arange(10)
    fig = viz.plot_loss(steps, 3.0 - 0.1 * steps, val=[2.9, 2.5], val_steps=[0, 9])
    train, val = fig.axes[0].lines[:2]
    np.testing.assert_allclose(train.get_ydata(), 3.0 - 0.1 * steps)
    np.testing.assert_allclose(val.get_xdata(), [0, 9])
