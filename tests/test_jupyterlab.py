"""`vtrace notebook`'s JupyterLab as a user meets it: a paired `.py` notebook double-clicked in
the file browser opens as a notebook (jupytext's viewer, vtrace's shipped setting), and its
cells run in a kernel. The browser is Debian's headless chromium, driven over the DevTools
protocol on a pipe.
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jupytext
import pytest

from vtrace.notebook import JUPYTER_CONFIG_DIR, jupyterlab_command, jupyterlab_env, notebooks_dir

NOTEBOOK = "03-batching-and-ring-size"
TOKEN = "vtrace-test"
DOCMANAGER = "@jupyterlab/docmanager-extension:plugin"
START_S = 90  # JupyterLab's server, then its page, on a busy 2-core machine


@dataclass
class Lab:
    url: str
    directory: Path
    proc: subprocess.Popen[str]

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}?token={TOKEN}", timeout=10) as r:
            return json.load(r)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """JupyterLab as `vtrace notebook` starts it, on a copy of one notebook pair (running
    cells must not touch the shipped files), with the user's own Jupyter settings, config
    and workspaces replaced by empty folders."""
    tmp = tmp_path_factory.mktemp("lab")
    directory = tmp / "notebooks"
    directory.mkdir()
    for suffix in (".py", ".ipynb"):
        shutil.copy(notebooks_dir() / f"{NOTEBOOK}{suffix}", directory)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    isolated = {
        "JUPYTER_CONFIG_DIR": tmp / "config",
        "JUPYTERLAB_SETTINGS_DIR": tmp / "settings",
        "JUPYTERLAB_WORKSPACES_DIR": tmp / "workspaces",
        "JUPYTER_RUNTIME_DIR": tmp / "runtime",
    }
    base = {k: v for k, v in os.environ.items() if k != "JUPYTER_CONFIG_PATH"}
    env = jupyterlab_env({**base, **{k: str(v) for k, v in isolated.items()}})
    cmd = jupyterlab_command(
        directory,
        port=port,
        open_browser=False,
        extra=[f"--IdentityProvider.token={TOKEN}", "--ServerApp.ip=127.0.0.1"],
    )
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    server = Lab(f"http://127.0.0.1:{port}", directory, proc)
    try:
        deadline = time.monotonic() + START_S
        while True:
            assert proc.poll() is None, proc.communicate()[0][-2000:]
            try:
                server.get("/api/status")
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, f"JupyterLab did not answer in {START_S} s"
                time.sleep(0.3)
        yield server
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def test_jupyterlab_env_puts_vtrace_settings_first():
    env = jupyterlab_env({"PATH": "/usr/bin", "JUPYTER_CONFIG_PATH": "/etc/mine"})
    assert env["JUPYTER_CONFIG_PATH"].split(os.pathsep) == [str(JUPYTER_CONFIG_DIR), "/etc/mine"]
    assert env["PATH"].endswith(os.pathsep + "/usr/bin")
    assert jupyterlab_env({})["JUPYTER_CONFIG_PATH"] == str(JUPYTER_CONFIG_DIR)
    shipped = json.loads(
        (JUPYTER_CONFIG_DIR / "labconfig/default_setting_overrides.json").read_text()
    )
    assert shipped[DOCMANAGER]["defaultViewers"] == {"python": "Jupytext Notebook"}


def test_python_files_default_to_jupytext_notebooks(lab: Lab):
    """The setting JupyterLab's page reads: Python files open with jupytext's notebook view."""
    settings = lab.get(f"/lab/api/settings/{DOCMANAGER}")
    viewers = settings["schema"]["properties"]["defaultViewers"]["default"]
    assert viewers.get("python") == "Jupytext Notebook"
    model = lab.get(f"/api/contents/{NOTEBOOK}.py")
    assert model["type"] == "notebook"


class Chromium:
    """Headless chromium over the DevTools protocol on fds 3 and 4 (--remote-debugging-pipe):
    JSON messages ended by NUL, no port and no websocket library."""

    def __init__(self, profile: Path) -> None:
        to_chrome_r, self._to_chrome = _high_pipe()
        self._from_chrome, from_chrome_w = _high_pipe()

        def child_fds() -> None:  # the protocol's fixed descriptors in the child
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        self.proc = subprocess.Popen(
            [
                shutil.which("chromium") or "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1400,1000",
                f"--user-data-dir={profile}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(3, 4),
            preexec_fn=child_fds,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._replies: dict[int, queue.Queue[dict]] = {}
        self._lock = threading.Lock()
        self._next = 0
        self._session: str | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self._from_chrome, 1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                if "id" in message:
                    with self._lock:
                        box = self._replies.get(message["id"])
                    if box is not None:
                        box.put(message)

    def send(self, method: str, session: bool = True, **params: Any) -> dict:
        with self._lock:
            self._next += 1
            ident = self._next
            box: queue.Queue[dict] = queue.Queue()
            self._replies[ident] = box
        message: dict[str, Any] = {"id": ident, "method": method, "params": params}
        if session and self._session:
            message["sessionId"] = self._session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        reply = box.get(timeout=60)
        assert "error" not in reply, (method, reply["error"])
        return reply["result"]

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", session=False, url=url)["targetId"]
        attached = self.send("Target.attachToTarget", session=False, targetId=target, flatten=True)
        self._session = attached["sessionId"]

    def js(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait(self, expression: str, what: str, timeout_s: float = START_S) -> Any:
        deadline = time.monotonic() + timeout_s
        while not (value := self.js(expression)):
            assert time.monotonic() < deadline, f"no {what} after {timeout_s:.0f} s"
            time.sleep(0.25)
        return value

    def click(self, x: float, y: float, clicks: int = 1) -> None:
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for count in range(1, clicks + 1):  # a double click is two, the second with count 2
            for kind in ("mousePressed", "mouseReleased"):
                self.send(
                    "Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=count
                )

    def key(self, key: str, code: int, modifiers: int = 0) -> None:
        for kind in ("rawKeyDown", "keyUp"):
            self.send(
                "Input.dispatchKeyEvent",
                type=kind,
                key=key,
                code=key,
                windowsVirtualKeyCode=code,
                modifiers=modifiers,
            )

    def screenshot(self, path: Path) -> Path:
        import base64

        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot")["data"]))
        return path

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def _high_pipe() -> tuple[int, int]:
    """A pipe whose ends are above 4, so placing the child's fds 3 and 4 overwrites neither."""
    ends = []
    for fd in os.pipe():
        ends.append(fcntl.fcntl(fd, fcntl.F_DUPFD, 10))
        os.close(fd)
    return ends[0], ends[1]


SHIFT = 8  # the DevTools protocol's modifier bit
# The centre of the file browser's entry for a file.
ENTRY = """(() => {{
  const item = [...document.querySelectorAll('.jp-DirListing-item')].find(
    e => e.querySelector('.jp-DirListing-itemText')?.textContent.trim() === '{name}');
  if (!item) return null;
  const r = item.getBoundingClientRect();
  return r.width ? [r.x + r.width / 2, r.y + r.height / 2] : null;
}})()"""
# What the main area's current tab shows: its label, the notebook's cells (markdown or code,
# with their text and prompts), and whether it is a text editor instead.
CURRENT = """(() => {
  const label = document.querySelector(
    '#jp-main-dock-panel .lm-TabBar-tab.lm-mod-current .lm-TabBar-tabLabel');
  const panel = [...document.querySelectorAll('#jp-main-dock-panel .jp-Document')].find(
    e => !e.classList.contains('lm-mod-hidden') && e.offsetParent !== null);
  if (!label || !panel) return null;
  const cells = [...panel.querySelectorAll('.jp-Notebook .jp-Cell')].map(c => ({
    kind: c.classList.contains('jp-CodeCell') ? 'code' : (
      c.classList.contains('jp-MarkdownCell') ? 'markdown' : 'raw'),
    text: (c.querySelector('.jp-InputArea-editor .cm-content') || {}).textContent || '',
    prompt: (c.querySelector('.jp-InputPrompt') || {}).textContent || '',
  }));
  return {label: label.textContent, notebook: panel.classList.contains('jp-NotebookPanel'),
          editor: !!panel.querySelector('.jp-FileEditor'), cells};
})()"""
# The centre of the first code cell's editor.
# The status bar's kernel item ("Python 3 (ipykernel) | Idle") once the notebook's kernel
# is up: a cell run before it has a kernel is not queued, so the test waits for it.
KERNEL_IDLE = """(() => {
  const items = [...document.querySelectorAll('.jp-StatusBar-TextItem')].map(
    e => e.textContent.trim());
  return items.find(t => t.endsWith('| Idle')) || null;
})()"""
FIRST_CODE = """(() => {
  const panel = document.querySelector('#jp-main-dock-panel .jp-NotebookPanel:not(.lm-mod-hidden)');
  const editor = panel && panel.querySelector('.jp-CodeCell .jp-InputArea-editor');
  if (!editor) return null;
  const r = editor.getBoundingClientRect();
  return [r.x + 20, r.y + r.height / 2];
})()"""


@pytest.mark.slow
@pytest.mark.browser
def test_a_py_notebook_opens_from_the_file_browser_as_a_notebook_and_runs(lab: Lab, tmp_path: Path):
    name = f"{NOTEBOOK}.py"
    cells = jupytext.read(lab.directory / name).cells
    first_code = next(c for c in cells if c.cell_type == "code")
    browser = Chromium(tmp_path / "profile")
    try:
        browser.open(f"{lab.url}/lab?token={TOKEN}")
        try:
            x, y = browser.wait(ENTRY.format(name=name), f"{name} in the file browser")
            browser.click(x, y, clicks=2)
            # Until its content is loaded, a notebook shows one empty placeholder cell.
            shown = browser.wait(
                f"(() => {{ const c = {CURRENT}; return c && c.label === '{name}' "
                f"&& (c.editor || c.cells.length === {len(cells)}) ? c : null; }})()",
                f"{name} opened in the main area with its {len(cells)} cells",
            )
            assert shown["notebook"] and not shown["editor"], f"{name} opened as text"
            kinds = [c["kind"] for c in shown["cells"]]
            assert kinds[0] == "markdown" and "code" in kinds
            assert len(kinds) == len(cells)
            code = next(c for c in shown["cells"] if c["kind"] == "code")
            assert first_code.source.splitlines()[0] in code["text"]
            # Run the first code cell (the parameters) the way a user does: click, Shift+Enter,
            # once the kernel is up (on a slow host it starts after the cells are shown).
            browser.wait(KERNEL_IDLE, "the notebook's kernel idle in the status bar")
            x, y = browser.wait(FIRST_CODE, "the first code cell")
            browser.click(x, y)
            browser.key("Enter", 13, SHIFT)
            prompt = browser.wait(
                f"(() => {{ const c = {CURRENT}; const p = c && c.cells.find("
                "x => x.kind === 'code').prompt; return p && p.includes('[1]') ? p : null; })()",
                "execution count [1] on the first code cell",
            )
            assert prompt.strip() == "[1]:"
        except AssertionError as e:
            shot = browser.screenshot(tmp_path / "jupyterlab.png")
            raise AssertionError(f"{e} (screenshot: {shot})") from None
    finally:
        browser.close()
    kernels = lab.get("/api/kernels")
    assert len(kernels) == 1 and kernels[0]["name"] == "python3"
