"""The model calibrated from the shipped QEMU guest traces, against what those traces measured.

Each trace is a real Linux guest under TCG (traces/README.md); its meta holds the measured
trapping accesses, kicks and interrupts per request. A config calibrated from the trace is
replayed with the capture's request count and queue depth (a closed loop, like the guest's
dd / ping) and with the trace's own request arrivals, and must reproduce those counts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from vtrace import open_trace
from vtrace.errors import VtraceError
from vtrace.sim import load_config, replay
from vtrace.sim.calibrate import calibrate

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT / "traces"

CASES = [
    ("qemu-ide", "ide-emulated"),
    ("qemu-virtio-blk-qd1", "virtio-blk"),
    ("qemu-virtio-blk-qd16", "virtio-blk"),
    ("qemu-e1000", "e1000-emulated"),
    ("qemu-virtio-net", "virtio-net"),
]
ARRIVAL = {
    "qemu-ide": "ide_exec_cmd",
    "qemu-virtio-blk-qd1": "virtqueue_pop",
    "qemu-virtio-blk-qd16": "virtqueue_pop",
    "qemu-e1000": "e1000 TDT write",
    "qemu-virtio-net": "virtqueue_pop",
}


def measured(trace: str) -> dict:
    """meta's per-request figures, with interrupts on the kicked queue alone for virtio-net.

    The model is one queue; virtio-net's round trip also interrupts on the receive queue,
    which it leaves out: compare with the transmit queue's interrupts, counted in the trace.
    """
    t = open_trace(TRACES / trace)
    m = dict(t.meta["qemu_lab"])
    if trace == "qemu-virtio-net":
        per_queue = dict(
            t.events.filter(pl.col("event").cast(pl.String) == "virtio_notify")
            .group_by("queue")
            .len()
            .collect()
            .iter_rows()
        )
        assert per_queue == {0: 1024, 1: 1024} and m["interrupts"] == 2048  # RX + TX
        m["interrupts_per_request"] = per_queue[1] / m["requests"]
    return m


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("qemu-fit")
    files = {}
    for trace, model in CASES:
        files[trace] = out / f"{trace}.toml"
        calibrate([TRACES / trace], model, files[trace])
    return files


@pytest.mark.parametrize(("trace", "model"), CASES)
def test_closed_loop_replay_matches_the_capture(
    calibrated: dict[str, Path], trace: str, model: str
) -> None:
    m = measured(trace)
    cfg = load_config(calibrated[trace])
    meta_cfg = open_trace(TRACES / trace).meta["config"]
    assert cfg["workload.arrivals"] == "closed"
    assert cfg["workload.requests"] == m["requests"]
    assert cfg["workload.queue_depth"] == meta_cfg["queue_depth"]
    s = replay(cfg).summary
    assert s["completed"] == m["requests"]
    # trapping accesses: deterministic in the model, so exact
    assert s["userspace_exits_per_request"] == m["device_accesses_per_request"]
    if cfg.kind == "emulated":
        assert s["exits_per_request"] == m["device_accesses_per_request"]
        assert s["kicks_per_request"] == 0 and m["kicks"] is None
        assert s["irqs_per_request"] == m["interrupts_per_request"] == 1.0
    else:
        assert s["kicks_per_request"] == pytest.approx(m["kicks_per_request"], rel=0.1)
        assert s["irqs_per_request"] == pytest.approx(m["interrupts_per_request"], rel=0.1)


@pytest.mark.parametrize(("trace", "model"), CASES)
def test_trace_replay_matches_the_capture(
    calibrated: dict[str, Path], trace: str, model: str
) -> None:
    m = measured(trace)
    r = replay(calibrated[trace], TRACES / trace)
    s = r.summary
    assert s["arrival_event"] == ARRIVAL[trace]
    assert s["requests"] == m["requests"] == r.requests.height
    assert s["userspace_exits_per_request"] == m["device_accesses_per_request"]
    if m["kicks"] is not None:
        assert s["kicks_per_request"] == pytest.approx(m["kicks_per_request"], rel=0.1)
    if trace != "qemu-virtio-blk-qd16":
        assert s["irqs_per_request"] == pytest.approx(m["interrupts_per_request"], rel=0.1)
    else:
        # replayed pops are spread out and the model's back end serves them one by one: it
        # announces smaller passes than QEMU, whose reads complete together (docs/model.md)
        assert s["irqs_per_request"] > 2 * m["interrupts_per_request"]


def test_calibrated_file_names_trace_and_statistic(calibrated: dict[str, Path]) -> None:
    text = calibrated["qemu-virtio-blk-qd16"].read_text()
    assert "descs_per_request = 3  # fitted: qemu-virtio-blk-qd16: median in_num + out_num" in text
    assert (
        "batch = 85  # fitted: qemu-virtio-blk-qd16: no count: the guest kicks at the end" in text
    )
    assert (
        "dispatch_splits = 0.2852  # fitted: qemu-virtio-blk-qd16: 329 virtio_queue_notify" in text
    )
    assert 'publish = "per_pass"  # fitted: qemu-virtio-blk-qd16: 13.1 virtqueue_flush' in text
    assert "queue_depth = 16  # fitted: qemu-virtio-blk-qd16: most requests popped" in text
    assert "service_ns = 8000.0  # from virtio-blk.toml" in text  # TCG shows no KVM timing
    net = load_config(calibrated["qemu-virtio-net"])
    assert net["virtqueue.descs_per_request"] == 1  # header and frame in one descriptor
    ide = load_config(calibrated["qemu-ide"])
    assert sum(a["count"] for a in ide["device.accesses"]) == 26
    assert ide["interrupt.accesses"] == []
    e1000 = {
        a["register"]: a["count"] for a in load_config(calibrated["qemu-e1000"])["device.accesses"]
    }
    assert e1000 == {"TDT write": 1, "RDT write": 1, "ICR read": 1, "IMC write": 1,
                     "IMS write": 1, "STATUS read": 2}  # fmt: skip


@pytest.mark.parametrize(("trace", "model"), CASES)
def test_shipped_calibrated_models_are_what_calibrate_writes(
    calibrated: dict[str, Path], trace: str, model: str
) -> None:
    assert load_config(trace).values == load_config(calibrated[trace]).values
    fresh = calibrated[trace].read_text().replace(str(TRACES / trace), f"traces/{trace}")
    assert (ROOT / "models" / f"{trace}.toml").read_text() == fresh


def test_cli_calibrates_a_virtio_guest_and_replays_an_emulated_one(tmp_path: Path) -> None:
    out = tmp_path / "x.toml"
    r = subprocess.run(
        [sys.executable, "-m", "vtrace.cli", "calibrate", "traces/qemu-virtio-blk-qd1",
         "--model", "virtio-blk", "-o", str(out)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert load_config(out)["virtqueue.descs_per_request"] == 3
    r = subprocess.run(
        [sys.executable, "-m", "vtrace.cli", "replay", "traces/qemu-ide", "--model",
         "ide-emulated", "--json"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["arrival_event"] == "ide_exec_cmd" and s["requests"] == 1024


def test_qemu_trace_with_the_wrong_model_or_company_fails_on_one_line(tmp_path: Path) -> None:
    with pytest.raises(VtraceError, match="not an emulated device"):
        calibrate([TRACES / "qemu-virtio-blk-qd1"], "ide-emulated", tmp_path / "a.toml")
    with pytest.raises(VtraceError, match="not a virtio trace"):
        calibrate([TRACES / "qemu-ide"], "virtio-blk", tmp_path / "b.toml")
    with pytest.raises(VtraceError, match="of one device only"):
        calibrate([TRACES / "qemu-ide", TRACES / "qemu-e1000"], "ide-emulated", tmp_path / "c.toml")
    with pytest.raises(VtraceError, match="not with lab traces"):
        calibrate(
            [TRACES / "qemu-ide", TRACES / "lab-emulated"], "ide-emulated", tmp_path / "d.toml"
        )
    assert not list(tmp_path.iterdir())
