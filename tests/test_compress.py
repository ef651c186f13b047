"""lm.compress end to end (quantize, save, load through lm.loader, report) and its errors."""
import json
import os

import numpy as np
import pytest
from helpers import tiny_model_folder

from lm import compress as lc
from lm import generate as gen
from lm.loader import detect_kind, load_model
from minigrad.io import load_file
from minigrad.nn.quantized import QuantEmbedding, QuantLinear


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("compress")
    tiny_model_folder(root)
    return root


FAST = ["--eval_batches", "2", "--batch_size", "4", "--decode_tokens", "8", "--repeats", "1", "--no_progress"]


@pytest.mark.parametrize("scheme", ["fp16", "q4_0", "nf4"])
def test_compress_then_generate(model_dir, tmp_path, scheme, capsys):
    out = tmp_path / scheme
    assert lc.main(["--model_dir", str(model_dir / "model"), "--quantize", scheme, "--output_dir", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    for f in ("model.safetensors", "config.json", "tokenizer.json", "compress_report.json", "compress_report.md"):
        assert (out / f).is_file(), f
    rep = json.loads((out / "compress_report.json").read_text())
    assert "validation loss" in printed and "same top-1" in printed
    assert rep["after"]["bytes_on_disk"] < rep["before"]["bytes_on_disk"] * (0.55 if scheme == "fp16" else 0.3)
    assert 0.9 < rep["same_top1"] <= 1 and 0 <= rep["kl_divergence"] < 0.05
    assert abs(rep["delta_val_loss"]) < 0.05 and rep["before"]["decode_tokens_per_s"] > 0
    assert detect_kind(str(out)) == "quantized"
    m, _ = load_model(str(out))
    assert isinstance(m.lm_head, QuantLinear) and isinstance(m.transformer.wte, QuantEmbedding)
    # loading gives identical codes, and no float copy of a quantized weight
    state = load_file(str(out / "model.safetensors"))
    for name, mod in m.named_modules():
        if isinstance(mod, QuantLinear):
            for k, a in mod.weight.arrays.items():
                assert np.array_equal(a, state[f"{name}.weight_{k}"])
            assert f"{name}.weight" not in state
    assert gen.main(["--model_dir", str(out), "--prompt", "the cat", "--max_new_tokens", "10", "--seed", "1"]) == 0
    assert "the cat" in capsys.readouterr().out


def test_gptq_through_the_tool(model_dir, tmp_path):
    corpus = str(model_dir / "corpus.txt")
    out = tmp_path / "gptq"
    assert lc.main(["--model_dir", str(model_dir / "model"), "--quantize", "gptq", "--calib_data", corpus,
                    "--calib_batches", "2", "--calib_batch_size", "4", "--output_dir", str(out), *FAST]) == 0
    conf = json.loads((out / "config.json").read_text())
    assert conf["quantization"]["scheme"] == "gptq"
    assert set(conf["quantization"]["modules"].values()) == {"gptq"}
    # --gptq_sequential: the later layers' Hessians come from the partly quantized model
    seq = tmp_path / "gptq-seq"
    assert lc.main(["--model_dir", str(model_dir / "model"), "--quantize", "gptq", "--calib_data", corpus,
                    "--calib_batches", "2", "--calib_batch_size", "4", "--gptq_sequential",
                    "--output_dir", str(seq), *FAST]) == 0
    a, b = load_file(str(out / "model.safetensors")), load_file(str(seq / "model.safetensors"))
    first = "transformer.h.0.attn.c_attn.weight_codes"                  # the first layer the model runs
    assert np.array_equal(a[first], b[first])                 # it sees the float model either way
    assert any(not np.array_equal(a[k], b[k]) for k in a if k.endswith("weight_codes"))


def _err(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]
    return err[0]


def test_errors(model_dir, tmp_path, capsys):
    src = str(model_dir / "model")
    assert lc.main(["--model_dir", src, "--quantize", "q5", "--output_dir", str(tmp_path / "a")]) == 2
    assert "valid: fp16, bf16, int8, q8_0, q4_0, nf4, gptq" in _err(capsys)
    assert lc.main(["--model_dir", src, "--quantize", "gptq", "--output_dir", str(tmp_path / "a")]) == 2
    assert "--calib_data" in _err(capsys)
    assert lc.main(["--model_dir", src, "--output_dir", str(tmp_path / "a")]) == 2
    assert "nothing to do" in _err(capsys)
    assert lc.main(["--model_dir", str(tmp_path / "none"), "--quantize", "q8_0", "--output_dir", str(tmp_path / "a")]) == 2
    assert "not a folder" in _err(capsys)
    assert not (tmp_path / "a").exists()                       # nothing created on bad input
    q = tmp_path / "q"
    assert lc.main(["--model_dir", src, "--quantize", "q8_0", "--output_dir", str(q), "--no_report", "--no_progress"]) == 0
    capsys.readouterr()
    assert lc.main(["--model_dir", str(q), "--quantize", "q4_0", "--output_dir", str(tmp_path / "b")]) == 2
    assert "already quantized" in _err(capsys)
    assert lc.main(["--model_dir", src, "--quantize", "q4_0", "--output_dir", str(q)]) == 2
    assert "not empty" in _err(capsys)


def test_corrupt_truncated_or_mismatched_folders(model_dir, tmp_path, capsys):
    q = tmp_path / "q"
    assert lc.main(["--model_dir", str(model_dir / "model"), "--quantize", "q4_0", "--output_dir", str(q),
                    "--no_report", "--no_progress"]) == 0
    capsys.readouterr()
    data = (q / "model.safetensors").read_bytes()

    def variant(name, weights=None, conf=None):
        d = tmp_path / name
        d.mkdir()
        (d / "tokenizer.json").write_bytes((q / "tokenizer.json").read_bytes())
        (d / "model.safetensors").write_bytes(data if weights is None else weights)
        c = json.loads((q / "config.json").read_text())
        (d / "config.json").write_text(json.dumps(conf(c) if conf else c))
        assert gen.main(["--model_dir", str(d), "--max_new_tokens", "2"]) == 2
        return _err(capsys)

    assert "truncated" in variant("trunc", data[: len(data) // 2])
    assert "truncated" in variant("head", data[:100])

    def unknown(c):
        c["quantization"]["modules"]["lm_head"] = "q3_k"
        return c
    assert "unknown quantization scheme 'q3_k'" in variant("unknown", conf=unknown)

    def wrong_scheme(c):
        c["quantization"]["modules"]["lm_head"] = "q8_0"
        return c
    assert "q8_0 layout needs int8 (a mismatched file)" in variant("mismatch", conf=wrong_scheme)

    def other_shape(c):
        c["model"]["n_embd"] = 128
        return c
    assert "does not match its config.json" in variant("shape", conf=other_shape)
    assert "not 'minigrad-gpt-quantized'" in variant(
        "float", (tmp_path / "x").write_bytes(b"") or (model_dir / "model" / "model.safetensors").read_bytes())


def test_parser_has_the_documented_flags():
    flags = {a.dest for a in lc.build_parser()._actions}
    assert {"model_dir", "quantize", "output_dir", "calib_data", "calib_batches", "exclude"} <= flags
    assert [s.name for s in lc.STEPS][-1] == "quantize"
    assert os.path.basename(lc.__file__) == "compress.py"


def test_loading_a_quantized_folder_never_builds_the_float_weights(model_dir, tmp_path):
    import tracemalloc
    q = tmp_path / "q"
    assert lc.main(["--model_dir", str(model_dir / "model"), "--quantize", "q4_0", "--output_dir", str(q),
                    "--no_report", "--no_progress"]) == 0
    f32 = (model_dir / "model" / "model.safetensors").stat().st_size
    load_model(str(q))                                    # warm: imports, compiled kernels
    tracemalloc.start()
    model, _ = load_model(str(q))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # the file's bytes, the arrays read from them and their copies in the layers: about four times
    # the 4-bit bytes (~17% of float32 each), below one float32 copy of the matrices (~94% of the file)
    assert peak < 0.75 * f32, (peak, f32)
    floats = [n for n, p in model.named_parameters() if p.ndim == 2 and p.shape[0] > 32 and "wpe" not in n]
    assert floats == []


def test_rest_dtype_float16_halves_the_float_tensors_and_loads_as_float32(model_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, extra in ((a, ["--rest_dtype", "float32"]), (b, ["--rest_dtype", "float16"])):
        assert lc.main(["--model_dir", str(model_dir / "model"), "--quantize", "q4_0", "--output_dir", str(d),
                        "--no_report", "--no_progress", *extra]) == 0
    sa, sb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert sb["transformer.wpe.weight"].dtype == np.float16 and sb["lm_head.weight_codes"].dtype == np.uint8
    assert np.array_equal(sa["lm_head.weight_codes"], sb["lm_head.weight_codes"])
    m, _ = load_model(str(b))
    assert m.transformer.wpe.weight.dtype == np.float32
    assert (b / "model.safetensors").stat().st_size < (a / "model.safetensors").stat().st_size
    c = tmp_path / "c"                              # the default with a 4-bit scheme: float16
    assert lc.main(["--model_dir", str(model_dir / "model"), "--quantize", "q4_0", "--output_dir", str(c),
                    "--no_report", "--no_progress"]) == 0
    assert load_file(str(c / "model.safetensors"))["transformer.wpe.weight"].dtype == np.float16
    d = tmp_path / "d"                              # and float32 with an 8-bit one
    assert lc.main(["--model_dir", str(model_dir / "model"), "--quantize", "q8_0", "--output_dir", str(d),
                    "--no_report", "--no_progress"]) == 0
    assert load_file(str(d / "model.safetensors"))["transformer.wpe.weight"].dtype == np.float32
