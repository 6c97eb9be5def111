"""Exports of a trace to other tools' formats: Perfetto's timeline (:mod:`.perfetto`)."""

from __future__ import annotations

from vtrace.export.perfetto import ExportResult, build_timeline, export_perfetto

__all__ = ["ExportResult", "build_timeline", "export_perfetto"]
