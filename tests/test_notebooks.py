"""The shipped notebooks as files: paired, without outputs, parameterised.

Executing them is in test_demo.py, which runs every notebook once through `vtrace demo`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import jupytext
import nbformat
import polars as pl
import pytest

from vtrace.errors import VtraceError
from vtrace.notebook import NOTEBOOKS, notebooks_dir
from vtrace.report import INJECTED_TAG, PARAMETERS_TAG, inject_parameters, read_notebook

NB_DIR = notebooks_dir()


def _cells(nb: nbformat.NotebookNode) -> list[tuple[str, str, tuple[str, ...]]]:
    return [
        (c.cell_type, c.source.strip(), tuple(c.get("metadata", {}).get("tags", [])))
        for c in nb.cells
    ]


def test_the_shipped_notebooks_are_the_listed_ones():
    assert sorted(p.stem for p in NB_DIR.glob("*.py")) == sorted(NOTEBOOKS)
    assert sorted(p.stem for p in NB_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_py_and_ipynb_hold_the_same_cells(name: str):
    py = jupytext.read(NB_DIR / f"{name}.py")
    ipynb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    assert _cells(py) == _cells(ipynb), f"{name}: run `jupytext --sync notebooks/{name}.py`"
    formats = ipynb.metadata.get("jupytext", {}).get("formats", "")
    assert "py:percent" in formats and "ipynb" in formats


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_no_outputs_are_committed(name: str):
    nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    assert all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_markdown_first_then_a_tagged_parameters_cell(name: str):
    nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    tagged = [c for c in nb.cells if PARAMETERS_TAG in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    # Each takes a trace location or a model name, and QUICK for the demo's short runs.
    assert "QUICK = False" in tagged[0].source
    assert "TRACES = " in tagged[0].source or "MODEL" in tagged[0].source
    # Nothing before the parameters cell but markdown: injected values override defaults.
    before = nb.cells[: nb.cells.index(tagged[0])]
    assert all(c.cell_type == "markdown" for c in before)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_never_show_figures_themselves(name: str):
    # Figures are the last expression of a cell; `.show()` would bypass the renderer the
    # report and JupyterLab choose.
    text = (NB_DIR / f"{name}.py").read_text()
    assert ".show(" not in text
    assert "map_elements" not in text and "iter_rows" not in text


def test_parameters_are_injected_after_the_parameters_cell():
    nb = jupytext.read(NB_DIR / "03-batching-and-ring-size.py")
    n = len(nb.cells)
    where = next(i for i, c in enumerate(nb.cells) if PARAMETERS_TAG in c.metadata.get("tags", []))
    inject_parameters(nb, {"MODEL": "lab-virtio", "BATCHES": [1, 8], "QUICK": True, "X": None})
    assert len(nb.cells) == n + 1
    cell = nb.cells[where + 1]
    assert cell.metadata["tags"] == [INJECTED_TAG]
    namespace: dict[str, object] = {}
    exec(cell.source, namespace)  # the injected cell is plain assignments
    assert namespace["MODEL"] == "lab-virtio"
    assert namespace["BATCHES"] == [1, 8]
    assert namespace["QUICK"] is True and namespace["X"] is None


def test_no_parameters_leaves_the_notebook_alone():
    nb = jupytext.read(NB_DIR / "01-explore-a-trace.py")
    before = _cells(nb)
    inject_parameters(nb, {})
    assert _cells(nb) == before


def test_read_notebook_takes_the_newer_of_the_pair(tmp_path: Path):
    py = tmp_path / "n.py"
    ipynb = tmp_path / "n.ipynb"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    nbformat.write(nb, ipynb)
    jupytext.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 2")]), py)
    now = time.time()
    os.utime(ipynb, (now - 10, now - 10))
    assert read_notebook(py).cells[0].source == "x = 2"
    os.utime(py, (now - 20, now - 20))
    assert read_notebook(py).cells[0].source == "x = 1"
    with pytest.raises(VtraceError, match="no such notebook"):
        read_notebook(tmp_path / "missing.py")


def test_jupyterlab_serves_the_py_notebooks_as_notebooks():
    """`vtrace notebook`'s command line: JupyterLab starts, jupytext opens the `.py` files as
    notebooks, and the kernel it offers is this environment's."""
    import json
    import socket
    import subprocess
    import urllib.error
    import urllib.request

    from vtrace.notebook import jupyterlab_command

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = "vtrace-test"
    cmd = jupyterlab_command(
        NB_DIR,
        port=port,
        open_browser=False,
        extra=[f"--IdentityProvider.token={token}", "--ServerApp.ip=127.0.0.1"],
    )
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def get(path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}?token={token}", timeout=5) as r:
            return json.load(r)

    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[0][-2000:]
            try:
                model = get("/api/contents/01-explore-a-trace.py")
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "JupyterLab did not answer in 60 s"
                time.sleep(0.3)
        assert model["type"] == "notebook"
        assert model["content"]["cells"][0]["source"].startswith("# 1. Explore a trace")
        assert "python3" in get("/api/kernelspecs")["kernelspecs"]
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


@pytest.mark.slow
@pytest.mark.kvm
@pytest.mark.root
@pytest.mark.bcc
def test_capture_notebook_records_live_on_this_host(tmp_path: Path):
    """Notebook 05 with LIVE = True: the lab on /dev/kvm, recorded by the collector."""
    from vtrace import open_trace
    from vtrace.report import execute_notebook

    requests = 400
    run = execute_notebook(
        NB_DIR / "05-capture-on-your-host.py",
        tmp_path / "report" / "notebooks",
        {"LIVE": True, "LIVE_DIR": str(tmp_path), "LAB_REQUESTS": requests, "LAB_BATCH": 8},
    )
    assert run.error is None, run.error
    trace = open_trace(tmp_path / "lab-virtio")
    events = trace.events.collect()
    lab = trace.meta["lab"]
    ev = pl.col("event")
    assert events.filter(ev == "lab_pop").height == lab["requests"] == requests
    # The guest's notify writes (port 0x200, an ioeventfd) are the kicks it made; the back
    # end's eventfd reads carry how many of them each wake-up consumed.
    notify = events.filter((ev == "kvm_pio") & pl.col("write") & (pl.col("addr") == 0x200))
    assert notify.height == lab["guest_kicks"] > 0
    assert events.filter(ev == "lab_kick")["count"].sum() == lab["kicks"]
    nb = nbformat.read(run.ipynb, as_version=4)
    printed = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert f"recorded {tmp_path / 'lab-virtio'}" in printed
