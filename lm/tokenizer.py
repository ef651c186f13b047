"""Tokenizers trained from scratch: character-level and byte-level BPE.

Both turn text into a list of integer ids and back, and are saved as small JSON
files (no pickle), so a trained model directory can be read by any tool.

    tok = BPETokenizer.train(text, vocab_size=512)
    ids = tok.encode("hello world")
    assert tok.decode(ids) == "hello world"
    tok.save("tokenizer.json")
    tok = load_tokenizer("tokenizer.json")
"""

from __future__ import annotations

import heapq
import json
import os
import re
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm import tqdm

from minigrad.io import atomic_write_text

__all__ = [
    "Tokenizer",
    "CharTokenizer",
    "BPETokenizer",
    "load_tokenizer",
    "build_tokenizer",
    "TOKENIZER_KINDS",
    "GPT2_SPLIT_PATTERN",
]

FORMAT_VERSION = 1
TOKENIZER_KINDS = ("char", "bpe")
DEFAULT_BPE_VOCAB_SIZE = 512

# GPT-2 pre-splits text with
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# The stdlib `re` has no \p{..} classes, so we approximate them:
#   letters    \p{L}  ~ [^\W\d_]     (word characters that are neither digits nor "_")
#   numbers    \p{N}  ~ \d
#   the rest          ~ [^\s\w]|_    ("_" is a word character in `re`, not in GPT-2)
# Every character is a letter, a digit, "_", whitespace or "none of these", so the
# alternatives together match any character: the chunks always concatenate back to the
# input, which is what makes round trips exact. Contractions are matched
# case-insensitively (GPT-2's are not, which splits "DON'T" oddly).
GPT2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"| ?[^\W\d_]+"
    r"| ?\d+"
    r"| ?(?:[^\s\w]|_)+"
    r"|\s+(?!\S)"
    r"|\s+"
)


class Tokenizer:
    """Common interface: `encode`, `decode`, `vocab_size`, `save`, `encode_array`."""

    kind: str = ""

    @property
    def vocab_size(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:  # pragma: no cover - overridden
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def to_dict(self) -> dict:  # pragma: no cover - overridden
        raise NotImplementedError

    def to_json(self) -> str:
        """Canonical JSON text of the tokenizer (stable: usable as a cache key)."""
        return json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=True)

    @property
    def dtype(self) -> np.dtype:
        """Smallest integer dtype that holds every id: uint16 when it fits, else int32."""
        return np.dtype(np.uint16) if self.vocab_size <= 2**16 else np.dtype(np.int32)

    def encode_array(self, text: str) -> np.ndarray:
        """Encode `text` to a 1-D array of dtype `self.dtype` (uint16 for small vocabularies)."""
        ids = self.encode(text)
        return np.fromiter(ids, dtype=self.dtype, count=len(ids))

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as JSON, atomically (temporary file, then rename)."""
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1, ensure_ascii=True))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a tokenizer saved by `save`; the file must hold this class's type."""
        tok = load_tokenizer(path)
        if not isinstance(tok, cls):
            raise ValueError(
                f"{path}: holds a {tok.kind!r} tokenizer, not a {cls.kind!r} one "
                f"(use lm.tokenizer.load_tokenizer to load any type)"
            )
        return tok


# --------------------------------------------------------------------------- char


class CharTokenizer(Tokenizer):
    """One id per character, ids in sorted character order (like nanoGPT's shakespeare_char)."""

    kind = "char"

    def __init__(self, chars: Iterable[str]):
        chars = list(chars)
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(
                    f"CharTokenizer vocabulary entries must be single characters, got {c!r}"
                )
        if len(set(chars)) != len(chars):
            dup = sorted(c for c, n in Counter(chars).items() if n > 1)
            raise ValueError(f"CharTokenizer vocabulary has duplicate characters: {dup[:10]!r}")
        if not chars:
            raise ValueError("CharTokenizer needs at least one character")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self._table: np.ndarray | None = None  # code point -> id, built on first encode_array

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        """Vocabulary = the sorted set of characters in `text`."""
        if not text:
            raise ValueError("cannot train a CharTokenizer on empty text")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def _unknown_error(self, text: str) -> ValueError:
        unknown = sorted(set(text) - self.stoi.keys())
        shown = ", ".join(repr(c) for c in unknown[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        return ValueError(
            f"text contains {len(unknown)} character(s) not in the vocabulary: {shown}{more}. "
            f"This tokenizer was trained on a corpus without them; retrain it on text that "
            f"includes them, or drop them (encode(..., errors='ignore'); on the lm.generate command "
            f"line: --skip_unknown)."
        )

    def encode(self, text: str, errors: str = "strict") -> list[int]:
        """Map each character to its id.

        errors="strict" (default) raises ValueError naming any characters that were not
        in the training corpus; errors="ignore" silently drops them. (There is no
        "unknown" id: reserving one would waste a slot in every small char vocabulary.)
        """
        _check_errors(errors)
        stoi = self.stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            if errors == "strict":
                raise self._unknown_error(text) from None
            return [stoi[c] for c in text if c in stoi]

    def encode_array(self, text: str, errors: str = "strict") -> np.ndarray:
        """Fast `encode` for whole corpora: a NumPy lookup table indexed by code point."""
        _check_errors(errors)
        if self._table is None:
            codes = [ord(c) for c in self.chars]
            table = np.full(max(codes) + 1, -1, dtype=np.int32)
            table[codes] = np.arange(len(codes), dtype=np.int32)
            self._table = table
        table = self._table
        # "surrogatepass" keeps lone surrogates (legal in a Python str) as their code points.
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        ids = np.full(cps.shape, -1, dtype=np.int32)
        inside = cps < table.size
        ids[inside] = table[cps[inside]]
        known = ids >= 0
        if not known.all():
            if errors == "strict":
                raise self._unknown_error(text)
            ids = ids[known]
        return ids.astype(self.dtype)

    def decode(self, ids: Iterable[int]) -> str:
        """Join the characters of `ids`; an id outside the vocabulary is an IndexError."""
        chars = self.chars
        return "".join([chars[int(i)] for i in ids])

    def to_dict(self) -> dict:
        return {"type": "char", "version": FORMAT_VERSION, "chars": list(self.chars)}

    @classmethod
    def from_dict(cls, d: dict) -> "CharTokenizer":
        chars = d["chars"]
        if not isinstance(chars, list):
            raise ValueError("'chars' must be a list of single characters")
        return cls(chars)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


def _check_errors(errors: str) -> None:
    if errors not in ("strict", "ignore"):
        raise ValueError(f"errors must be 'strict' or 'ignore', got {errors!r}")


# --------------------------------------------------------------------------- BPE


def _merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of `pair`, left to right, by `new_id`."""
    a, b = pair
    out = []
    i, n = 0, len(ids)
    while i < n:
        if ids[i] == a and i + 1 < n and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style): 256 byte tokens plus learned merges.

    Because the base vocabulary is all 256 bytes of UTF-8, any string can be encoded,
    and `decode(encode(s)) == s` for every valid Unicode string.
    """

    kind = "bpe"
    _CACHE_LIMIT = 200_000  # chunk -> ids entries kept by encode

    def __init__(self, merges: Iterable[tuple[int, int]], pattern: str = GPT2_SPLIT_PATTERN):
        self.merges: list[tuple[int, int]] = []
        for i, m in enumerate(merges):
            a, b = (int(x) for x in m)
            if not (0 <= a < 256 + i and 0 <= b < 256 + i):
                raise ValueError(f"merge {i} {m!r} refers to a token that does not exist yet")
            self.merges.append((a, b))
        self.pattern = pattern
        self._split = re.compile(pattern)
        # pair -> id of the merged token; a smaller id is an earlier (higher-priority) merge
        self.ranks = {pair: 256 + i for i, pair in enumerate(self.merges)}
        self.vocab: list[bytes] = [bytes([i]) for i in range(256)]
        for a, b in self.merges:
            self.vocab.append(self.vocab[a] + self.vocab[b])
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def train(
        cls,
        text: str,
        vocab_size: int,
        verbose: bool = False,
        pattern: str = GPT2_SPLIT_PATTERN,
    ) -> "BPETokenizer":
        """Learn `vocab_size - 256` merges from `text`, most frequent adjacent pair first.

        Text is split into chunks by `pattern` so no merge crosses a word boundary.
        Pairs are counted over unique chunks weighted by frequency; after each merge
        only the chunks that contain the merged pair are updated, and a lazy max-heap
        finds the next pair, so a merge costs time proportional to what it changes.
        Ties go to the smallest pair (by ids), which makes training deterministic.
        If the text runs out of pairs first, fewer merges are learned (with a warning).
        """
        vocab_size = int(vocab_size)
        if vocab_size < 256:
            raise ValueError(
                f"BPE vocab_size must be at least 256 (the byte alphabet), got {vocab_size}"
            )
        n_merges = vocab_size - 256
        chunk_counts = Counter(re.findall(pattern, text))
        words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
        freqs = list(chunk_counts.values())

        pair_counts: dict[tuple[int, int], int] = defaultdict(int)
        where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> chunks holding it
        for i, (w, f) in enumerate(zip(words, freqs)):
            for pair in zip(w, w[1:]):
                pair_counts[pair] += f
                where[pair].add(i)
        # Entries go stale when counts change; a popped entry is used only if its count
        # still matches pair_counts (the standard "lazy deletion" heap).
        heap = [(-c, p) for p, c in pair_counts.items()]
        heapq.heapify(heap)

        merges: list[tuple[int, int]] = []
        bar = tqdm(total=n_merges, desc="BPE merges", unit="merge", disable=not verbose)
        while len(merges) < n_merges:
            while heap and pair_counts.get(heap[0][1], 0) != -heap[0][0]:
                heapq.heappop(heap)
            if not heap:
                warnings.warn(
                    f"BPE training text only supports {len(merges)} merges; "
                    f"vocab_size is {256 + len(merges)} instead of {vocab_size}",
                    stacklevel=2,
                )
                break
            _, pair = heapq.heappop(heap)
            new_id = 256 + len(merges)
            merges.append(pair)

            changed = set()
            for i in where.pop(pair):
                w = words[i]
                new_w = _merge(w, pair, new_id)
                if len(new_w) == len(w):  # stale index entry: pair no longer in this chunk
                    continue
                f = freqs[i]
                for p in zip(w, w[1:]):
                    pair_counts[p] -= f
                    changed.add(p)
                for p in zip(new_w, new_w[1:]):
                    pair_counts[p] += f
                    changed.add(p)
                    where[p].add(i)
                words[i] = new_w
            for p in changed:
                c = pair_counts[p]
                if c > 0:
                    heapq.heappush(heap, (-c, p))
                else:
                    del pair_counts[p]
                    where.pop(p, None)
            bar.update(1)
        bar.close()
        return cls(merges, pattern)

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.merges)

    def _encode_chunk(self, chunk: str) -> list[int]:
        ids = list(chunk.encode("utf-8"))
        ranks = self.ranks
        while len(ids) >= 2:
            # the adjacent pair that was merged earliest in training goes first
            pair = min(zip(ids, ids[1:]), key=lambda p: ranks.get(p, 1 << 62))
            new_id = ranks.get(pair)
            if new_id is None:
                break
            ids = _merge(ids, pair, new_id)
        return ids

    def encode(self, text: str) -> list[int]:
        """Split `text` into chunks, then apply merges by rank inside each chunk."""
        cache = self._cache
        out: list[int] = []
        for chunk in self._split.findall(text):
            ids = cache.get(chunk)
            if ids is None:
                ids = self._encode_chunk(chunk)
                if len(cache) >= self._CACHE_LIMIT:
                    cache.clear()  # crude bound on memory; natural text rebuilds it fast
                cache[chunk] = ids
            out.extend(ids)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Concatenate token bytes and decode UTF-8; invalid sequences become U+FFFD."""
        vocab = self.vocab
        return b"".join([vocab[int(i)] for i in ids]).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (useful to inspect what was learned)."""
        return self.vocab[token_id]

    def to_dict(self) -> dict:
        return {
            "type": "bpe",
            "version": FORMAT_VERSION,
            "pattern": self.pattern,
            "merges": [list(m) for m in self.merges],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "BPETokenizer":
        merges = d["merges"]
        if not isinstance(merges, list) or not all(
            isinstance(m, list) and len(m) == 2 and all(isinstance(x, int) for x in m)
            for m in merges
        ):
            raise ValueError("'merges' must be a list of [int, int] pairs")
        pattern = d.get("pattern", GPT2_SPLIT_PATTERN)
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ValueError(f"'pattern' is not a valid regular expression: {e}") from None
        return cls([tuple(m) for m in merges], pattern)

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


# --------------------------------------------------------------------------- files

_CLASSES: dict[str, type[Tokenizer]] = {"char": CharTokenizer, "bpe": BPETokenizer}


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer JSON file of any type (dispatches on its "type" field)."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"tokenizer file not found: {path}") from None
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a valid tokenizer file (bad JSON: {e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: not a valid tokenizer file (expected a JSON object)")
    kind = d.get("type")
    if kind not in _CLASSES:
        raise ValueError(
            f"{path}: unknown tokenizer type {kind!r}; expected one of {list(TOKENIZER_KINDS)}"
        )
    if d.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: tokenizer format version {d.get('version')!r} is not supported "
            f"(this code reads version {FORMAT_VERSION})"
        )
    try:
        return _CLASSES[kind].from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        detail = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise ValueError(f"{path}: corrupt {kind} tokenizer file: {detail}") from None


def build_tokenizer(
    kind: str, text: str, vocab_size: int | None = None, verbose: bool = False
) -> Tokenizer:
    """Train a tokenizer of `kind` ("char" or "bpe") on `text`.

    `vocab_size` is used by "bpe" only (default 512); a char vocabulary is whatever
    characters the text contains, so it ignores `vocab_size`.
    """
    if kind == "char":
        return CharTokenizer.train(text)
    if kind == "bpe":
        size = DEFAULT_BPE_VOCAB_SIZE if vocab_size is None else vocab_size
        return BPETokenizer.train(text, size, verbose=verbose)
    raise ValueError(f"unknown tokenizer kind {kind!r}; valid kinds are {list(TOKENIZER_KINDS)}")
