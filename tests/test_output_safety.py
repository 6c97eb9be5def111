"""Outputs nobody else can redirect: trace directories and single files are created by vtrace
itself, opened without following links, never in a directory other users can write (unless
sticky and root's), and an existing file is replaced only with --force.

Each test plays what another user could do before or while vtrace writes (pre-create the
output, plant links under the names vtrace uses) with real files; the ones that need a
second owner (chown) run as root.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from vtrace.errors import VtraceError
from vtrace.output import OutputDir, check_new_dir, check_new_file, write_file
from vtrace.store import TraceWriter, write_trace

VTRACE = [sys.executable, "-m", "vtrace.cli"]
ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534
as_root = pytest.mark.root


def _events(n: int) -> pl.DataFrame:
    return pl.DataFrame({"ts_ns": list(range(n)), "source": ["kvm"] * n, "event": ["kvm_pio"] * n})


def _vtrace(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VTRACE, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def _one_line_error(r: subprocess.CompletedProcess[str], *words: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith("vtrace: error: ") and r.stderr.count("\n") == 1, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


# --- trace directories ------------------------------------------------------------------------


def test_an_existing_empty_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    with pytest.raises(VtraceError, match="output exists"):
        TraceWriter(tmp_path / "t")
    assert list((tmp_path / "t").iterdir()) == []


def test_a_link_to_another_directory_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    victim.chmod(0o755)
    (tmp_path / "t").symlink_to(victim)
    with pytest.raises(VtraceError, match="output exists"):
        TraceWriter(tmp_path / "t")
    assert stat.S_IMODE(victim.stat().st_mode) == 0o755 and list(victim.iterdir()) == []


def test_links_planted_under_temporary_names_are_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("someone else's file")
    w = TraceWriter(tmp_path / "t")
    for name in (".meta.json.tmp", ".part-000000.parquet.tmp"):
        os.symlink(victim, tmp_path / "t" / name)
    w.append(_events(3))
    trace = w.close()
    assert victim.read_text() == "someone else's file"
    assert trace.events.collect().height == 3 and trace.meta["events"] == 3
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [
        "meta.json",
        "part-000000.parquet",
    ]


def test_modes_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        trace = write_trace(tmp_path / "a" / "b" / "t", _events(2), {})
    finally:
        os.umask(old)
    for d in (tmp_path / "a", tmp_path / "a" / "b", trace.path):
        assert stat.S_IMODE(d.stat().st_mode) == 0o750, d
    for f in [*trace.parts, trace.path / "meta.json"]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o640, f


def test_a_parent_other_users_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(VtraceError, match="other users can write"):
        TraceWriter(shared / "t")
    with pytest.raises(VtraceError, match="other users can write"):
        TraceWriter(shared / "new" / "t")  # nor a directory made inside it
    assert list(shared.iterdir()) == []


@as_root
def test_sticky_parent_only_when_root_owns_it(tmp_path: Path) -> None:
    tmp_like = tmp_path / "tmp"
    tmp_like.mkdir()
    tmp_like.chmod(0o1777)  # owned by root (this test runs as root), like /tmp
    write_trace(tmp_like / "t", _events(1), {})
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    theirs.chmod(0o1777)  # sticky, but its owner can still rename what vtrace made
    with pytest.raises(VtraceError, match="other users can write"):
        write_trace(theirs / "t", _events(1), {})


@as_root
def test_a_directory_pre_created_by_another_user_is_refused(tmp_path: Path) -> None:
    # What an unprivileged user could do in /tmp before root records there.
    tmp_like = tmp_path / "tmp"
    tmp_like.mkdir()
    tmp_like.chmod(0o1777)
    planted = tmp_like / "trace"
    planted.mkdir()
    os.chown(planted, NOBODY, NOBODY)
    planted.chmod(0o777)
    with pytest.raises(VtraceError, match="output exists"):
        TraceWriter(planted)
    assert list(planted.iterdir()) == [] and planted.stat().st_uid == NOBODY


def test_check_new_dir_leaves_nothing(tmp_path: Path) -> None:
    check_new_dir(tmp_path / "a" / "b" / "t")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "x").mkdir()
    with pytest.raises(VtraceError, match="output exists"):
        check_new_dir(tmp_path / "x")
    with pytest.raises(VtraceError, match="/proc/x"):
        check_new_dir("/proc/x")


def test_removing_a_directory_removes_only_what_is_in_it(tmp_path: Path) -> None:
    out = OutputDir(tmp_path / "t")
    with out.create("a") as f:
        f.write(b"x")
    # Someone swaps the path for a link to a directory of theirs: remove() works on the
    # directory it made (by descriptor), never through the link.
    os.rename(tmp_path / "t", tmp_path / "moved")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("keep")
    (tmp_path / "t").symlink_to(victim)
    out.remove()
    assert (victim / "keep").read_text() == "keep"
    assert list((tmp_path / "moved").iterdir()) == []


# --- single files -----------------------------------------------------------------------------


def test_single_file_refuses_existing_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "x.toml"
    out.write_text("mine")
    with pytest.raises(VtraceError, match="exists; pass --force"):
        write_file(out, lambda f: f.write(b"new"))
    with pytest.raises(VtraceError, match="exists; pass --force"):
        check_new_file(out)
    assert out.read_text() == "mine"
    write_file(out, lambda f: f.write(b"new"), force=True)
    assert out.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.toml"]


def test_single_file_never_replaces_a_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("theirs")
    (tmp_path / "x.parquet").symlink_to(victim)
    for force in (False, True):
        with pytest.raises(VtraceError, match="not a regular file"):
            write_file(tmp_path / "x.parquet", lambda f: f.write(b"new"), force=force)
    assert victim.read_text() == "theirs" and (tmp_path / "x.parquet").is_symlink()


def test_single_file_failure_leaves_nothing(tmp_path: Path) -> None:
    def bad(f: object) -> None:
        raise VtraceError("does not load")

    with pytest.raises(VtraceError, match="does not load"):
        write_file(tmp_path / "x.toml", lambda f: f.write(b"x"), verify=lambda p: bad(p))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(VtraceError, match="does not exist"):
        write_file(tmp_path / "no" / "x.toml", lambda f: f.write(b"x"))


# --- commands ---------------------------------------------------------------------------------


def test_calibrate_refuses_an_existing_file_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "fit.toml"
    out.write_text("# mine\n")
    args = ["calibrate", "traces/lab-virtio-b1", "--model", "lab-virtio", "-o", str(out)]
    _one_line_error(_vtrace(*args), str(out), "--force")
    assert out.read_text() == "# mine\n"
    r = _vtrace(*args, "--force")
    assert r.returncode == 0, r.stderr
    assert "costs" in out.read_text() or "[" in out.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit.toml"]


def test_calibrate_never_writes_through_a_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("theirs")
    (tmp_path / "fit.toml").symlink_to(victim)
    args = [
        "calibrate",
        "traces/lab-virtio-b1",
        "-m",
        "lab-virtio",
        "-o",
        str(tmp_path / "fit.toml"),
    ]
    _one_line_error(_vtrace(*args, "--force"), "not a regular file")
    assert victim.read_text() == "theirs"


def test_sweep_checks_its_output_before_running(tmp_path: Path) -> None:
    out = tmp_path / "s.parquet"
    out.write_bytes(b"mine")
    # Enough points that running them first would take far longer than the check.
    grid = ["--grid", "virtqueue.batch=" + ",".join(str(b) for b in range(1, 65))]
    start = time.monotonic()
    _one_line_error(_vtrace("sweep", "-m", "lab-virtio", *grid, "-o", str(out)), "--force")
    _one_line_error(
        _vtrace("sweep", "-m", "lab-virtio", *grid, "-o", "/proc/s.parquet"), "/proc/s.parquet"
    )
    assert time.monotonic() - start < 20
    assert out.read_bytes() == b"mine"


def test_import_refuses_a_parent_others_can_write(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    r = _vtrace("import", "ftrace", "tests/data/kvm_tracefs.txt", "-o", str(shared / "t"))
    _one_line_error(r, "other users can write")
    assert list(shared.iterdir()) == []


def test_qemu_lab_checks_its_output_before_booting(tmp_path: Path) -> None:
    # Before: the guest booted, ran the whole workload, then TraceWriter failed (traceback).
    for out in ("/proc/x", str(tmp_path)):
        start = time.monotonic()
        r = _vtrace("qemu-lab", "run", "--device", "virtio-blk", "--requests", "8", "-o", out,
                    timeout=30)  # fmt: skip
        _one_line_error(r, out)
        assert time.monotonic() - start < 10


def test_lab_record_refuses_an_existing_directory_before_running(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    r = _vtrace("lab", "run", "--device", "emulated", "--requests", "10", "--record",
                str(tmp_path / "t"))  # fmt: skip
    _one_line_error(r, "output exists")
    assert list((tmp_path / "t").iterdir()) == []


def test_record_refuses_a_pid_that_does_not_exist(tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    r = _vtrace("record", "-o", str(tmp_path / "t"), "--pid", str(gone.pid), timeout=30)
    _one_line_error(r, f"--pid {gone.pid}", "no such process")
    assert not (tmp_path / "t").exists()
