"""Saving and loading named arrays in the safetensors format (no pickle anywhere).

safetensors stores a JSON header (names, dtypes, shapes, a string->string metadata
map) followed by raw little-endian bytes: loading a file can never run code.
Writes are atomic: the bytes go to a temporary file in the same folder, which is
then renamed over the target, so a crash leaves either the old file or the new one.
"""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from . import backend


def _mode_for(path: str) -> int:
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers never see a half-written file."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write(path: str, write) -> None:
    """Call ``write(f)`` on a temporary binary file beside ``path``, then rename it over ``path``."""
    def to_path(tmp):
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_TRUNC), "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    atomic_write_path(path, to_path)


def atomic_write_path(path: str, write) -> None:
    """Call ``write(tmp_path)`` for a temporary file beside ``path``, then rename it over ``path``.

    For writers that want a file name rather than a file object (GGUFWriter). A crash or an
    exception leaves the old file or none, and the temporary file is removed.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        # mkstemp makes the file 0600; give it the mode a plain open() would (or the old file's)
        os.chmod(tmp, _mode_for(path))
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_file(tensors: dict, path: str, metadata: dict | None = None) -> None:
    """Save a dict of name -> array/Tensor (CPU or GPU) to a .safetensors file, atomically."""
    from safetensors.numpy import save

    arrays = {}
    for name, t in tensors.items():
        a = getattr(t, "data", t)
        if not hasattr(a, "shape"):
            raise TypeError(f"save_file: {name!r} is a {type(t).__name__}, not an array or Tensor")
        a = backend.to_numpy(a)
        # not np.ascontiguousarray: it turns a 0-d array into shape (1,)
        arrays[name] = a if a.flags.c_contiguous else a.copy(order="C")
    meta = None
    if metadata:
        meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    atomic_write_bytes(path, save(arrays, metadata=meta))


def load_file(path: str) -> dict:
    """Load a .safetensors file into a dict of name -> NumPy array."""
    from safetensors.numpy import load

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no safetensors file at {path}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return load(data)
    except Exception as e:
        raise ValueError(f"{path} is not a valid safetensors file: {e}") from None


def load_metadata(path: str) -> dict:
    """The string->string metadata stored in a .safetensors header (without reading the arrays)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or n > 100_000_000:
            raise ValueError(f"{path} is not a valid safetensors file (header size {n})")
        try:
            header = json.loads(f.read(n))
            return dict(header.get("__metadata__") or {})
        except (ValueError, AttributeError, TypeError) as e:
            raise ValueError(f"{path} is not a valid safetensors file: {e}") from None


def save_module(module, path: str, metadata: dict | None = None) -> None:
    """Save a module's state_dict; the module stays on its device (nothing is moved)."""
    save_file(module.state_dict(), path, metadata)


def load_module(module, path: str, strict: bool = True):
    return module.load_state_dict(load_file(path), strict=strict)
