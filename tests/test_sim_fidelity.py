"""The calibrated model against real runs it was not calibrated on.

Shipped traces (no KVM needed): calibrate on the lab's virtio runs at batch 1 and 8
(traces/lab-virtio-b1, -b8, recorded with `vtrace lab run --record`, see traces/README.md)
and predict the batch-32 run.

Live (KVM, root, bcc): record lab runs at two batch sizes, calibrate, predict other batch
and ring sizes, and the emulated device at other request counts. The host is shared, so
each configuration runs several times, interleaved in rounds, and the least disturbed run
(the fastest) stands for its throughput, which is only judged when those runs agree; kicks
and exits per request are compared with the median run.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest

from vtrace.sim import load_config, simulate
from vtrace.sim.calibrate import calibrate, trace_facts

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT / "traces"
THROUGHPUT_GOAL = 0.15
COUNT_GOAL = 0.10


def test_shipped_traces_calibrate_b1_b8_predict_b32(tmp_path: Path) -> None:
    fit = calibrate(
        [TRACES / "lab-virtio-b1", TRACES / "lab-virtio-b8"], "lab-virtio", tmp_path / "fit.toml"
    )
    text = (tmp_path / "fit.toml").read_text()
    assert "fitted: lab-virtio-b1, lab-virtio-b8: least squares" in text
    assert set(fit.fitted) >= {"vcpu.request_prep_ns", "vcpu.batch_prep_ns", "backend.wakeup_ns"}
    b32 = trace_facts(TRACES / "lab-virtio-b32")
    assert (b32.requests, b32.batch, b32.kicks) == (2000, 32, 63)
    rates = {}
    for batch in (1, 8, 32):
        over = {"workload.requests": 2000, "virtqueue.batch": batch}
        s = simulate(load_config(tmp_path / "fit.toml", over)).summary
        rates[batch] = s["throughput_rps"]
    # the shipped traces were recorded at different moments of a shared host's load, so only
    # counts are compared here; throughput is judged by the live test, on interleaved runs
    assert s["kicks_per_request"] == pytest.approx(b32.kicks / b32.requests, rel=COUNT_GOAL)
    assert rates[1] < rates[8] < rates[32]


def test_shipped_emulated_trace_calibrates_to_four_user_exits(tmp_path: Path) -> None:
    fit = calibrate([TRACES / "lab-emulated"], "lab-emulated", tmp_path / "fit.toml")
    cfg = fit.config
    assert [a["count"] for a in cfg["device.accesses"]] == [1, 1, 1, 1]
    assert all(a["handler"] == "user" for a in cfg["device.accesses"])
    assert sum(a["emulation_ns"] > 0 for a in cfg["device.accesses"]) == 1  # the command write
    assert 2_000 < cfg["kvm.userspace_exit_ns"] < 50_000
    facts = fit.facts[0]
    s = simulate(load_config(tmp_path / "fit.toml", {"workload.requests": 2000})).summary
    assert s["exits_per_request"] == 4 and s["userspace_exits_per_request"] == 4
    assert s["throughput_rps"] == pytest.approx(facts.requests / facts.duration_ns * 1e9, rel=0.02)


N = 2000
ROUNDS = 4
VIRTIO_CAL = ((1, 256), (8, 256))
VIRTIO_PREDICT = ((4, 256), (32, 256), (16, 16), (2, 4))
EMULATED_CAL = 2000
EMULATED_PREDICT = (500, 5000)


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple, list]:
    from vtrace.lab import run_lab

    out = tmp_path_factory.mktemp("lab")
    runs: dict[tuple, list] = {}
    for i in range(ROUNDS):  # rounds interleave configurations: all see the same host load
        for b, ring in VIRTIO_CAL + VIRTIO_PREDICT:
            rec = out / f"v-b{b}-r{ring}-{i}" if (b, ring) in VIRTIO_CAL else None
            runs.setdefault(("virtio", b, ring), []).append(
                run_lab("virtio", requests=N, batch=b, ring_size=ring, record=rec)
            )
        for n in (EMULATED_CAL, *EMULATED_PREDICT):
            # Recorded too: the calibration's user-space exit round trip includes the
            # collector's cost per exit (about 9 % here), so the runs it predicts must pay it.
            rec = out / f"e-{n}-{i}"
            runs.setdefault(("emulated", n), []).append(run_lab("emulated", requests=n, record=rec))
    best = {k: max(v, key=lambda r: r.requests_per_s) for k, v in runs.items()}
    calibrate([best["virtio", b, r].trace for b, r in VIRTIO_CAL], "lab-virtio", out / "v.toml")
    calibrate([best["emulated", EMULATED_CAL].trace], "lab-emulated", out / "e.toml")
    table = {}
    for key, group in runs.items():
        if key[0] == "virtio":
            over = {
                "workload.requests": N,
                "virtqueue.batch": key[1],
                "virtqueue.ring_size": key[2],
            }
            s = simulate(load_config(out / "v.toml", over)).summary
        else:
            s = simulate(load_config(out / "e.toml", {"workload.requests": key[1]})).summary
        rates = sorted((r.requests_per_s for r in group), reverse=True)
        r = best[key]
        table[key] = {
            "real_rps": r.requests_per_s,
            "model_rps": s["throughput_rps"],
            # counts: the median run (how often the back end was still busy at a kick, and so
            # suppressed it, depends on the host's load in that run)
            "real_kicks": statistics.median(g.kicks / g.requests for g in group),
            "kicks_range": (
                min(g.kicks / g.requests for g in group),
                max(g.kicks / g.requests for g in group),
            ),
            "model_kicks": s["kicks_per_request"],
            "real_exits": statistics.median(
                (g.userspace_exits + g.kicks) / g.requests for g in group
            ),
            "exits_range": (
                min((g.userspace_exits + g.kicks) / g.requests for g in group),
                max((g.userspace_exits + g.kicks) / g.requests for g in group),
            ),
            "model_exits": s["exits_per_request"],
            "agreement": (rates[0] - rates[1]) / rates[0],
        }
    print(
        "\nconfiguration          real req/s  model  error | kicks/req real model (all runs)"
        " | exits/req real model"
    )
    for key, t in table.items():
        err = t["model_rps"] / t["real_rps"] - 1
        print(
            f"{' '.join(map(str, key)):22s} {t['real_rps']:9.0f} {t['model_rps']:8.0f} {err:+6.1%} |"
            f" {t['real_kicks']:6.3f} {t['model_kicks']:6.3f}"
            f" ({t['kicks_range'][0]:.3f}-{t['kicks_range'][1]:.3f})"
            f" | {t['real_exits']:6.3f} {t['model_exits']:6.3f}"
        )
    return table


@pytest.mark.kvm
@pytest.mark.root
@pytest.mark.bcc
@pytest.mark.slow
@pytest.mark.timeout(240)  # a stuck recording must fail the run, not hang it
def test_predicted_kicks_and_exits_per_request_match_real_runs(real_runs: dict) -> None:
    for key, t in real_runs.items():
        if t["real_kicks"] > 0:
            # At batch 1 the share of kicks NO_NOTIFY suppresses is a race between the guest's
            # next request and the back end's pass, and differs from run to run on a shared
            # host (0.78 to 0.98 kicks per request across 4 runs here); the model, with
            # steady costs, is judged against the runs' range, within the same goal.
            lo, hi = t["kicks_range"]
            assert lo * (1 - COUNT_GOAL) <= t["model_kicks"] <= hi * (1 + COUNT_GOAL), key
        lo, hi = t["exits_range"]  # kicks are exits too: the same race
        assert lo * (1 - COUNT_GOAL) <= t["model_exits"] <= hi * (1 + COUNT_GOAL), key


@pytest.mark.kvm
@pytest.mark.root
@pytest.mark.bcc
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_predicted_throughput_matches_real_runs(real_runs: dict) -> None:
    noisy = {k: t["agreement"] for k, t in real_runs.items() if t["agreement"] > 0.10}
    if noisy:
        worst = max(noisy.values())
        pytest.skip(
            f"host too busy to judge throughput: the two fastest of {ROUNDS} runs differ by up "
            f"to {worst:.0%} in {len(noisy)} configurations; run on a quiet host"
        )
    for key, t in real_runs.items():
        # small rings too (16 16, 2 4): the model's guest, like the lab's, checks for room
        # before it builds a batch and pays a reap each time it takes used buffers back
        assert t["model_rps"] == pytest.approx(t["real_rps"], rel=THROUGHPUT_GOAL), key
    assert not any(math.isnan(t["model_rps"]) for t in real_runs.values())


def test_cli_calibrate_writes_a_loadable_commented_model(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "fit.toml"
    r = subprocess.run(
        [sys.executable, "-m", "vtrace.cli", "calibrate", str(TRACES / "lab-emulated"),
         "--model", "lab-emulated", "-o", str(out)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "kvm.userspace_exit_ns" in r.stdout
    text = out.read_text()
    assert "userspace_exit_ns = " in text and "# fitted: lab-emulated:" in text
    assert load_config(out).kind == "emulated"
    bad = subprocess.run(
        [sys.executable, "-m", "vtrace.cli", "calibrate", str(TRACES / "lab-emulated"),
         "--model", "lab-virtio", "-o", str(tmp_path / "bad.toml")],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert bad.returncode == 2 and "not a virtio trace" in bad.stderr
    assert not (tmp_path / "bad.toml").exists()


@pytest.mark.parametrize(("trace", "model", "exits"), [
    ("qemu-ide", "ide-emulated", 26), ("qemu-e1000", "e1000-emulated", 7),
])  # fmt: skip
def test_qemu_guest_traces_give_exits_per_request(
    tmp_path: Path, trace: str, model: str, exits: int
) -> None:
    """Under TCG every register access of a real Linux driver reaches QEMU (traces/README.md:
    26.0 per IDE read); calibrated on that, the model makes exactly as many exits."""
    calibrate([TRACES / trace], model, tmp_path / "fit.toml")
    s = simulate(load_config(tmp_path / "fit.toml", {"workload.requests": 1000})).summary
    assert s["exits_per_request"] == exits == s["userspace_exits_per_request"]
