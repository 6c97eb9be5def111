"""Reading a text trace as one column of lines, and accounting for the lines that are not events.

The whole file becomes a single polars string column (one row per line) so that every
parser after this works on whole columns. Bad files fail here with one line naming the
file: missing, unreadable, not a regular file (a device or a FIFO would never end), empty,
binary, not UTF-8; a file cut in the middle of its last line fails in
:func:`check_last_line`.
"""

from __future__ import annotations

import os
import stat
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


def check_utf8(path: Path, data: bytes) -> None:
    """Raise a VtraceError naming the first line that is not UTF-8 (if any)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise VtraceError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x})") from None


def _split_in_python(path: Path, data: bytes) -> pl.DataFrame:
    """Lines of a file that holds the CSV reader's separator (one string split by polars)."""
    check_utf8(path, data)
    text = data.decode("utf-8").removesuffix("\n")
    lines = pl.Series("line", [text], dtype=pl.String).str.split("\n").explode().to_frame()
    return lines.select(pl.col("line").str.strip_suffix("\r"))


@dataclass(frozen=True)
class TextLines:
    """A text file read as lines: ``lines`` (``lineno: UInt32, line: String``), the bytes.

    ``starts`` is the byte offset of every line in ``data`` where each line is exactly its
    bytes followed by one newline (no carriage returns), else None. ``has_nul``: a NUL byte
    somewhere after the binary probe (damage, such as a zero-filled block after a crash).
    """

    lines: pl.DataFrame
    ends_in_newline: bool
    data: bytes
    starts: np.ndarray | None
    has_nul: bool = False


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


# What a file that is not a regular one is, for the message.
_KINDS = (
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


def read_regular_file(p: Path) -> bytes:
    """The bytes of ``p``, which must be a regular file (a link to one is fine).

    A device (/dev/zero) or a FIFO would be read without end or block forever: refused,
    checked on the open descriptor (opened non-blocking, so a FIFO with no writer does not
    hang the open itself).
    """
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise VtraceError(f"{p}: no such file") from None
    except OSError as e:
        raise VtraceError(f"{p}: cannot read: {e.strerror or e}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise VtraceError(f"{p}: is a directory, expected a text trace file")
        kind = next((name for test, name in _KINDS if test(mode)), "not a file")
        raise VtraceError(
            f"{p}: not a regular file ({kind}); save the trace text to a file first "
            "(e.g. `cat trace_pipe > kvm.txt`, then Ctrl-C) and import that"
        )
    with open(fd, "rb") as f:
        try:
            return f.read()
        except OSError as e:
            raise VtraceError(f"{p}: cannot read: {e.strerror or e}") from None


def read_text_bytes(p: Path) -> bytes:
    """The bytes of a text trace: a regular file, not empty, not binary."""
    data = read_regular_file(p)
    # Cheap checks first; whitespace-only large files fail later as "no events".
    if not data or (len(data) < BINARY_PROBE_BYTES and not data.strip()):
        raise VtraceError(f"{p}: empty file")
    if b"\0" in data[:BINARY_PROBE_BYTES]:
        raise VtraceError(
            f"{p}: binary file, expected text (convert perf.data with `perf script`, "
            "trace.dat with `trace-cmd report`)"
        )
    return data


def read_text_lines(path: str | os.PathLike[str], data: bytes | None = None) -> TextLines:
    """Like :func:`read_lines`, keeping the bytes and where each line starts in them.

    ``data``: the file's bytes, already read by :func:`read_text_bytes`.
    """
    p = Path(path)
    if data is None:
        data = read_text_bytes(p)
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
            check_utf8(p, data)
            raise VtraceError(f"{p}: cannot be read as lines of text: {e}") from None
    lines = lines.with_row_index("lineno", offset=1)
    starts = _line_starts(lines, data, ends_in_newline)
    # One memchr over the bytes: the parsers look for NULs in lines only when there are any.
    has_nul = data.find(b"\0", BINARY_PROBE_BYTES) >= 0
    return TextLines(lines, ends_in_newline, data, starts, has_nul)


def first_line_numbers(frame: pl.DataFrame, n: int = FIRST_UNPARSED) -> list[int]:
    """The first ``n`` values of the ``lineno`` column, as plain ints."""
    return [int(x) for x in frame.get_column("lineno").head(n).to_list()]


def check_last_line(path: Path, lines: pl.DataFrame, *, ends_in_newline: bool, what: str) -> None:
    """A last line without its newline: the file was cut off, maybe inside a value.

    Every tool these importers read ends each line with a newline, and a line cut inside
    a field can still look whole (``val 0x4`` of ``val 0x41``): such a file is refused,
    even without ``strict``. Blanks after the last newline do not count.
    """
    if ends_in_newline or lines.height == 0:
        return
    check_last_text(path, lines.get_column("line")[-1], lineno=lines.height, what=what)


def check_last_text(path: Path, last: str, *, lineno: int, what: str) -> None:
    """:func:`check_last_line` given the text of the last line (which has no newline)."""
    if last.strip():
        raise VtraceError(
            f"{path}:{lineno}: truncated: the file ends in the middle of a {what} line "
            "(no newline after it)"
        )


def check_unparsed(
    path: Path, unparsed: pl.DataFrame, *, strict: bool, what: str
) -> dict[str, Any]:
    """Meta entries for unparsed lines; with ``strict`` any unparsed line is an error.

    ``unparsed`` has ``lineno`` and ``line`` columns; the error names the file and the first
    of them.
    """
    count = unparsed.height
    if count and strict:
        first = int(unparsed.get_column("lineno")[0])
        text = unparsed.get_column("line")[0]
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise VtraceError(f"{path}:{first}: not a {what} line ({count} unparsed in all): {shown!r}")
    return {"unparsed": count, "unparsed_first_lines": first_line_numbers(unparsed)}
