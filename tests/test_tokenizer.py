"""Tokenizers: round trips, errors, BPE training against a plain reference, JSON files."""

import json
import re

import numpy as np
import pytest

from lm.tokenizer import (
    GPT2_SPLIT_PATTERN,
    BPETokenizer,
    CharTokenizer,
    build_tokenizer,
    load_tokenizer,
)

ENGLISH = (
    "The quick brown fox jumps over the lazy dog. It's a sunny day, isn't it? "
    "We'll see: 42 foxes, 7 dogs and 1000 trees in the forest_of_words.\n"
    "Then the fox said to the dog: \"I'm faster than you, and you're slower than me.\"\n"
) * 20

MIXED = [
    "",
    "Hello, world!",
    "Καλημέρα κόσμε",  # Greek
    "你好，世界。今天天气很好",  # Chinese
    "مرحبا بالعالم",  # Arabic
    "👨‍👩‍👧‍👦 family, 👍🏽 thumbs, 🏳️‍🌈 flag",  # ZWJ sequences, skin tone, variation selector
    "e\u0301 n\u0303 a\u0308\u0301 Z\u0351\u0362\u0334",  # combining marks
    "line one\r\nline two\n\n\ttabbed   spaces \u00a0nbsp\u200bzero-width\u2028sep",
    "   leading and trailing   ",
    "snake_case __dunder__ x+=1; a->b && c||d",
    "DON'T don't we'LL 3.14159 1,000,000 Ⅻ ½ ٣",
]


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(ENGLISH, 300)


# ---------------------------------------------------------------- char


def test_char_round_trip_and_vocab():
    tok = CharTokenizer.train("hello world")
    assert tok.vocab_size == len(set("hello world"))
    assert tok.chars == sorted(set("hello world"))
    ids = tok.encode("hold low red")
    assert tok.decode(ids) == "hold low red"
    assert tok.decode(tok.encode("")) == ""


def test_char_unknown_characters_are_named():
    tok = CharTokenizer.train("abc")
    with pytest.raises(ValueError, match="'Z'") as exc:
        tok.encode("abZcQ")
    assert "'Q'" in str(exc.value) and "trained on a corpus without them" in str(exc.value)
    with pytest.raises(ValueError, match="'Z'"):
        tok.encode_array("abZ")
    assert tok.encode("abZcQ", errors="ignore") == tok.encode("abc")
    assert tok.encode_array("abZcQ", errors="ignore").tolist() == tok.encode("abc")
    with pytest.raises(ValueError, match="errors"):
        tok.encode("abc", errors="replace")


def test_char_encode_array_matches_encode():
    text = "Zürich 😀 naïve\r\n" * 50
    tok = CharTokenizer.train(text)
    arr = tok.encode_array(text)
    assert arr.dtype == np.uint16
    assert arr.tolist() == tok.encode(text)
    assert tok.decode(arr) == text


def test_char_empty_training_text():
    with pytest.raises(ValueError, match="empty"):
        CharTokenizer.train("")


# ---------------------------------------------------------------- BPE


def test_split_pattern_covers_every_code_point():
    # Round trips rest on the chunks concatenating back to the text for ANY input.
    text = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    assert "".join(re.findall(GPT2_SPLIT_PATTERN, text)) == text


@pytest.mark.parametrize("text", MIXED)
def test_bpe_round_trip_mixed_scripts(bpe, text):
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text
    assert bpe.encode_array(text).tolist() == ids


def test_bpe_round_trip_random_code_points(bpe):
    rng = np.random.default_rng(0)
    cps = rng.integers(0, 0x110000, size=3000)
    text = "".join(chr(c) for c in cps if not 0xD800 <= c < 0xE000)
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_compresses_training_text(bpe):
    assert bpe.vocab_size == 300
    n_tokens = len(bpe.encode(ENGLISH))
    assert n_tokens < 0.7 * len(ENGLISH.encode("utf-8"))  # 44 merges already save >30%


def test_bpe_merges_stay_inside_chunks(bpe):
    # A token never spans two pre-split chunks: no word followed by a space or by
    # punctuation ("fox jumps", "dog.") even though such pairs are frequent here.
    for i in range(256, bpe.vocab_size):
        s = bpe.token_bytes(i).decode("utf-8", errors="replace")
        assert not re.search(r"\S\s|[^\W\d_][^\w\s]|\d[^\W\d]", s), s


def _reference_train(text, vocab_size):
    """Plain BPE: recount every pair over every chunk at each step."""
    words = [list(c.encode("utf-8")) for c in re.findall(GPT2_SPLIT_PATTERN, text)]
    merges = []
    for new_id in range(256, vocab_size):
        counts = {}
        for w in words:
            for p in zip(w, w[1:]):
                counts[p] = counts.get(p, 0) + 1
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))  # most frequent, then smallest
        merges.append(pair)
        new_words = []
        for w in words:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == pair:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words.append(out)
        words = new_words
    return merges


def test_bpe_training_matches_reference_and_is_deterministic(bpe):
    text = ENGLISH[:2000] + " aaaa aaaaa aaaaaaa"  # runs of one byte test overlapping pairs
    assert BPETokenizer.train(text, 330).merges == _reference_train(text, 330)
    assert BPETokenizer.train(ENGLISH, 300).merges == bpe.merges


def test_bpe_encode_equals_applying_merges_in_order(bpe):
    # Merging by rank inside a chunk must equal replaying training's merges in order.
    for chunk in re.findall(GPT2_SPLIT_PATTERN, "The quick brown forest_of_words isn't 1000!"):
        ids = list(chunk.encode("utf-8"))
        for k, (a, b) in enumerate(bpe.merges):
            out, i = [], 0
            while i < len(ids):
                if i + 1 < len(ids) and ids[i] == a and ids[i + 1] == b:
                    out.append(256 + k)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            ids = out
        assert bpe.encode(chunk) == ids


def test_bpe_vocab_size_too_small():
    with pytest.raises(ValueError, match="at least 256"):
        BPETokenizer.train("abc", 255)


def test_bpe_runs_out_of_pairs():
    with pytest.warns(UserWarning, match="only supports"):
        tok = BPETokenizer.train("ab ab", 400)
    assert tok.vocab_size < 400
    assert tok.decode(tok.encode("ab ba")) == "ab ba"


# ---------------------------------------------------------------- files


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_load_round_trip(tmp_path, kind):
    tok = build_tokenizer(kind, ENGLISH, 280)
    path = tmp_path / "tok.json"
    tok.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["tok.json"]  # no temp file left behind
    assert json.loads(path.read_text())["type"] == kind
    loaded = load_tokenizer(path)
    assert type(loaded) is type(tok)
    assert loaded.vocab_size == tok.vocab_size
    sample = ENGLISH[:500]
    assert loaded.encode(sample) == tok.encode(sample)
    assert type(tok).load(path).to_json() == tok.to_json()


def test_load_wrong_class(tmp_path):
    path = tmp_path / "char.json"
    CharTokenizer.train("abc").save(path)
    with pytest.raises(ValueError, match="char"):
        BPETokenizer.load(path)


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "bad JSON"),
        ("[1, 2]", "JSON object"),
        ('{"type": "wordpiece", "version": 1}', "unknown tokenizer type"),
        ('{"type": "bpe", "version": 99, "merges": []}', "version"),
        ('{"type": "bpe", "version": 1}', "merges"),
        ('{"type": "bpe", "version": 1, "merges": [[300, 1]]}', "does not exist"),
        ('{"type": "char", "version": 1, "chars": ["a", "bc"]}', "single characters"),
    ],
)
def test_corrupt_tokenizer_file(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as exc:
        load_tokenizer(path)
    assert str(path) in str(exc.value)


def test_build_tokenizer_kinds():
    assert isinstance(build_tokenizer("char", "abc", None), CharTokenizer)
    assert build_tokenizer("bpe", ENGLISH, 260).vocab_size == 260
    with pytest.raises(ValueError, match="'char', 'bpe'"):
        build_tokenizer("wordpiece", "abc", None)
