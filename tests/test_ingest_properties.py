"""Property tests: random and mutated real lines either parse or give a VtraceError, never crash."""

from __future__ import annotations

import tempfile
from pathlib import Path

import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtrace import schema as s
from vtrace.errors import VtraceError
from vtrace.ingest import read_events

DATA = Path(__file__).parent / "data"
# Per format, the lines of each real capture (a QEMU log either has timestamps or not).
REAL_FILES = {
    "ftrace": [
        (DATA / "kvm_tracefs.txt").read_text().splitlines(),
        (DATA / "kvm_trace_cmd_report.txt").read_text().splitlines(),
    ],
    "perf": [(DATA / "kvm_perf_script.txt").read_text().splitlines()],
    "qemu": [p.read_text().splitlines()[:300] for p in sorted((DATA / "qemu").glob("*.log"))]
    # Without the QEMU captures, two lines in QEMU 7.2's format keep the tests meaningful.
    or [
        [
            "12545@1795621072.527085:virtqueue_pop vq 0x55fcad1b8e10 elem 0x7f3e80001f00 "
            "in_num 2 out_num 1",
            "12545@1795621072.527090:memory_region_ops_write cpu 0 mr 0x55fcace7e8a0 "
            "addr 0xfee00380 value 0x295d1 size 4 name 'apic-msi'",
        ]
    ],
}
REAL = {fmt: [line for lines in files for line in lines] for fmt, files in REAL_FILES.items()}
# Characters that matter to the parsers, plus anything printable.
ALPHABET = st.sampled_from(list(" -:[]().@x0123456789abcdef_kvm'|/\t\r")) | st.characters(
    blacklist_categories=("Cs",)
)
SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


@st.composite
def mutated_line(draw: st.DrawFn, fmt: str) -> str:
    line = draw(st.sampled_from(REAL[fmt]))
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["insert", "delete", "replace", "cut", "dup"]))
        i = draw(st.integers(0, len(line)))
        if kind == "insert":
            line = line[:i] + draw(st.text(ALPHABET, max_size=5)) + line[i:]
        elif kind == "delete":
            line = line[:i] + line[i + draw(st.integers(1, 8)) :]
        elif kind == "replace":
            line = line[:i] + draw(st.text(ALPHABET, min_size=1, max_size=3)) + line[i + 1 :]
        elif kind == "cut":
            line = line[:i]
        else:
            line = line[:i] + line
    return line.replace("\n", " ")


def check(fmt: str, lines: list[str], strict: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.txt"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
        try:
            events, meta = read_events(fmt, path, strict=strict)
        except VtraceError as e:
            text = str(e)
            assert "\n" not in text and text.startswith(str(path))
            return
        s.validate(events)
        non_blank = sum(1 for x in lines if x.strip())
        # Every line is accounted for: an event, unparsed, or (ftrace) an ignored/lost marker.
        accounted = meta["events"] + meta["unparsed"] + meta.get("ignored_lines", 0)
        assert accounted <= len(lines) and accounted >= min(non_blank, 1)
        assert events.height == meta["events"]
        assert events.get_column("ts_ns").null_count() == 0
        assert events.get_column("event").null_count() == 0
        if strict:
            assert meta["unparsed"] == 0 and meta["malformed"] == 0


def formats() -> st.SearchStrategy[str]:
    return st.sampled_from(["ftrace", "perf", "qemu"])


@SETTINGS
@given(data=st.data(), fmt=formats(), strict=st.booleans())
def test_mutated_real_lines(data: st.DataObject, fmt: str, strict: bool) -> None:
    lines = data.draw(st.lists(mutated_line(fmt), min_size=1, max_size=20))
    check(fmt, lines, strict)


@SETTINGS
@given(fmt=formats(), lines=st.lists(st.text(ALPHABET, max_size=80), min_size=1, max_size=10))
def test_random_lines(fmt: str, lines: list[str]) -> None:
    check(fmt, [x.replace("\n", " ").replace("\r", " ") for x in lines], strict=False)


@SETTINGS
@given(data=st.data(), fmt=formats())
def test_unmutated_real_lines_all_parse(data: st.DataObject, fmt: str) -> None:
    source = data.draw(st.sampled_from(REAL_FILES[fmt]))
    lines = data.draw(st.lists(st.sampled_from(source), min_size=1, max_size=30))
    events_lines = [
        x for x in lines if not x.startswith("#") and x.strip() and not x.startswith("cpus=")
    ]
    if not events_lines:
        return
    events, meta = read_events_from(fmt, lines)
    assert (meta["unparsed"], meta["malformed"]) == (0, 0)
    assert events.height == len(events_lines)
    assert events.filter(pl.col("event").cast(pl.String) == "").height == 0


def read_events_from(fmt: str, lines: list[str]) -> tuple[pl.DataFrame, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.txt"
        path.write_text("\n".join(lines) + "\n")
        return read_events(fmt, path, strict=True)


# Lines that test the edges of tracefs' fixed-width header: widths, blanks, look-alikes.
TRACEFS_EDGES = [
    "       CPU 0/KVM-2345    [001] d..2.  1234.567890: kvm_pio: pio_write at 0x500 size 1 count 1 val 0x41 ",
    "       CPU 0/KVM-12345678 [001] .....  1234.567890: kvm_fpu: load",
    "       CPU 0/KVM-2345    [1001] .....  1234.567890: kvm_fpu: load",
    "       CPU 0/KVM-2345    [001] ..... 123456.567890: kvm_fpu: load",
    "       CPU 0/KVM-2345    [001] .....  1234.5678901: kvm_fpu: load",
    "       CPU 0/KVM-2345    [001] .....     42: kvm_fpu: load",
    "   a: b[0]-2345    [001] .....  1234.567890: kvm_fpu: load",
    "    x[9]-2345    [001] .....  1234.567890: kvm_fpu: load",
    "       CPU 0/KVM-2345    (   2340) [001] .....  1234.567890: kvm_fpu: load",
    "       CPU 0/KVM-2345    [001] .....  1234.567890:  kvm_fpu: load",
    "       CPU 0/KVM-2345    [001] .....  1234.567890: kvm_fpu:\tload",
    "       CPU 0/KVM-2345    [001] .....  1234.567890: kvm_fpu:",
    "       CPU 0/KVM-2345    [001] .....  1234.567890: kvm_fpu:   ",
    "       CPU 0/KVM-2345    [001] .....  1234.567890: kvm-fpu: load",
    "       CPU 0/KVM-2345    [001] .....  1234.567890: " + "k" * 63 + ":x",
    "       CPU 0/KVM-2345    [001] .....  1234.567890: " + "k" * 70 + ": x",
    "       CPU 0/KVM-234 5   [001] .....  1234.567890: kvm_fpu: load",
    "       CPU 0/KVM-2345    [0a1] .....  1234.567890: kvm_fpu: load",
    "       CPU 0/KVM-2345    [001] .....  12 4.567890: kvm_fpu: load",
    "       CPU 0/KVM-2345    [001] ..... 1234.567890: kvm_fpu: load",
    "       CPU 0/KVM-2345    [001]  1234.567890: kvm_fpu: load",
    "      CPU 0/KVMé-2345    [001] .....  1234.567890: kvm_fpu: load",
]


def general_and_fast(lines: list[str]) -> tuple[object, object]:
    """The same file read with the tracefs fast path and with the general parser only."""
    from dataclasses import replace

    from vtrace.ingest.ftrace import FTRACE
    from vtrace.ingest.tracepoint_text import read_tracepoint_text

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.txt"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
        for fmt in (FTRACE, replace(FTRACE, tracefs_layout=False)):
            try:
                events, meta = read_tracepoint_text(fmt, path)
                results.append((events.with_columns(pl.col(pl.Categorical).cast(pl.String)), meta))
            except VtraceError as e:
                results.append(str(e))
    return results[0], results[1]


def same_result(fast: object, general: object) -> None:
    if isinstance(fast, str) or isinstance(general, str):
        assert fast == general
        return
    (a, meta_a), (b, meta_b) = fast, general  # type: ignore[misc]
    assert a.equals(b)
    assert meta_a == meta_b


def test_tracefs_fast_path_edges() -> None:
    """Each edge line alone and all together: the fast path gives what the general one does."""
    from vtrace.ingest.textlines import read_text_lines
    from vtrace.ingest.tracepoint_text import split_fast

    for line in TRACEFS_EDGES:
        same_result(*general_and_fast([line]))
    same_result(*general_and_fast(TRACEFS_EDGES + REAL_FILES["ftrace"][0]))
    # The fast path did claim the plain lines (the comparison is not between two general runs).
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.txt"
        path.write_text("\n".join(TRACEFS_EDGES) + "\n")
        fast, rest = split_fast(read_text_lines(path))
    assert fast is not None
    # Plain, empty text (twice), no flags column.
    assert fast.get_column("lineno").to_list() == [1, 12, 13, 21]
    assert rest.height == len(TRACEFS_EDGES) - 4


@SETTINGS
@given(data=st.data())
def test_tracefs_fast_path_matches_general(data: st.DataObject) -> None:
    """Mutated real tracefs lines: fast path and general parser agree on every table and meta."""
    pool = REAL_FILES["ftrace"][0] + TRACEFS_EDGES
    lines = data.draw(
        st.lists(st.sampled_from(pool) | mutated_line("ftrace"), min_size=1, max_size=20)
    )
    same_result(*general_and_fast(lines))
