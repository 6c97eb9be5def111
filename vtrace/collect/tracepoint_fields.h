// Shared by probes.c (the recorder) and stat.c (vtrace stat).
#pragma once

static __always_inline u64 field(void *ctx, int off, int size) {
    // Direct loads from the tracepoint record at constant offsets (the verifier checks
    // them against the context); offset -1: the kernel lacks the field.
    if (off < 0)
        return 0;
    switch (size) {
    case 1:
        return *(u8 *)((u8 *)ctx + off);
    case 2:
        return *(u16 *)((u8 *)ctx + off);
    case 4:
        return *(u32 *)((u8 *)ctx + off);
    default:
        return *(u64 *)((u8 *)ctx + off);
    }
}

// Kernel worker threads: where KVM injects an interrupt signalled through an irqfd.
static __always_inline int is_kworker(void) {
    char comm[16];
    bpf_get_current_comm(&comm, sizeof(comm));
    return comm[0] == 'k' && comm[1] == 'w' && comm[2] == 'o' && comm[3] == 'r' &&
           comm[4] == 'k' && comm[5] == 'e' && comm[6] == 'r';
}
