#!/bin/sh
# /init of the vtrace QEMU guest (busybox sh as PID 1).
#
# Loads the device's driver modules in the order listed in /etc/vtrace/modules, runs one
# workload between console markers and powers off. The host side (vtrace.lab.qemu) reads
# the markers on the serial console: after "vtrace-guest: ready" it switches QEMU's trace
# events on and answers with a line; the guest then prints "start", runs the workload,
# prints "end status=N" and waits for a second line (events off) before powering off, so
# the traced window holds the workload and nothing else.
#
# Parameters come from the kernel command line: vtrace_op=read|write|ping,
# vtrace_requests=N, vtrace_bytes=N, vtrace_qd=N, vtrace_submit=batch|streams,
# vtrace_streams=N (N streams, stream i pinned to CPU i, each 1/N of the requests),
# vtrace_net=tap (ping: the host's tap interface, stream i pinging 198.18.0.(i+1), instead
# of QEMU's user network).
#
# vtrace_loop=1 (vtrace qemu-lab start): no markers to wait for; after "ready" the guest
# prints "running" and repeats the workload (rounds of vtrace_requests) until QEMU is
# stopped, printing "count requests=N interrupts=M" after every round: the requests its
# block layer completed (/sys/block/*/stat) or the echo replies it received, and the
# device's interrupts, both since the workload began.

/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

say() { echo "vtrace-guest: $*"; }
# The host's answers must not echo into the middle of a marker line.
stty -echo 2>/dev/null
die() {
    say "error: $*"
    poweroff -f
}

for m in $(cat /etc/vtrace/modules); do
    insmod "/lib/modules/$m" || say "insmod $m failed"
done

op=read
requests=32
bytes=4096
qd=1
submit=streams
streams=1
loop=0
gtrace=0
net=user
for kv in $(cat /proc/cmdline); do
    # Only digits and letters reach the variables: the values are used in arithmetic.
    case "$kv" in
        vtrace_op=read | vtrace_op=write | vtrace_op=ping) op=${kv#*=} ;;
        vtrace_requests=[0-9]*) requests=${kv#*=} ;;
        vtrace_bytes=[0-9]*) bytes=${kv#*=} ;;
        vtrace_qd=[0-9]*) qd=${kv#*=} ;;
        vtrace_submit=streams | vtrace_submit=batch) submit=${kv#*=} ;;
        vtrace_streams=[0-9]*) streams=${kv#*=} ;;
        vtrace_loop=1) loop=1 ;;
        vtrace_gtrace=1) gtrace=1 ;;
        vtrace_net=tap) net=tap ;;
    esac
done

# wait_for PATH...: wait up to 10 s until one of the paths exists; print it.
wait_for() {
    n=0
    while [ $n -lt 200 ]; do
        for p in "$@"; do
            [ -e "$p" ] && echo "$p" && return 0
        done
        usleep 50000
        n=$((n + 1))
    done
    return 1
}

# The guest's own interrupt count for the device under test, from /proc/interrupts
# (IDE: ata_piix, virtio: the virtqueue vectors, e1000: eth0).
device_interrupts() {
    awk '/ata_piix|virtio[0-9]+-(req|input|output)|eth0/ {
        for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i
    }
    END { print n + 0 }' /proc/interrupts
}

# The IOAPIC pins of the device's legacy interrupt lines (IDE, e1000), comma-separated:
# /proc/interrupts shows them as "14-edge" / "10-fasteoi" on IO-APIC lines.
ioapic_pins() {
    awk '/IO-APIC/ && /ata_piix|eth0/ {
        for (i = 2; i <= NF; i++)
            if ($i ~ /^[0-9]+-(edge|fasteoi|level)$/) {
                split($i, a, "-")
                printf "%s%s", sep, a[1]
                sep = ","
            }
    }
    END { print "" }' /proc/interrupts
}

# ping_target STREAM: the address stream STREAM pings
ping_target() {
    if [ "$net" = tap ]; then
        echo "198.18.0.$(($1 + 1))"
    else
        echo 10.0.2.2
    fi
}

if [ "$op" = ping ]; then
    wait_for /sys/class/net/eth0 >/dev/null || die "no eth0 (driver did not bind)"
    ip link set lo up
    ip link set eth0 up
    if [ "$net" = tap ]; then
        # the host's tap interface, an address per stream (vtrace/lab/tap.py); the tap
        # driver sends each flow's replies to the queue its requests came from
        ip addr add 198.18.0.100/24 dev eth0
        say "info queue_pairs=$(ls -d /sys/class/net/eth0/queues/tx-* | wc -l)"
    else
        # QEMU's user network answers echo requests to its gateway itself: the traffic
        # stays inside QEMU.
        ip addr add 10.0.2.15/24 dev eth0
    fi
    # One warm-up exchange per target resolves ARP before the traced window. The link may
    # still be negotiating: try for up to 30 s.
    i=0
    while [ $i -lt "$streams" ]; do
        target=$(ping_target $i)
        n=0
        until ping -c 1 -W 3 "$target" >/dev/null 2>&1; do
            n=$((n + 1))
            [ $n -lt 10 ] || die "no echo reply from $target"
        done
        i=$((i + 1))
    done
else
    disk=$(wait_for /dev/vda /dev/sda) || die "no disk (/dev/vda or /dev/sda) appeared"
    blk=${disk#/dev/}
    say "info disk=$disk"
    if [ "$submit" = batch ]; then
        # No scheduler: a plugged batch goes to the driver as one list (one kick).
        echo none >/sys/block/$blk/queue/scheduler
        if [ "$qd" -gt 1 ]; then
            echo $((bytes / 1024)) >/sys/block/$blk/queue/max_sectors_kb ||
                die "cannot limit requests to $bytes bytes (max_sectors_kb)"
        fi
    fi
    say "info scheduler=$(cat /sys/block/$blk/queue/scheduler)"
    # blk-mq's hardware queues and the CPUs each serves ("0:0 1:1"): one per vCPU when the
    # device has as many queues as the guest has CPUs.
    mq=
    for q in /sys/block/$blk/mq/*; do
        [ -e "$q/cpu_list" ] && mq="$mq${mq:+ }${q##*/}:$(cat "$q/cpu_list" | tr -d ' ')"
    done
    say "info hw_queues=$(ls /sys/block/$blk/mq | wc -l)"
    say "info queue_cpus=$mq"
    # One warm-up request: the first access pays for one-time driver work.
    dd if="$disk" of=/dev/null bs="$bytes" count=1 iflag=direct 2>/dev/null ||
        die "warm-up read of $disk failed"
fi

# pinned CPU COMMAND...: run COMMAND on CPU (busybox taskset takes a hexadecimal mask);
# a single stream runs unpinned, as the scheduler places it.
pinned() {
    cpu=$1
    shift
    if [ "$streams" -gt 1 ]; then
        taskset "$(printf %x $((1 << cpu)))" "$@"
    else
        "$@"
    fi
}

# block_stream CPU COUNT FIRST: COUNT requests of $bytes on CPU, over the range that starts
# FIRST requests into the disk (after the warm-up's first block). Exit status: 0 if all
# succeeded.
block_stream() {
    cpu=$1
    count=$2
    first=$3
    if [ "$submit" = batch ]; then
        # O_DIRECT transfers of qd*bytes; the block layer splits each transfer into qd
        # requests of $bytes (max_sectors_kb) and submits them together under one plug.
        # skip/seek in transfers, +1: the first transfer-sized block holds the warm-up read.
        if [ "$op" = read ]; then
            pinned "$cpu" dd if="$disk" of=/dev/null bs=$((bytes * qd)) count=$((count / qd)) \
                iflag=direct skip=$((first / qd + 1)) 2>/dev/null
        else
            pinned "$cpu" dd if=/dev/zero of="$disk" bs=$((bytes * qd)) count=$((count / qd)) \
                oflag=direct seek=$((first / qd + 1)) conv=notrunc 2>/dev/null
        fi
        return
    fi
    # qd concurrent O_DIRECT streams over disjoint ranges; together they issue COUNT.
    per=$((count / qd))
    extra=$((count % qd))
    offset=$((first + 1)) # block 0 was read by the warm-up
    spids=
    j=0
    while [ $j -lt "$qd" ]; do
        n=$per
        [ $j -lt $extra ] && n=$((n + 1))
        if [ "$op" = read ]; then
            pinned "$cpu" dd if="$disk" of=/dev/null bs="$bytes" count=$n skip=$offset \
                iflag=direct 2>/dev/null &
        else
            pinned "$cpu" dd if=/dev/zero of="$disk" bs="$bytes" count=$n seek=$offset \
                oflag=direct conv=notrunc 2>/dev/null &
        fi
        spids="$spids $!"
        offset=$((offset + n))
        j=$((j + 1))
    done
    rc=0
    for p in $spids; do
        wait "$p" || rc=1
    done
    return $rc
}

say "info cpus=$(nproc)"
say "info ioapic_pins=$(ioapic_pins)"
say ready

# Completed requests of the disk (reads + writes, /sys/block/*/stat fields 1 and 5).
disk_requests() {
    set -- $(cat /sys/block/$blk/stat)
    echo $(($1 + $5))
}

if [ "$loop" = 1 ]; then
    irq_before=$(device_interrupts)
    say running
    replies=0
    [ "$op" = ping ] || req_before=$(disk_requests)
    while :; do
        if [ "$op" = ping ]; then
            n=$(ping -q -A -c "$requests" -s "$bytes" 10.0.2.2 2>/dev/null |
                grep -o '[0-9]* packets received' | grep -o '^[0-9]*')
            replies=$((replies + ${n:-0}))
            done_now=$replies
        else
            block_stream 0 "$requests" 0 || die "workload failed"
            done_now=$(($(disk_requests) - req_before))
        fi
        say "count requests=$done_now interrupts=$(($(device_interrupts) - irq_before))"
    done
fi

# --guest-trace: the block layer's issue and completion of every request on the disk, and
# the entry and exit of the disk's interrupt handlers, recorded over the workload (tracefs)
# and printed once the host has stopped recording. 256 bytes a request per CPU
# (GUEST_TRACE_BYTES in qemu.py) covers the two block events and up to one interrupt a
# request with room to spare; a buffer that still fills is reported.
T=/sys/kernel/tracing
gtrace_on() {
    mount -t tracefs nodev $T 2>/dev/null
    [ -e $T/events/block/block_rq_issue/enable ] || die "guest trace: no block tracepoints"
    echo 0 >$T/tracing_on
    echo $((requests * 256 / 1024 + 1024)) >$T/buffer_size_kb ||
        die "guest trace: cannot size the ring buffer"
    echo >$T/trace
    echo 1 >$T/events/block/block_rq_issue/enable
    echo 1 >$T/events/block/block_rq_complete/enable
    # the virtio-blk request queues' interrupts (virtioN-req.Q in /proc/interrupts) only
    irqs=$(awk '/virtio[0-9]+-req/ { sub(":", "", $1); printf "%s%s", sep, "irq==" $1; sep = "||" }' \
        /proc/interrupts)
    if [ -n "$irqs" ] && [ -e $T/events/irq/irq_handler_entry/enable ]; then
        for e in irq_handler_entry irq_handler_exit; do
            echo "$irqs" >$T/events/irq/$e/filter || die "guest trace: cannot filter $e"
            echo 1 >$T/events/irq/$e/enable
        done
    fi
    echo 1 >$T/tracing_on
}

# gtrace_dump: one compact line per event on the disk (major:minor $devno): guest clock,
# CPU, i(ssue) or c(omplete), RWBS, first sector, sectors; and per interrupt handler run:
# guest clock, CPU, h (entry) or x (exit), the IRQ number.
gtrace_dump() {
    lost=0
    for f in $T/per_cpu/cpu*/stats; do
        n=$(awk '/^overrun:/ {print $2}' "$f")
        lost=$((lost + ${n:-0}))
    done
    say "info guest_trace_lost=$lost"
    devno=$(cat /sys/block/$blk/dev | tr : ,)
    awk -v dev="$devno" -v mark="vtrace-guest: gt" '
        / irq_handler_(entry|exit): / {
            for (i = 1; i <= NF; i++) {
                if ($i ~ /^\[[0-9]+\]$/) cpu = substr($i, 2, length($i) - 2) + 0
                if ($i == "irq_handler_entry:" || $i == "irq_handler_exit:") {
                    ts = $(i - 1)
                    sub(/:$/, "", ts)
                    ev = ($i == "irq_handler_entry:") ? "h" : "x"
                    irq = $(i + 1)
                    sub(/^irq=/, "", irq)
                }
            }
            print mark, ts, cpu, ev, irq
            next
        }
        / block_rq_(issue|complete): / {
            k = 0
            sec = 0
            for (i = 1; i <= NF; i++) {
                if ($i ~ /^\[[0-9]+\]$/) cpu = substr($i, 2, length($i) - 2) + 0
                if ($i == "block_rq_issue:" || $i == "block_rq_complete:") {
                    k = i
                    ts = $(i - 1)
                    sub(/:$/, "", ts)
                }
                if ($i == "+") sec = i
            }
            if (!k || !sec || $(k + 1) != dev) next
            ev = ($k == "block_rq_issue:") ? "i" : "c"
            print mark, ts, cpu, ev, $(k + 2), $(sec - 1), $(sec + 1)
        }' $T/trace
}

read -r _go
[ "$gtrace" = 1 ] && [ -n "$blk" ] && gtrace_on
irq_before=$(device_interrupts)
say start
status=0
# one_stream I: stream I's share of the workload, on CPU I when there are several streams.
# ping: -A sends the next request as soon as the reply arrives (one packet in flight), to
# the stream's own target (its flow keeps to queue pair I). Block: its own range of the disk.
one_stream() {
    if [ "$op" = ping ]; then
        pinned "$1" ping -q -A -c "$per_stream" -s "$bytes" "$(ping_target "$1")" \
            >/tmp/ping.$1.out 2>&1
    else
        block_stream "$1" $per_stream $(($1 * per_stream))
    fi
}
per_stream=$((requests / streams))
pids=
i=0
while [ $i -lt "$streams" ]; do
    one_stream $i &
    pids="$pids $!"
    i=$((i + 1))
done
for p in $pids; do
    wait "$p" || status=1
done
irq_after=$(device_interrupts)
[ "$gtrace" = 1 ] && [ -n "$blk" ] && echo 0 >$T/tracing_on
say "info guest_interrupts=$((irq_after - irq_before))"
if [ "$op" = ping ]; then
    received=0
    for f in /tmp/ping.*.out; do
        n=$(grep -o '[0-9]* packets received' "$f" | grep -o '^[0-9]*')
        received=$((received + ${n:-0}))
    done
    say "info ping=$received packets received"
fi
say "end status=$status"
read -r next
if [ "$next" = dump ]; then
    # the host has stopped recording: the guest trace's lines cost it nothing now
    gtrace_dump
    say "dumped"
    read -r _done
fi
poweroff -f
