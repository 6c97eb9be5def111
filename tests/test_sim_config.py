"""Model configs: every shipped model loads, bad files and overrides fail on one line."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtrace.errors import VtraceError
from vtrace.sim.config import (
    ACCESS_KEYS,
    KIND_TABLES,
    SCHEMA,
    load_config,
    model_names,
    value_range,
)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = [
    "lab-emulated", "lab-virtio", "ide-emulated", "virtio-blk", "e1000-emulated",
    "virtio-net", "vhost-net", "mm1", "md1", "mm1k",
]  # fmt: skip


def test_every_required_model_ships() -> None:
    assert set(SHIPPED) <= set(model_names())


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_loads_and_documents_every_value(name: str) -> None:
    cfg = load_config(name)
    text = (ROOT / "models").joinpath(
        *(["reference"] if cfg.kind == "queue" else [])
    ) / f"{name}.toml"
    lines = text.read_text().splitlines()
    # every `key = value` line carries a comment, or the comment line right above explains it
    for i, line in enumerate(lines):
        if re.match(r"^[a-z_]+ = ", line):
            assert "#" in line or lines[i - 1].lstrip().startswith("#"), f"{text}:{i + 1}: {line}"


def test_every_parameter_has_a_unit_or_is_unitless_by_nature() -> None:
    unitless = {
        "kind", "description", "arrivals", "queue_depth", "requests", "seed", "warmup_requests",
        "ring_size", "descs_per_request", "event_idx", "batch", "batch_policy", "kick_handler",
        "whole_batches", "thread", "service_distribution", "max_outstanding", "accesses",
        "coalesce_requests", "capacity", "completion", "publish", "stall_probability",
        "service_cv", "service_trace", "servers", "vcpus", "jobs", "submit", "queues", "threads",
        "mode", "max_per_pass", "dispatch_splits", "host_cpus", "wakeup_cpu_share", "avail_event",
        "holds_kicks", "preempt_share", "slow_share", "slow_factor",
    }  # fmt: skip
    for table in SCHEMA.values():
        for key in table:
            assert key in unitless or key.endswith(("_ns", "_bytes", "_per_s")), key


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "m.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[model]\nkind = "virtio"\n[virtqueue]\nring_sise = 8\n', "virtqueue.ring_sise: unknown key"),
        ('[model]\nkind = "virtio"\n[virtqueue]\nring_size = "8"\n', "virtqueue.ring_size: expected integer"),
        ('[model]\nkind = "virtio"\n[virtqueue]\nring_size = 100\n', "virtqueue.ring_size: must be a power of two"),
        ('[model]\nkind = "virtio"\n[kvm]\nuserspace_exit_ns = -5.0\n', "kvm.userspace_exit_ns: must not be negative"),
        ('[model]\nkind = "virtio"\n[vcpu]\nrequest_prep_ns = true\n', "vcpu.request_prep_ns: expected number"),
        ('[model]\nkind = "emulated"\n[virtqueue]\nbatch = 2\n', "virtqueue: unknown table for a emulated model"),
        ('[model]\nkind = "virtio"\n[virtqueue]\nbatch_policy = "sometimes"\n', "virtqueue.batch_policy: must be one of"),
        ('[model]\nkind = "emulated"\n[device]\naccesses = [{ register = "x", handler = "qemu" }]\n', "device.accesses[0].handler"),
        ('[model]\nkind = "virtio"\n[kvm\n', "m.toml: "),
        ('[model]\nkind = "queue"\n[queue]\narrival_rate_per_s = 1.0\n', "set exactly one of"),
    ],
)  # fmt: skip
def test_bad_file_is_one_line_naming_file_and_key(tmp_path: Path, body: str, message: str) -> None:
    p = _write(tmp_path, body)
    with pytest.raises(VtraceError) as err:
        load_config(p)
    text = str(err.value)
    assert message in text and str(p) in text and "\n" not in text


def test_set_overrides_dotted_and_bare_keys() -> None:
    cfg = load_config("virtio-blk", ["virtqueue.batch=4", "ring_size=64", "event_idx=false"])
    assert cfg["virtqueue.batch"] == 4 and cfg["virtqueue.ring_size"] == 64
    assert cfg["virtqueue.event_idx"] is False
    assert cfg.overrides == {
        "virtqueue.batch": 4,
        "virtqueue.ring_size": 64,
        "virtqueue.event_idx": False,
    }
    q = load_config("mm1", ["arrival_rate_per_s=70000"])  # [queue] wins for a reference queue
    assert q["queue.arrival_rate_per_s"] == 70000.0


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("virtqueue.bach=4", "virtqueue.bach: unknown key"),
        ("service_ns=-1", "device.service_ns: must not be negative"),
        ("ring_size=48", "must be a power of two"),
        ("per_request_ns", "expected key=value"),
        ("request_prep_ns=fast", "expected number"),
    ],
)
def test_bad_set_is_one_line(item: str, message: str) -> None:
    with pytest.raises(VtraceError, match=re.escape(message)):
        load_config("virtio-blk", [item])


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=-4, max_value=1 << 16))
def test_ring_size_accepted_exactly_when_a_power_of_two(n: int) -> None:
    # virtio-blk takes 3 descriptors per request; virtio 1.x rings hold at most 32768
    ok = n & (n - 1) == 0 and 3 <= n <= 32768
    try:
        load_config("virtio-blk", {"virtqueue.ring_size": n})
    except VtraceError as e:
        assert not ok, str(e)
    else:
        assert ok


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(sorted(k for k in SCHEMA["kvm"])), st.floats(allow_nan=False))
def test_exit_costs_reject_negative_values(key: str, value: float) -> None:
    try:
        cfg = load_config("lab-virtio", {f"kvm.{key}": value})
    except VtraceError as e:
        assert not 0 <= value <= 3.6e12, str(e)  # at most an hour
    else:
        assert cfg[f"kvm.{key}"] == value >= 0


def test_cli_bad_model_is_one_line_exit_2(tmp_path: Path) -> None:
    p = _write(tmp_path, '[model]\nkind = "virtio"\n[virtqueue]\nring_size = 12\n')
    r = subprocess.run(
        [sys.executable, "-m", "vtrace.cli", "replay", "--model", str(p), "--json"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.strip().count("\n") == 0
    assert "virtqueue.ring_size: must be a power of two" in r.stderr


# --- ranges: every number has a minimum and a maximum, with the reason -----------------------

# A model of each kind, to override keys of the tables that kind reads.
KIND_MODELS = {"virtio": "virtio-blk", "emulated": "lab-emulated", "queue": "mm1"}
NUMERIC = sorted(
    f"{table}.{key}"
    for table, params in SCHEMA.items()
    for key, p in params.items()
    if p.kind in (int, float)
)


def _model_for(dotted: str) -> str:
    table = dotted.split(".", 1)[0]
    return next(KIND_MODELS[k] for k, tables in KIND_TABLES.items() if table in tables)


def test_every_number_has_a_range_and_a_reason() -> None:
    for dotted in NUMERIC:
        table, key = dotted.split(".", 1)
        lo, hi, why = value_range(key, SCHEMA[table][key])
        assert math.isfinite(lo) and math.isfinite(hi) and lo < hi, dotted
        assert len(why) > 10, dotted
    for key, p in ACCESS_KEYS.items():
        if p.kind in (int, float):
            assert value_range(key, p)[2]


@st.composite
def _out_of_range(draw: st.DrawFn) -> tuple[str, float | int]:
    dotted = draw(st.sampled_from(NUMERIC))
    table, key = dotted.split(".", 1)
    p = SCHEMA[table][key]
    lo, hi, _ = value_range(key, p)
    if p.kind is int:
        below = st.integers(max_value=math.ceil(lo) - 1, min_value=-(1 << 70))
        above = st.integers(min_value=math.floor(hi) + 1, max_value=1 << 70)
    else:
        below = st.floats(max_value=lo, exclude_max=True, allow_nan=False, allow_infinity=False)
        above = st.floats(min_value=hi, exclude_min=True, allow_nan=False, allow_infinity=False)
    return dotted, draw(st.one_of(below, above))


_BASES: dict[str, Any] = {}


@settings(max_examples=300, deadline=None)
@given(_out_of_range())
def test_any_value_outside_its_range_is_one_line_naming_the_key(case: tuple[str, Any]) -> None:
    dotted, value = case
    model = _model_for(dotted)
    base = _BASES.get(model) or _BASES.setdefault(model, load_config(model))
    with pytest.raises(VtraceError) as err:
        base.with_overrides({dotted: value})
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"--set: {dotted}: must "), text


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("workload.warmup_requests=-5", "workload.warmup_requests: must not be negative"),
        ("seed=-1", "workload.seed: must not be negative"),
        ("ring_size=4611686018427387904", "virtqueue.ring_size: must be at most 32768"),
        ("request_bytes=-1", "workload.request_bytes: must not be negative"),
        ("stall_probability=1.5", "backend.stall_probability: must be at most 1"),
        ("warmup_requests=20000", "workload.warmup_requests: must be below workload.requests"),
        ("model.kind=queue", "model.kind: a virtio model cannot become a queue model"),
    ],
)
def test_reported_bad_values_are_one_line(item: str, message: str) -> None:
    with pytest.raises(VtraceError, match=re.escape(message)):
        load_config("virtio-blk", [item])


def test_set_kind_to_its_own_kind_is_accepted() -> None:
    assert load_config("virtio-blk", ["model.kind=virtio"]).kind == "virtio"


def test_an_access_count_outside_its_range_names_the_access(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        '[model]\nkind = "emulated"\n[device]\naccesses = [{ register = "x", count = 1_000_000 }]\n',
    )
    with pytest.raises(VtraceError, match=r"device\.accesses\[0\]\.count: must be at most"):
        load_config(p)


def test_a_file_that_is_not_utf8_is_one_line_naming_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "latin1.toml"
    p.write_bytes(b'[model]\nkind = "virtio"\ndescription = "caf\xe9"\n')
    with pytest.raises(VtraceError) as err:
        load_config(p)
    assert str(err.value) == f"{p}: line 3: not UTF-8 text (byte 0xe9)"


def test_set_value_with_a_newline_is_a_string_not_two_keys() -> None:
    with pytest.raises(VtraceError, match="expected integer"):
        load_config("virtio-blk", ["seed=1\nrequests=5"])


@pytest.mark.parametrize(
    "args",
    [
        ["--set", "seed=-1"],
        ["--set", "model.kind=queue"],
        ["--seed", "-1"],
        ["--requests", "0"],
    ],
)
def test_cli_bad_values_are_one_line_exit_2(args: list[str]) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "vtrace.cli", "replay", "--model", "virtio-blk", *args],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("vtrace: error: "), r.stderr
