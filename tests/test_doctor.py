"""`vtrace doctor` on this host, and with features taken away (paths pointed elsewhere)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vtrace.collect import doctor
from vtrace.collect.doctor import FAIL, OK, WARN

VTRACE = [sys.executable, "-m", "vtrace.cli"]


@pytest.mark.root
@pytest.mark.bcc
def test_doctor_here_can_record():
    checks = {c.name: c for c in doctor.run_checks()}
    assert doctor.record_problem(list(checks.values())) is None
    assert checks["privileges"].status == OK
    assert checks["tracefs"].status == OK
    assert checks["bcc"].status == OK and "dist-packages/bcc" in checks["bcc"].verdict
    assert checks["kvm tracepoints"].status in (OK, WARN)
    virt = checks["virtualisation"]
    flags = Path("/proc/cpuinfo").read_text()
    if " vmx" in flags or " svm" in flags:
        assert virt.status == OK
    else:
        assert virt.status == WARN and "kvm_exit and kvm_entry will not fire" in virt.verdict
    kprobes = checks["kprobes"]
    assert (kprobes.status == OK) == Path("/sys/kernel/tracing/kprobe_events").exists()
    if Path("/sys/kernel/btf/vmlinux").exists():
        assert checks["raw tracepoints"].status == OK
        assert checks["raw tracepoints"].verdict.startswith("all 7 kvm I/O")


@pytest.mark.root
def test_doctor_without_btf_reads_classic(tmp_path):
    check = doctor.check_raw_tracepoints(btf_dir=tmp_path)
    assert check.status == WARN and check.verdict.startswith("0 of 7 read raw")
    assert "kvm_pio: no " in check.verdict and "CONFIG_DEBUG_INFO_BTF" in check.verdict


@pytest.mark.root
@pytest.mark.bcc
def test_doctor_cli_json():
    r = subprocess.run([*VTRACE, "doctor", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    checks = json.loads(r.stdout)
    assert [c["name"] for c in checks] == [
        "privileges", "tracefs", "bcc", "headers", "kvm tracepoints", "raw tracepoints",
        "virtualisation", "kprobes", "qemu usdt",
    ]  # fmt: skip
    assert all(c["status"] in ("ok", "warn", "fail") and c["verdict"] for c in checks)


def test_no_tracefs(tmp_path):
    t = doctor.check_tracefs(tmp_path)
    assert t.status == FAIL and t.required and t.fix == f"mount -t tracefs nodev {tmp_path}"
    tp = doctor.check_tracepoints(tmp_path)
    assert tp.status == FAIL and "modprobe kvm" in tp.fix
    assert "CONFIG_KPROBES" in doctor.check_kprobes(tmp_path).verdict
    problem = doctor.record_problem([t, tp])
    assert problem.startswith("tracefs:") and "mount -t tracefs" in problem


def test_partial_tracefs(tmp_path):
    for ev in ("kvm_pio", "kvm_userspace_exit"):
        (tmp_path / "events" / "kvm" / ev).mkdir(parents=True)
        (tmp_path / "events" / "kvm" / ev / "format").write_text("format:\n")
    (tmp_path / "kprobe_events").write_text("")
    tp = doctor.check_tracepoints(tmp_path)
    assert tp.status == WARN and "missing kvm_exit" in tp.verdict
    assert doctor.check_kprobes(tmp_path).status == OK


def _python_without_dist_packages(code: str, extra_path: str = "") -> dict:
    env = {**os.environ, "PYTHONPATH": extra_path}
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(r.stdout)


def test_no_bcc_module(tmp_path):
    # The venv's Python has no dist-packages on its path; point Debian's folder elsewhere too.
    code = (
        "import json; from vtrace.collect.doctor import check_bcc; "
        f"print(json.dumps(check_bcc({str(tmp_path)!r}).as_dict()))"
    )
    c = _python_without_dist_packages(code)
    assert c["status"] == "fail" and c["required"]
    assert "apt-get install python3-bpfcc bpfcc-tools" in c["fix"]
    assert "not importable" in c["verdict"]


def test_unrelated_pypi_bcc_is_not_taken_for_bpf(tmp_path):
    fake = tmp_path / "site" / "bcc"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("# an unrelated package that happens to be called bcc\n")
    code = (
        "import json; from vtrace.collect.doctor import check_bcc; "
        f"print(json.dumps(check_bcc({str(tmp_path / 'none')!r}).as_dict()))"
    )
    c = _python_without_dist_packages(code, str(tmp_path / "site"))
    assert c["status"] == "fail" and "is not the BPF Compiler Collection" in c["verdict"]
    # With Debian's folder reachable, the real one wins over the impostor.
    if Path("/usr/lib/python3/dist-packages/bcc/__init__.py").exists():
        code = "import json; from vtrace.collect.doctor import check_bcc; print(json.dumps(check_bcc().as_dict()))"
        c = _python_without_dist_packages(code, str(tmp_path / "site"))
        assert c["status"] == "ok" and "/usr/lib/python3/dist-packages/bcc" in c["verdict"]


def _headers_tree(root: Path) -> Path:
    usr_src = root / "src"
    (usr_src / "linux-headers-6.1.0-9-amd64" / "include").mkdir(parents=True)
    (usr_src / "linux-headers-6.1.0-9-common").mkdir()
    return usr_src


def test_headers_missing_then_fixed_by_linking(tmp_path):
    modules, usr_src = tmp_path / "modules", _headers_tree(tmp_path)
    h = doctor.check_headers(modules, "9.9.9-test", usr_src)
    assert (
        h.status == FAIL
        and "vtrace doctor --fix" in h.fix
        and "linux-headers-6.1.0-9-amd64" in h.fix
    )
    did = doctor.fix_headers(modules, "9.9.9-test", usr_src)
    assert "only tracepoint programs" in did
    build, source = modules / "9.9.9-test" / "build", modules / "9.9.9-test" / "source"
    assert build.resolve() == (usr_src / "linux-headers-6.1.0-9-amd64").resolve()
    assert source.resolve() == (usr_src / "linux-headers-6.1.0-9-common").resolve()
    h = doctor.check_headers(modules, "9.9.9-test", usr_src)
    assert h.status == WARN and "tracepoint programs only" in h.verdict


def test_headers_missing_without_debian_package(tmp_path):
    h = doctor.check_headers(tmp_path / "modules", "9.9.9-test", tmp_path / "empty")
    assert h.status == FAIL and h.fix.startswith("apt-get install linux-headers-9.9.9-test")


def test_virtualisation_from_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("vendor_id\t: GenuineIntel\nflags\t\t: fpu vmx sse2\n\n")
    assert doctor.check_virtualisation(info).status == OK
    info.write_text("vendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2\n\n")
    v = doctor.check_virtualisation(info, tmp_path / "no-kvm")
    assert v.status == WARN and "no /dev/kvm" in v.verdict and "will not fire" in v.verdict


def test_privileges():
    assert doctor.check_privileges(euid=0, caps=0).status == OK
    assert doctor.check_privileges(euid=1000, caps=(1 << 39) | (1 << 38)).status == OK
    c = doctor.check_privileges(euid=1000, caps=0)
    assert c.status == FAIL and c.required and "sudo" in c.fix


def test_usdt_notes_match_readelf():
    # Debian's python3.11 is built with USDT probes: a real ELF with .note.stapsdt here.
    exe = Path("/usr/bin/python3.11")
    if not exe.exists():
        pytest.skip("no /usr/bin/python3.11 (Debian's python3.11) to read USDT notes from")
    r = subprocess.run(["readelf", "-n", str(exe)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip("no readelf: apt-get install binutils")
    lines = r.stdout.splitlines()
    want = {
        lines[i + 2].split("Name:")[1].strip()
        for i, line in enumerate(lines)
        if "NT_STAPSDT" in line and "Name:" in lines[i + 2]
    }
    assert want and doctor.usdt_probes(exe) == want
    assert doctor.usdt_probes(Path(__file__)) == set()  # not an ELF


@pytest.mark.qemu
def test_qemu_without_usdt_notes_is_reported():
    c = doctor.check_qemu_usdt()
    binaries = doctor.find_qemu_binaries()
    notes = {b: doctor.usdt_probes(b) for b in binaries}
    if any(notes.values()):
        assert c.status == OK
    else:
        assert c.status == WARN and "dtrace" in c.verdict
    assert doctor.check_qemu_usdt([]).verdict == "no qemu-system-* on PATH"


@pytest.mark.root
def test_fix_mounts_tracefs(tmp_path):
    # A second tracefs mount on an empty folder: the real one stays untouched.
    target = tmp_path / "tracing"
    target.mkdir()
    checks = doctor.run_checks(fix=True, tracefs=target, qemu_binaries=[])
    t = next(c for c in checks if c.name == "tracefs")
    try:
        assert t.fixed == f"mounted tracefs at {target}"
        assert t.status == OK and (target / "events" / "kvm").is_dir()
    finally:
        subprocess.run(["umount", str(target)], check=False)
    assert not (target / "events").exists()


@pytest.mark.root
def test_doctor_as_an_ordinary_user_says_run_as_root():
    if shutil.which("setpriv") is None:
        pytest.skip("no setpriv: apt-get install util-linux")
    r = subprocess.run(
        [
            "setpriv",
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            *VTRACE,
            "doctor",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if r.returncode not in (0, 1):
        pytest.skip(f"the checkout is not readable by user nobody: {r.stderr.strip()[-200:]}")
    assert r.returncode == 1
    checks = {c["name"]: c for c in json.loads(r.stdout)}
    assert checks["privileges"]["status"] == "fail" and "sudo" in checks["privileges"]["fix"]
    assert checks["tracefs"]["status"] == "fail" and "run as root" in checks["tracefs"]["fix"]
    assert "cannot tell" in checks["kvm tracepoints"]["verdict"]
