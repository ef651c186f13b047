"""GGUF export: llama.cpp's GPT-2 names and keys, and Q8_0/Q4_0 bytes equal to the gguf package's."""
import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="GGUF export is an optional extra (pip install gguf)")

from lm import compress as lc  # noqa: E402
from lm.config import Config, apply_overrides  # noqa: E402
from lm.gguf import export_gguf  # noqa: E402
from lm.model import GPT  # noqa: E402
from lm.tokenizer import build_tokenizer  # noqa: E402
from lm.train import save_model_dir  # noqa: E402


def _folder(root, *over):
    tok = build_tokenizer("char", "the cat sat on a mat and the dog ran far away home.\n" * 5)
    cfg = apply_overrides(Config(), ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=32",
                                     f"model.vocab_size={tok.vocab_size}", *over])
    model = GPT(cfg.model)
    save_model_dir(str(root), model, tok, cfg)
    return model, tok


def _read(path):
    r = gguf.GGUFReader(str(path))
    fields = {k: f for k, f in r.fields.items()}
    return r, fields, {t.name: t for t in r.tensors}


def _value(field):
    return field.parts[field.data[0]].tolist()


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0", "q4_0"])
def test_export_names_keys_and_bytes(tmp_path, outtype):
    model, tok = _folder(tmp_path / "m")
    s = export_gguf(str(tmp_path / "m"), str(tmp_path / "m.gguf"), outtype)
    assert s["tensors"] == 2 + 2 + 1 + 2 * 12 and s["bytes"] == (tmp_path / "m.gguf").stat().st_size
    r, fields, tensors = _read(tmp_path / "m.gguf")
    assert bytes(_value(fields["general.architecture"])).decode() == "gpt2"
    for key, v in [("gpt2.block_count", 2), ("gpt2.embedding_length", 64), ("gpt2.context_length", 32),
                   ("gpt2.feed_forward_length", 256), ("gpt2.attention.head_count", 2)]:
        assert _value(fields[key]) == [v], key
    assert len(fields["tokenizer.ggml.tokens"].data) == tok.vocab_size
    for name in ["token_embd.weight", "position_embd.weight", "output.weight", "output_norm.bias",
                 "blk.1.attn_qkv.weight", "blk.1.attn_qkv.bias", "blk.0.attn_output.weight", "blk.0.ffn_up.weight",
                 "blk.0.ffn_down.bias", "blk.0.attn_norm.weight", "blk.0.ffn_norm.bias"]:
        assert name in tensors, name
    w = model.transformer.h[1].attn.c_attn.weight.data
    t = tensors["blk.1.attn_qkv.weight"]
    T = gguf.GGMLQuantizationType
    qtype = {"f32": T.F32, "f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[outtype]
    assert t.tensor_type == qtype and list(t.shape) == [64, 192]
    ref = gguf.quants.quantize(w, qtype)
    assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), ref.view(np.uint8).reshape(-1))
    assert tensors["blk.0.attn_norm.weight"].tensor_type == T.F32


def test_quantized_folder_is_written_code_for_code(tmp_path):
    _folder(tmp_path / "m")
    assert lc.main(["--model_dir", str(tmp_path / "m"), "--quantize", "q4_0", "--output_dir", str(tmp_path / "q"),
                    "--no_report", "--no_progress"]) == 0
    from minigrad.io import load_file
    from minigrad.quant import FORMATS
    state = load_file(str(tmp_path / "q" / "model.safetensors"))
    name = "transformer.h.0.mlp.c_proj.weight_"
    blocks = FORMATS["q4_0"].ggml_blocks({"codes": state[name + "codes"], "scales": state[name + "scales"]})
    export_gguf(str(tmp_path / "q"), str(tmp_path / "q.gguf"), "q4_0")
    _, _, tensors = _read(tmp_path / "q.gguf")
    assert np.array_equal(np.asarray(tensors["blk.0.ffn_down.weight"].data).reshape(-1),
                          blocks.reshape(-1))


def test_models_gguf_cannot_express_are_refused(tmp_path):
    _folder(tmp_path / "exact", "model.gelu=exact")
    with pytest.raises(ValueError, match="cannot be exported as a GPT-2 GGUF: gelu='exact'"):
        export_gguf(str(tmp_path / "exact"), str(tmp_path / "x.gguf"), "q8_0")
    _folder(tmp_path / "nobias", "model.bias=false")
    with pytest.raises(ValueError, match="bias=false"):
        export_gguf(str(tmp_path / "nobias"), str(tmp_path / "x.gguf"), "f32")
    with pytest.raises(ValueError, match="valid: f32, f16, q8_0, q4_0"):
        export_gguf(str(tmp_path / "exact"), str(tmp_path / "x.gguf"), "q4_k")
    assert not (tmp_path / "x.gguf").exists()
