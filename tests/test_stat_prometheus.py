"""`vtrace stat --prometheus`: OpenMetrics over HTTP, checked against the lab VMM's own counts;
a bad or busy [HOST:]PORT is one line before anything attaches."""

from __future__ import annotations

import itertools
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
VTRACE = [sys.executable, "-m", "vtrace.cli"]
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
real = [pytest.mark.kvm, pytest.mark.root, pytest.mark.bcc]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def exporter(*args: str) -> Iterator[tuple[subprocess.Popen, int]]:
    """`vtrace stat --prometheus 127.0.0.1:PORT ARGS`, serving once its probes are attached;
    stopped with SIGTERM at the end (exit status 0 expected)."""
    port = _free_port()
    proc = subprocess.Popen(
        [*VTRACE, "stat", "--prometheus", f"127.0.0.1:{port}", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    lines = []
    while not (line := proc.stderr.readline()).startswith("vtrace stat: serving"):
        lines.append(line)
        assert line, f"exporter ended: {lines}"
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and out == "", (out, err)


def scrape(port: int) -> dict[str, dict[tuple, float]]:
    """{sample name: {(pid, reason[, le]): value}} from one OpenMetrics scrape."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics", headers={"Accept": OPENMETRICS}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["Content-Type"].startswith("application/openmetrics-text")
        text = r.read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            key = (int(smp.labels["pid"]), smp.labels["reason"])
            if "le" in smp.labels:
                key += (smp.labels["le"],)
            out.setdefault(smp.name, {})[key] = smp.value
            assert smp.labels["vm"], smp
        out.setdefault(f"TYPE {fam.name}", {})[()] = fam.type
    return out


def irq_lines(n: int) -> int:
    """A guest whose VMM raises an interrupt line ``n`` times (KVM_IRQ_LINE): its pid."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "kvm_guest.py"), "--exits", "0", "--irq-lines",
         str(n)],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    return json.loads(r.stdout.splitlines()[0])["pid"]


def hardware_virtualisation() -> bool:
    """vmx/svm: without them (this host's KVM emulates the guest) KVM never traces
    kvm_exit, kvm_entry or kvm_inj_virq."""
    flags = Path("/proc/cpuinfo").read_text().split()
    return "vmx" in flags or "svm" in flags


def lab(*args: str) -> dict:
    r = subprocess.run(
        [*VTRACE, "lab", "run", "--json", *args], capture_output=True, text=True, check=True,
        cwd=ROOT,
    )  # fmt: skip
    return json.loads(r.stdout)


def of(samples: dict[tuple, float], pid: int) -> dict:
    return {k[1:]: v for k, v in samples.items() if k[0] == pid}


@pytest.mark.kvm
@pytest.mark.root
@pytest.mark.bcc
def test_scrape_matches_the_lab_counts() -> None:
    with exporter("--interval", "0.1") as (_, port):
        virtio = lab("--device", "virtio", "--wait", "irq", "--requests", "2000", "--batch", "4")
        emulated = lab("--device", "emulated", "--requests", "500")
        lines = irq_lines(300)
        m = scrape(port)
    assert m["TYPE vtrace_kicks"][()] == "counter"
    assert m["TYPE vtrace_userspace_handling_seconds"][()] == "histogram"
    # The virtio device: kicks through an ioeventfd, one user-space exit (the guest's last
    # write), interrupts through an irqfd.
    v = virtio["pid"]
    exits = {(k,): n for k, n in virtio["exit_reasons"].items()}
    assert of(m["vtrace_userspace_exits_total"], v) == exits == {("KVM_EXIT_IO",): 1}
    kicks = of(m["vtrace_kicks_total"], v)
    assert sum(kicks.values()) == virtio["kicks"] == virtio["guest_kicks"] > 0, kicks
    assert len(kicks) == 1 and next(iter(kicks))[0].startswith("port 0x")
    # Interrupts the guest's handler took: KVM's injections into its vCPU, by vector.
    injected = of(m.get("vtrace_interrupts_total", {}), v)
    if hardware_virtualisation():
        assert sum(injected.values()) == virtio["interrupts"] > 0, injected
    else:
        assert injected == {}
    # The back end's irqfd signals are injected by kernel workers, named as such.
    raised = m["vtrace_irq_raised_total"]
    assert any(n > 0 for (pid, r), n in raised.items() if r == "kvm_set_irq" and pid != lines)
    # A VMM's own KVM_IRQ_LINE calls are its VM's.
    assert of(raised, lines) == {("kvm_set_irq",): 300}
    # The emulated device: every register access a user-space exit, no kick.
    e = emulated["pid"]
    exits = {(k,): n for k, n in emulated["exit_reasons"].items()}
    assert of(m["vtrace_userspace_exits_total"], e) == exits
    assert sum(exits.values()) == emulated["userspace_exits"] == 4 * 500 + 1
    assert of(m["vtrace_kicks_total"], e) == {}
    # Every exit but the last is timed (the VMM's next KVM_RUN ends it); buckets cumulative.
    count = of(m["vtrace_userspace_handling_seconds_count"], e)
    assert count == {("KVM_EXIT_IO",): emulated["userspace_exits"] - 1}
    buckets = sorted(
        ((float(le), n) for (reason, le), n in of(m["vtrace_userspace_handling_seconds_bucket"], e).items()),
    )  # fmt: skip
    assert buckets[-1] == (float("inf"), emulated["userspace_exits"] - 1)
    assert all(a[1] <= b[1] for a, b in itertools.pairwise(buckets))
    assert buckets[0][0] == pytest.approx(1.024e-6)
    mean_s = (
        of(m["vtrace_userspace_handling_seconds_sum"], e)[("KVM_EXIT_IO",)]
        / count[("KVM_EXIT_IO",)]
    )
    assert 1e-7 < mean_s < 1e-2, mean_s


@pytest.mark.kvm
@pytest.mark.root
@pytest.mark.bcc
def test_duration_stops_the_exporter() -> None:
    t0 = time.monotonic()
    with exporter("--duration", "2") as (proc, port):
        scrape(port)
        assert proc.wait(timeout=60) == 0
    assert time.monotonic() - t0 < 30
    with pytest.raises(OSError):  # the port is released
        scrape(port)


def _stat_error(*args: str) -> str:
    r = subprocess.run(
        [*VTRACE, "stat", *args], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    assert r.stderr.startswith("vtrace: error: "), r.stderr
    assert r.stderr.count("\n") == 1 and "attached" not in r.stderr, r.stderr
    return r.stderr


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("0", "port '0' is not a number from 1 to 65535"),
        ("65536", "port '65536' is not a number from 1 to 65535"),
        ("127.0.0.1:http", "port 'http' is not a number from 1 to 65535"),
        ("127.0.0.1:", "port '' is not a number from 1 to 65535"),
        (":9464", "has an empty HOST"),
        ("a:b:9464", "is not [HOST:]PORT"),
    ],
)
def test_a_bad_address_is_one_line(spec: str, says: str) -> None:
    assert says in _stat_error("--prometheus", spec)


def test_a_port_in_use_is_one_line_before_anything_attaches() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        err = _stat_error("--prometheus", f"127.0.0.1:{port}")
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in err


def test_prometheus_is_not_mixed_with_csv() -> None:
    assert "not with --csv or --once" in _stat_error("--prometheus", "9464", "--csv")


@pytest.mark.kvm
@pytest.mark.root
@pytest.mark.bcc
@pytest.mark.parametrize("classic", [False, True], ids=["raw", "classic"])
@pytest.mark.parametrize("ioeventfd", [False, True], ids=["user-space-port", "ioeventfd"])
def test_kicks_are_the_writes_no_exit_claimed(classic: bool, ioeventfd: bool) -> None:
    from tests.test_collect_capture import GuestProcess
    from vtrace.collect.stat import Stat, kicks

    outs = 3000
    guest = GuestProcess(outs, ioeventfd=ioeventfd)
    with Stat([guest.pid], classic=classic) as st:
        result = guest.go()
        counts, _ = st.snapshot_all()
    got = kicks(counts).select("target", "total").rows()
    assert got == ([("port 0x10", outs)] if ioeventfd else [])
    assert result["kicks"] == (outs if ioeventfd else 0)


def test_a_host_it_cannot_listen_on_is_one_line() -> None:
    err = _stat_error("--prometheus", "256.1.1.1:9464")
    assert "cannot listen on 256.1.1.1:9464: " in err


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_a_duration_it_cannot_wait_is_one_line(value: str) -> None:
    assert f"--duration: {value} is not a positive number of seconds" in _stat_error(
        "--prometheus", "9464", "--duration", value
    )
