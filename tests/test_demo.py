"""`vtrace demo` end to end: every notebook executed headless on the shipped traces, the
report written, and the report rendered by a real browser (Debian's chromium).

The demo runs once per module (about a minute and a half on a 2-core machine); the tests
read what it made.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from rich.console import Console

from vtrace.demo import NOTEBOOK_TRACE, DemoResult, run_demo
from vtrace.notebook import NOTEBOOKS, shipped_traces, traces_dir
from vtrace.report import PLOTLY_JS, PLOTLY_MIMETYPE

TRACES = shipped_traces(traces_dir())
NO_TRACES = f"{traces_dir()} holds no traces yet: scripts that capture them fill it"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoResult:
    out = tmp_path_factory.mktemp("demo") / "report"
    return run_demo(out, console=Console(file=io.StringIO(), width=120))


def _needs_trace(name: str) -> None:
    # the traces are in git: one missing is a broken checkout, not a host without a feature
    assert name not in NOTEBOOK_TRACE or TRACES, f"{name} opens a trace; {NO_TRACES}"


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_notebook_runs_headless_without_an_error_cell(demo: DemoResult, name: str):
    _needs_trace(name)
    runs = {r.name: r for r in demo.notebooks}
    assert name in runs, f"{name} did not run: {demo.missing}"
    run = runs[name]
    assert run.error is None, run.error
    nb = nbformat.read(run.ipynb, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code")
    figures = [o for o in outputs if PLOTLY_MIMETYPE in o.get("data", {})]
    assert len(figures) == run.figures >= 1
    for fig in figures:  # every figure has a title and axis titles where it has axes
        layout = fig["data"][PLOTLY_MIMETYPE]["layout"]
        assert layout["title"]["text"]
        if layout.get("xaxis", {}).get("visible", True) and "xaxis" in layout:
            titled = [a for k, a in layout.items() if k.startswith(("xaxis", "yaxis"))]
            annotated = layout.get("annotations")  # small multiples name panels instead
            assert annotated or any(a.get("title", {}).get("text") for a in titled)
    # The HTML page shows each figure as a div drawn with the report's own plotly.js.
    page = run.html.read_text()
    assert page.count("Plotly.newPlot") == run.figures
    assert f'src="../{PLOTLY_JS}"' in page


@pytest.mark.slow
def test_the_report_links_the_notebooks_and_embeds_the_key_figures(demo: DemoResult):
    index = demo.index.read_text()
    assert demo.index == demo.out_dir / "index.html"
    assert (demo.out_dir / PLOTLY_JS).stat().st_size > 1_000_000
    for run in demo.notebooks:
        assert f"href='notebooks/{run.name}.html'" in index
        assert run.html.is_file() and run.ipynb.is_file()
    # Model comparison and sweep always; traces' figures when there are traces.
    divs = index.count("Plotly.newPlot")
    assert divs >= (6 if TRACES else 5)
    # No network: every script the pages load is the local plotly.js.
    for page in [demo.index, *(r.html for r in demo.notebooks)]:
        srcs = re.findall(r"<script[^>]*src=[\"']([^\"']+)", page.read_text())
        assert srcs and all(s.endswith(PLOTLY_JS) and "//" not in s for s in srcs), srcs
    if TRACES:
        for t in TRACES:
            assert t.name in index
    else:
        assert any("no traces" in m for m in demo.missing)


def _chromium(url: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        shutil.which("chromium") or "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        # Virtual time runs the page's scripts to completion before dumping or shooting.
        "--virtual-time-budget=15000",
        *args,
        url,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


@pytest.mark.slow
@pytest.mark.browser
def test_the_report_renders_in_a_headless_browser(demo: DemoResult, tmp_path: Path):
    index = demo.index.read_text()
    divs = index.count("Plotly.newPlot")
    dom = _chromium(demo.index.as_uri(), tmp_path / "profile", "--dump-dom").stdout
    # plotly.js replaces each empty div with a plot container holding its SVG layers.
    assert dom.count('class="plot-container plotly"') == divs
    assert dom.count('class="main-svg"') >= 2 * divs
    assert "Plotly is not defined" not in dom
    shot = tmp_path / "report.png"
    _chromium(
        demo.index.as_uri(),
        tmp_path / "profile",
        f"--screenshot={shot}",
        "--window-size=1280,4000",
    )
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000  # a blank page is ~10 kB


@pytest.mark.slow
@pytest.mark.browser
def test_an_executed_notebook_renders_its_figures(demo: DemoResult, tmp_path: Path):
    run = next(r for r in demo.notebooks if r.ok)
    dom = _chromium(run.html.as_uri(), tmp_path / "profile", "--dump-dom").stdout
    assert dom.count('class="plot-container plotly"') == run.figures


def test_the_demo_runs_without_traces_and_says_so(tmp_path: Path):
    empty = tmp_path / "traces"
    empty.mkdir()
    result = run_demo(
        tmp_path / "report",
        console=Console(file=io.StringIO()),
        notebooks=("01-explore-a-trace",),
        traces_root=empty,
    )
    assert result.index.is_file()
    assert result.traces == [] and result.notebooks == []
    assert any("no traces" in m for m in result.missing)
    assert any("01-explore-a-trace" in m for m in result.missing)
    assert "Not in this report" in result.index.read_text()


def test_unknown_notebook_is_one_line_and_status_2(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "-m", "vtrace.cli", "demo", "-o", str(tmp_path), "--notebooks", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "unknown nope" in proc.stderr and "01-explore-a-trace" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def test_an_output_path_that_is_a_file_is_one_line_and_status_2(tmp_path: Path):
    taken = tmp_path / "report"
    taken.write_text("not a directory")
    proc = subprocess.run(
        [sys.executable, "-m", "vtrace.cli", "demo", "-o", str(taken)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == f"vtrace: error: {taken}: exists and is not a directory; choose another -o"
    )
    assert taken.read_text() == "not a directory"
