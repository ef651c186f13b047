"""Corpora, token caches and batches. No test touches the network or the shared benchmark data."""

import io
import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import lm.data as data
from lm.data import (
    BUILTIN_CORPORA,
    CorpusError,
    default_cache_dir,
    get_batch,
    iter_eval_batches,
    load_corpus,
    prepare_data,
)
from lm.tokenizer import BPETokenizer, CharTokenizer

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 40


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own cache folder, and any download attempt fails loudly."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LM_DATA_DIR", str(cache))
    monkeypatch.delenv("LM_SHAKESPEARE_PATH", raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("tests must not use the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    return cache


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


# ---------------------------------------------------------------- corpora


def test_txt_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(TEXT)
    assert load_corpus(str(path)) == TEXT
    assert load_corpus(path) == TEXT  # a Path works too


def test_jsonl_file_skips_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "one", "id": 1}, "", "   ", {"text": "two"}])
    assert load_corpus(str(path)) == "one\n\ntwo"


def test_jsonl_custom_text_field(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"content": "alpha"}, {"content": "beta"}])
    assert load_corpus(str(path), text_field="content") == "alpha\n\nbeta"


def test_folder_recursive_sorted(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("bee")
    (root / "a.txt").write_text("ay")
    write_jsonl(root / "sub" / "c.jsonl", [{"text": "sea"}, {"text": "see"}])
    (root / "notes.md").write_text("ignored")
    assert load_corpus(str(root)) == "ay\n\nbee\n\nsea\n\nsee"


def test_python_docs_builtin():
    from pydoc_data.topics import topics

    text = load_corpus("python-docs")
    assert text == "\n\n".join(topics[k] for k in sorted(topics))
    assert len(text) > 100_000


def test_missing_path_lists_builtins(tmp_path):
    with pytest.raises(CorpusError, match="neither a file, a folder, nor a built-in") as exc:
        load_corpus(str(tmp_path / "nope.txt"))
    for name in BUILTIN_CORPORA:
        assert name in str(exc.value)


def test_empty_file_is_named(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("  \n")
    with pytest.raises(CorpusError, match="empty") as exc:
        load_corpus(str(path))
    assert "empty.txt" in str(exc.value)


def test_bad_jsonl_line_number(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, "", '{"text": "unterminated'])
    with pytest.raises(CorpusError, match=r"bad\.jsonl, line 3: invalid JSON"):
        load_corpus(str(path))


def test_jsonl_missing_field_names_keys(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, {"body": "x", "title": "y"}])
    with pytest.raises(CorpusError, match="line 2: no 'text' field") as exc:
        load_corpus(str(path))
    assert "'body'" in str(exc.value) and "'title'" in str(exc.value)


def test_jsonl_line_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ['["a", "list"]'])
    with pytest.raises(CorpusError, match="line 1: expected a JSON object.*got a JSON array"):
        load_corpus(str(path))


def test_jsonl_field_not_a_string(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": 3}])
    with pytest.raises(CorpusError, match="'text' must be a string, got a JSON number"):
        load_corpus(str(path))


def test_folder_without_corpus_files(tmp_path):
    (tmp_path / "readme.md").write_text("hi")
    with pytest.raises(CorpusError, match="no .txt or .jsonl files"):
        load_corpus(str(tmp_path))


def test_unsupported_extension(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("x,y")
    with pytest.raises(CorpusError, match="unsupported file type '.csv'"):
        load_corpus(str(path))


def test_corpus_error_is_value_error():
    assert issubclass(CorpusError, ValueError)


# ---------------------------------------------------------------- shakespeare


def test_default_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("LM_DATA_DIR", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("LM_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "minigrad-lm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "minigrad-lm"


def test_shakespeare_offline_error(monkeypatch, isolated_cache):
    calls = []

    def fake_urlopen(url, timeout=None):
        calls.append((url, timeout))
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    with pytest.raises(CorpusError) as exc:
        load_corpus("shakespeare")
    msg = str(exc.value)
    assert "--data /path/to/tinyshakespeare.txt" in msg
    assert "LM_SHAKESPEARE_PATH" in msg and "LM_DATA_DIR" in msg
    assert "network unreachable" in msg
    assert calls == [(data.SHAKESPEARE_URL, 15.0)]
    assert not list(isolated_cache.glob("*"))  # no partial download left behind


def test_shakespeare_found_in_cache(isolated_cache):
    isolated_cache.mkdir()
    (isolated_cache / "input.txt").write_text(TEXT)
    assert load_corpus("shakespeare") == TEXT


def test_shakespeare_env_path(monkeypatch, tmp_path):
    path = tmp_path / "ts.txt"
    path.write_text(TEXT)
    monkeypatch.setenv("LM_SHAKESPEARE_PATH", str(path))
    assert load_corpus("shakespeare") == TEXT
    monkeypatch.setenv("LM_SHAKESPEARE_PATH", str(tmp_path / "missing.txt"))
    with pytest.raises(CorpusError, match="LM_SHAKESPEARE_PATH"):
        load_corpus("shakespeare")


def test_shakespeare_download_goes_to_cache(monkeypatch, isolated_cache):
    monkeypatch.setattr(
        urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(TEXT.encode())
    )
    assert load_corpus("shakespeare") == TEXT
    assert (isolated_cache / "tinyshakespeare.txt").read_text() == TEXT
    # the second call reads the cached copy
    monkeypatch.setattr(data, "download_file", lambda *a, **k: pytest.fail("downloaded twice"))
    assert load_corpus("shakespeare") == TEXT


# ---------------------------------------------------------------- token data


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


def test_prepare_data_char_split(corpus_file, tmp_path):
    ds = prepare_data(corpus_file, "char", None, val_fraction=0.25, cache_dir=tmp_path / "tok")
    assert isinstance(ds.tokenizer, CharTokenizer)
    assert ds.source == corpus_file
    n = len(TEXT)
    assert len(ds.train) == int(n * 0.75) and len(ds.train) + len(ds.val) == n
    assert ds.tokenizer.decode(ds.train) + ds.tokenizer.decode(ds.val) == TEXT
    assert ds.train.ndim == 1 and np.issubdtype(ds.train.dtype, np.integer)


def test_prepare_data_reuses_token_cache(corpus_file, tmp_path, monkeypatch):
    cache = tmp_path / "tok"
    first = prepare_data(corpus_file, "char", None, cache_dir=cache)
    assert isinstance(first.train, np.memmap)
    files = sorted(p.name for p in cache.iterdir())
    mtimes = {p: p.stat().st_mtime_ns for p in cache.iterdir()}

    def fail(*args, **kwargs):
        raise AssertionError("re-encoded or retrained despite the cache")

    monkeypatch.setattr(CharTokenizer, "encode_array", fail)
    monkeypatch.setattr(CharTokenizer, "train", fail)
    second = prepare_data(corpus_file, "char", None, cache_dir=cache)
    assert isinstance(second.train, np.memmap) and isinstance(second.val, np.memmap)
    assert np.array_equal(first.train, second.train) and np.array_equal(first.val, second.val)
    assert sorted(p.name for p in cache.iterdir()) == files
    assert {p: p.stat().st_mtime_ns for p in cache.iterdir()} == mtimes


def test_prepare_data_bpe_cache_and_given_tokenizer(corpus_file, tmp_path, monkeypatch):
    cache = tmp_path / "tok"
    first = prepare_data(corpus_file, "bpe", 270, cache_dir=cache)
    assert first.tokenizer.vocab_size == 270
    monkeypatch.setattr(BPETokenizer, "train", lambda *a, **k: pytest.fail("retrained"))
    second = prepare_data(corpus_file, "bpe", 270, cache_dir=cache)
    assert second.tokenizer.merges == first.tokenizer.merges
    assert np.array_equal(second.train, first.train)
    # a different tokenizer gets its own token cache, not the BPE one
    char_tok = CharTokenizer.train(TEXT)
    third = prepare_data(corpus_file, tokenizer=char_tok, cache_dir=cache)
    assert third.tokenizer is char_tok and len(third.train) + len(third.val) == len(TEXT)


def test_prepare_data_corrupt_cache_is_rebuilt(corpus_file, tmp_path):
    cache = tmp_path / "tok"
    first = prepare_data(corpus_file, "char", None, cache_dir=cache)
    expected = np.array(first.train)  # a copy: the mapped file is about to be replaced
    # Replace (never truncate) the file: truncating a file that is memory-mapped makes
    # later reads of the mapping crash the process with SIGBUS.
    garbage = cache / "garbage"
    garbage.write_bytes(b"garbage")
    garbage.replace(first.cache_path)
    again = prepare_data(corpus_file, "char", None, cache_dir=cache)
    assert np.array_equal(again.train, expected)


def test_prepare_data_without_cache(corpus_file, tmp_path):
    ds = prepare_data(corpus_file, "char", None, use_cache=False, cache_dir=tmp_path / "tok")
    assert not isinstance(ds.train, np.memmap) and ds.cache_path is None
    assert not (tmp_path / "tok").exists()


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_prepare_data_bad_val_fraction(corpus_file, fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_data(corpus_file, "char", None, val_fraction=fraction)


def test_split_too_short_for_block_size(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("abcdefghijklmnopqrstuvwxyz" * 4)  # 104 chars: val has 11 tokens
    ds = prepare_data(str(path), "char", None, cache_dir=tmp_path / "tok")
    ds.check_block_size(10)
    with pytest.raises(ValueError, match=r"val split .* 11 tokens.*block_size=16.*smaller block_size"):
        ds.get_batch("val", 2, 16, np.random.default_rng(0))
    with pytest.raises(ValueError, match="val split"):
        ds.check_block_size(16)


# ---------------------------------------------------------------- batches


def test_get_batch_shapes_shift_and_determinism():
    seq = np.arange(1000, dtype=np.uint16)
    x, y = get_batch(seq, 4, 8, np.random.default_rng(0))
    assert x.shape == y.shape == (4, 8)
    assert x.dtype == y.dtype == np.int64
    assert np.array_equal(x[:, 1:], y[:, :-1])
    assert np.array_equal(y[:, -1], x[:, -1] + 1)
    assert np.array_equal(x, x[:, :1] + np.arange(8))  # contiguous windows of the data
    x2, y2 = get_batch(seq, 4, 8, np.random.default_rng(0))
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    x3, _ = get_batch(seq, 4, 8, np.random.default_rng(1))
    assert not np.array_equal(x, x3)


def test_get_batch_offsets_follow_nanogpt():
    seq = np.arange(50)
    x, _ = get_batch(seq, 16, 5, np.random.default_rng(3))
    expected = np.random.default_rng(3).integers(0, 50 - 5, size=16)
    assert np.array_equal(x[:, 0], expected)


def test_get_batch_smallest_data():
    x, y = get_batch(np.arange(9), 3, 8, np.random.default_rng(0))  # exactly block_size + 1
    assert np.array_equal(x[0], np.arange(8)) and np.array_equal(y[0], np.arange(1, 9))
    with pytest.raises(ValueError, match="8 tokens.*block_size=8"):
        get_batch(np.arange(8), 3, 8, np.random.default_rng(0))


def test_iter_eval_batches_deterministic_windows():
    seq = np.arange(101)
    batches = list(iter_eval_batches(seq, 4, 10))
    assert [b[0].shape for b in batches] == [(4, 10), (4, 10), (2, 10)]
    xs = np.concatenate([x for x, _ in batches])
    ys = np.concatenate([y for _, y in batches])
    assert np.array_equal(xs.ravel(), np.arange(100)) and np.array_equal(ys.ravel(), np.arange(1, 101))
    assert xs.dtype == np.int64
    assert len(list(iter_eval_batches(seq, 4, 10, max_batches=2))) == 2
