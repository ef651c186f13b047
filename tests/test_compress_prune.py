"""lm.compress with pruning, structured pruning, low rank and recovery fine-tuning, end to end.

Each run saves a folder that the one loader opens and lm.generate runs; bad flags end in one
``error:`` line, exit code 2, and no folder.
"""
import json

import numpy as np
import pytest
from helpers import tiny_model_folder

from lm import compress as lc
from lm import generate as gen
from lm.loader import detect_kind, load_model
from minigrad.io import load_file
from minigrad.nn import LowRankLinear
from minigrad.prune import check_nm

FAST = ["--eval_batches", "2", "--batch_size", "4", "--decode_tokens", "8", "--repeats", "1", "--no_progress"]
BLOCKS = ("c_attn", "c_proj", "c_fc")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("compress_prune")
    tiny_model_folder(root)
    return root


def run(root, out, *flags):
    return lc.main(["--model_dir", str(root / "model"), "--output_dir", str(out), "--data",
                    str(root / "corpus.txt"), *flags, *FAST])


def block_weights(model):
    return {n: m.weight.data for n, m in model.named_modules() if n.endswith(BLOCKS) and hasattr(m, "weight")}


def test_wanda_then_generate(root, tmp_path, capsys):
    out = tmp_path / "wanda"
    assert run(root, out, "--prune", "wanda", "--sparsity", "0.5", "--finetune_iters", "3") == 0
    assert "same top-1" in capsys.readouterr().out
    assert detect_kind(str(out)) == "pruned"
    m, _ = load_model(str(out))
    for n, w in block_weights(m).items():   # every row keeps half (Wanda compares within rows)
        assert ((w == 0).sum(axis=1) == w.shape[1] // 2).all(), n
    rep = json.loads((out / "compress_report.json").read_text())
    names = [s["name"] for s in rep["steps"]]
    assert names == ["prune wanda unstructured 0.5", "finetune 3"]
    # honest bytes: 8 block matrices lose half their float32 values and gain one bit per weight
    n = sum(w.size for w in block_weights(m).values())
    saved = rep["before"]["bytes_on_disk"] - rep["after"]["bytes_on_disk"]
    assert abs(saved - (n // 2 * 4 - n // 8)) < 3000
    assert gen.main(["--model_dir", str(out), "--prompt", "the cat", "--max_new_tokens", "8", "--seed", "1"]) == 0


@pytest.mark.parametrize("pattern,quant", [("2:4", None), ("4:8", None), ("2:4", "q4_0"), ("unstructured", "q4_0")])
def test_nm_and_prune_then_quantize(root, tmp_path, pattern, quant):
    out = tmp_path / "o"
    flags = ["--prune", "magnitude", "--pattern", pattern] + (["--sparsity", "0.5"] if pattern == "unstructured" else [])
    assert run(root, out, *flags, *(["--quantize", quant] if quant else [])) == 0
    m, _ = load_model(str(out))
    for w in block_weights(m).values():
        if pattern == "unstructured":
            assert (w == 0).mean() >= 0.5
        else:
            assert check_nm(w, *map(int, pattern.split(":")))
    rep = json.loads((out / "compress_report.json").read_text())
    if quant:
        conf = json.loads((out / "config.json").read_text())
        assert set(conf["sparse"]["layout"].values()) == {f"{'bitmask' if pattern == 'unstructured' else pattern}+q4_0", "q4_0"}
        assert "quantization" not in conf
        assert rep["size_ratio"] < 0.2
    assert gen.main(["--model_dir", str(out), "--max_new_tokens", "4"]) == 0


def test_prune_then_quantize_in_two_runs(root, tmp_path):
    one, two, both = tmp_path / "one", tmp_path / "two", tmp_path / "both"
    assert run(root, one, "--prune", "magnitude", "--sparsity", "0.5", "--no_report") == 0
    assert lc.main(["--model_dir", str(one), "--output_dir", str(two), "--quantize", "q4_0", "--no_report"]) == 0
    assert run(root, both, "--prune", "magnitude", "--sparsity", "0.5", "--quantize", "q4_0", "--no_report") == 0
    fa, fb = load_file(str(two / "model.safetensors")), load_file(str(both / "model.safetensors"))
    assert set(fa) == set(fb) and all(np.array_equal(fa[k], fb[k]) for k in fa)   # the same packed arrays
    a, b = load_model(str(two))[0], load_model(str(both))[0]
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(v, b.state_dict()[k])


def test_structured_and_low_rank(root, tmp_path):
    out = tmp_path / "s"
    assert run(root, out, "--structured", "heads=0.5,mlp=0.5", "--finetune_iters", "2") == 0
    conf = json.loads((out / "config.json").read_text())
    assert conf["model"]["layer_heads"] == [1, 1] and conf["model"]["layer_mlp"] == [128, 128]
    assert detect_kind(str(out)) == "minigrad"
    m, _ = load_model(str(out))
    assert m.transformer.h[0].attn.c_attn.weight.shape == (96, 64)
    assert gen.main(["--model_dir", str(out), "--max_new_tokens", "4"]) == 0
    lr = tmp_path / "lr"
    assert run(root, lr, "--rank", "8", "--quantize", "q8_0") == 0
    m, _ = load_model(str(lr))
    assert isinstance(m.transformer.h[1].mlp.c_fc, LowRankLinear) and m.transformer.h[1].mlp.c_fc.rank == 8
    assert gen.main(["--model_dir", str(lr), "--max_new_tokens", "4"]) == 0
    en = tmp_path / "en"
    assert run(root, en, "--energy", "0.5", "--no_report") == 0
    assert json.loads((en / "config.json").read_text())["low_rank"]


def _err(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("flags,msg", [
    (["--prune", "magnitude", "--sparsity", "1.0"], "--sparsity must be in [0, 1)"),
    (["--prune", "magnitude", "--sparsity", "-0.5"], "--sparsity must be in [0, 1)"),
    (["--prune", "magnitude", "--pattern", "2:8:1"], "unknown pattern"),
    (["--prune", "magnitude", "--pattern", "3:7"], "multiple of 7"),
    (["--prune", "random", "--sparsity", "0.5"], "unknown --prune method"),
    (["--rank", "64"], "--rank must be in [1, 64)"),
    (["--rank", "8", "--energy", "0.5"], "not both"),
    (["--structured", "heads=0.75"], "every head of layer 0"),
    (["--structured", "layers=0.5"], "heads=F,mlp=F"),
    (["--prune", "magnitude", "--sparsity", "0.5", "--quantize", "gptq", "--calib_data", "x"], "fill the pruned zeros"),
])
def test_bad_input(root, tmp_path, capsys, flags, msg):
    out = tmp_path / "bad"
    assert run(root, out, *flags) == 2
    assert msg in _err(capsys)
    assert not out.exists()


@pytest.mark.parametrize("flags,msg", [
    (["--prune", "wanda", "--sparsity", "0.5"], "--prune wanda ranks weights by their activations"),
    (["--structured", "heads=0.5"], "needs calibration text"),
])
def test_missing_calibration_data(root, tmp_path, capsys, flags, msg):
    out = tmp_path / "bad"
    assert lc.main(["--model_dir", str(root / "model"), "--output_dir", str(out), *flags, *FAST]) == 2
    assert msg in _err(capsys)
    assert not out.exists()


def test_finetune_a_pruned_folder_keeps_its_zeros(root, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert run(root, one, "--prune", "magnitude", "--pattern", "2:4", "--no_report") == 0
    assert lc.main(["--model_dir", str(one), "--output_dir", str(two), "--finetune_iters", "3", "--finetune_lr", "1e-2",
                    "--data", str(root / "corpus.txt"), "--no_report", "--no_progress"]) == 0
    a, b = load_model(str(one))[0], load_model(str(two))[0]
    for n, w in block_weights(b).items():
        assert check_nm(w, 2, 4) and np.array_equal(w == 0, block_weights(a)[n] == 0), n
        assert not np.array_equal(w, block_weights(a)[n])          # it did train
    assert json.loads((two / "config.json").read_text())["sparse"]["pattern"] == "2:4"


def test_prune_quantize_with_float16_rest(root, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    flags = ["--prune", "magnitude", "--sparsity", "0.5", "--quantize", "q4_0", "--no_report"]
    assert run(root, a, *flags, "--rest_dtype", "float32") == 0       # (auto: float16 with q4_0)
    assert run(root, b, *flags, "--rest_dtype", "float16") == 0
    state = load_file(str(b / "model.safetensors"))
    assert state["transformer.ln_f.weight"].dtype == np.float16
    assert all(v.dtype == np.uint8 for k, v in state.items() if k.endswith((".q_codes", ".sparse_bitmask")))
    assert (b / "model.safetensors").stat().st_size < (a / "model.safetensors").stat().st_size
    ma, mb = load_model(str(a))[0], load_model(str(b))[0]
    for n, w in block_weights(mb).items():
        np.testing.assert_array_equal(w, block_weights(ma)[n])      # the packed weights are untouched
