"""Hugging Face GPT-2 interop (lm.hf, lm.export): export, import, tokenizer ids, errors.

transformers, torch and tokenizers are references only: the tests that need them skip
without them; the round trips inside our engine run everywhere.
"""
import json
import os

import numpy as np
import pytest

import minigrad as mg
from lm import export as lx
from lm import generate as gen
from lm import hf
from lm import train as lt
from lm.config import ModelConfig
from lm.generate import generate_ids
from lm.loader import ModelDirError, detect_kind, load_model
from lm.model import GPT
from lm.tokenizer import BPETokenizer, load_tokenizer
from minigrad.io import load_file, load_metadata, save_file

TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=16",
        "train.batch_size=4", "train.eval_iters=1", "train.warmup_iters=2", "train.progress=false",
        "train.sample_tokens=0", "train.log_interval=5", "train.eval_interval=100"]
MIXED = ("Hello world! DON'T stop: naïve café, 東京は晴れ, Москва 2024, ½ + x² = 3, "
         "mañana\tεὐχαριστῶ   العربية\n\n  tab\t\tend ... 'll 've 're")


def _train(tmp_path, name, *extra, tokenizer="char", iters=12):
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        rng = np.random.default_rng(0)
        words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home"]
        corpus.write_text("\n".join(" ".join(rng.choice(words, size=8)) + "." for _ in range(300)))
    out = tmp_path / name
    args = ["--data", str(corpus), "--output_dir", str(out), "--seed", "3", "--max_iters", str(iters),
            *TINY, f"data.cache_dir={tmp_path}/cache", f"data.tokenizer={tokenizer}", "data.vocab_size=280",
            *extra]
    assert lt.main(args) == 0
    return str(out / "model")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model trained by lm.train (char tokenizer) and its HF export."""
    tmp = tmp_path_factory.mktemp("hf")
    model_dir = _train(tmp, "run")
    out = str(tmp / "hf")
    assert lx.main(["--format", "hf", "--model_dir", model_dir, "--out", out]) == 0
    return model_dir, out


def _logits(model, idx):
    with mg.no_grad():
        logits, _ = model(idx, idx)     # with targets: every position's logits
    return logits.numpy()


# --------------------------------------------------------------------------- export, in our engine
def test_export_writes_gpt2_layout(trained):
    model_dir, out = trained
    conf = json.load(open(os.path.join(out, "config.json")))
    ours = json.load(open(os.path.join(model_dir, "config.json")))["model"]
    assert conf["model_type"] == "gpt2" and conf["activation_function"] == "gelu_new"
    assert (conf["n_positions"], conf["n_embd"], conf["n_layer"], conf["n_head"]) == (16, 32, 2, 2)
    assert conf["vocab_size"] == ours["vocab_size"] and conf["tie_word_embeddings"] is True
    assert load_metadata(os.path.join(out, "model.safetensors")) == {"format": "pt"}
    w = load_file(os.path.join(out, "model.safetensors"))
    src = load_file(os.path.join(model_dir, "model.safetensors"))
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):    # Conv1D: (in, out)
        k = f"transformer.h.1.{name}.weight"
        np.testing.assert_array_equal(w[k], src[k].T)
    assert "lm_head.weight" not in w and w["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)
    assert os.path.isfile(os.path.join(out, hf.CHAR_VOCAB_FILE))


def test_export_round_trip_identical_logits(trained):
    """The square c_proj loaded untransposed would change the logits, not raise."""
    model_dir, out = trained
    assert detect_kind(out) == "hf-gpt2"
    a, tok_a = load_model(model_dir)
    b, tok_b = load_model(out)
    idx = np.random.default_rng(0).integers(0, a.config.vocab_size, (2, 16))
    np.testing.assert_array_equal(_logits(a, idx), _logits(b, idx))
    assert tok_b.encode("the cat sat.") == tok_a.encode("the cat sat.")
    # and the check would catch it: the square c_proj read as (out, in) changes the logits
    sd = dict(b.state_dict())
    sd["transformer.h.0.attn.c_proj.weight"] = sd["transformer.h.0.attn.c_proj.weight"].T.copy()
    b.load_state_dict(sd)
    assert np.abs(_logits(a, idx) - _logits(b, idx)).max() > 1e-3


def test_generate_cli_on_exported_folder(trained, capsys):
    _, out = trained
    assert gen.main(["--model_dir", out, "--prompt", "the ", "--strategy", "greedy", "--max_new_tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("the ")


def test_bias_free_model_exports_zero_biases(tmp_path):
    cfg = ModelConfig(vocab_size=40, block_size=8, n_layer=1, n_head=2, n_embd=16, bias=False, gelu="exact")
    mg.manual_seed(1)
    model = GPT(cfg)
    sd = hf.hf_state_dict(model)
    assert not sd["transformer.h.0.mlp.c_fc.bias"].any() and sd["transformer.h.0.mlp.c_fc.bias"].shape == (64,)
    assert not sd["transformer.ln_f.bias"].any()
    assert hf.hf_config(cfg)["activation_function"] == "gelu"
    back = GPT(hf.config_from_hf(hf.hf_config(cfg))[0])
    back.load_state_dict(hf.gpt_state_from_hf(sd, back.config))
    idx = np.arange(8)[None] % 40
    np.testing.assert_allclose(_logits(model, idx), _logits(back, idx), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- against transformers
def test_export_loads_in_transformers_same_logits_and_greedy(trained):
    torch = pytest.importorskip("torch", reason="torch is the reference for the HF export")
    transformers = pytest.importorskip("transformers", reason="transformers reads the exported folder")
    assert int(transformers.__version__.split(".")[0]) >= 5
    model_dir, out = trained
    ours, tok = load_model(model_dir)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    idx = np.random.default_rng(1).integers(0, ours.config.vocab_size, (2, 16))
    with torch.no_grad():
        ref = theirs(torch.from_numpy(idx)).logits.numpy()
    diff = np.abs(_logits(ours, idx) - ref).max()
    assert diff < 1e-4, f"logits differ by {diff}"
    prompt = tok.encode("the cat")
    n_new = ours.config.block_size - len(prompt)          # transformers does not slide the window
    mine = generate_ids(ours, prompt, max_new_tokens=n_new, strategy="greedy")[0]
    with torch.no_grad():
        hf_ids = theirs.generate(torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False,
                                 pad_token_id=0)[0].tolist()
    assert mine == hf_ids


def test_import_random_hf_gpt2_within_1e4(tmp_path):
    torch = pytest.importorskip("torch", reason="torch builds the reference model")
    transformers = pytest.importorskip("transformers", reason="transformers writes the folder")
    torch.manual_seed(0)
    conf = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=24,
                                   bos_token_id=0, eos_token_id=0)
    ref = transformers.GPT2LMHeadModel(conf).eval()
    with torch.no_grad():   # random biases and LayerNorm parameters too, so each one is checked
        for name, p in ref.named_parameters():
            if "ln" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(tmp_path / "gpt2")
    model, tok = load_model(str(tmp_path / "gpt2"))
    assert tok is None and model.config.block_size == 24
    assert gen.main(["--model_dir", str(tmp_path / "gpt2")]) == 2           # no vocab.json: said so
    idx = np.random.default_rng(2).integers(0, 97, (3, 24))
    with torch.no_grad():
        expect = ref(torch.from_numpy(idx)).logits.numpy()
    diff = np.abs(_logits(model, idx) - expect).max()
    assert diff < 1e-4, f"logits differ by {diff}"
    with torch.no_grad():
        hf_ids = ref.generate(torch.tensor([[5, 7]]), max_new_tokens=10, do_sample=False)[0].tolist()
    assert generate_ids(model, [5, 7], 10, strategy="greedy")[0] == hf_ids


def test_import_half_precision_weights(tmp_path):
    torch = pytest.importorskip("torch", reason="torch builds the reference model")
    transformers = pytest.importorskip("transformers", reason="transformers writes the folder")
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50,
                                                               n_positions=8, bos_token_id=0, eos_token_id=0)).eval()
    idx = np.arange(8)[None] % 50
    for dtype in (torch.float16, torch.bfloat16):
        m = ref.to(dtype)
        folder = tmp_path / str(dtype)
        m.save_pretrained(folder)
        with torch.no_grad():
            expect = m.float()(torch.from_numpy(idx)).logits.numpy()   # the same rounded weights, in float32
        model, _ = load_model(str(folder))
        assert np.abs(_logits(model, idx) - expect).max() < 1e-4


# --------------------------------------------------------------------------- tokenizer files
def test_gpt2_vocab_ids_equal_hf_tokenizers(tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="Hugging Face tokenizers is the reference")
    text = (MIXED + "\n") * 3 + open(os.path.join(os.path.dirname(__file__), "test_ops.py")).read()[:20000]
    trainer = tokenizers.ByteLevelBPETokenizer()
    trainer.train_from_iterator([text], vocab_size=600, min_frequency=2, special_tokens=["<|endoftext|>"],
                                show_progress=False)
    trainer.save_model(str(tmp_path))
    ref = tokenizers.ByteLevelBPETokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    ours = hf.GPT2BPETokenizer.from_folder(str(tmp_path))
    assert ours.vocab_size == ref.get_vocab_size()
    samples = [MIXED, "DON'T ÀB 'S x²³ ①② Ⅻ", "  leading\n\n\nand trailing   ", "日本語のテキスト", "",
               "\u00a0nbsp\u2003em space\u3000ideographic", "a \x1c b\x1fc x\u200bb a\u00a0 b\x85 e",
               text[5000:9000]]
    for s in samples:
        assert ours.encode(s) == ref.encode(s).ids, s
        assert ours.decode(ours.encode(s)) == s
    eot = ref.token_to_id("<|endoftext|>")
    assert ours.decode([eot]) == "<|endoftext|>"
    # saved and loaded as our tokenizer.json, it keeps the files' ids
    ours.save(tmp_path / "tok.json")
    again = load_tokenizer(tmp_path / "tok.json")
    assert isinstance(again, hf.GPT2BPETokenizer) and again.encode(MIXED) == ours.encode(MIXED)


def test_our_bpe_exports_gpt2_files(tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="Hugging Face tokenizers reads the exported files")
    text = "the quick brown fox jumps over the lazy dog; the dog sleeps. " * 30 + "it's 2024 and we'll see"
    ours = BPETokenizer.train(text, 300)
    vocab, merges = hf.bpe_to_gpt2(ours)
    hf.write_gpt2_vocab(str(tmp_path), vocab, merges)
    ref = tokenizers.ByteLevelBPETokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    sample = "the lazy fox jumps; it's 2024, we'll sleep over the dog"
    assert ref.encode(sample).ids == ours.encode(sample)
    assert hf.GPT2BPETokenizer.from_folder(str(tmp_path)).encode(sample) == ours.encode(sample)


def test_bpe_model_export_reimport(tmp_path):
    model_dir = _train(tmp_path, "bpe", tokenizer="bpe", iters=3)
    out = str(tmp_path / "hf")
    assert lx.main(["--format", "hf", "--model_dir", model_dir, "--out", out]) == 0
    assert {"vocab.json", "merges.txt"} <= set(os.listdir(out))
    _, tok = load_model(model_dir)
    _, back = load_model(out)
    assert back.encode(MIXED) == tok.encode(MIXED)
    transformers = pytest.importorskip("transformers", reason="transformers reads the exported tokenizer")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    sample = "the cat sat on a mat and the dog ran far away home."
    assert hf_tok(sample)["input_ids"] == tok.encode(sample)


# --------------------------------------------------------------------------- errors
def _cli_error(argv, capsys, *words):
    assert lx.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


def test_export_reversible_is_refused_before_writing(tmp_path, capsys):
    model_dir = _train(tmp_path, "rev", "model.reversible=true", iters=2)
    out = tmp_path / "hf"
    _cli_error(["--format", "hf", "--model_dir", model_dir, "--out", str(out)], capsys, "reversible")
    assert not out.exists()


def test_export_into_nonempty_folder_needs_force(trained, capsys):
    model_dir, out = trained
    _cli_error(["--format", "hf", "--model_dir", model_dir, "--out", out], capsys, "--force")


def test_folder_neither_ours_nor_gpt2(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelDirError, match="model_type gpt2"):
        load_model(str(tmp_path))
    _cli_error(["--format", "hf", "--model_dir", str(tmp_path), "--out", str(tmp_path / "o")], capsys, "gpt2")
    assert gen.main(["--model_dir", str(tmp_path)]) == 2


def _hf_folder(tmp_path, **conf_overrides):
    cfg = ModelConfig(vocab_size=30, block_size=8, n_layer=1, n_head=2, n_embd=16)
    mg.manual_seed(0)
    weights = hf.hf_state_dict(GPT(cfg))
    save_file(weights, str(tmp_path / "model.safetensors"), {"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps({**hf.hf_config(cfg), **conf_overrides}))
    return weights


def test_unsupported_activation_is_a_clear_error(tmp_path, capsys):
    _hf_folder(tmp_path, activation_function="relu")
    with pytest.raises(hf.HFError, match="activation_function 'relu'"):
        load_model(str(tmp_path))
    assert gen.main(["--model_dir", str(tmp_path)]) == 2
    assert "relu" in capsys.readouterr().err


@pytest.mark.parametrize("key, value", [("scale_attn_by_inverse_layer_idx", True), ("n_inner", 20),
                                        ("add_cross_attention", True)])
def test_unsupported_gpt2_switches(tmp_path, key, value):
    _hf_folder(tmp_path, **{key: value})
    with pytest.raises(hf.HFError, match=key):
        load_model(str(tmp_path))


def test_unsupported_weight_dtype(tmp_path):
    weights = _hf_folder(tmp_path)
    save_file({k: v.astype(np.float64) for k, v in weights.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(hf.HFError, match="F64.*float32, float16 or bfloat16"):
        load_model(str(tmp_path))


def test_untied_lm_head_and_missing_weights(tmp_path):
    weights = _hf_folder(tmp_path)
    save_file({**weights, "lm_head.weight": weights["transformer.wte.weight"] + 1},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(hf.HFError, match="untied"):
        load_model(str(tmp_path))
    del weights["transformer.h.0.mlp.c_fc.bias"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(hf.HFError, match="c_fc.bias"):
        load_model(str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(hf.HFError, match="pickle"):
        load_model(str(tmp_path))


def test_switches_gpt2_cannot_express():
    with pytest.raises(hf.HFError, match="reversible"):
        hf.check_exportable(ModelConfig(vocab_size=10, reversible=True))
    hf.check_exportable(ModelConfig(vocab_size=10, checkpoint_every=1, attention="naive"))   # fine
    # any other switch away from its default is refused by name (GQA, rotary, sharing, low rank...)
    import dataclasses
    Wider = dataclasses.make_dataclass("Wider", [("n_kv_head", int, 0), ("rope", bool, False)], bases=(ModelConfig,))
    hf.check_exportable(Wider(vocab_size=10))
    with pytest.raises(hf.HFError, match=r"model\.n_kv_head=2.*model\.n_kv_head=0"):
        hf.check_exportable(Wider(vocab_size=10, n_kv_head=2))
    with pytest.raises(hf.HFError, match=r"model\.rope=True"):
        hf.check_exportable(Wider(vocab_size=10, rope=True))


def test_other_folder_kinds_are_refused(trained, tmp_path, capsys, monkeypatch):
    """A quantized (or adapter) folder is its own loader kind: GPT-2 has no form for it."""
    from lm import loader
    model_dir, _ = trained
    monkeypatch.setattr(loader, "KINDS", [("quantized", lambda d, c: True, None)] + loader.KINDS)
    out = tmp_path / "o"
    _cli_error(["--format", "hf", "--model_dir", model_dir, "--out", str(out)], capsys, "'quantized'")
    assert not out.exists()


def test_gguf_format_calls_the_gguf_exporter(trained, tmp_path, capsys, monkeypatch):
    model_dir, _ = trained
    try:
        import lm.gguf  # noqa: F401
    except ImportError:
        _cli_error(["--format", "gguf", "--model_dir", model_dir, "--out", str(tmp_path / "m.gguf")], capsys,
                   "GGUF exporter is not installed")
        return
    calls = []
    monkeypatch.setattr("lm.gguf.export_gguf", lambda *a: calls.append(a) or {"tensors": 0})
    assert lx.main(["--format", "gguf", "--outtype", "q8_0", "--model_dir", model_dir,
                    "--out", str(tmp_path / "m.gguf")]) == 0
    assert calls == [(model_dir, str(tmp_path / "m.gguf"), "q8_0")]


def test_outtype_only_with_gguf(trained, tmp_path, capsys):
    model_dir, _ = trained
    _cli_error(["--format", "hf", "--outtype", "q8_0", "--model_dir", model_dir, "--out", str(tmp_path / "x")],
               capsys, "--outtype")
