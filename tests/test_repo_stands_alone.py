"""The repository is complete on its own: no code, comment, doc, model or notebook points at
a document that is not in it, and every script the code and docs name exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Design notes kept outside the repository while it was built; what the repo needs from them
# is in docs/ with its published sources.
OUTSIDE_DOCUMENTS = re.compile(r"\b(?:DESIGN|ANCHORS|HOST)\.md\b")
# A path to a script or notebook of this repository, as the code and docs write them.
REPO_PATH = re.compile(r"(?<![\w./-])((?:scripts|traces|benchmarks|notebooks)/[\w.-]+\.(?:sh|py))")
TEXT_SUFFIXES = {".py", ".md", ".toml", ".sh", ".ipynb", ".c", ".h", ".txt", ".cfg"}


def _tracked_text_files() -> list[Path]:
    names = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return [ROOT / n for n in names if Path(n).suffix in TEXT_SUFFIXES and (ROOT / n).is_file()]


def test_no_file_cites_a_document_outside_the_repository():
    this = Path(__file__).resolve()
    cites = [
        f"{path.relative_to(ROOT)}:{i}: {line.strip()[:100]}"
        for path in _tracked_text_files()
        if path != this
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if OUTSIDE_DOCUMENTS.search(line)
    ]
    assert not cites, "\n".join(cites)


def test_every_script_the_code_and_docs_name_exists():
    named = {
        (path.relative_to(ROOT), m.group(1))
        for path in _tracked_text_files()
        if path.suffix in {".py", ".md", ".toml", ".sh"}
        for m in REPO_PATH.finditer(path.read_text(errors="replace"))
    }
    missing = sorted(
        f"{where}: {script}" for where, script in named if not (ROOT / script).exists()
    )
    assert not missing, "\n".join(missing)
