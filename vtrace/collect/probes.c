// vtrace collector: one fixed-size record per KVM event into a BPF ring buffer.
//
// Compiled by bcc at run time. Everything variable arrives as -D integers validated in
// Python (program.py): EV_* event ids, EVENT_MASK (which classic handlers exist), RAW_MASK
// (which raw tracepoint handlers exist), RINGBUF_PAGES,
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
// Events seen (after the pid filter) are the records the ring took (its producer position,
// which the consumer reads) plus these: no counter of its own on every event.
BPF_PERCPU_ARRAY(lost, u64, 1);
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

// The record for one event, its header filled, or NULL when the event is filtered out or the
// ring is full (then counted in `lost`). Not a macro: bcc rewrites map calls only outside
// macros. Always inlined, so the callers' offsets and sizes stay constants.
static __always_inline struct rec *start(u8 ev, int irq_rule) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (!wanted(tgid, irq_rule))
        return 0;
    struct rec *r = events.ringbuf_reserve(sizeof(struct rec));
    if (!r) {
        u32 zero = 0;
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
    r->vcpu = -1;
    return r;
}

static __always_inline void commit(struct rec *r) {
    // The consumer polls; skipping the wake-up keeps the hot path short.
    events.ringbuf_submit(r, BPF_RB_NO_WAKEUP);
}

// Classic tracepoint: fields read from the formatted record at the format file's offsets.
static __always_inline int emit(void *ctx, u8 ev, int irq_rule, int vcpu_off, int vcpu_size,
                                int o0, int s0, int o1, int s1, int o2, int s2, int o3, int s3,
                                int o4, int s4) {
    struct rec *r = start(ev, irq_rule);
    if (!r)
        return 0;
    if (vcpu_off >= 0)
        r->vcpu = (s32)field(ctx, vcpu_off, vcpu_size);
    r->a[0] = field(ctx, o0, s0);
    r->a[1] = field(ctx, o1, s1);
    r->a[2] = field(ctx, o2, s2);
    r->a[3] = field(ctx, o3, s3);
    r->a[4] = field(ctx, o4, s4);
    commit(r);
    return 0;
}

#define HANDLER(EV, NAME, IRQ_RULE)                                                  \
    int on_##NAME(void *ctx) {                                                       \
        return emit(ctx, EV, IRQ_RULE, NAME##_VCPU_OFF, NAME##_VCPU_SIZE,             \
                    NAME##_A0_OFF, NAME##_A0_SIZE, NAME##_A1_OFF, NAME##_A1_SIZE,    \
                    NAME##_A2_OFF, NAME##_A2_SIZE, NAME##_A3_OFF, NAME##_A3_SIZE,    \
                    NAME##_A4_OFF, NAME##_A4_SIZE);                                  \
    }

// Raw tracepoints: the kernel calls the program with the tracepoint's C arguments (TP_PROTO)
// before any record is formatted, which saves that formatting on every event. Each handler
// below is written against one prototype; program.py attaches it only where the running
// kernel's BTF shows exactly that prototype, else the classic handler. A slot holds what
// the formatted record would: the argument cut to the format file's field size (0 where the
// format file lacks the field), so the decoder cannot tell the two paths apart.
static __always_inline u64 fit(u64 v, int off, int size) {
    if (off < 0)
        return 0;
    switch (size) {
    case 1:
        return (u8)v;
    case 2:
        return (u16)v;
    case 4:
        return (u32)v;
    default:
        return v;
    }
}

#define ARG(NAME, I, V) fit((V), NAME##_A##I##_OFF, NAME##_A##I##_SIZE)

// Arguments that are plain integers, in slot order (kvm_userspace_exit, kvm_fast_mmio,
// kvm_set_irq, kvm_msi_set_irq, kvm_inj_virq).
#define RAW_HANDLER(EV, NAME, IRQ_RULE, NARGS)                                       \
    int raw_on_##NAME(struct bpf_raw_tracepoint_args *ctx) {                         \
        struct rec *r = start(EV, IRQ_RULE);                                         \
        if (!r)                                                                      \
            return 0;                                                                \
        r->a[0] = NARGS > 0 ? ARG(NAME, 0, ctx->args[0]) : 0;                        \
        r->a[1] = NARGS > 1 ? ARG(NAME, 1, ctx->args[1]) : 0;                        \
        r->a[2] = NARGS > 2 ? ARG(NAME, 2, ctx->args[2]) : 0;                        \
        r->a[3] = 0;                                                                 \
        r->a[4] = 0;                                                                 \
        commit(r);                                                                   \
        return 0;                                                                    \
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
#if RAW_MASK & (1 << EV_KVM_PIO)
// TP_PROTO(unsigned int rw, unsigned int port, unsigned int size, unsigned int count,
//          const void *data); the record's val is the first 1, 2 or 4 bytes of data, by size.
int raw_on_KVM_PIO(struct bpf_raw_tracepoint_args *ctx) {
    struct rec *r = start(EV_KVM_PIO, 0);
    if (!r)
        return 0;
    u32 size = ctx->args[2];
    u32 val = 0;
    bpf_probe_read_kernel(&val, sizeof(val), (void *)ctx->args[4]);
    r->a[0] = ARG(KVM_PIO, 0, ctx->args[0]);
    r->a[1] = ARG(KVM_PIO, 1, ctx->args[1]);
    r->a[2] = ARG(KVM_PIO, 2, size);
    r->a[3] = ARG(KVM_PIO, 3, ctx->args[3]);
    r->a[4] = ARG(KVM_PIO, 4, size == 1 ? (val & 0xff) : size == 2 ? (val & 0xffff) : val);
    commit(r);
    return 0;
}
#endif
#if EVENT_MASK & (1 << EV_KVM_MMIO)
HANDLER(EV_KVM_MMIO, KVM_MMIO, 0)
#endif
#if RAW_MASK & (1 << EV_KVM_MMIO)
// TP_PROTO(int type, int len, u64 gpa, void *val); the record's val is the first
// min(len, 8) bytes at val, 0 when val is NULL.
int raw_on_KVM_MMIO(struct bpf_raw_tracepoint_args *ctx) {
    struct rec *r = start(EV_KVM_MMIO, 0);
    if (!r)
        return 0;
    u32 len = ctx->args[1];
    u64 val = 0;
    void *src = (void *)ctx->args[3];
    if (src) {
        bpf_probe_read_kernel(&val, sizeof(val), src);
        if (len < 8)
            val &= (1ULL << (8 * len)) - 1;
    }
    r->a[0] = ARG(KVM_MMIO, 0, ctx->args[0]);
    r->a[1] = ARG(KVM_MMIO, 1, len);
    r->a[2] = ARG(KVM_MMIO, 2, ctx->args[2]);
    r->a[3] = ARG(KVM_MMIO, 3, val);
    r->a[4] = 0;
    commit(r);
    return 0;
}
#endif
#if EVENT_MASK & (1 << EV_KVM_FAST_MMIO)
HANDLER(EV_KVM_FAST_MMIO, KVM_FAST_MMIO, 0)
#endif
#if RAW_MASK & (1 << EV_KVM_FAST_MMIO)
RAW_HANDLER(EV_KVM_FAST_MMIO, KVM_FAST_MMIO, 0, 1)
#endif
#if EVENT_MASK & (1 << EV_KVM_USERSPACE_EXIT)
HANDLER(EV_KVM_USERSPACE_EXIT, KVM_USERSPACE_EXIT, 0)
#endif
#if RAW_MASK & (1 << EV_KVM_USERSPACE_EXIT)
RAW_HANDLER(EV_KVM_USERSPACE_EXIT, KVM_USERSPACE_EXIT, 0, 2)
#endif
// Interrupt injection through an irqfd (a level-triggered GSI, or any interrupt KVM cannot
// inject atomically) runs in a kworker, not in the VM's process, and these tracepoints carry
// no VM identity: with a pid filter they are kept from the VM's processes and from kworkers.
#if EVENT_MASK & (1 << EV_KVM_SET_IRQ)
HANDLER(EV_KVM_SET_IRQ, KVM_SET_IRQ, 1)
#endif
#if RAW_MASK & (1 << EV_KVM_SET_IRQ)
RAW_HANDLER(EV_KVM_SET_IRQ, KVM_SET_IRQ, 1, 3)
#endif
#if EVENT_MASK & (1 << EV_KVM_MSI_SET_IRQ)
HANDLER(EV_KVM_MSI_SET_IRQ, KVM_MSI_SET_IRQ, 1)
#endif
#if RAW_MASK & (1 << EV_KVM_MSI_SET_IRQ)
RAW_HANDLER(EV_KVM_MSI_SET_IRQ, KVM_MSI_SET_IRQ, 1, 2)
#endif
#if EVENT_MASK & (1 << EV_KVM_INJ_VIRQ)
HANDLER(EV_KVM_INJ_VIRQ, KVM_INJ_VIRQ, 1)
#endif
#if RAW_MASK & (1 << EV_KVM_INJ_VIRQ)
RAW_HANDLER(EV_KVM_INJ_VIRQ, KVM_INJ_VIRQ, 1, 3)
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
