"""The HTML report: executed notebooks exported to HTML, and a page of key figures.

A report directory holds `index.html` (key figures as plotly divs, tables, links), the
executed notebooks as `notebooks/NAME.ipynb` and `notebooks/NAME.html`, and one copy of
plotly.js taken from the installed plotly package, which every page loads from its own
directory: nothing is fetched from the network, and the report opens from a file or a USB
stick.

Notebooks run headless through nbclient in a kernel started from this Python (so the
kernel sees the same vtrace and packages); their tagged `parameters` cell is followed by
an injected cell with the values the caller passes, as papermill does.
"""

from __future__ import annotations

import html
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
import plotly.graph_objects as go
import polars as pl

from vtrace.errors import VtraceError
from vtrace.version import __version__

PLOTLY_JS = "plotly.min.js"
PLOTLY_MIMETYPE = "application/vnd.plotly.v1+json"
PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"
KERNEL_NAME = "python3"
NOTEBOOK_TIMEOUT_S = 300

# nbconvert's lab template with the network left out: plotly.js from the report directory,
# no require.js (it would capture plotly.js as an AMD module), no MathJax or mermaid CDN.
_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}
<script src="{{ resources.vtrace_plotly_js }}"></script>
{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


def plotly_js_path() -> Path:
    """plotly.js as shipped inside the installed plotly package."""
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / PLOTLY_JS
    if not path.is_file():
        raise VtraceError(f"{path}: missing from the plotly package; reinstall plotly")
    return path


def copy_plotly_js(out_dir: Path) -> Path:
    """Put plotly.js in ``out_dir`` once; pages refer to it by a relative path."""
    target = out_dir / PLOTLY_JS
    if not target.exists():
        shutil.copyfile(plotly_js_path(), target)
    return target


# --- notebooks ----------------------------------------------------------------------------


def read_notebook(path: Path) -> nbformat.NotebookNode:
    """A notebook from its jupytext `.py` or its `.ipynb`, whichever was saved last.

    The pair holds the same cells (JupyterLab with jupytext saves both); an edit to only
    one of them, in an editor, is the one that counts.
    """
    candidates = [p for p in (path.with_suffix(".py"), path.with_suffix(".ipynb")) if p.is_file()]
    if not candidates:
        raise VtraceError(f"{path}: no such notebook (.py or .ipynb)")
    newest = max(candidates, key=lambda p: p.stat().st_mtime_ns)
    if newest.suffix == ".ipynb":
        return nbformat.read(newest, as_version=4)
    import jupytext

    return jupytext.read(newest)


def inject_parameters(nb: nbformat.NotebookNode, parameters: Mapping[str, Any]) -> None:
    """Insert a cell assigning ``parameters`` right after the cell tagged `parameters`.

    Values are written with ``repr``, so str, int, float, bool, None, lists and dicts of
    those round-trip. A notebook without a `parameters` cell gets the cell first.
    """
    if not parameters:
        return
    source = "# Parameters injected by vtrace\n" + "".join(
        f"{name} = {value!r}\n" for name, value in parameters.items()
    )
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": [INJECTED_TAG]})
    where = next(
        (
            i + 1
            for i, c in enumerate(nb.cells)
            if PARAMETERS_TAG in c.get("metadata", {}).get("tags", [])
        ),
        0,
    )
    nb.cells.insert(where, cell)


def _error_of(nb: nbformat.NotebookNode) -> str | None:
    """The first error output of an executed notebook, as one line."""
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return f"cell {i}: {out.get('ename')}: {out.get('evalue')}".splitlines()[0]
    return None


@dataclass
class NotebookRun:
    """One notebook executed headless: where its outputs went and how it went."""

    name: str
    ipynb: Path
    html: Path
    seconds: float
    error: str | None = None
    figures: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


def execute_notebook(
    source: Path,
    out_dir: Path,
    parameters: Mapping[str, Any] | None = None,
    *,
    timeout_s: int = NOTEBOOK_TIMEOUT_S,
) -> NotebookRun:
    """Execute one notebook headless and write it executed (`.ipynb`) and as HTML.

    The kernel runs in the notebook's own directory, so relative paths in it mean the
    same as in JupyterLab. A cell that raises stops the run; the notebook is still written
    with the error in place and the error is returned in :attr:`NotebookRun.error`.
    """
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    nb = read_notebook(source)
    inject_parameters(nb, parameters or {})
    out_dir.mkdir(parents=True, exist_ok=True)
    client = NotebookClient(
        nb,
        timeout=timeout_s,
        kernel_name=KERNEL_NAME,
        resources={"metadata": {"path": str(source.parent.resolve())}},
        # The kernel's own start-up warnings would land on the demo's terminal; errors in
        # cells come back as error outputs, and the kernel still logs its own errors.
        extra_arguments=["--IPKernelApp.log_level=ERROR"],
    )
    # Figures as plotly's JSON mimetype: JupyterLab renders it, and the HTML export below
    # turns it into a div; plotly's other renderers would inline plotly.js in every output.
    env = {**os.environ, "PLOTLY_RENDERER": "plotly_mimetype"}
    # jupyter_client swaps the kernelspec's bare `python` for sys.executable, which is
    # this environment's Python: the kernel imports the same vtrace.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    started = time.perf_counter()
    error = None
    try:
        client.execute(env=env)
    except CellExecutionError:
        error = _error_of(nb) or "a cell failed"
    except (CellTimeoutError, DeadKernelError) as e:
        error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    seconds = time.perf_counter() - started
    name = source.stem
    ipynb = out_dir / f"{name}.ipynb"
    nbformat.write(nb, ipynb)
    page = out_dir / f"{name}.html"
    page.write_text(
        notebook_html(nb, plotly_js=os.path.relpath(copy_plotly_js(out_dir.parent), out_dir))
    )
    figures = sum(
        PLOTLY_MIMETYPE in out.get("data", {})
        for cell in nb.cells
        for out in cell.get("outputs", [])
    )
    return NotebookRun(name, ipynb, page, seconds, error, figures)


def _plotly_outputs_as_html(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy of ``nb`` whose plotly outputs are HTML divs that use a page-wide plotly.js."""
    import plotly.io as pio

    nb = nbformat.from_dict(nb)  # deep copy: the executed .ipynb keeps the mimetype
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if PLOTLY_MIMETYPE in data:
                fig = go.Figure(data[PLOTLY_MIMETYPE])
                data.clear()
                data["text/html"] = pio.to_html(
                    fig, include_plotlyjs=False, full_html=False, config={"responsive": True}
                )
    return nb


def notebook_html(nb: nbformat.NotebookNode, *, plotly_js: str = PLOTLY_JS) -> str:
    """An executed notebook as one HTML page that loads plotly.js from ``plotly_js``."""
    import jinja2
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(
        template_name="lab",
        extra_loaders=[jinja2.DictLoader({"vtrace.html.j2": _TEMPLATE})],
        template_file="vtrace.html.j2",
    )
    body, _ = exporter.from_notebook_node(
        _plotly_outputs_as_html(nb), resources={"vtrace_plotly_js": plotly_js}
    )
    return body


# --- the index page ---------------------------------------------------------------------------


@dataclass
class Section:
    """One part of the index page: a heading, a few paragraphs, then figures and tables."""

    title: str
    intro: str = ""
    items: list[str] = field(default_factory=list)

    def figure(self, fig: go.Figure, caption: str = "") -> Section:
        div = fig.to_html(include_plotlyjs=False, full_html=False, config={"responsive": True})
        cap = f"<p class='caption'>{html.escape(caption)}</p>" if caption else ""
        self.items.append(f"<div class='figure'>{div}{cap}</div>")
        return self

    def table(self, frame: pl.DataFrame, caption: str = "", *, max_rows: int = 50) -> Section:
        self.items.append(html_table(frame, caption, max_rows=max_rows))
        return self

    def text(self, paragraph: str) -> Section:
        """A paragraph of plain text (escaped)."""
        self.items.append(f"<p>{html.escape(paragraph)}</p>")
        return self

    def raw(self, fragment: str) -> Section:
        """An HTML fragment built by the caller from escaped parts."""
        self.items.append(fragment)
        return self


def _cell(value: Any) -> str:
    if value is None:
        return "<td class='null'>–</td>"
    if isinstance(value, float):
        text = f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return f"<td class='num'>{text}</td>"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"<td class='num'>{value:,}</td>"
    return f"<td>{html.escape(str(value))}</td>"


def html_table(frame: pl.DataFrame, caption: str = "", *, max_rows: int = 50) -> str:
    """A polars frame as an escaped HTML table (the first ``max_rows`` rows)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    shown = frame.head(max_rows)
    # Whole columns to Python lists once; the table is small and this is presentation.
    columns = [shown[c].to_list() for c in shown.columns]
    rows = "".join(
        "<tr>" + "".join(_cell(col[i]) for col in columns) + "</tr>" for i in range(shown.height)
    )
    more = (
        f"<p class='caption'>{frame.height - max_rows:,} more rows not shown</p>"
        if frame.height > max_rows
        else ""
    )
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>{more}"


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #222; }
header { background: #1f3b57; color: white; padding: 1.2em 2em; }
header h1 { margin: 0 0 0.2em 0; font-size: 1.6em; }
header p { margin: 0; opacity: 0.85; }
main { max-width: 1200px; margin: 0 auto; padding: 1em 2em 3em 2em; }
section { margin-top: 2em; }
h2 { border-bottom: 2px solid #1f3b57; padding-bottom: 0.2em; }
.figure { margin: 1em 0 2em 0; }
.caption, caption { color: #555; font-size: 0.9em; text-align: left; padding: 0.3em 0; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3em 0.8em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.null { color: #aaa; text-align: center; }
.ok { color: #2a7a2a; } .failed { color: #b00020; } .missing { color: #a06000; }
code { background: #f3f3f3; padding: 0.1em 0.3em; border-radius: 3px; }
"""


def write_index(
    out_dir: Path,
    *,
    title: str,
    subtitle: str,
    sections: Sequence[Section],
) -> Path:
    """Write `index.html` with ``sections``; plotly.js is copied next to it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    copy_plotly_js(out_dir)
    body = "".join(
        f"<section><h2>{html.escape(s.title)}</h2>"
        + (f"<p>{html.escape(s.intro)}</p>" if s.intro else "")
        + "".join(s.items)
        + "</section>"
        for s in sections
    )
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style>"
        f"<script src='{PLOTLY_JS}'></script></head><body>"
        f"<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p></header>"
        f"<main>{body}</main>"
        f"<footer><main><p class='caption'>vtrace {html.escape(__version__)}</p></main></footer>"
        "</body></html>"
    )
    index = out_dir / "index.html"
    index.write_text(page)
    return index


def notebook_links(runs: Sequence[NotebookRun], out_dir: Path) -> str:
    """A table linking each executed notebook's HTML page, with its status and run time."""
    rows = []
    for run in runs:
        href = html.escape(os.path.relpath(run.html, out_dir))
        status = (
            "<span class='ok'>ran</span>"
            if run.ok
            else f"<span class='failed'>failed: {html.escape(run.error or '')}</span>"
        )
        rows.append(
            f"<tr><td><a href='{href}'>{html.escape(run.name)}</a></td><td>{status}</td>"
            f"<td class='num'>{run.figures}</td><td class='num'>{run.seconds:.1f}</td></tr>"
        )
    return (
        "<table><thead><tr><th>notebook</th><th>status</th><th>figures</th>"
        "<th>run time (s)</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def timeline_links(exports: Sequence[tuple[str, Path, str]], out_dir: Path) -> str:
    """A table linking each exported timeline file: (trace name, file, what is in it)."""
    rows = []
    for name, path, what in exports:
        href = html.escape(os.path.relpath(path, out_dir))
        size = path.stat().st_size / 1e6
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td><a href='{href}' download>"
            f"{html.escape(path.name)}</a></td><td class='num'>{size:.1f}</td>"
            f"<td>{html.escape(what)}</td></tr>"
        )
    return (
        "<table><thead><tr><th>trace</th><th>timeline</th><th>MB</th><th>what it shows</th>"
        "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )
