// vtrace stat: in-kernel aggregation of KVM events, no per-event output.
//
// counts: (pid, event, reason) -> events (behind the per-CPU `hot` table, see count()). For kvm_exit the reason is the exit reason (VMX:
// low 16 bits), for kvm_userspace_exit the KVM_EXIT_* code, for kvm_pio the port.
// For kvm_mmio the reason is the access type (KVM_TRACE_MMIO_*: 0 unsatisfied read, 1 read,
// 2 write; MMIO_KERNEL_DEVICE_WRITE: a write to the local APIC or IOAPIC page), for
// kvm_inj_virq the vector. EV_PIO_READ, EV_USER_PIO_WRITE, EV_READ_CLAIM (reason: port) and
// EV_USER_MMIO_WRITE are the bookkeeping of kicks (see "Kicks" below).
// hist:   (pid, kind, reason, log2 slot) -> (events, summed ns), where kind 0 is kvm_exit -> kvm_entry on
// the same thread (the whole exit, where the CPU has vmx/svm) and kind 1 is
// kvm_userspace_exit -> the same thread's next KVM_RUN (time the VMM spent in user space
// handling the exit; seen on every host). The next KVM_RUN is marked by kvm_fpu with load=1,
// which KVM traces once at the start of every KVM_RUN (END_FPU), or else by the syscall
// tracepoint on ioctl(KVM_RUN) (END_IOCTL): dearer, since a syscall tracepoint sends every
// syscall of every process on the host through the slow entry path.
// -D defines (stat.py): FILTER_PIDS, KVM_RUN, HAVE_EXIT, END_FPU, END_IOCTL, RAW_FPU,
// TASK_STORAGE, HOT_SLOTS, EV_PIO_READ, EV_USER_PIO_WRITE, EV_USER_MMIO_WRITE, EV_READ_CLAIM,
// <NAME>_OFF/_SIZE
// offsets from the running kernel's format files, and RAW_MASK: the events read as raw
// tracepoints (their C arguments, before the kernel formats a record: cheaper per event),
// each where the kernel's BTF shows the prototype its handler below is written against
// (raw_tracepoints.py). The classic handlers serve the other events and the fallback.

struct ckey {
    u32 pid;
    u32 reason;
    u32 event;
};
struct hkey {
    u32 pid;
    u32 kind;
    u32 reason;
    u32 slot;
};
// A thread's open intervals, one per kind: on a vmx/svm host an exit that goes to user space
// is open as kind 0 (until kvm_entry) and kind 1 (until the next KVM_RUN) at once.
// claimed: the thread's last user-space exit was taken as the PIO write to claimed_port's
// (see "Kicks").
struct pending {
    u64 ts_ns[2];
    u32 reason[2];
    u8 open[2];
    u8 claimed;
    u16 claimed_port;
};
// A histogram bucket: events and their summed duration (a Prometheus histogram's _sum),
// both in the one value, so the sum costs no second map operation.
struct hval {
    u64 n;
    u64 ns;
};

BPF_PERCPU_HASH(counts, struct ckey, u64, 16384);
BPF_PERCPU_HASH(hist, struct hkey, struct hval, 16384);
BPF_HASH(pids, u32, u8, 1024);

// The open intervals of each thread, written in place: a thread's entry is made once and then
// only rewritten (no map update or delete per exit, each of which takes the map's lock).
#if TASK_STORAGE
// In the thread's own task storage: no key hashing, and the kernel frees the entry with the
// thread.
BPF_TASK_STORAGE(start, struct pending);

static __always_inline struct pending *pending_of(int create) {
    return start.task_storage_get((struct task_struct *)bpf_get_current_task_btf(), 0,
                                  create ? BPF_LOCAL_STORAGE_GET_F_CREATE : 0);
}
#else
// Kernels that do not give task storage to tracepoint programs: a map by thread id, LRU so
// that the threads of a long session cannot fill it.
BPF_TABLE("lru_hash", u32, struct pending, start, 65536);

static __always_inline struct pending *pending_of(int create) {
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct pending *p = start.lookup(&tid);
    if (p || !create)
        return p;
    struct pending fresh = {};
    start.update(&tid, &fresh);
    return start.lookup(&tid);
}
#endif

#include "tracepoint_fields.h"

// Hot counters: a per-CPU direct-mapped table in front of `counts`. A slot belongs to the
// first key that maps to it and counts that key on this CPU from then on; a key whose slot
// another key holds is counted in `counts`. Slots are never given back, so each key lives in
// one place per CPU and the sums stay exact. An array slot costs no key hashing and no
// bucket walk (the verifier inlines the lookup): on a kick loop this is the whole program.
// The key packs pid (below 2^22, the kernel's PID_MAX_LIMIT), event (5 bits) and reason.
struct hot_slot {
    u64 key;
    u64 n;
};
BPF_PERCPU_ARRAY(hot, struct hot_slot, HOT_SLOTS);
#define HOT_CLAIMED (1ULL << 63)

// irq_rule: the interrupt events are also counted from kworkers when filtering by pid.
// id: bpf_get_current_pid_tgid(), read once by the caller.
static __always_inline int count_id(u64 id, u32 event, u32 reason, int irq_rule) {
    u32 tgid = id >> 32;
#if FILTER_PIDS
    if (!pids.lookup(&tgid) && !(irq_rule && is_kworker()))
        return 0;
#endif
    u64 packed = HOT_CLAIMED | ((u64)reason << 27) | ((u64)(tgid & 0x3fffff) << 5) | event;
    u32 i = (tgid * 2654435761u ^ reason * 40503u ^ event) & (HOT_SLOTS - 1);
    struct hot_slot *slot = hot.lookup(&i);
    if (slot) {
        if (slot->key == packed) {
            slot->n += 1;
            return 1;
        }
        // Claimed atomically: a program that interrupts this one on the same CPU may race
        // for the same free slot.
        if (slot->key == 0 && __sync_val_compare_and_swap(&slot->key, 0, packed) == 0) {
            slot->n += 1;
            return 1;
        }
    }
    struct ckey k = {.pid = tgid, .reason = reason, .event = event};
    u64 zero = 0;
    u64 *n = counts.lookup_or_try_init(&k, &zero);
    if (n)
        *n += 1;
    return 1;
}

static __always_inline int count(u32 event, u32 reason, int irq_rule) {
    return count_id(bpf_get_current_pid_tgid(), event, reason, irq_rule);
}

// Kicks: a device write (kvm_pio out, kvm_mmio write) that KVM handled in the kernel, i.e.
// that no user-space exit for it follows (an ioeventfd; kvm_fast_mmio is one by itself).
// Counted without any per-event work in user space and without a map update on the kick:
// each write is noted in this CPU's `last_access` slot (an inlined per-CPU array, as cheap
// as the hot counters), and a KVM_EXIT_IO / KVM_EXIT_MMIO exit of the same thread claims the
// noted write as one that went to user space (EV_USER_PIO_WRITE / EV_USER_MMIO_WRITE). Kicks
// are then writes - claimed writes, per port. The write and its exit are on one CPU: nothing
// between them sleeps (a thread preempted there and another's write noted on its CPU in
// the meantime would make that one write a kick).
// An `in` that goes to user space is traced only when it completes, after the exit: an
// `out` handled in the kernel then an `in` to user space would have the exit claim the
// `out`. The read's completion runs first thing in the next KVM_RUN, right after the marker
// that ends user-space time (end(1)), which arms this CPU's slot with the claimed port; a
// PIO read while armed gives the claim back (EV_READ_CLAIM, reason: the port). Any other
// device event of the thread disarms it. Without kvm_exit (no vmx/svm), an in-kernel `in`
// that is the guest's very next access after a user-space `out` cannot be told from that
// completion, the same limit as the trace analysis (vtrace.analyze.accesses).
#define LAST_NONE 0
#define LAST_PIO_WRITE 1
#define LAST_MMIO_WRITE 2
#define LAST_READ_ARMED 3
#define KVM_EXIT_IO 2
#define KVM_EXIT_MMIO 6
#define MMIO_KERNEL_DEVICE_WRITE 3
struct last_access {
    u32 tid;
    u32 state;
    u64 addr;
};
BPF_PERCPU_ARRAY(last_access, struct last_access, 1);

static __always_inline struct last_access *last_of_cpu(void) {
    u32 zero = 0;
    return last_access.lookup(&zero);
}

static __always_inline void note_access(u64 id, u32 state, u64 addr) {
    struct last_access *a = last_of_cpu();
    if (a) {
        a->tid = (u32)id;
        a->state = state;
        a->addr = addr;
    }
}

// A PIO event of a counted thread: a write is noted; a read right after the marker of the
// thread's return to KVM_RUN completes an `in` whose exit claimed a write (given back).
static __always_inline void pio_access(u64 id, u32 write, u32 port) {
    struct last_access *a = last_of_cpu();
    if (!a)
        return;
    if (!write) {
        count_id(id, EV_PIO_READ, port, 0);  // writes per port: kvm_pio - these
        if (a->tid == (u32)id && a->state == LAST_READ_ARMED)
            count_id(id, EV_READ_CLAIM, (u32)a->addr, 0);
    }
    a->tid = (u32)id;
    a->state = write ? LAST_PIO_WRITE : LAST_NONE;
    a->addr = port;
}

static __always_inline void mmio_access(u64 id, u32 type, u64 gpa) {
    u32 reason = type;
    int kernel_device = (gpa >= 0xfec00000 && gpa <= 0xfec00fff) ||  // IOAPIC
                        (gpa >= 0xfee00000 && gpa <= 0xfeefffff);   // local APIC
    if (type == 2 && kernel_device)  // KVM_TRACE_MMIO_WRITE, to a device inside KVM
        reason = MMIO_KERNEL_DEVICE_WRITE;
    if (count_id(id, EV_KVM_MMIO, reason, 0))
        note_access(id, reason == 2 ? LAST_MMIO_WRITE : LAST_NONE, gpa);
}

// Another device event of the thread: it ran on, so nothing is armed any more.
static __always_inline void disarm(u64 id) {
    struct last_access *a = last_of_cpu();
    if (a && a->tid == (u32)id && a->state == LAST_READ_ARMED)
        a->state = LAST_NONE;
}

// log2 of a duration in ns, by halving (bounded loop the verifier accepts).
static __always_inline u32 log2_slot(u64 v) {
    u32 slot = 0;
#pragma unroll
    for (int i = 0; i < 40; i++) {
        if (v > 1) {
            v >>= 1;
            slot++;
        }
    }
    return slot;
}

// kind is a constant at every call (0: kvm_exit, 1: kvm_userspace_exit).
static __always_inline struct pending *begin(u32 reason, u32 kind) {
    struct pending *p = pending_of(1);
    if (!p)
        return 0;
    p->ts_ns[kind] = bpf_ktime_get_ns();  // only this thread writes its entry
    p->reason[kind] = reason;
    p->open[kind] = 1;
    return p;
}

// A user-space exit: counted, timed from here, and (KVM_EXIT_IO/MMIO) the claim of the
// write this CPU noted for the thread.
static __always_inline void userspace_exit(u32 reason) {
    u64 id = bpf_get_current_pid_tgid();
    if (!count_id(id, EV_KVM_USERSPACE_EXIT, reason, 0))
        return;
    u32 claimed = 0, port = 0;
    struct last_access *a = last_of_cpu();
    if (a && a->tid == (u32)id) {
        if (a->state == LAST_PIO_WRITE && reason == KVM_EXIT_IO) {
            count_id(id, EV_USER_PIO_WRITE, (u32)a->addr, 0);
            claimed = 1;
            port = (u32)a->addr;
        } else if (a->state == LAST_MMIO_WRITE && reason == KVM_EXIT_MMIO) {
            count_id(id, EV_USER_MMIO_WRITE, 0, 0);
        }
        a->state = LAST_NONE;
    }
    struct pending *p = begin(reason, 1);
    if (p) {
        p->claimed = claimed;
        p->claimed_port = port;
    }
}

static __always_inline void end(u32 kind) {
    struct pending *p = pending_of(0);
    if (!p || !p->open[kind])
        return;
    u64 d = bpf_ktime_get_ns() - p->ts_ns[kind];
    struct hkey k = {.pid = bpf_get_current_pid_tgid() >> 32, .kind = kind,
                     .reason = p->reason[kind], .slot = log2_slot(d)};
    p->open[kind] = 0;  // closed: a second marker before the next exit times nothing
    if (kind == 1 && p->claimed) {  // the next PIO read may be the exit's own `in`
        p->claimed = 0;
        struct last_access *a = last_of_cpu();
        if (a) {
            a->tid = (u32)bpf_get_current_pid_tgid();
            a->state = LAST_READ_ARMED;
            a->addr = p->claimed_port;
        }
    }
    struct hval zero = {};
    struct hval *v = hist.lookup_or_try_init(&k, &zero);
    if (v) {
        v->n += 1;
        v->ns += d;
    }
}

#if HAVE_EXIT
int on_kvm_exit(void *ctx) {
    u32 reason = field(ctx, EXIT_REASON_OFF, EXIT_REASON_SIZE);
    if (field(ctx, EXIT_ISA_OFF, EXIT_ISA_SIZE) == 1)  // KVM_ISA_VMX: flags in the high bits
        reason &= 0xffff;
    u64 id = bpf_get_current_pid_tgid();
    if (count_id(id, EV_KVM_EXIT, reason, 0)) {
        disarm(id);
        begin(reason, 0);
    }
    return 0;
}

int on_kvm_entry(void *ctx) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
#if FILTER_PIDS
    if (!pids.lookup(&tgid))
        return 0;
#endif
    end(0);
    return 0;
}
#endif

int on_kvm_userspace_exit(void *ctx) {
    userspace_exit(field(ctx, USER_REASON_OFF, USER_REASON_SIZE));
    return 0;
}

#if END_FPU
int on_kvm_fpu(void *ctx) {
    if (field(ctx, FPU_LOAD_OFF, FPU_LOAD_SIZE))
        end(1);
    return 0;
}
#endif

#if END_FPU && RAW_FPU
// TP_PROTO(int load)
int raw_on_kvm_fpu(struct bpf_raw_tracepoint_args *ctx) {
    if ((int)ctx->args[0])
        end(1);
    return 0;
}
#endif

#if END_IOCTL
int on_sys_enter_ioctl(void *ctx) {
    if ((u32)field(ctx, IOCTL_CMD_OFF, IOCTL_CMD_SIZE) != KVM_RUN)
        return 0;
    end(1);
    return 0;
}
#endif

int on_kvm_pio(void *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    u32 port = field(ctx, PIO_PORT_OFF, PIO_PORT_SIZE);
    if (count_id(id, EV_KVM_PIO, port, 0))
        pio_access(id, field(ctx, PIO_RW_OFF, PIO_RW_SIZE), port);
    return 0;
}

int on_kvm_mmio(void *ctx) {
    mmio_access(bpf_get_current_pid_tgid(), field(ctx, MMIO_TYPE_OFF, MMIO_TYPE_SIZE),
                field(ctx, MMIO_GPA_OFF, MMIO_GPA_SIZE));
    return 0;
}

int on_kvm_fast_mmio(void *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    if (count_id(id, EV_KVM_FAST_MMIO, 0, 0))
        disarm(id);
    return 0;
}

// IRQ injection through an irqfd runs in a kworker: counted from kworkers too.
int on_kvm_set_irq(void *ctx) {
    count(EV_KVM_SET_IRQ, 0, 1);
    return 0;
}

int on_kvm_msi_set_irq(void *ctx) {
    count(EV_KVM_MSI_SET_IRQ, 0, 1);
    return 0;
}

int on_kvm_inj_virq(void *ctx) {
    count(EV_KVM_INJ_VIRQ, field(ctx, INJ_VECTOR_OFF, INJ_VECTOR_SIZE), 1);
    return 0;
}

// Raw tracepoint handlers: the same counts from the tracepoints' C arguments.
#define RAW(EV) (RAW_MASK & (1 << EV))

#if RAW(EV_KVM_USERSPACE_EXIT)
// TP_PROTO(__u32 reason, int errno)
int raw_on_kvm_userspace_exit(struct bpf_raw_tracepoint_args *ctx) {
    userspace_exit((u32)ctx->args[0]);
    return 0;
}
#endif

#if RAW(EV_KVM_PIO)
// TP_PROTO(unsigned int rw, unsigned int port, unsigned int size, unsigned int count, ...)
int raw_on_kvm_pio(struct bpf_raw_tracepoint_args *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    u32 port = ctx->args[1];
    if (count_id(id, EV_KVM_PIO, port, 0))
        pio_access(id, (u32)ctx->args[0], port);
    return 0;
}
#endif

#if RAW(EV_KVM_MMIO)
// TP_PROTO(int type, int len, u64 gpa, void *val)
int raw_on_kvm_mmio(struct bpf_raw_tracepoint_args *ctx) {
    mmio_access(bpf_get_current_pid_tgid(), (u32)ctx->args[0], ctx->args[2]);
    return 0;
}
#endif

#if RAW(EV_KVM_FAST_MMIO)
int raw_on_kvm_fast_mmio(struct bpf_raw_tracepoint_args *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    if (count_id(id, EV_KVM_FAST_MMIO, 0, 0))
        disarm(id);
    return 0;
}
#endif

#if RAW(EV_KVM_SET_IRQ)
int raw_on_kvm_set_irq(struct bpf_raw_tracepoint_args *ctx) {
    count(EV_KVM_SET_IRQ, 0, 1);
    return 0;
}
#endif

#if RAW(EV_KVM_MSI_SET_IRQ)
int raw_on_kvm_msi_set_irq(struct bpf_raw_tracepoint_args *ctx) {
    count(EV_KVM_MSI_SET_IRQ, 0, 1);
    return 0;
}
#endif

#if RAW(EV_KVM_INJ_VIRQ)
// TP_PROTO(unsigned int vector, bool soft, bool reinjected)
int raw_on_kvm_inj_virq(struct bpf_raw_tracepoint_args *ctx) {
    count(EV_KVM_INJ_VIRQ, (u32)ctx->args[0], 1);
    return 0;
}
#endif
