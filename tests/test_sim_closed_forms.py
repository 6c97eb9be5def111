"""The engine against queueing theory: M/M/1, M/D/1 and M/G/1 with lognormal service
(Pollaczek-Khinchine), M/M/c (Erlang C), M/M/1/K, Little.

Each estimate comes with a 99 % confidence interval from batch means (20 batches of one
long run after a warm-up); the closed form must fall inside it, and the interval must be
narrow enough (a few percent) for the check to mean something.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from vtrace.sim import load_config, simulate

T_99_19 = 2.861  # Student t, 99 % two-sided, 19 degrees of freedom
BATCHES = 20


def batch_means_ci(values: np.ndarray) -> tuple[float, float]:
    """Mean and 99 % half-width from ``BATCHES`` contiguous batch means."""
    usable = values[: len(values) // BATCHES * BATCHES].reshape(BATCHES, -1).mean(axis=1)
    return float(usable.mean()), T_99_19 * float(usable.std(ddof=1)) / np.sqrt(BATCHES)


def run_queue(name: str, rho: float, requests: int, **extra: float) -> pl.DataFrame:
    service_key = "queue.service_ns" if name == "md1" else "queue.service_mean_ns"
    overrides = {
        "queue.arrival_rate_per_s": rho * 1e5,  # service 10 us: mu = 100,000 per s
        service_key: 10_000.0,
        "workload.requests": requests,
        "workload.warmup_requests": 2000,
        **extra,
    }
    result = simulate(load_config(name, overrides))
    return result.requests.slice(2000)


@pytest.mark.parametrize("rho", [0.3, 0.5, 0.7])
def test_mm1_mean_sojourn(rho: float) -> None:
    frame = run_queue("mm1", rho, 42_000 if rho < 0.7 else 82_000)
    mean, half = batch_means_ci(frame["latency_ns"].to_numpy())
    expected = 10_000.0 / (1 - rho)  # W = 1 / (mu - lambda)
    assert half < 0.08 * expected
    assert abs(mean - expected) <= half, (mean, expected, half)


@pytest.mark.parametrize("rho", [0.3, 0.5, 0.8])
def test_md1_mean_sojourn_pollaczek_khinchine(rho: float) -> None:
    frame = run_queue("md1", rho, 42_000)
    mean, half = batch_means_ci(frame["latency_ns"].to_numpy())
    s = 10_000.0
    expected = s + rho * s / (2 * (1 - rho))  # P-K with a deterministic service time
    assert half < 0.08 * expected
    assert abs(mean - expected) <= half, (mean, expected, half)


@pytest.mark.parametrize(
    ("rho", "cv", "requests"), [(0.5, 0.5, 150_000), (0.7, 0.5, 300_000), (0.3, 1.2, 250_000)]
)
def test_mg1_lognormal_mean_sojourn_pollaczek_khinchine(
    rho: float, cv: float, requests: int
) -> None:
    """P-K holds for any service law with mean S and coefficient of variation cv; a lognormal
    one's heavy tail makes the wait noisy, so the runs are long and the loads moderate."""
    frame = run_queue("mg1-lognormal", rho, requests, **{"queue.service_cv": cv})
    mean, half = batch_means_ci(frame["latency_ns"].to_numpy())
    s = 10_000.0
    expected = s + rho * s * (1 + cv**2) / (2 * (1 - rho))
    assert half < 0.03 * expected
    assert abs(mean - expected) <= min(half, 0.03 * expected), (mean, expected, half)


def erlang_c(c: int, a: float) -> float:
    """Probability that an arrival waits in an M/M/c queue with offered load ``a`` (< c)."""
    top = a**c / math.factorial(c) * c / (c - a)
    return top / (sum(a**k / math.factorial(k) for k in range(c)) + top)


@pytest.mark.parametrize(
    ("c", "rho", "requests"), [(2, 0.5, 200_000), (4, 0.7, 300_000), (8, 0.7, 200_000)]
)
def test_mmc_waiting_probability_and_mean_sojourn_erlang_c(
    c: int, rho: float, requests: int
) -> None:
    """Erlang C: the share of customers that wait, the mean wait Wq = C / (c mu - lambda)
    and the mean sojourn W = Wq + 1 / mu."""
    # run_queue's rate is its load times mu: an offered load a = rho * c gives lambda.
    frame = run_queue("mmc", rho * c, requests, **{"queue.servers": c})
    s, mu, lam = 10_000.0, 1e5, rho * c * 1e5
    wait_share = erlang_c(c, rho * c)
    expected = wait_share / (c * mu - lam) * 1e9 + s
    mean, half = batch_means_ci(frame["latency_ns"].to_numpy())
    assert half < 0.03 * expected
    assert abs(mean - expected) <= min(half, 0.03 * expected), (mean, expected, half)
    waited = (frame["start_ns"] > frame["submit_ns"]).cast(pl.Float64).to_numpy()
    share, share_half = batch_means_ci(waited)
    assert share_half < 0.1 * wait_share
    assert abs(share - wait_share) <= share_half, (share, wait_share, share_half)
    # the wait alone is noisier (most customers wait 0): its interval is wider
    wait, wait_half = batch_means_ci((frame["start_ns"] - frame["submit_ns"]).to_numpy())
    assert wait_half < 0.2 * (expected - s)
    assert abs(wait - (expected - s)) <= wait_half, (wait, expected - s, wait_half)


@pytest.mark.parametrize(("rho", "k"), [(0.5, 3), (0.8, 5), (1.2, 5)])
def test_mm1k_blocking_probability(rho: float, k: int) -> None:
    frame = run_queue("mm1k", rho, 42_000, **{"queue.capacity": k})
    mean, half = batch_means_ci(frame["dropped"].cast(pl.Float64).to_numpy())
    expected = (1 - rho) * rho**k / (1 - rho ** (k + 1))
    assert half < 0.2 * expected
    assert abs(mean - expected) <= half, (mean, expected, half)


def number_in_system(frame: pl.DataFrame, samples: int = 20_000) -> float:
    """Time-average number of requests in the system, by sampling N(t) at uniform times."""
    done = frame.filter(pl.col("complete_ns").is_not_null())
    submit = np.sort(done["submit_ns"].to_numpy())
    complete = np.sort(done["complete_ns"].to_numpy())
    t = np.linspace(submit[0], complete[-1], samples)
    return float(
        np.mean(np.searchsorted(submit, t, "right") - np.searchsorted(complete, t, "right"))
    )


@pytest.mark.parametrize("model", ["mm1", "virtio-net", "e1000-emulated"])
def test_littles_law_on_outputs(model: str) -> None:
    """L (sampled from the per-request frame) = throughput x mean latency, any model."""
    result = simulate(
        load_config(model, {"workload.requests": 20_000, "workload.warmup_requests": 0})
    )
    s = result.summary
    lam_w = s["throughput_rps"] / 1e9 * s["latency_ns"]["mean"]
    assert number_in_system(result.requests) == pytest.approx(lam_w, rel=0.03)


def test_mm1_number_in_system_matches_rho_over_one_minus_rho() -> None:
    frame = run_queue("mm1", 0.5, 42_000)
    assert number_in_system(frame) == pytest.approx(0.5 / (1 - 0.5), rel=0.06)


def zero_cost_virtio(rho: float, distribution: str = "exponential") -> dict[str, object]:
    """The virtio path with every virtualisation cost zero: an M/M/1 (or M/D/1) in disguise."""
    return {
        "workload.arrivals": "poisson",
        "workload.arrival_rate_per_s": rho * 1e5,
        "workload.requests": 42_000,
        "workload.warmup_requests": 2000,
        "vcpu.request_prep_ns": 0.0,
        "vcpu.batch_prep_ns": 0.0,
        "kvm.kernel_exit_ns": 0.0,
        "kvm.userspace_exit_ns": 0.0,
        "virtqueue.batch": 1,
        "virtqueue.ring_size": 32768,
        "backend.wakeup_ns": 0.0,
        "backend.per_request_ns": 0.0,
        "device.service_ns": 10_000.0,
        "device.per_byte_ns": 0.0,
        "device.service_distribution": distribution,
        "interrupt.injection_ns": 0.0,
        "interrupt.delivery_ns": 0.0,
        "interrupt.guest_handler_ns": 0.0,
    }


def test_zero_cost_virtio_path_is_an_mm1_and_kicks_only_when_idle() -> None:
    """Through the whole virtqueue path (EVENT_IDX, interrupts): W = 1/(mu - lambda), and with
    Poisson arrivals the share of requests that kick is 1 - rho (arrivals see time averages:
    Wolff 1982; docs/sources.md)."""
    result = simulate(load_config("virtio-blk", zero_cost_virtio(0.6)))
    frame = result.requests.slice(2000)
    mean, half = batch_means_ci(frame["latency_ns"].to_numpy())
    assert abs(mean - 10_000.0 / 0.4) <= half
    kicks, khalf = batch_means_ci(frame["kicks"].cast(pl.Float64).to_numpy())
    assert abs(kicks - 0.4) <= khalf, (kicks, khalf)
