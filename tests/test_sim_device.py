"""The device's service laws: deterministic, exponential, lognormal and empirical (a trace's
measured durations), their keys' checks, and the reference queue's laws."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from vtrace import open_trace
from vtrace.analyze import requests
from vtrace.errors import VtraceError
from vtrace.sim import load_config, simulate
from vtrace.sim.device import service_sampler, service_times_ns

ROOT = Path(__file__).resolve().parent.parent
QD16 = ROOT / "traces" / "qemu-virtio-blk-qd16"
LAB_B8 = ROOT / "traces" / "lab-virtio-b8"


def device(**overrides: object) -> dict[str, object]:
    """virtio-blk's device with ``overrides`` and no per-byte cost unless one is given."""
    return {"device.per_byte_ns": 0.0, **{f"device.{k}": v for k, v in overrides.items()}}


def draws(model: str, overrides: dict[str, object], n: int, seed: int = 7) -> np.ndarray:
    return service_sampler(load_config(model, overrides), np.random.default_rng(seed))(n)


def measured_ns(trace: Path) -> np.ndarray:
    """What the analysis measured per request: pop to completion on the same queue."""
    return requests(open_trace(trace).events)["latency_ns"].drop_nulls().to_numpy()


@pytest.mark.parametrize(("mean", "cv"), [(20_000.0, 0.5), (20_000.0, 1.0), (5_000.0, 1.5)])
def test_lognormal_has_the_mean_and_cv_asked_for(mean: float, cv: float) -> None:
    x = draws("virtio-blk", device(service_distribution="lognormal", service_ns=mean,
                                   service_cv=cv), 200_000)  # fmt: skip
    assert x.min() > 0
    assert x.mean() == pytest.approx(mean, rel=0.02)
    assert x.std() / x.mean() == pytest.approx(cv, rel=0.05)
    # the law itself, not just two moments: log-draws are normal with sigma^2 = ln(1 + cv^2)
    assert np.log(x).std() == pytest.approx(np.sqrt(np.log1p(cv * cv)), rel=0.01)


def test_per_byte_cost_is_added_to_every_draw() -> None:
    per_byte = {"device.per_byte_ns": 0.5, "workload.request_bytes": 4096}
    base = draws("virtio-blk", device(service_distribution="lognormal", service_cv=0.8), 1000)
    more = draws("virtio-blk", {**device(service_distribution="lognormal", service_cv=0.8),
                                **per_byte}, 1000)  # fmt: skip
    np.testing.assert_allclose(more - base, 2048.0)


def test_exponential_and_deterministic_draw_what_they_always_did() -> None:
    """The same seed gives the same service times as before the laws were added, so runs
    of the shipped models do not change."""
    cfg = load_config("virtio-blk", {"device.service_distribution": "exponential"})
    d = cfg.values["device"]
    fixed = d["per_byte_ns"] * cfg["workload.request_bytes"]
    got = service_times_ns(cfg, np.random.default_rng(3), 500)
    np.testing.assert_array_equal(got, np.random.default_rng(3).exponential(d["service_ns"], 500)
                                  + fixed)  # fmt: skip
    rng = np.random.default_rng(3)
    det = service_times_ns(load_config("virtio-net"), rng, 4)
    assert len(set(det)) == 1 and rng.random() == np.random.default_rng(3).random()  # no draw
    mm1 = service_times_ns(load_config("mm1"), np.random.default_rng(3), 5)
    np.testing.assert_array_equal(mm1, np.random.default_rng(3).exponential(10_000.0, 5))
    assert service_times_ns(load_config("md1"), np.random.default_rng(3), 3) == [10_000.0] * 3


@pytest.mark.parametrize(
    "overrides",
    [
        device(service_distribution="exponential"),
        device(service_distribution="lognormal", service_cv=2.0),
        device(service_distribution="empirical", service_trace=str(LAB_B8)),
    ],
)
def test_drawing_in_chunks_gives_the_same_times(overrides: dict[str, object]) -> None:
    """The engine may draw service times a chunk at a time: the run stays the same."""
    cfg = load_config("virtio-blk", overrides)
    whole = service_sampler(cfg, np.random.default_rng(11))(3000)
    draw = service_sampler(cfg, np.random.default_rng(11))
    chunks = np.concatenate([draw(1), draw(999), draw(2000)])
    assert whole.dtype == np.float64
    np.testing.assert_array_equal(whole, chunks)


@pytest.mark.parametrize("trace", [QD16, LAB_B8], ids=lambda p: p.name)
def test_empirical_draws_only_the_durations_the_trace_measured(trace: Path) -> None:
    measured = measured_ns(trace)
    x = draws("virtio-blk", device(service_distribution="empirical",
                                   service_trace=str(trace)), 200_000)  # fmt: skip
    assert set(np.unique(x)) <= set(measured.astype(float))
    # drawn with replacement as given: every measured value shows up, none scaled
    assert len(np.unique(x)) == len(np.unique(measured))
    assert x.mean() == pytest.approx(measured.mean(), rel=0.02)


def test_empirical_qemu_durations_are_pop_to_flush() -> None:
    """Independent of the analysis: at queue depth 16 QEMU took 110 to 112 us from a pop to
    the flush that completed it (each request's virtqueue_fill comes 1-2 us before)."""
    x = draws("virtio-blk", device(service_distribution="empirical",
                                   service_trace=str(QD16)), 50_000)  # fmt: skip
    assert 105_000 < x.mean() < 118_000 and x.min() >= 17_000


def test_empirical_adds_the_per_byte_cost_and_takes_a_path_from_here(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(ROOT)
    overrides = device(service_distribution="empirical", service_trace="traces/lab-virtio-b8",
                       per_byte_ns=0.25)  # fmt: skip
    x = draws("virtio-blk", {**overrides, "workload.request_bytes": 4000}, 5000)
    assert set(np.unique(x - 1000.0)) <= set(measured_ns(LAB_B8).astype(float))


def test_a_run_with_an_empirical_device_serves_at_the_trace_pace() -> None:
    """virtio-blk with the lab's batch-8 durations as its device: no request is served faster
    than the fastest the trace measured (virtio-blk's own exponential law would serve some in
    a few ns)."""
    overrides = {**device(service_distribution="empirical", service_trace=str(LAB_B8)),
                 "workload.requests": 4000}  # fmt: skip
    cfg = load_config("virtio-blk", overrides)
    result = simulate(cfg)
    assert result.summary["completed"] == 4000
    served = result.requests["complete_ns"] - result.requests["start_ns"]
    assert served.min() >= measured_ns(LAB_B8).min()


def test_a_rewritten_trace_is_read_again(tmp_path: Path) -> None:
    trace = tmp_path / "t"
    shutil.copytree(LAB_B8, trace)
    overrides = device(service_distribution="empirical", service_trace=str(trace))
    before = draws("virtio-blk", overrides, 1000)
    events = open_trace(LAB_B8).events.collect()
    slower = events.with_columns(
        pl.when(pl.col("event").cast(pl.String) == "lab_complete")
        .then(pl.col("ts_ns") + 1_000_000)
        .otherwise(pl.col("ts_ns"))
        .alias("ts_ns")
    )
    from vtrace.store import write_trace

    shutil.rmtree(trace)
    write_trace(trace, slower, {"source": "test"})
    after = draws("virtio-blk", overrides, 1000)
    assert after.min() > before.max() - 1 and after.mean() > before.mean() + 900_000


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (device(service_distribution="empirical"),
         "device.service_trace: an empirical service law needs a trace directory"),
        (device(service_distribution="empirical", service_trace="/no/such/trace"),
         "device.service_trace: /no/such/trace: no such trace directory"),
        (device(service_distribution="empirical", service_trace=str(ROOT / "models")),
         "device.service_trace: " + str(ROOT / "models" / "meta.json") + ": missing"),
        (device(service_distribution="empirical", service_trace=str(ROOT / "traces/qemu-ide")),
         f"device.service_trace: {ROOT / 'traces/qemu-ide'}: no request durations"),
        (device(service_distribution="lognormal", service_cv=0.0),
         "device.service_cv: a lognormal service needs a value > 0"),
        (device(service_cv=-1.0), "device.service_cv: must not be negative"),
    ],
)  # fmt: skip
def test_bad_device_law_is_one_line_naming_the_key(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(VtraceError) as e:
        load_config("virtio-blk", overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_trace_in_a_model_file_names_the_file(tmp_path: Path) -> None:
    model = tmp_path / "m.toml"
    model.write_text(
        '[model]\nkind = "emulated"\n\n[device]\nservice_distribution = "empirical"\n'
        f'service_trace = "{tmp_path / "nope"}"\n'
    )
    with pytest.raises(VtraceError) as e:
        load_config(model)
    assert str(e.value) == (
        f"{model}: device.service_trace: {tmp_path / 'nope'}: no such trace directory"
    )


def test_cli_bad_trace_is_one_line_and_no_output() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "vtrace.cli", "replay", "--model", "virtio-blk", "--json",
         "--set", "device.service_distribution=empirical",
         "--set", "device.service_trace=traces/none"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == (
        "vtrace: error: --set: device.service_trace: traces/none: no such trace directory"
    )


# --- the reference queue's laws ----------------------------------------------------------------


def test_queue_lognormal_has_its_mean_and_cv() -> None:
    x = draws("mg1-lognormal", {"queue.service_cv": 0.7}, 200_000)
    assert x.mean() == pytest.approx(10_000.0, rel=0.02)
    assert x.std() / x.mean() == pytest.approx(0.7, rel=0.05)


def test_queue_laws_by_name_and_the_older_keys() -> None:
    det = draws("mm1", {"queue.service_distribution": "deterministic"}, 10)
    assert det.tolist() == [10_000.0] * 10  # the mean of service_mean_ns, every time
    assert (
        draws("md1", {"queue.service_distribution": "deterministic"}, 3).tolist() == [10_000.0] * 3
    )
    assert load_config("mmc")["queue.servers"] == 4
    assert load_config("mm1")["queue.servers"] == 1


@pytest.mark.parametrize(
    ("model", "overrides", "message"),
    [
        ("md1", {"queue.service_distribution": "lognormal"},
         "queue.service_ns: a deterministic service; give the mean of a lognormal service in "
         "queue.service_mean_ns"),
        ("mg1-lognormal", {"queue.service_cv": 0.0},
         "queue.service_cv: a lognormal service needs a value > 0"),
        ("mmc", {"queue.capacity": 2},
         "queue.capacity: 2 is below queue.servers 4"),
        ("mm1", {"queue.servers": 0}, "queue.servers: must be at least 1"),
        ("mm1", {"queue.service_distribution": "empirical"},
         "queue.service_distribution: must be one of auto, exponential, deterministic, "
         "lognormal"),
    ],
)  # fmt: skip
def test_bad_queue_law_is_one_line_naming_the_key(
    model: str, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(VtraceError) as e:
        load_config(model, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)
