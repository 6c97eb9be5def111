"""Reading a text trace as one column of lines, and accounting for the lines that are not events.

The whole file becomes a single polars string column (one row per line) so that every
parser after this works on whole columns. Bad files fail here with one line naming the
file: missing, unreadable, empty, binary, not UTF-8.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from vtrace.errors import VtraceError

# How many line numbers of unparsed lines meta and messages keep.
FIRST_UNPARSED = 10
# A NUL byte in the first chunk means a binary file (perf.data, trace.dat, Parquet, ...).
BINARY_PROBE_BYTES = 64 * 1024
# ASCII unit separator: never in trace text; if a file has one, lines are split another way.
UNIT_SEPARATOR = b"\x1f"


def _raise_not_utf8(path: Path, data: bytes) -> None:
    """Raise a VtraceError naming the first line that is not UTF-8 (if any)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise VtraceError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x})") from None


def _split_in_python(path: Path, data: bytes) -> pl.DataFrame:
    """Lines of a file that holds the CSV reader's separator (one string split by polars)."""
    _raise_not_utf8(path, data)
    text = data.decode("utf-8").removesuffix("\n")
    lines = pl.Series("line", [text], dtype=pl.String).str.split("\n").explode().to_frame()
    return lines.select(pl.col("line").str.strip_suffix("\r"))


@dataclass(frozen=True)
class TextLines:
    """A text file read as lines: ``lines`` (``lineno: UInt32, line: String``), the bytes.

    ``starts`` is the byte offset of every line in ``data`` where each line is exactly its
    bytes followed by one newline (no carriage returns), else None.
    """

    lines: pl.DataFrame
    ends_in_newline: bool
    data: bytes
    starts: np.ndarray | None


def read_lines(path: str | os.PathLike[str]) -> tuple[pl.DataFrame, bool]:
    """The file as a frame ``(lineno: UInt32, line: String)`` and whether it ends in a newline.

    Line numbers start at 1. A trailing newline does not make an extra empty line.
    """
    text = read_text_lines(path)
    return text.lines, text.ends_in_newline


def _line_starts(lines: pl.DataFrame, data: bytes, ends_in_newline: bool) -> np.ndarray | None:
    """Byte offset of each line, from the lines' lengths, when they add up to the file."""
    if b"\r" in data:
        return None
    lengths = lines.get_column("line").str.len_bytes().to_numpy().astype(np.int64)
    ends = np.cumsum(lengths + 1)
    if int(ends[-1]) != len(data) + (0 if ends_in_newline else 1):
        return None
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1]
    return starts


def read_text_lines(path: str | os.PathLike[str]) -> TextLines:
    """Like :func:`read_lines`, keeping the bytes and where each line starts in them."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise VtraceError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise VtraceError(f"{p}: is a directory, expected a text trace file") from None
    except OSError as e:
        raise VtraceError(f"{p}: cannot read: {e.strerror or e}") from None
    # Cheap checks first; whitespace-only large files fail later as "no events".
    if not data or (len(data) < BINARY_PROBE_BYTES and not data.strip()):
        raise VtraceError(f"{p}: empty file")
    if b"\0" in data[:BINARY_PROBE_BYTES]:
        raise VtraceError(
            f"{p}: binary file, expected text (convert perf.data with `perf script`, "
            "trace.dat with `trace-cmd report`)"
        )
    ends_in_newline = data.endswith(b"\n")
    if UNIT_SEPARATOR in data:
        lines = _split_in_python(p, data)
    else:
        # polars' CSV reader with a separator that does not occur: one column, one row per
        # line; blank lines come back as nulls, "\r\n" endings are removed. It also checks
        # that the text is UTF-8.
        try:
            lines = pl.read_csv(
                data,
                separator=UNIT_SEPARATOR.decode(),
                quote_char=None,
                has_header=False,
                new_columns=["line"],
                infer_schema=False,
            ).select(pl.col("line").fill_null(""))
        except pl.exceptions.ComputeError as e:
            _raise_not_utf8(p, data)
            raise VtraceError(f"{p}: cannot be read as lines of text: {e}") from None
    lines = lines.with_row_index("lineno", offset=1)
    return TextLines(lines, ends_in_newline, data, _line_starts(lines, data, ends_in_newline))


def first_line_numbers(frame: pl.DataFrame, n: int = FIRST_UNPARSED) -> list[int]:
    """The first ``n`` values of the ``lineno`` column, as plain ints."""
    return [int(x) for x in frame.get_column("lineno").head(n).to_list()]


def check_unparsed(
    path: Path,
    unparsed: pl.DataFrame,
    *,
    strict: bool,
    ends_in_newline: bool,
    total_lines: int,
    what: str,
) -> dict[str, Any]:
    """Meta entries for unparsed lines; raise where they make the input unusable.

    ``unparsed`` has ``lineno`` and ``line`` columns. A last line cut off without its newline
    is a truncated file, an error even without ``strict``; with ``strict`` any unparsed line
    is an error naming its file and line.
    """
    count = unparsed.height
    check_truncated(
        path, unparsed, ends_in_newline=ends_in_newline, total_lines=total_lines, what=what
    )
    if count and strict:
        first = int(unparsed.get_column("lineno")[0])
        text = unparsed.get_column("line")[0]
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise VtraceError(f"{path}:{first}: not a {what} line ({count} unparsed in all): {shown!r}")
    return {"unparsed": count, "unparsed_first_lines": first_line_numbers(unparsed)}


def check_truncated(
    path: Path, bad: pl.DataFrame, *, ends_in_newline: bool, total_lines: int, what: str
) -> None:
    """A last line without its newline that did not parse: the file was cut off."""
    if ends_in_newline or bad.height == 0:
        return
    last = int(bad.get_column("lineno")[-1])
    if last == total_lines:
        raise VtraceError(f"{path}:{last}: truncated: the file ends in the middle of a {what} line")
