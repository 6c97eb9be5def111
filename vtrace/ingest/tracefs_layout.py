"""The fixed-width header tracefs writes, read straight from the file's bytes with numpy.

The kernel prints every event line of ``trace`` and ``trace_pipe`` as::

    %16s-%-7d [%03d] FLAGS %5lu.%06lu: EVENT: TEXT
             python3-4774    [000] d..1.   411.057114: kvm_pio: pio_write at 0x500 ...

Given where each line starts in the bytes, the first ``[`` and the first ``": "`` of each
line, the thread id, the CPU and the timestamp sit at fixed distances from those two
positions: two fixed-width windows per line, copied out in one gather each, and integer
sums over their bytes, for all lines at once, instead of string slicing and parsing.
Every byte the fields are made of is checked, so a
line that does not have exactly this layout (a longer thread id, a 6-digit second, a
task name with "[" or ": ", trace-cmd's layout, ...) is simply not claimed here and goes to
the general parser.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

SPACE = ord(" ")
DOT = ord(".")
DASH = ord("-")
OPEN = ord("[")
CLOSE = ord("]")
ZERO = ord("0")

# "-%-7d [%03d]": 14 bytes from the dash before the thread id to the "]" after the CPU.
TID_WIDTH = 7
CPU_WIDTH = 3
HEAD_WIDTH = 1 + TID_WIDTH + 2 + CPU_WIDTH + 1
# " %5lu.%06lu" right before ": ": a blank, seconds right-aligned in 5, a dot, 6 digits.
SEC_WIDTH = 5
USEC_WIDTH = 6
STAMP_WIDTH = 1 + SEC_WIDTH + 1 + USEC_WIDTH
NS_PER_S = 1_000_000_000
NS_PER_US = 1_000
# `%5lu` only pads: a host up for more than 27.7 hours prints 6 or more digits of seconds,
# then the stamp starts right after the blank that ends the flags. Up to 10 digits here.
WIDE_SEC_MAX = 10
# Seconds from here on do not fit Int64 nanoseconds (the general parser leaves them unparsed).
MAX_SECONDS = (2**63 - 1) // NS_PER_S


@dataclass(frozen=True)
class Header:
    """Header fields of the lines that have the tracefs layout (``ok``); junk elsewhere."""

    ok: np.ndarray
    tid: np.ndarray
    cpu: np.ndarray
    ts_ns: np.ndarray


def _number(rows: np.ndarray, ok: np.ndarray, *, pad: str) -> np.ndarray:
    """The decimal number in byte rows ``rows`` (one row per position), clearing ``ok``
    where the bytes are not one.

    ``pad`` is where blanks may be: ``"left"`` (right-aligned, ``%5lu``), ``"right"``
    (left-aligned, ``%-7d``) or ``"none"`` (``%03d``). At least one digit is required.
    The fields are at most 7 digits: int32 arithmetic.
    """
    n = rows.shape[1]
    total = np.zeros(n, dtype=np.int32)
    seen_digit = np.zeros(n, dtype=bool)
    seen_blank = np.zeros(n, dtype=bool)
    for row in rows:
        value = row - np.uint8(ZERO)  # wraps below "0": one unsigned compare
        is_digit = value <= 9
        if pad == "none":
            ok &= is_digit
            total = total * 10 + value
            continue
        is_blank = row == SPACE
        if pad == "left":  # blanks, then digits to the end: blanks add leading zeros
            ok &= is_digit | (is_blank & ~seen_digit)
            total = total * 10 + value * is_digit
        else:  # digits, then blanks to the end: blanks leave the number as it is
            ok &= (is_digit & ~seen_blank) | (is_blank & seen_digit)
            total = np.where(is_digit, total * 10 + value, total)
            seen_blank |= is_blank
        seen_digit |= is_digit
    if pad != "none":
        ok &= seen_digit
    return total


def _wide_seconds(buf: np.ndarray, at_dot: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Seconds of 6 to :data:`WIDE_SEC_MAX` digits right before the dot at ``at_dot`` (byte
    offsets in ``buf``), after a blank; clears ``ok`` where there are none.

    The window before the dot is gathered and transposed like the others, then read from
    the dot leftwards: the digits run until the first other byte, which must be a blank.
    """
    width = WIDE_SEC_MAX + 1
    at = np.where(ok, at_dot - width, 0)
    rows = np.ascontiguousarray(sliding_window_view(buf, width)[at].T)
    n = rows.shape[1]
    sec = np.zeros(n, dtype=np.int64)
    digits = np.zeros(n, dtype=np.int8)
    run = np.ones(n, dtype=bool)  # still in the digits that end at the dot
    blank_before = np.zeros(n, dtype=bool)
    scale = 1
    for row in rows[::-1]:
        value = row - np.uint8(ZERO)  # wraps below "0": one unsigned compare
        blank_before |= run & (row == SPACE)
        run &= value <= 9
        sec += value * run * np.int64(scale)
        digits += run
        scale *= 10
    ok &= blank_before & (digits > SEC_WIDTH) & (sec < MAX_SECONDS)
    return sec


def tracefs_header(
    data: bytes,
    starts: np.ndarray,
    bracket: np.ndarray,
    colon: np.ndarray,
    usable: np.ndarray,
    *,
    wide_seconds: bool = False,
) -> Header:
    """Thread id, CPU and timestamp of every line with the tracefs layout.

    ``starts`` are the lines' byte offsets in ``data``; ``bracket`` and ``colon`` the byte
    offsets, within each line, of its first ``[`` and first ``": "`` (any value where
    ``usable`` is false). The two fixed-width windows of each line (before ``[`` and before
    ``": "``) are copied out in one gather each and transposed, so that every check and
    sum below runs over one contiguous row of bytes per position. ``wide_seconds``: also
    read lines whose seconds have 6 or more digits (:func:`_wide_seconds`).
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    n = len(starts)
    b = bracket.astype(np.int64)
    c = colon.astype(np.int64)
    ok = usable & (b >= TID_WIDTH + 2) & (c - STAMP_WIDTH >= b + CPU_WIDTH + 2)
    if len(buf) < max(HEAD_WIDTH, STAMP_WIDTH) or not ok.any():
        zero = np.zeros(n, dtype=np.int64)
        return Header(ok=np.zeros(n, dtype=bool), tid=zero, cpu=zero, ts_ns=zero)
    at_head = np.where(ok, starts + b - TID_WIDTH - 2, 0)
    at_stamp = np.where(ok, starts + c - STAMP_WIDTH, 0)
    head = np.ascontiguousarray(sliding_window_view(buf, HEAD_WIDTH)[at_head].T)
    stamp = np.ascontiguousarray(sliding_window_view(buf, STAMP_WIDTH)[at_stamp].T)

    # "-" TID (digits, then blanks) " [" CPU "]"
    ok &= (head[0] == DASH) & (head[TID_WIDTH + 1] == SPACE)
    ok &= (head[TID_WIDTH + 2] == OPEN) & (head[-1] == CLOSE)
    tid = _number(head[1 : TID_WIDTH + 1], ok, pad="right")
    cpu = _number(head[TID_WIDTH + 3 : TID_WIDTH + 3 + CPU_WIDTH], ok, pad="none")
    # " " SEC (blanks, then digits) "." USEC
    ok &= stamp[1 + SEC_WIDTH] == DOT
    usec = _number(stamp[2 + SEC_WIDTH :], ok, pad="none")
    narrow = ok & (stamp[0] == SPACE)
    sec = _number(stamp[1 : 1 + SEC_WIDTH], narrow, pad="left").astype(np.int64)
    if wide_seconds:  # the lines that fail only there may have wider seconds
        retry = np.flatnonzero(ok & ~narrow)
        if len(retry):
            wide = np.ones(len(retry), dtype=bool)
            sec[retry] = _wide_seconds(buf, at_stamp[retry] + 1 + SEC_WIDTH, wide)
            narrow[retry] = wide
    ok = narrow
    ts_ns = sec.astype(np.int64) * NS_PER_S + usec.astype(np.int64) * NS_PER_US
    return Header(ok=ok, tid=tid, cpu=cpu, ts_ns=ts_ns)
