"""benchmarks/claims.py --quick end to end on a tiny model, and its input errors."""
import json
import sys

import numpy as np
import pytest

from helpers import tiny_model_folder

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from benchmarks import claims  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("claims")
    tiny_model_folder(root)
    return root


def _args(tiny, *extra):
    return ["--quick", "--model_dir", str(tiny / "model"), "--data", str(tiny / "corpus.txt"),
            "--output_dir", str(tiny / "out"), "--work_dir", str(tiny / "work"), *extra]


def test_quick_run_end_to_end(tiny):
    args = claims.build_parser().parse_args(_args(tiny, "--seeds", "2"))
    args.eval_batches, args.decode_tokens = 2, 8
    res = claims.run(args, log=lambda *a: None)
    out = tiny / "out"
    text = (out / "report.md").read_text()
    names = list(claims.recipes(True, "x"))
    for n in names:                                  # a row per recipe
        assert f"| {n} |" in text
    assert "QUICK MODE" in text and "not measured" not in text
    for c in ("model size", "memory usage", "training memory", "inference speed", "quality"):
        assert f"| {c} |" in text
    forms = res["quality"]["forms"]
    assert set(forms) == set(names)
    for n, f in forms.items():
        assert f["ppl_ratio"]["n"] == 2 and f["ppl_ratio"]["lo"] <= f["ppl_ratio"]["mean"] <= f["ppl_ratio"]["hi"]
        assert 0 < f["bytes"] < res["quality"]["reference"]["bytes"]
    # size on disk is what the files hold; q8_0 keeps ~8.5 bits per quantized weight, 4-bit recipes less
    assert forms["q8_0"]["size_reduction"]["mean"] > 0.5
    assert forms["nf4"]["bytes"] < forms["q8_0"]["bytes"]
    assert forms["q8_0"]["ppl_ratio"]["mean"] == pytest.approx(1.0, abs=0.02)   # 8-bit barely changes the model
    # the student: half the width (64 -> 32), two thirds of the depth (2 -> 1); the structured
    # model lost heads and MLP channels
    student = json.load(open(forms["student+q4_0"]["runs"][0]["dir"] + "/config.json"))["model"]
    assert (student["n_embd"], student["n_layer"]) == (32, 1)
    pruned = json.load(open(forms["structured+distill+q4_0"]["runs"][0]["dir"] + "/config.json"))["model"]
    assert sum(pruned["layer_mlp"]) < 2 * 4 * 64 and sum(pruned["layer_heads"]) < 2 * 2
    mqa = json.load(open(forms["mqa+q4_0"]["runs"][0]["dir"] + "/config.json"))
    assert mqa["model"]["n_kv_head"] == 1 and mqa["quantization"]["scheme"] == "q4_0"
    # training memory: each technique lowers its own component
    tm = res["training_memory"]["variants"]
    base = tm["float32 AdamW"]
    assert tm["8-bit AdamW"]["at_peak"]["optimizer"] < 0.3 * base["at_peak"]["optimizer"]
    assert tm["reversible"]["max"]["activations"] < base["max"]["activations"]
    combo = tm["reversible + checkpointing + 8-bit AdamW"]
    assert combo["peak"] < min(v["peak"] for k, v in tm.items() if k != "reversible + checkpointing + 8-bit AdamW")
    fm = res["finetune_memory"]
    assert fm["qlora"]["bytes"] < fm["lora"]["bytes"] < fm["full"]["bytes"]
    im = res["inference_memory"]
    assert im["q4_0 + MQA"]["kv_cache"] < im["float32 MHA"]["kv_cache"]
    # the plots show what was measured
    xs, ys = res["_plots"]["scatter"]
    ax = res["_plots"]["fig_size"].axes[0]
    from matplotlib.collections import PathCollection
    stars = [np.asarray(c.get_offsets(), float) for c in ax.collections if isinstance(c, PathCollection)]
    assert any(np.allclose(p, (100, 100)) for s in stars for p in s)       # the reference's star
    line = ax.lines[0]
    np.testing.assert_allclose(np.asarray(line.get_xdata(), float), xs)
    np.testing.assert_allclose(np.asarray(line.get_ydata(), float), ys)
    bars = [p for p in res["_plots"]["fig_speed"].axes[0].patches if hasattr(p, "get_height")]
    heights = sorted(round(b.get_height(), 6) for b in bars if b.get_width() < 1)
    want = sorted(round(100 * forms[n][k]["mean"], 6) for n in names for k in ("decode_speedup", "prompt_speedup"))
    assert heights == want
    assert (out / "size_quality.png").stat().st_size > 0 and (out / "speed.png").stat().st_size > 0
    saved = json.load(open(out / "results.json"))
    assert saved["claims"] == json.loads(json.dumps(res["claims"], default=str))


def test_unknown_recipe_and_missing_technique_are_clear_errors(tiny, capsys, monkeypatch):
    assert claims.main(_args(tiny, "--recipes", "q8_0,q3_k")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --recipes: unknown recipe(s) q3_k; valid: q8_0, nf4") and err.count("\n") == 1
    assert claims.main(["--quick", "--model_dir", str(tiny / "model"), "--data", str(tiny / "nope.txt")]) == 2
    assert "--data " in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "lm.distill", None)    # as if lm.distill were not installed
    out = tiny / "out-missing"
    assert claims.main(_args(tiny, "--recipes", "q8_0,student+q4_0", "--output_dir", str(out))) == 2
    err = capsys.readouterr().err
    assert "recipe 'student+q4_0' needs distill (lm.distill), which is not installed" in err
    assert not out.exists()


def test_interval_and_status():
    c = claims.ci([0.85, 0.86, 0.87])
    assert c["lo"] < 0.85 and c["hi"] > 0.87 and c["mean"] == pytest.approx(0.86)
    assert claims._status(c, "model size") == "met (beyond the range)"
    assert claims._status(claims.ci([0.58, 0.6, 0.62]), "model size") == "met"
    assert claims._status(claims.ci([0.2, 0.3, 0.4]), "inference speed").startswith("not met")
    assert claims._status(claims.ci([0.10, 0.11, 0.12]), "inference speed") == "missed by 19.0 points"
