// vtrace collector: one fixed-size record per KVM event into a BPF ring buffer.
//
// Compiled by bcc at run time. Everything variable arrives as -D integers validated in
// Python (program.py): EV_* event ids, EVENT_MASK (which handlers exist), RINGBUF_PAGES,
// FILTER_PIDS, and for each tracepoint <EVENT>_A<i>_OFF / _SIZE, the offset and size of the
// field that goes into record slot a<i>, read from the running kernel's format file
// (formats.py); offset -1 means the kernel lacks the field and the slot stays 0.

#include <uapi/linux/ptrace.h>

struct rec {
    u64 ts_ns;      // bpf_ktime_get_ns(): CLOCK_MONOTONIC
    u32 pid;        // tgid: the VMM process
    u32 tid;        // the thread (a vCPU thread, a kworker, ...)
    u16 cpu;
    u8 event;       // EV_*
    u8 pad;
    s32 vcpu;       // the tracepoint's own vcpu_id, -1 when it has none
    u64 a[5];       // tracepoint fields, raw (formats.py: TRACEPOINT_SLOTS)
};

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
// bcc's ring buffer has no lost-event callback: count failed reservations per CPU here.
BPF_PERCPU_ARRAY(lost, u64, 1);
// Events seen (after the pid filter), per CPU: the consumer checks records against it.
BPF_PERCPU_ARRAY(seen, u64, 1);
// The VM processes to record (filled from Python), when FILTER_PIDS is 1.
BPF_HASH(pids, u32, u8, 1024);

#include "tracepoint_fields.h"

// irq_rule: 1 for the interrupt events, which are also kept from kworkers (see below).
static __always_inline int wanted(u32 tgid, int irq_rule) {
#if FILTER_PIDS
    if (pids.lookup(&tgid))
        return 1;
    return irq_rule && is_kworker();
#else
    return 1;
#endif
}

// Not a macro: bcc rewrites map calls only outside macros. Always inlined, so every offset
// and size below is a constant again in each handler.
static __always_inline int emit(void *ctx, u8 ev, int irq_rule, int vcpu_off, int vcpu_size,
                                int o0, int s0, int o1, int s1, int o2, int s2, int o3, int s3,
                                int o4, int s4) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (!wanted(tgid, irq_rule))
        return 0;
    u32 zero = 0;
    u64 *n = seen.lookup(&zero);
    if (n)
        *n += 1;
    struct rec *r = events.ringbuf_reserve(sizeof(struct rec));
    if (!r) {
        u64 *l = lost.lookup(&zero);
        if (l)
            *l += 1;
        return 0;
    }
    r->ts_ns = bpf_ktime_get_ns();
    r->pid = tgid;
    r->tid = (u32)id;
    r->cpu = bpf_get_smp_processor_id();
    r->event = ev;
    r->pad = 0;
    r->vcpu = vcpu_off < 0 ? -1 : (s32)field(ctx, vcpu_off, vcpu_size);
    r->a[0] = field(ctx, o0, s0);
    r->a[1] = field(ctx, o1, s1);
    r->a[2] = field(ctx, o2, s2);
    r->a[3] = field(ctx, o3, s3);
    r->a[4] = field(ctx, o4, s4);
    // The consumer polls; skipping the wake-up keeps the hot path short.
    events.ringbuf_submit(r, BPF_RB_NO_WAKEUP);
    return 0;
}

#define HANDLER(EV, NAME, IRQ_RULE)                                                  \
    int on_##NAME(void *ctx) {                                                       \
        return emit(ctx, EV, IRQ_RULE, NAME##_VCPU_OFF, NAME##_VCPU_SIZE,             \
                    NAME##_A0_OFF, NAME##_A0_SIZE, NAME##_A1_OFF, NAME##_A1_SIZE,    \
                    NAME##_A2_OFF, NAME##_A2_SIZE, NAME##_A3_OFF, NAME##_A3_SIZE,    \
                    NAME##_A4_OFF, NAME##_A4_SIZE);                                  \
    }

// Fields of a kprobe or USDT event: none beyond who and when.
#define NOFIELDS(NAME)            \
    enum {                        \
        NAME##_VCPU_OFF = -1, NAME##_VCPU_SIZE = 0,        \
        NAME##_A0_OFF = -1, NAME##_A0_SIZE = 0,            \
        NAME##_A1_OFF = -1, NAME##_A1_SIZE = 0,            \
        NAME##_A2_OFF = -1, NAME##_A2_SIZE = 0,            \
        NAME##_A3_OFF = -1, NAME##_A3_SIZE = 0,            \
        NAME##_A4_OFF = -1, NAME##_A4_SIZE = 0,            \
    };

#if EVENT_MASK & (1 << EV_KVM_EXIT)
HANDLER(EV_KVM_EXIT, KVM_EXIT, 0)
#endif
#if EVENT_MASK & (1 << EV_KVM_ENTRY)
HANDLER(EV_KVM_ENTRY, KVM_ENTRY, 0)
#endif
#if EVENT_MASK & (1 << EV_KVM_PIO)
HANDLER(EV_KVM_PIO, KVM_PIO, 0)
#endif
#if EVENT_MASK & (1 << EV_KVM_MMIO)
HANDLER(EV_KVM_MMIO, KVM_MMIO, 0)
#endif
#if EVENT_MASK & (1 << EV_KVM_FAST_MMIO)
HANDLER(EV_KVM_FAST_MMIO, KVM_FAST_MMIO, 0)
#endif
#if EVENT_MASK & (1 << EV_KVM_USERSPACE_EXIT)
HANDLER(EV_KVM_USERSPACE_EXIT, KVM_USERSPACE_EXIT, 0)
#endif
// Interrupt injection through an irqfd (a level-triggered GSI, or any interrupt KVM cannot
// inject atomically) runs in a kworker, not in the VM's process, and these tracepoints carry
// no VM identity: with a pid filter they are kept from the VM's processes and from kworkers.
#if EVENT_MASK & (1 << EV_KVM_SET_IRQ)
HANDLER(EV_KVM_SET_IRQ, KVM_SET_IRQ, 1)
#endif
#if EVENT_MASK & (1 << EV_KVM_MSI_SET_IRQ)
HANDLER(EV_KVM_MSI_SET_IRQ, KVM_MSI_SET_IRQ, 1)
#endif
#if EVENT_MASK & (1 << EV_KVM_INJ_VIRQ)
HANDLER(EV_KVM_INJ_VIRQ, KVM_INJ_VIRQ, 1)
#endif
// Kick and interrupt paths in the kernel (kprobes) and QEMU's virtio USDT probes: who and
// when only. Attached only where the host has them (program.py says which and why not).
#if EVENT_MASK & (1 << EV_IOEVENTFD_WRITE)
NOFIELDS(IOEVENTFD_WRITE)
HANDLER(EV_IOEVENTFD_WRITE, IOEVENTFD_WRITE, 0)
#endif
#if EVENT_MASK & (1 << EV_IRQFD_WAKEUP)
NOFIELDS(IRQFD_WAKEUP)
HANDLER(EV_IRQFD_WAKEUP, IRQFD_WAKEUP, 1)
#endif
#if EVENT_MASK & (1 << EV_VHOST_TX_KICK)
NOFIELDS(VHOST_TX_KICK)
HANDLER(EV_VHOST_TX_KICK, VHOST_TX_KICK, 1)
#endif
#if EVENT_MASK & (1 << EV_VHOST_RX_KICK)
NOFIELDS(VHOST_RX_KICK)
HANDLER(EV_VHOST_RX_KICK, VHOST_RX_KICK, 1)
#endif
#if EVENT_MASK & (1 << EV_VIRTIO_QUEUE_NOTIFY)
NOFIELDS(VIRTIO_QUEUE_NOTIFY)
HANDLER(EV_VIRTIO_QUEUE_NOTIFY, VIRTIO_QUEUE_NOTIFY, 0)
#endif
#if EVENT_MASK & (1 << EV_VIRTQUEUE_POP)
NOFIELDS(VIRTQUEUE_POP)
HANDLER(EV_VIRTQUEUE_POP, VIRTQUEUE_POP, 0)
#endif
#if EVENT_MASK & (1 << EV_VIRTQUEUE_FLUSH)
NOFIELDS(VIRTQUEUE_FLUSH)
HANDLER(EV_VIRTQUEUE_FLUSH, VIRTQUEUE_FLUSH, 0)
#endif
#if EVENT_MASK & (1 << EV_VIRTIO_NOTIFY)
NOFIELDS(VIRTIO_NOTIFY)
HANDLER(EV_VIRTIO_NOTIFY, VIRTIO_NOTIFY, 0)
#endif
#if EVENT_MASK & (1 << EV_VIRTIO_NOTIFY_IRQFD)
NOFIELDS(VIRTIO_NOTIFY_IRQFD)
HANDLER(EV_VIRTIO_NOTIFY_IRQFD, VIRTIO_NOTIFY_IRQFD, 0)
#endif
