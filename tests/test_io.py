"""safetensors files: round trips, metadata, atomic writes, clear errors, and no pickle."""
import json
import os

import numpy as np
import pytest

import minigrad as mg
import minigrad.io as mio
from minigrad import nn
from minigrad.backend import to_device, to_numpy
from minigrad.io import load_file, load_metadata, load_module, save_file, save_module


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.uint8, np.float16, np.bool_])
def test_round_trip_dtypes_and_shapes(dtype, tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "matrix": (rng.standard_normal((3, 4)) * 50).astype(dtype),
        "vector": np.arange(5).astype(dtype),
        "scalar": np.array(7, dtype=dtype),        # 0-d stays 0-d, not shape (1,)
        "empty": np.zeros((0, 3), dtype=dtype),
        "cube": (rng.standard_normal((2, 1, 3)) * 50).astype(dtype),
    }
    path = tmp_path / "a.safetensors"
    save_file(arrays, path)
    back = load_file(path)
    assert set(back) == set(arrays)
    for k, a in arrays.items():
        assert back[k].dtype == a.dtype and back[k].shape == a.shape, k
        np.testing.assert_array_equal(back[k], a, err_msg=k)


def test_round_trip_tensors_views_and_devices(backend, tmp_path):
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    arrays = {
        "tensor": mg.Tensor(to_device(base, backend)),
        "param": nn.Parameter(to_device(base[:2], backend)),
        "transposed": to_device(base.T, backend),          # not C-contiguous
        "strided": base[::2, 1::3],
        "numpy_scalar": np.float64(2.5),
        "tensor_0d": mg.Tensor(to_device(np.array(1.5, np.float32), backend)),
    }
    path = tmp_path / "b.safetensors"
    save_file(arrays, path)
    back = load_file(path)
    for k, a in arrays.items():
        expect = to_numpy(getattr(a, "data", a))
        assert isinstance(back[k], np.ndarray)
        assert back[k].shape == expect.shape and back[k].dtype == expect.dtype, k
        np.testing.assert_array_equal(back[k], expect, err_msg=k)
    # the loaded arrays are writable and independent of each other
    back["tensor"][0, 0] = -1
    assert back["param"][0, 0] == 0


def test_save_file_rejects_non_arrays(tmp_path):
    with pytest.raises(TypeError, match="'cfg'"):
        save_file({"w": np.zeros(2), "cfg": {"a": 1}}, tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()


def test_metadata_round_trip(tmp_path):
    path = tmp_path / "m.safetensors"
    meta = {"name": "gpt-mini", "step": 1200, "lr": 3e-4, "config": {"n_layer": 2, "bias": False},
            "betas": [0.9, 0.95]}
    save_file({"w": np.ones(2, np.float32)}, path, metadata=meta)
    got = load_metadata(path)
    assert set(got) == set(meta) and all(isinstance(v, str) for v in got.values())
    assert got["name"] == "gpt-mini"                      # strings are stored as they are
    assert {k: json.loads(v) for k, v in got.items() if k != "name"} == {
        k: v for k, v in meta.items() if k != "name"}     # everything else as JSON
    np.testing.assert_array_equal(load_file(path)["w"], 1.0)
    save_file({"w": np.ones(2, np.float32)}, path)
    assert load_metadata(path) == {}


def _dir_listing(folder):
    return sorted(os.listdir(folder))


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    save_file({"w": np.arange(1000, dtype=np.float64)}, path, metadata={"step": 1})
    old = path.read_bytes()
    real_fdopen = os.fdopen

    class HalfWriter:
        """A file that writes half of what it is given, then fails (a full disk, a kill)."""

        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(mio.os, "fdopen", lambda *a, **k: HalfWriter(real_fdopen(*a, **k)))
    with pytest.raises(OSError, match="No space"):
        save_file({"w": np.zeros(5000, dtype=np.float64)}, path, metadata={"step": 2})
    with pytest.raises(OSError):
        save_file({"w": np.zeros(10)}, tmp_path / "new.safetensors")
    monkeypatch.undo()

    assert path.read_bytes() == old
    assert _dir_listing(tmp_path) == ["ckpt.safetensors"]   # no temp file, no half-made new file
    assert load_metadata(path) == {"step": "1"}
    np.testing.assert_array_equal(load_file(path)["w"], np.arange(1000))


def test_failed_rename_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    save_file({"w": np.ones(3)}, path)
    old = path.read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt  # interrupted right before the rename

    monkeypatch.setattr(mio.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        save_file({"w": np.zeros(3)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert _dir_listing(tmp_path) == ["ckpt.safetensors"]


def test_overwrite_and_new_folders(tmp_path):
    path = tmp_path / "deep" / "er" / "x.safetensors"
    save_file({"a": np.ones(2)}, path)            # missing folders are made
    save_file({"b": np.zeros(3)}, path)           # overwriting replaces the whole file
    assert list(load_file(str(path))) == ["b"]    # str and PathLike both work
    assert _dir_listing(path.parent) == ["x.safetensors"]


def test_file_mode_follows_umask_or_the_old_file(tmp_path):
    if os.name != "posix":
        pytest.skip("POSIX permissions")
    umask = os.umask(0o022)
    try:
        path = tmp_path / "p.safetensors"
        save_file({"a": np.ones(2)}, path)
        assert path.stat().st_mode & 0o777 == 0o644   # not mkstemp's private 0600
        os.chmod(path, 0o640)
        save_file({"a": np.zeros(2)}, path)
        assert path.stat().st_mode & 0o777 == 0o640   # replacing a file keeps its mode
    finally:
        os.umask(umask)


def test_not_a_safetensors_file_is_a_clear_value_error(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("this is not a tensor file, it is a text file with some words in it\n")
    with pytest.raises(ValueError, match="notes.txt.*not a valid safetensors"):
        load_file(text)
    with pytest.raises(ValueError, match="notes.txt"):
        load_metadata(text)

    good = tmp_path / "good.safetensors"
    save_file({"w": np.arange(100, dtype=np.float32)}, good)
    cut = tmp_path / "truncated.safetensors"
    cut.write_bytes(good.read_bytes()[:-40])        # a partial copy
    with pytest.raises(ValueError, match="truncated.safetensors"):
        load_file(cut)
    bad_json = tmp_path / "bad_header.safetensors"
    bad_json.write_bytes((5).to_bytes(8, "little") + b"{oops" + bytes(16))
    for load in (load_file, load_metadata):
        with pytest.raises(ValueError, match="bad_header.safetensors"):
            load(bad_json)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.safetensors"):
        load_file(empty)
    with pytest.raises(ValueError, match="empty.safetensors"):
        load_metadata(empty)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_file(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError):
        load_metadata(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError):
        load_module(nn.Linear(2, 2), tmp_path / "nope.safetensors")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(11, 4)
        self.ln = nn.LayerNorm(4)
        self.head = nn.Linear(4, 11, bias=False)
        self.head.weight = self.wte.weight              # tied: stored once
        self.register_buffer("pos", np.arange(6, dtype=np.int64))
        self.register_buffer("scratch", np.zeros(3, np.float32), persistent=False)

    def forward(self, ids):
        return self.head(self.ln(self.wte(ids)))


def test_save_module_load_module_round_trip(backend, tmp_path):
    mg.manual_seed(0)
    src = Tiny().to(backend)
    src.ln.weight.data = src.ln.weight.data * 3
    path = tmp_path / "tiny.safetensors"
    save_module(src, path, metadata={"arch": "tiny", "step": 5})
    assert src.device == backend                        # saving does not move the model
    assert sorted(load_file(path)) == ["ln.bias", "ln.weight", "pos", "wte.weight"]
    assert load_metadata(path) == {"arch": "tiny", "step": "5"}

    mg.manual_seed(1)
    dst = Tiny().to(backend)
    assert load_module(dst, path) == ([], [])
    assert dst.device == backend and dst.head.weight is dst.wte.weight   # tying survives loading
    for (n, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b), err_msg=n)
    ids = mg.Tensor(to_device(np.array([[1, 5, 10]]), backend))
    np.testing.assert_array_equal(to_numpy(src(ids).data), to_numpy(dst(ids).data))


def test_load_module_strict_and_non_strict(tmp_path):
    path = tmp_path / "lin.safetensors"
    save_file({"weight": np.ones((2, 3), np.float32), "extra": np.zeros(1)}, path)
    with pytest.raises(nn.StateDictError, match="missing keys: bias"):
        load_module(nn.Linear(3, 2), path)
    lin = nn.Linear(3, 2)
    assert load_module(lin, path, strict=False) == (["bias"], ["extra"])
    np.testing.assert_array_equal(lin.weight.numpy(), 1.0)


def test_file_is_plain_header_and_bytes_not_pickle(tmp_path):
    path = tmp_path / "w.safetensors"
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    save_module(nn.Linear(3, 2), tmp_path / "lin.safetensors")
    save_file({"w": w, "s": np.array(3, np.int64)}, path, metadata={"k": "v"})
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")             # u64 little-endian header length
    header = json.loads(raw[8:8 + n])                  # then a JSON header ...
    assert header["__metadata__"] == {"k": "v"}
    assert header["w"]["dtype"] == "F32" and header["w"]["shape"] == [2, 3]
    assert header["s"]["dtype"] == "I64" and header["s"]["shape"] == []
    body = raw[8 + n:]                                 # ... then raw little-endian bytes, nothing else
    start, end = header["w"]["data_offsets"]
    assert body[start:end] == w.astype("<f4").tobytes()
    assert len(body) == max(e for k, v in header.items() if k != "__metadata__" for e in v["data_offsets"])
    for f in (path, tmp_path / "lin.safetensors"):
        data = f.read_bytes()
        assert not data.startswith(b"\x80")            # a pickle (torch.save) starts with PROTO 0x80
        assert not data.startswith(b"PK")              # nor a zip archive (torch's zip format)
        assert data[8:9] == b"{"
