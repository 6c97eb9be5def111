"""`vtrace export perfetto`: the file is read back with protobuf (Perfetto's own generated
messages, from the `perfetto` package) and checked the way Perfetto's trace processor reads
it: every track described, every slice closed on its own track in nesting order, every flow
with one start and one end, every interned name defined. Its counts and durations must be
those of the analyses, on every shipped trace and on a synthetic trace with the exits
software KVM never records."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pytest
from perfetto.protos.perfetto.trace import perfetto_trace_pb2 as pb

from vtrace import schema as s
from vtrace.analyze import accesses, exits, interrupts, kicks, requests, user_exits
from vtrace.export import export_perfetto
from vtrace.store import open_trace, write_trace

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p.parent.name for p in (ROOT / "traces").glob("*/meta.json"))
BEGIN, END, INSTANT, COUNTER = (
    pb.TrackEvent.TYPE_SLICE_BEGIN,
    pb.TrackEvent.TYPE_SLICE_END,
    pb.TrackEvent.TYPE_INSTANT,
    pb.TrackEvent.TYPE_COUNTER,
)


@dataclass
class Read:
    """What a timeline file holds, as the trace processor would see it."""

    tracks: dict[int, pb.TrackDescriptor] = field(default_factory=dict)
    # (category, name, track uuid, start, duration) per closed slice
    slices: list[tuple[str, str, int, int, int]] = field(default_factory=list)
    instants: list[tuple[str, str, int, int]] = field(default_factory=list)
    counters: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    flows: dict[int, list[tuple[str, int]]] = field(default_factory=dict)

    def count(self, cat: str) -> int:
        return sum(1 for x in self.slices if x[0] == cat)

    def instants_of(self, cat: str) -> int:
        return sum(1 for x in self.instants if x[0] == cat)

    def durations(self, cat: str) -> list[int]:
        return sorted(x[4] for x in self.slices if x[0] == cat)

    def track_names(self) -> list[str]:
        out = []
        for t in self.tracks.values():
            if t.HasField("thread"):
                out.append(t.thread.thread_name)
            elif t.HasField("process"):
                out.append(t.process.process_name)
            else:
                out.append(t.name)
        return out


def read_timeline(path: Path) -> Read:
    """Parse and check a timeline file; raises AssertionError naming what is wrong."""
    trace = pb.Trace()
    trace.ParseFromString(path.read_bytes())
    out = Read()
    names: dict[int, str] = {}
    cats: dict[int, str] = {}
    args: dict[int, str] = {}
    stacks: dict[int, list[tuple[str, str, int]]] = defaultdict(list)
    last_ts = None
    sequence_started = False
    for packet in trace.packet:
        if packet.HasField("track_descriptor"):
            d = packet.track_descriptor
            assert d.uuid and d.uuid not in out.tracks, f"track {d.uuid} described twice"
            if d.HasField("parent_uuid"):
                assert d.parent_uuid in out.tracks, f"parent of {d.uuid} not described first"
            out.tracks[d.uuid] = d
            continue
        if packet.HasField("interned_data"):
            assert packet.sequence_flags & pb.TracePacket.SEQ_INCREMENTAL_STATE_CLEARED
            sequence_started = True
            names.update({n.iid: n.name for n in packet.interned_data.event_names})
            cats.update({n.iid: n.name for n in packet.interned_data.event_categories})
            args.update({n.iid: n.name for n in packet.interned_data.debug_annotation_names})
            assert 0 not in names and 0 not in cats
            continue
        assert packet.HasField("track_event"), packet
        assert sequence_started, "an event before the interned names"
        assert packet.sequence_flags == pb.TracePacket.SEQ_NEEDS_INCREMENTAL_STATE
        assert packet.trusted_packet_sequence_id == 1
        e, ts = packet.track_event, packet.timestamp
        assert last_ts is None or ts >= last_ts, "packets out of time order"
        last_ts = ts
        assert e.track_uuid in out.tracks, f"event on undescribed track {e.track_uuid}"
        track = out.tracks[e.track_uuid]
        for a in e.debug_annotations:
            assert a.name_iid in args
        if e.type == COUNTER:
            assert track.HasField("counter")
            out.counters.setdefault(e.track_uuid, []).append((ts, e.counter_value))
            continue
        assert not track.HasField("counter")
        if e.type == END:
            assert stacks[e.track_uuid], f"an END with no open slice on {e.track_uuid} at {ts}"
            cat, name, start = stacks[e.track_uuid].pop()
            assert ts >= start
            out.slices.append((cat, name, e.track_uuid, start, ts - start))
            continue
        cat, name = cats[e.category_iids[0]], names[e.name_iid]
        where = "slice" if e.type == BEGIN else "instant"
        for flow in e.flow_ids:
            out.flows.setdefault(flow, []).append(("out", ts))
        for flow in e.terminating_flow_ids:
            out.flows.setdefault(flow, []).append(("in", ts))
        if e.type == BEGIN:
            stacks[e.track_uuid].append((cat, name, ts))
        else:
            assert e.type == INSTANT, where
            out.instants.append((cat, name, e.track_uuid, ts))
    open_slices = {k: v for k, v in stacks.items() if v}
    assert not open_slices, f"slices never closed: {open_slices}"
    for flow, ends in out.flows.items():
        kinds = sorted(k for k, _ in ends)
        assert kinds == ["in", "out"], f"flow {flow} has {kinds}"
        t_out = next(t for k, t in ends if k == "out")
        t_in = next(t for k, t in ends if k == "in")
        assert t_out <= t_in, f"flow {flow} goes back in time"
    return out


def check_against_analyses(read: Read, trace_dir: Path) -> None:
    """Every count and duration in the timeline is the analyses' own."""
    events = open_trace(trace_dir).events
    ex = exits(events)
    paired = ex.filter(pl.col("entry_ts_ns").is_not_null())
    assert read.count("exit") == paired.height
    assert read.durations("exit") == sorted(paired.get_column("duration_ns").to_list())
    assert read.instants_of("exit") == ex.height - paired.height
    user = user_exits(events)
    assert read.count("user-space") + read.instants_of("user-space") == user.height
    reqs = requests(events)
    assert read.count("request") == reqs.height
    done = reqs.filter(pl.col("complete_ts_ns").is_not_null())
    want = done.select(
        pl.col("complete_ts_ns") - pl.coalesce("kick_ts_ns", "pop_ts_ns")
    ).to_series()
    got = sorted(x[4] for x in read.slices if x[1] == "request")
    assert got == sorted(want.to_list())
    assert read.instants_of("pop") == reqs.height
    k = kicks(events)
    assert read.instants_of("kick") == k.height
    assert read.instants_of("interrupt") == interrupts(events).height
    kvm_kicks = k.filter(pl.col("source") == "kvm").height
    assert read.instants_of("access") == accesses(events).height - kvm_kicks
    # Ring occupancy ends where the requests left it: those never completed.
    occupancy = [v for uuid, v in read.counters.items() if "occupancy" in read.tracks[uuid].name]
    assert sum(values[-1][1] for values in occupancy) == reqs.height - done.height


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Read]]:
    out = tmp_path_factory.mktemp("perfetto")
    made = {}
    for name in SHIPPED:
        path = out / f"{name}.pftrace"
        export_perfetto(ROOT / "traces" / name, path)
        made[name] = (path, read_timeline(path))
    return made


def test_the_shipped_traces_are_there():
    # They are in git: a missing one is a broken checkout, not a reason to skip.
    assert len(SHIPPED) >= 10, SHIPPED
    assert {"lab-emulated", "lab-virtio-b8", "qemu-ide", "qemu-virtio-blk-qd1"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_trace_exports_what_its_analyses_count(exported, name: str):
    _, read = exported[name]
    check_against_analyses(read, ROOT / "traces" / name)


def test_a_virtio_timeline_has_requests_passes_flows_and_counters(exported):
    _, read = exported["qemu-virtio-blk-qd16"]
    names = read.track_names()
    assert "QEMU" in names and "back end" in " ".join(names)
    assert any(n.startswith("requests: virtio-blk queue 0") for n in names)
    assert any(n.startswith("ring occupancy: virtio-blk queue 0") for n in names)
    assert any(n.startswith("kicks/s: virtio_queue_notify virtio-blk queue 0") for n in names)
    assert read.count("pass") > 0 and read.flows
    # 16 requests in flight at once: as many request tracks of one name, merged in the UI.
    lanes = Counter(n for n in names if n.startswith("requests:"))
    assert max(lanes.values()) >= 16
    occupancy = next(v for u, v in read.counters.items() if "occupancy" in read.tracks[u].name)
    assert max(value for _, value in occupancy) == 16


def test_the_lab_timeline_links_kicks_to_passes_and_completions_to_the_irqfd(exported):
    _, read = exported["lab-virtio-b8-irq"]
    names = read.track_names()
    assert "lab VMM" in names and "interrupt injection" in names
    # Every pass after a guest kick, every interrupt raised after a completion.
    passes = read.count("pass")
    assert passes and len(read.flows) > passes  # kick->pass and completion->interrupt


def test_an_emulated_trace_has_accesses_and_interrupts_only(exported):
    _, read = exported["qemu-ide"]
    assert read.instants_of("access") == 26624
    assert read.count("request") == read.count("pass") == 0 and not read.flows


# --- a trace with exits (hardware virtualisation), made here ------------------------------


def _event(ts: int, event: str, tid: int, **cols) -> dict:
    return {"ts_ns": ts, "source": cols.pop("source", "kvm"), "event": event, "pid": 100,
            "tid": tid, **cols}  # fmt: skip


def hardware_events() -> pl.DataFrame:
    """Two vCPUs exiting (PIO to user space, an ioeventfd kick, HLT, a lost entry, an exit of
    no duration) and a QEMU iothread serving two queues with requests in flight together."""
    rows = []
    for vcpu, tid in ((0, 11), (1, 12)):
        o = vcpu * 7

        def ex(ts, reason, name, tid=tid, vcpu=vcpu, o=o):
            return _event(ts + o, s.KVM_EXIT, tid, vcpu=vcpu, reason=reason, reason_name=name)

        def en(ts, tid=tid, vcpu=vcpu, o=o):
            return _event(ts + o, s.KVM_ENTRY, tid, vcpu=vcpu)

        rows += [
            ex(1_000, 30, "IO_INSTRUCTION"),
            _event(1_100 + o, s.KVM_PIO, tid, vcpu=vcpu, addr=0x1F7, size=1, write=True, value=1),
            _event(1_200 + o, s.KVM_USERSPACE_EXIT, tid, vcpu=vcpu, reason=2, reason_name="KVM_EXIT_IO"),
            en(5_000),
            ex(6_000, 30, "IO_INSTRUCTION"),
            _event(6_100 + o, s.KVM_PIO, tid, vcpu=vcpu, addr=0xC050, size=2, write=True, value=0),
            en(6_500),
            ex(7_000, 12, "HLT"),
            en(7_000),  # an exit of no duration
            ex(8_000, 1, "EXTERNAL_INTERRUPT"),
            ex(9_000, 12, "HLT"),  # the entry of the one before was lost
            en(9_800),
            _event(9_900 + o, s.KVM_INJ_VIRQ, tid, vcpu=vcpu, value=33),
        ]  # fmt: skip
    io = 20
    for q in (0, 1):
        t = 6_600 + q * 50
        rows += [
            _event(t, s.VIRTIO_QUEUE_NOTIFY, io, source="qemu", device="virtio-blk", queue=q),
            _event(t + 10, s.VIRTQUEUE_POP, io, source="qemu", device="virtio-blk", queue=q),
            _event(t + 20, s.VIRTQUEUE_POP, io, source="qemu", device="virtio-blk", queue=q),
        ]
    rows += [
        _event(8_500, s.VIRTQUEUE_FLUSH, io, source="qemu", device="virtio-blk", queue=0, count=2),
        _event(8_510, s.VIRTIO_NOTIFY_IRQFD, io, source="qemu", device="virtio-blk", queue=0),
        _event(8_600, s.VIRTQUEUE_FLUSH, io, source="qemu", device="virtio-blk", queue=1, count=1),
        _event(8_700, s.VIRTQUEUE_POP, io, source="qemu", device="virtio-blk", queue=1),
        _event(9_200, s.KVM_MSI_SET_IRQ, 30, addr=0xFEE00000, value=33),
    ]  # fmt: skip
    return s.conform(pl.DataFrame(rows, infer_schema_length=None)).sort("ts_ns")


def test_a_trace_with_exits_gets_nested_exit_and_user_space_slices(tmp_path: Path):
    trace = write_trace(tmp_path / "hw", hardware_events(), {"importer": "test"})
    out = tmp_path / "hw.pftrace"
    result = export_perfetto(trace.path, out)
    read = read_timeline(out)
    check_against_analyses(read, trace.path)
    assert read.count("exit") == 8 and read.instants_of("exit") == 2
    assert read.count("user-space") == 2
    # The user-space handling sits inside its exit and ends with it.
    for vcpu in (0, 1):
        o = vcpu * 7
        assert ("exit", "IO_INSTRUCTION", 1_000 + o, 4_000) in {
            (c, n, st, d) for c, n, _, st, d in read.slices
        }
        assert ("user-space", "user space: KVM_EXIT_IO", 1_200 + o, 3_800) in {
            (c, n, st, d) for c, n, _, st, d in read.slices
        }
    names = read.track_names()
    assert {"vCPU 0", "vCPU 1", "back end"} <= set(names)
    # Kick -> pass: the guest's ioeventfd write on a vCPU thread woke the iothread's pass.
    assert read.count("pass") == 3 and len(read.flows) >= 2
    # Two requests of queue 0 and two of queue 1 overlap: two lanes each.
    assert Counter(n for n in names if n.startswith("requests:")) == {
        "requests: virtio-blk queue 0": 2,
        "requests: virtio-blk queue 1": 2,
    }
    assert read.count("request") == 5
    assert result.counts["exit slices"] == 8 and result.bytes == out.stat().st_size


def test_an_empty_trace_exports_an_empty_timeline(tmp_path: Path):
    trace = write_trace(tmp_path / "empty", s.empty_events(), {"importer": "test"})
    export_perfetto(trace.path, tmp_path / "empty.pftrace")
    read = read_timeline(tmp_path / "empty.pftrace")
    assert not read.slices and not read.instants and not read.tracks


# --- the command ---------------------------------------------------------------------------


def _vtrace(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vtrace.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_the_command_writes_the_file_and_says_what_is_in_it(tmp_path: Path):
    out = tmp_path / "t.pftrace"
    proc = _vtrace("export", "perfetto", str(ROOT / "traces" / "lab-virtio-b8"), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout and "request slices" in proc.stdout
    assert "ui.perfetto.dev" in proc.stdout
    read_timeline(out)


def test_an_existing_output_is_one_line_and_kept_unless_forced(tmp_path: Path):
    out = tmp_path / "t.pftrace"
    out.write_bytes(b"mine")
    trace = str(ROOT / "traces" / "lab-virtio-b8")
    proc = _vtrace("export", "perfetto", trace, "-o", str(out))
    assert proc.returncode == 2 and "--force" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert out.read_bytes() == b"mine"
    assert _vtrace("export", "perfetto", trace, "-o", str(out), "--force").returncode == 0
    read_timeline(out)


def test_a_directory_that_is_not_a_trace_is_one_line_and_no_output(tmp_path: Path):
    out = tmp_path / "t.pftrace"
    proc = _vtrace("export", "perfetto", str(tmp_path), "-o", str(out))
    assert proc.returncode == 2 and "meta.json" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()
    assert not list(tmp_path.glob(".t.pftrace*"))
