"""Corpora, train/val token arrays with an on-disk cache, and random batches.

    data = prepare_data("python-docs", tokenizer_kind="char", vocab_size=None)
    x, y = get_batch(data.train, batch_size=8, block_size=64, rng=np.random.default_rng(0))

A corpus is a `.txt` file, a `.jsonl` file (one JSON object per line), a folder of
those, or a built-in name (`python-docs`, offline; `shakespeare`, cached or downloaded).
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from minigrad.io import atomic_write, atomic_write_bytes

from .tokenizer import Tokenizer, build_tokenizer, load_tokenizer

__all__ = [
    "CorpusError",
    "CacheWarning",
    "BUILTIN_CORPORA",
    "SHAKESPEARE_URL",
    "SHAKESPEARE_CHARS",
    "default_cache_dir",
    "load_corpus",
    "TokenDataset",
    "prepare_data",
    "get_batch",
    "iter_eval_batches",
]

BUILTIN_CORPORA = ("python-docs", "shakespeare")
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_CHARS = 1_115_394
SHAKESPEARE_FILENAMES = ("tinyshakespeare.txt", "input.txt")
DOWNLOAD_TIMEOUT_S = 15.0
CORPUS_EXTENSIONS = (".txt", ".jsonl")
DOC_SEPARATOR = "\n\n"
_CACHE_FORMAT = 1  # bump to invalidate every token cache when the layout changes


class CorpusError(ValueError):
    """A corpus could not be found, read, or parsed; the message says what to do."""


def default_cache_dir() -> Path:
    """Where corpora and token caches live: $LM_DATA_DIR, else $XDG_CACHE_HOME/minigrad-lm,
    else ~/.cache/minigrad-lm. Read at call time, so tests can point it elsewhere."""
    if os.environ.get("LM_DATA_DIR"):
        return Path(os.environ["LM_DATA_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "minigrad-lm"
    return Path.home() / ".cache" / "minigrad-lm"


# --------------------------------------------------------------------------- corpora


def load_corpus(source: str | os.PathLike, text_field: str = "text") -> str:
    """Return the text of a corpus.

    `source` is a built-in name (see BUILTIN_CORPORA), a `.txt` file, a `.jsonl` file
    (the string in `text_field` of each object; blank lines skipped), or a folder
    (every `.txt`/`.jsonl` file under it, recursively, in sorted path order).
    Documents are joined with a blank line. Built-in names win over a same-named
    path in the working folder; write `./shakespeare` to mean the path.
    Raises CorpusError with a message naming the source on any problem.
    """
    name = os.fspath(source)
    if name == "python-docs":
        text = _python_docs()
    elif name == "shakespeare":
        text = _shakespeare()
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            text = _read_folder(path, text_field)
        elif path.is_file():
            text = _read_file(path, text_field)
        else:
            raise CorpusError(
                f"corpus {name!r} is neither a file, a folder, nor a built-in corpus name "
                f"(built-in: {', '.join(BUILTIN_CORPORA)})"
            )
    if not text.strip():
        raise CorpusError(f"corpus {name!r} is empty (no text to train on)")
    return text


def _python_docs() -> str:
    # The Python reference documentation ships inside CPython itself, so this corpus
    # works on a fresh machine with no network.
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        raise CorpusError(
            "built-in corpus 'python-docs' needs the stdlib module pydoc_data, which this "
            "Python installation lacks; pass a .txt/.jsonl file or a folder instead"
        ) from None
    return DOC_SEPARATOR.join(topics[k] for k in sorted(topics))


def download_file(url: str, dest: Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Download `url` to `dest` atomically (temporary file in the same folder, then rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        payload = resp.read()
    atomic_write_bytes(dest, payload)


def _shakespeare() -> str:
    env = os.environ.get("LM_SHAKESPEARE_PATH")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise CorpusError(f"LM_SHAKESPEARE_PATH points to {path}, which is not a file")
        return _read_text(path)
    cache = default_cache_dir()
    for fname in SHAKESPEARE_FILENAMES:
        if (cache / fname).is_file():
            return _read_text(cache / fname)
    dest = cache / SHAKESPEARE_FILENAMES[0]
    try:
        download_file(SHAKESPEARE_URL, dest)
    except Exception as e:  # URLError, timeouts, HTTP errors, unwritable cache folder...
        raise CorpusError(
            f"could not download Tiny Shakespeare from {SHAKESPEARE_URL} ({e}). "
            f"Pass a local copy with --data /path/to/tinyshakespeare.txt, or set "
            f"LM_SHAKESPEARE_PATH to that file, or put it at {dest} "
            f"(the cache folder is chosen by LM_DATA_DIR)."
        ) from e
    return _read_text(dest)


def _read_text(path: Path) -> str:
    try:
        # utf-8-sig drops a leading byte-order mark that some editors write
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not valid UTF-8 text ({e})") from None
    except OSError as e:
        raise CorpusError(f"{path}: cannot read ({e.strerror or e})") from None


def _read_file(path: Path, text_field: str) -> str:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _read_text(path)
    if suffix == ".jsonl":
        return _read_jsonl(path, text_field)
    raise CorpusError(
        f"{path}: unsupported file type {repr(path.suffix) if path.suffix else '(no extension)'}; "
        f"a corpus file must end in {' or '.join(CORPUS_EXTENSIONS)}"
    )


def _read_jsonl(path: Path, text_field: str) -> str:
    docs = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(
                # e.msg may end in "at" ("Unterminated string starting at"): no "at at column"
                f"{path}, line {lineno}: invalid JSON ({e.msg.removesuffix(' at')} at column {e.colno})"
            ) from None
        if not isinstance(obj, dict):
            raise CorpusError(
                f"{path}, line {lineno}: expected a JSON object with a {text_field!r} field, "
                f"got a JSON {_json_type(obj)}"
            )
        if text_field not in obj:
            keys = ", ".join(repr(k) for k in list(obj)[:20]) or "none"
            raise CorpusError(
                f"{path}, line {lineno}: no {text_field!r} field (keys found: {keys}); "
                f"set text_field to the key that holds the text"
            )
        value = obj[text_field]
        if not isinstance(value, str):
            raise CorpusError(
                f"{path}, line {lineno}: field {text_field!r} must be a string, "
                f"got a JSON {_json_type(value)}"
            )
        if value:
            docs.append(value)
    return DOC_SEPARATOR.join(docs)


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _read_folder(folder: Path, text_field: str) -> str:
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in CORPUS_EXTENSIONS
    )
    if not files:
        raise CorpusError(
            f"folder {folder} contains no {' or '.join(CORPUS_EXTENSIONS)} files"
        )
    texts = [_read_file(p, text_field) for p in files]
    return DOC_SEPARATOR.join(t for t in texts if t)


# --------------------------------------------------------------------------- token data


@dataclass
class TokenDataset:
    """Encoded corpus split by position: `train` is the first part, `val` the rest."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer
    source: str
    cache_path: Path | None = None  # the .npy holding all tokens, when cached

    def split(self, name: str) -> np.ndarray:
        """The "train" or "val" array."""
        if name not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {name!r}")
        return self.train if name == "train" else self.val

    def check_block_size(self, block_size: int) -> None:
        """Raise ValueError unless both splits hold at least block_size + 1 tokens."""
        for name in ("train", "val"):
            _check_length(self.split(name), block_size, f"the {name} split of {self.source!r}")

    def get_batch(
        self, split: str, batch_size: int, block_size: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """`get_batch` on one split, with an error that names the split if it is too short."""
        data = self.split(split)
        _check_length(data, block_size, f"the {split} split of {self.source!r}")
        return get_batch(data, batch_size, block_size, rng)


def _check_length(data: np.ndarray, block_size: int, what: str) -> None:
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    if len(data) < block_size + 1:
        raise ValueError(
            f"{what} has {len(data)} tokens, but block_size={block_size} needs at least "
            f"{block_size + 1}; use a smaller block_size or more data "
            f"(or a smaller val_fraction if the val split is the short one)"
        )


def prepare_data(
    source: str | os.PathLike = "python-docs",
    tokenizer_kind: str = "char",
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    cache_dir: str | os.PathLike | None = None,
    text_field: str = "text",
    tokenizer: Tokenizer | None = None,
    use_cache: bool = True,
    verbose: bool = False,
) -> TokenDataset:
    """Load a corpus, build (or reuse) a tokenizer, encode once, split train/val.

    The first `1 - val_fraction` of the tokens train, the rest validate (nanoGPT's
    split). With `use_cache`, both the trained tokenizer (keyed by corpus content, kind
    and vocab_size) and the token array (keyed by corpus content and the tokenizer's
    JSON) are stored under `cache_dir` (default: default_cache_dir()/"tokens"), so a
    second call neither retrains nor re-encodes; token arrays come back memory-mapped.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be strictly between 0 and 1, got {val_fraction}")
    name = os.fspath(source)
    text = load_corpus(name, text_field=text_field)
    corpus_hash = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    if cache_dir is None:
        cache = default_cache_dir() / "tokens"
    else:
        cache = Path(cache_dir).expanduser()

    cache_failed = None   # the first error writing the cache: a cache is a shortcut, never fatal
    if tokenizer is None:
        tok_path = None
        if use_cache:
            key = _hash(f"{_CACHE_FORMAT}|{corpus_hash}|{tokenizer_kind}|{vocab_size}")
            tok_path = cache / f"tokenizer-{key[:20]}.json"
            tokenizer = _try_load_tokenizer(tok_path)
        if tokenizer is None:
            tokenizer = build_tokenizer(tokenizer_kind, text, vocab_size, verbose=verbose)
            if tok_path is not None:
                cache_failed = _try_write(cache_failed, tok_path, lambda: tokenizer.save(tok_path))

    if use_cache:
        key = _hash(f"{_CACHE_FORMAT}|{corpus_hash}|{tokenizer.to_json()}")
        tokens_path = cache / f"tokens-{key[:20]}.npy"
        tokens = _try_load_tokens(tokens_path)
        if tokens is None:
            tokens = tokenizer.encode_array(text)
            failed_before = cache_failed
            cache_failed = _try_write(cache_failed, tokens_path, lambda: _atomic_save_npy(tokens_path, tokens))
            if cache_failed is failed_before is None:
                tokens = np.load(tokens_path, mmap_mode="r")
            else:
                tokens_path = None
        if cache_failed is not None:   # one warning per call, however many files failed
            warnings.warn(f"could not write the token cache in {cache} ({cache_failed}); going on without it "
                          f"(choose another folder with data.cache_dir or LM_DATA_DIR)", CacheWarning,
                          stacklevel=2)
    else:
        tokens_path = None
        tokens = tokenizer.encode_array(text)

    n_train = int(len(tokens) * (1.0 - val_fraction))
    # slices of a memmap stay memory-mapped: nothing is read until a batch asks for it
    return TokenDataset(tokens[:n_train], tokens[n_train:], tokenizer, name, tokens_path)


def _hash(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8", "surrogatepass")).hexdigest()


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:   # a folder we may not look into
        return False


class CacheWarning(UserWarning):
    """The token cache could not be written; training goes on without it."""


def _try_write(failed, path: Path, write):
    """Run ``write()``; return the first error message seen (``failed`` or this one), None if none."""
    if failed is not None:
        return failed
    try:
        write()
    except OSError as e:
        return f"{e.strerror or e}: {getattr(e, 'filename', None) or path}"
    return None


def _try_load_tokenizer(path: Path) -> Tokenizer | None:
    # A cache is only a shortcut: anything unreadable is rebuilt, never fatal.
    if not _is_file(path):
        return None
    try:
        return load_tokenizer(path)
    except (OSError, ValueError):
        return None


def _try_load_tokens(path: Path) -> np.ndarray | None:
    if not _is_file(path):
        return None
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        return None
    return arr


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    # a file object, so np.save adds no ".npy"; renamed into place, never truncated in
    # place, because a reader may hold the old file memory-mapped
    atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False))


# --------------------------------------------------------------------------- batches


def get_batch(
    data: np.ndarray, batch_size: int, block_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random training batch (nanoGPT semantics).

    Offsets are `rng.integers(0, len(data) - block_size, size=batch_size)`;
    x[b] = data[i : i+T], y[b] = data[i+1 : i+T+1]. Both are int64 of shape (B, T).
    """
    _check_length(data, block_size, "the data")
    ix = rng.integers(0, len(data) - block_size, size=batch_size)
    idx = ix[:, None] + np.arange(block_size)  # (B, T)
    x = np.asarray(data[idx], dtype=np.int64)
    y = np.asarray(data[idx + 1], dtype=np.int64)
    return x, y


def iter_eval_batches(
    data: np.ndarray, batch_size: int, block_size: int, max_batches: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Deterministic evaluation batches: consecutive non-overlapping windows from the start.

    Unlike random batches, every evaluation sees exactly the same tokens, so losses
    from different steps (or runs) are comparable without sharing a random generator.
    Window k covers data[k*T : k*T + T + 1]; windows are grouped into batches of up to
    `batch_size` (the last may be smaller), and at most `max_batches` are yielded
    (None: cover the whole array).
    """
    _check_length(data, block_size, "the data")
    n_windows = (len(data) - 1) // block_size
    starts = np.arange(n_windows) * block_size
    if max_batches is not None:
        starts = starts[: max_batches * batch_size]
    offsets = np.arange(block_size)
    for b in range(0, len(starts), batch_size):
        idx = starts[b : b + batch_size, None] + offsets  # (B, T)
        yield np.asarray(data[idx], dtype=np.int64), np.asarray(data[idx + 1], dtype=np.int64)
