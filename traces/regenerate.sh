#!/usr/bin/env bash
# Regenerate the shipped real traces in traces/ (see traces/README.md for what each shows).
#
#   bash traces/regenerate.sh            # all of them
#   bash traces/regenerate.sh qemu-ide   # only the named ones
#
# Each trace is written to a temporary name and moved into place when complete, so a
# failed run leaves the previous version untouched. Needs what the captures need:
# QEMU guests: qemu-system-x86, linux-image-amd64, busybox-static (a few seconds each
# under TCG).
set -euo pipefail
cd "$(dirname "$0")/.."
VTRACE=${VTRACE:-.venv/bin/vtrace}
only=("$@")

wanted() {
    [ ${#only[@]} -eq 0 ] && return 0
    local n
    for n in "${only[@]}"; do [ "$n" = "$1" ] && return 0; done
    return 1
}

# capture NAME COMMAND...: run COMMAND with "-o <temporary dir>" appended, then replace
# traces/NAME with the result.
capture() {
    local name=$1
    shift
    wanted "$name" || return 0
    local tmp="traces/.new-$name"
    rm -rf "$tmp"
    echo "== $name: $*" >&2
    "$@" -o "$tmp" >/dev/null
    rm -rf "traces/$name"
    mv "$tmp" "traces/$name"
}

# --- QEMU guests: a Debian kernel on emulated vs virtio devices (vtrace qemu-lab run) --------
capture qemu-ide $VTRACE qemu-lab run --device ide --requests 1024 --request-bytes 4096
capture qemu-virtio-blk-qd1 $VTRACE qemu-lab run --device virtio-blk --requests 1024 \
    --request-bytes 4096
capture qemu-virtio-blk-qd4 $VTRACE qemu-lab run --device virtio-blk --requests 4096 \
    --request-bytes 4096 --queue-depth 4
capture qemu-virtio-blk-qd16 $VTRACE qemu-lab run --device virtio-blk --requests 4096 \
    --request-bytes 4096 --queue-depth 16
capture qemu-virtio-blk-qd32 $VTRACE qemu-lab run --device virtio-blk --requests 4096 \
    --request-bytes 4096 --queue-depth 32
capture qemu-virtio-blk-qd4-2x2 $VTRACE qemu-lab run --device virtio-blk --requests 4096 \
    --request-bytes 4096 --queue-depth 4 --vcpus 2 --queues 2
capture qemu-virtio-blk-qd16-streams $VTRACE qemu-lab run --device virtio-blk --requests 1024 \
    --request-bytes 4096 --queue-depth 16 --submit streams
# sched_series DIR: the series with the host scheduler's events (root): 8 rounds of depths
# 1, 4, 16, 32 in turn, so that every depth sees the host in the same states.
sched_series() {
    local dir=$1 name r d
    name=$(basename "$dir")
    wanted "$name" || return 0
    local tmp="traces/.new-$name"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    for r in 1 2 3 4 5 6 7 8; do
        for d in 1 4 16 32; do
            echo "== $name/qd$d-r$r" >&2
            $VTRACE qemu-lab run --device virtio-blk --requests 4096 --request-bytes 4096 \
                --queue-depth $d --sched -o "$tmp/qd$d-r$r" >/dev/null
        done
    done
    rm -rf "$dir"
    mv "$tmp" "$dir"
}
sched_series traces/qemu-virtio-blk-sched
# a second batch of the same series, judged on its own (a replication)
sched_series traces/qemu-virtio-blk-sched-2
if wanted qemu-virtio-blk-2x2-sched; then
    tmp=traces/.new-qemu-virtio-blk-2x2-sched
    rm -rf "$tmp"
    mkdir -p "$tmp"
    for r in 1 2 3 4 5 6; do
        d=4
        echo "== qemu-virtio-blk-2x2-sched/qd$d-r$r" >&2
        $VTRACE qemu-lab run --device virtio-blk --requests 4096 --request-bytes 4096 \
            --queue-depth $d --vcpus 2 --queues 2 --sched -o "$tmp/qd$d-r$r" >/dev/null
    done
    rm -rf traces/qemu-virtio-blk-2x2-sched
    mv "$tmp" traces/qemu-virtio-blk-2x2-sched
fi
capture qemu-e1000 $VTRACE qemu-lab run --device e1000 --requests 1024 --request-bytes 56
capture qemu-virtio-net $VTRACE qemu-lab run --device virtio-net --requests 1024 --request-bytes 56
# multi-queue virtio-net: a tap interface on the host (root), a ping stream per queue pair
capture qemu-virtio-net-2x2 $VTRACE qemu-lab run --device virtio-net --vcpus 2 --queues 2 \
    --requests 2048 --request-bytes 56

# --- /dev/kvm lab VMM traces (vtrace lab run) ----------------------------------------------------
# The lab VMM runs tiny guests on /dev/kvm while the bcc collector records the VMM's KVM
# events (docs/lab.md, docs/capture.md): needs root, /dev/kvm, tracefs, python3-bpfcc and
# kernel headers (`vtrace doctor` says which is missing). Kicks, back-end wake-ups and passes
# depend on how the back end thread and the vCPU interleave, so each capture rewrites the
# "Measured:" and "Counts:" lines of its entry in traces/README.md from the new trace.
PY=${PY:-.venv/bin/python}
lab_names=(lab-emulated lab-virtio-b1 lab-virtio-b8 lab-virtio-b32 lab-virtio-b8-irq)

lab_wanted() {
    local n
    for n in "${lab_names[@]}"; do wanted "$n" && return 0; done
    return 1
}

if lab_wanted; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "regenerate.sh: the lab traces (${lab_names[*]}) run a VM on /dev/kvm and trace it with bcc: run as root (sudo bash traces/regenerate.sh), or name only qemu-* traces" >&2
        exit 1
    fi
    if [ ! -c /dev/kvm ] || [ ! -w /dev/kvm ]; then
        echo "regenerate.sh: the lab traces need /dev/kvm (load kvm and kvm_intel or kvm_amd, or use a host with KVM), or name only qemu-* traces" >&2
        exit 1
    fi
fi

# `$PY -c "$LAB_TRACE_PY" check DIR RUN_JSON`: the trace agrees with the VMM's own counters,
# lost no event and holds no interrupt of another VM (the collector keeps kvm_set_irq from
# every kernel worker thread: an irqfd injection runs there and the tracepoint names no VM,
# so a VM running beside the capture can leave its injections in the trace).
# `$PY -c "$LAB_TRACE_PY" describe NAME`: rewrite the entry's Measured and Counts lines.
LAB_TRACE_PY=$(
    cat <<'PYEOF'
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import polars as pl

import vtrace

NOTIFY_PORT = 0x200
event = pl.col("event")


def check(path: str, run_json: str) -> list[str]:
    trace = vtrace.open_trace(path)
    run = json.loads(Path(run_json).read_text())
    ev = trace.events.collect()
    problems = []
    if trace.meta["lost"] != 0:
        problems.append(f"{trace.meta['lost']} lost events")
    exits = ev.filter(event == "kvm_userspace_exit").height
    if exits != run["userspace_exits"]:
        problems.append(f"{exits} kvm_userspace_exit rows, the VMM counted {run['userspace_exits']}")
    kicks = ev.filter((event == "kvm_pio") & (pl.col("addr") == NOTIFY_PORT)).height
    if kicks != run["kicks"]:
        problems.append(f"{kicks} kvm_pio writes to 0x200, the back end consumed {run['kicks']}")
    irq = ev.filter(event == "kvm_set_irq")
    if run["wait"] != "irq":
        if irq.height:
            problems.append(f"{irq.height} kvm_set_irq rows of another VM (this one has no irqchip)")
        return problems
    raised = np.sort(irq.filter(pl.col("value") == 1)["ts_ns"].to_numpy())
    signals = np.sort(ev.filter(event == "lab_complete")["ts_ns"].to_numpy())
    # Injection i needs at least i back-end passes before it (merged signals inject once)
    # and follows the last of them within microseconds (10 ms allows for a loaded host).
    before = np.searchsorted(signals, raised)
    lag_ns = raised - signals[np.maximum(before - 1, 0)]
    if (
        raised.size == 0
        or (before < np.arange(1, raised.size + 1)).any()
        or (lag_ns > 10_000_000).any()
        or raised.size > run["interrupts_sent"]
        or irq.height != 2 * raised.size
    ):
        problems.append("kvm_set_irq rows that no irqfd signal of this VM explains (another VM)")
    return problems


def lines(path: Path) -> tuple[str, str]:
    """The README's Measured and Counts lines for one lab trace."""
    trace = vtrace.open_trace(path)
    ev = trace.events.collect()
    lab = trace.meta["lab"]
    n = lab["requests"]
    exits = ev.filter(event == "kvm_userspace_exit").height
    head = f"Measured: {exits / n:.4f} user-space exits per request ({exits:,})"
    if lab["device"] == "emulated":
        measured = f"{head}; no kicks and no interrupts (the device has neither)."
    else:
        kicks = ev.filter((event == "kvm_pio") & (pl.col("addr") == NOTIFY_PORT)).height
        batches = math.ceil(n / lab["batch"])
        passes = ev.filter(event == "lab_complete")["count"]
        raised = ev.filter((event == "kvm_set_irq") & (pl.col("value") == 1)).height
        measured = (
            f"{head}; {kicks / n:.4f} kicks per request ({kicks:,}; {batches - kicks:,} of "
            f"{batches:,} batches suppressed), {n / kicks:.2f} requests per kick; "
            f"{ev.filter(event == 'lab_kick').height:,} back-end wake-ups, {passes.len():,} "
            f"passes (at most {passes.max():,} requests in one); {raised:,} irqfd injections, "
            f"{lab['interrupts']:,} interrupts taken by the guest."
        )
    by_event = ev.group_by(event.cast(pl.String)).len().sort("event")
    listed = ", ".join(f"{e} {c:,}" for e, c in by_event.iter_rows())
    counts = f"Counts: {ev.height:,} events ({listed}); lost {trace.meta['lost']:,}."
    return measured, counts


def describe(name: str) -> None:
    measured, counts = lines(Path("traces") / name)
    readme = Path("traces/README.md")
    text = readme.read_text()
    entry = re.search(rf"^### {re.escape(name)}\n.*?(?=^##|\Z)", text, re.S | re.M)
    if entry is None:
        print(f"{name}: no entry in {readme}; add one with:\n{measured}\n{counts}", file=sys.stderr)
        return
    block = entry.group(0)
    for line in (measured, counts):
        label = line.split(":", 1)[0]
        block, found = re.subn(rf"^{label}: .*$", lambda _: line, block, count=1, flags=re.M)
        if not found:
            block = block.rstrip("\n") + f"\n\n{line}\n\n"
    readme.write_text(text[: entry.start()] + block + text[entry.end() :])
    print(f"{name}: {measured}\n{name}: {counts}", file=sys.stderr)


if sys.argv[1] == "check":
    problems = check(sys.argv[2], sys.argv[3])
    if problems:
        print(f"{Path(sys.argv[2]).name}: " + "; ".join(problems), file=sys.stderr)
        sys.exit(1)
else:
    describe(sys.argv[2])
PYEOF
)

# capture_lab NAME ARGS...: `vtrace lab run ARGS --record <temporary dir> --json`, checked,
# moved to traces/NAME, and its README lines rewritten. A capture that fails the check is
# taken again (three tries).
capture_lab() {
    local name=$1
    shift
    wanted "$name" || return 0
    local tmp="traces/.new-$name" try
    for try in 1 2 3; do
        rm -rf "$tmp" "$tmp.json"
        echo "== $name: vtrace lab run $* --record traces/$name --json" >&2
        "$VTRACE" lab run "$@" --record "$tmp" --json >"$tmp.json"
        if "$PY" -c "$LAB_TRACE_PY" check "$tmp" "$tmp.json"; then
            rm -f "$tmp.json"
            rm -rf "traces/$name"
            mv "$tmp" "traces/$name"
            "$PY" -c "$LAB_TRACE_PY" describe "$name"
            return 0
        fi
    done
    rm -rf "$tmp" "$tmp.json"
    echo "regenerate.sh: $name failed its check three times; traces/$name is unchanged" >&2
    return 1
}

capture_lab lab-emulated --device emulated --requests 2000
capture_lab lab-virtio-b1 --device virtio --requests 2000 --batch 1 --ring-size 256
capture_lab lab-virtio-b8 --device virtio --requests 2000 --batch 8 --ring-size 256
capture_lab lab-virtio-b32 --device virtio --requests 2000 --batch 32 --ring-size 256
capture_lab lab-virtio-b8-irq --device virtio --requests 2000 --batch 8 --ring-size 256 --wait irq
