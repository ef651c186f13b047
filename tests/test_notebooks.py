"""Every notebook runs top to bottom (with small settings), as a learner would run it.

Each ``notebooks/*.ipynb`` is executed in a fresh ``python3`` kernel by nbclient. The
kernel finds the repository's packages through ``PYTHONPATH`` (no install needed), draws
with the file-only Agg backend, and sees ``MINIGRAD_NB_FAST=1`` so a chapter may pick
smaller settings. A notebook fails the test when any cell raises, and the error shows the
cell's traceback.
"""

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _code_cells(path):
    with open(path, encoding="utf-8") as f:
        nb = json.load(f)
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def _source(cell):
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks found in {ROOT / 'notebooks'}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_clean(path):
    """Stored without outputs (small diffs); first cell prints versions and seeds; reads no
    development-machine data folder (users' clones have none)."""
    cells = _code_cells(path)
    assert cells, f"{path.name} has no code cells"
    dirty = [i for i, c in enumerate(cells) if c.get("outputs") or c.get("execution_count") is not None]
    assert not dirty, f"{path.name}: code cells {dirty} have stored outputs; clear them before committing"
    first = _source(cells[0])
    assert "minigrad.manual_seed(" in first and "__version__" in first, \
        f"{path.name}: the first code cell should print versions and call minigrad.manual_seed"
    dev_data = os.path.join("..", "shared")
    for i, c in enumerate(cells):
        assert dev_data not in _source(c), f"{path.name}: cell {i} reads {dev_data}, which users do not have"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install '.[dev]')")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install '.[dev]')")
    pytest.importorskip("ipykernel", reason="ipykernel is not installed (pip install '.[dev]')")
    from jupyter_client.kernelspec import NoSuchKernel

    # the kernel is a child process: it inherits this environment
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("MINIGRAD_NB_FAST", "1")

    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    except NoSuchKernel:
        pytest.skip("no 'python3' Jupyter kernel is installed (python -m ipykernel install --user)")
