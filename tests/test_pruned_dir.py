"""Pruned, 2:4, structured and low-rank GPTs saved by lm.pruned and opened by the one loader."""
import os

import numpy as np
import pytest

import minigrad as mg
from lm.loader import detect_kind, load_model
from lm.model import GPT, ModelConfig
from lm.pruned import save_model_dir
from lm.structured import prune_structured_
from lm.tokenizer import build_tokenizer
from minigrad.nn import LowRankLinear
from minigrad.nn.lowrank import factorize_
from minigrad.prune import check_nm, prune_

TEXT = "the cat sat on the mat. a dog ran far away home. " * 20
TARGETS = ["c_attn", "c_proj", "c_fc"]


def tiny():
    mg.manual_seed(0)
    tok = build_tokenizer("char", TEXT)
    return GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=32)), tok


def same_logits(a, b):
    idx = np.arange(16)[None] % 10
    np.testing.assert_array_equal(a(idx, idx)[0].data, b(idx, idx)[0].data)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_sparse_folder_round_trip_and_bytes(tmp_path, pattern):
    m, tok = tiny()
    dense_dir = str(tmp_path / "dense")
    save_model_dir(dense_dir, m, tok)
    prune_(m, "magnitude", sparsity=0.5 if pattern == "unstructured" else None, pattern=pattern,
           targets=TARGETS)
    d = str(tmp_path / "pruned")
    conf = save_model_dir(d, m, tok, pattern=pattern)
    assert detect_kind(d) == "pruned" and detect_kind(dense_dir) == "minigrad"
    assert len(conf["sparse"]["layout"]) == 8
    back, _ = load_model(d)
    same_logits(m, back)
    if pattern != "unstructured":
        n, mm = map(int, pattern.split(":"))
        assert all(check_nm(lin.weight, n, mm) for nme, lin in back.named_modules() if nme.endswith(("c_fc", "c_attn")))
    # honest bytes: the packed file is smaller by what the layout saves
    pruned_n = sum(p.size for n, p in m.named_parameters() if n.endswith("weight") and p.ndim == 2
                   and "wte" not in n and "wpe" not in n)
    dense_b, packed_b = os.path.getsize(dense_dir + "/model.safetensors"), os.path.getsize(d + "/model.safetensors")
    bits = {"unstructured": 1, "2:4": 1, "4:8": 3 / 2}[pattern]   # mask bits or index bits per weight
    saved = pruned_n * 4 - (pruned_n // 2 * 4 + pruned_n * bits / 8)
    assert abs((dense_b - packed_b) - saved) < 2000     # headers differ by a few hundred bytes


def test_low_rank_and_structured_folders(tmp_path):
    m, tok = tiny()
    calib = [np.arange(32).reshape(2, 16) % 10]
    prune_structured_(m, heads=0.5, mlp=0.25, calib=calib)
    factorize_(m, rank=8, targets=["mlp.c_fc", "mlp.c_proj"])
    d = str(tmp_path / "lr")
    save_model_dir(d, m, tok)
    back, _ = load_model(d)
    assert isinstance(back.transformer.h[1].mlp.c_fc, LowRankLinear)
    assert back.config.layer_heads == [1, 1] and back.config.layer_mlp == [96, 96]
    same_logits(m, back)
    # a structured-only folder is a plain minigrad folder
    m2, _ = tiny()
    prune_structured_(m2, heads=0.5, calib=calib)
    save_model_dir(str(tmp_path / "s"), m2, tok)
    assert detect_kind(str(tmp_path / "s")) == "minigrad"
    same_logits(m2, load_model(str(tmp_path / "s"))[0])
