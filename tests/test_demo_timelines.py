"""The demo report links a Perfetto timeline of every shipped trace, and says how to open it."""

from __future__ import annotations

import re
from pathlib import Path

from test_export_perfetto import read_timeline

from vtrace.demo import timelines_section
from vtrace.notebook import shipped_traces, traces_dir
from vtrace.report import write_index


def test_the_report_links_a_timeline_of_each_shipped_trace(tmp_path: Path):
    traces = shipped_traces(traces_dir())
    assert len(traces) >= 10  # shipped in git: a missing one is a broken checkout
    section = timelines_section(traces, tmp_path)
    index = write_index(tmp_path, title="t", subtitle="s", sections=[section]).read_text()
    links = re.findall(r"<a href='([^']+\.pftrace)' download>", index)
    assert sorted(links) == sorted(f"timelines/{t.name}.pftrace" for t in traces)
    assert "ui.perfetto.dev" in index and "Open trace file" in index
    assert all((tmp_path / link).stat().st_size > 1000 for link in links)
    virtio = read_timeline(tmp_path / "timelines" / "qemu-virtio-blk-qd4.pftrace")
    assert virtio.count("request") == 4096
