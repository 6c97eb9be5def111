; virtio guest: a front end that keeps a split virtqueue (virtio 1.x, 2.7) in its memory.
; Per batch it writes one descriptor and one avail-ring entry per request, publishes the
; avail index once, and kicks by writing the queue index to PORT_NOTIFY unless the device
; set VRING_USED_F_NO_NOTIFY. The VMM registers PORT_NOTIFY with KVM_IOEVENTFD, so a kick
; stays in the kernel. Completions are taken from the used ring, waiting either by polling
; used.idx or with sti; hlt until the back end's irqfd interrupt (P_WAIT_IRQ). The only exit
; to user space is the final write to PORT_DONE (or PORT_STALL when the back end never
; answers).
;
; Request k uses descriptor k mod ring size (one descriptor per request, device-writable,
; P_REQUEST_BYTES long, buffer P_DATA + slot * P_REQUEST_BYTES): the back end completes in
; order, so that descriptor is free again once request k - ring size has been used.
;
; Several vCPUs run this program at once, each on its own virtqueue: esi holds the vCPU's
; parameter block (PARAM_BASE + v * PARAM_STRIDE, set by the VMM), which names its queue's
; rings, notify port and queue index, and gets its own counters. Assembled with SHARED
; defined (virtio_shared.asm), several vCPUs share one queue: each adds and takes back used
; elements under the queue's lock (P_QBLOCK), as Linux's virtio drivers do.
;
; Registers: ebp = requests added to the queue so far, ebx = used elements consumed so far
; (with SHARED, copies of the queue's counts, loaded and stored under its lock).

bits 32
%include "layout.inc"
org CODE_BASE

%define PARAM(x) dword [esi + x]

start:
        mov     eax, PARAM(P_RING_SIZE)
        dec     eax
        mov     PARAM(S_RING_MASK), eax
        cmp     PARAM(P_WAIT_IRQ), 0
        je      poll_mode
        ; Interrupt gate for the back end's line, then the 8259 master (in-kernel, so
        ; these writes never leave KVM): ICW1-ICW4, and mask every line but LAB_IRQ.
        mov     edi, IDT_BASE + (PIC_VECTOR_BASE + LAB_IRQ) * 8
        mov     eax, irq_handler
        mov     [edi], ax
        mov     word [edi + 2], CODE_SEL
        mov     word [edi + 4], 0x8e00  ; present, DPL 0, 32-bit interrupt gate
        shr     eax, 16
        mov     [edi + 6], ax
        mov     al, 0x11
        out     0x20, al
        mov     al, PIC_VECTOR_BASE
        out     0x21, al
        mov     al, 0x04
        out     0x21, al
        mov     al, 0x01
        out     0x21, al
        mov     al, ~(1 << LAB_IRQ) & 0xff
        out     0x21, al
        jmp     ready
poll_mode:
        mov     edi, PARAM(P_AVAIL)
        mov     word [edi], VRING_AVAIL_F_NO_INTERRUPT
ready:
        xor     ebp, ebp
        xor     ebx, ebx

next_batch:
        mov     eax, PARAM(P_REQUESTS)
%ifdef SHARED
        sub     eax, PARAM(S_MINE)
%else
        sub     eax, ebp
%endif
        jz      drain
        cmp     eax, PARAM(P_BATCH)
        jbe     have_n
        mov     eax, PARAM(P_BATCH)
have_n:
        mov     PARAM(S_BATCH_N), eax
%ifdef SHARED
        call    lock_queue
%endif
room:   ; a batch needs (added - used) + n <= ring size
        mov     eax, ebp
        sub     eax, ebx
        add     eax, PARAM(S_BATCH_N)
        cmp     eax, PARAM(P_RING_SIZE)
        jbe     add_batch
        call    wait_used
        jmp     room

add_batch:
        mov     ecx, PARAM(S_BATCH_N)
add_one:
        mov     eax, ebp
        and     eax, PARAM(S_RING_MASK)         ; slot = descriptor head
        mov     edi, eax
        shl     edi, 4
        add     edi, PARAM(P_DESC)
        mov     edx, eax
        imul    edx, PARAM(P_REQUEST_BYTES)
        add     edx, PARAM(P_DATA)
        mov     [edi], edx                      ; desc.addr
        mov     dword [edi + 4], 0
        mov     edx, PARAM(P_REQUEST_BYTES)
        mov     [edi + 8], edx                  ; desc.len
        mov     dword [edi + 12], VRING_DESC_F_WRITE  ; desc.flags, desc.next = 0
        mov     edi, PARAM(P_AVAIL)
        mov     [edi + 4 + eax * 2], ax         ; avail.ring[slot] = head
        inc     ebp
        dec     ecx
        jnz     add_one
        ; Publish avail.idx. xchg with memory is locked: the publish is ordered before the
        ; read of used.flags below, which pairs with the back end clearing NO_NOTIFY and
        ; then re-reading avail.idx.
        mov     eax, ebp
        mov     edi, PARAM(P_AVAIL)
        xchg    [edi + 2], ax
%ifdef SHARED
        mov     eax, PARAM(S_BATCH_N)
        add     PARAM(S_MINE), eax
        mov     PARAM(S_LAST), ebp
        call    unlock_queue
%endif
        mov     edi, PARAM(P_USED)
        test    word [edi], VRING_USED_F_NO_NOTIFY
        jnz     suppressed
        mov     edx, PARAM(P_NOTIFY_PORT)
        mov     eax, PARAM(P_QUEUE)
        out     dx, ax                          ; the kick: ioeventfd, no user-space exit
        inc     PARAM(R_KICKS)
        jmp     next_batch
suppressed:
        inc     PARAM(R_SUPPRESSED)
        jmp     next_batch

drain:  ; all requests added: wait until every one is used
%ifdef SHARED
        call    lock_queue                      ; in order: ours are used once S_LAST are
.check:
        mov     eax, ebx
        sub     eax, PARAM(S_LAST)
        jns     .mine_used
        call    wait_used
        jmp     .check
.mine_used:
        call    unlock_queue
%else
        cmp     ebx, ebp
        je      finish
        call    wait_used
        jmp     drain
%endif
finish:
        mov     dx, PORT_DONE
        xor     eax, eax
        out     dx, al
        hlt
        jmp     finish

; wait_used: return once at least one used element was consumed. Polls used.idx, or sleeps
; in hlt until an interrupt; reports a stall after P_SPIN_LIMIT polls without progress.
wait_used:
        mov     eax, PARAM(P_SPIN_LIMIT)
        mov     PARAM(S_SPIN), eax
.again:
        call    reap
        test    eax, eax
        jnz     .done
        inc     PARAM(R_POLLS)
        cmp     PARAM(P_WAIT_IRQ), 0
        je      .spin
        sti                                     ; hlt runs before a pending interrupt
        hlt
        cli
        jmp     .again                          ; not reached: the handler resumes at .again
.spin:
        dec     PARAM(S_SPIN)
        jnz     .again
        mov     dx, PORT_STALL
        mov     al, 2
        out     dx, al
        hlt
        jmp     .spin
.done:
        ret

%ifdef SHARED
; lock_queue: take the queue's lock (spinning on xchg, a locked exchange) and load its
; counts into ebp and ebx. unlock_queue: store them back and release the lock (a plain store
; releases on x86).
lock_queue:
        mov     edi, PARAM(P_QBLOCK)
.spin:
        mov     eax, 1
        xchg    [edi + Q_LOCK], eax
        test    eax, eax
        jnz     .spin
        mov     ebp, [edi + Q_ADDED]
        mov     ebx, [edi + Q_USED]
        ret
unlock_queue:
        mov     edi, PARAM(P_QBLOCK)
        mov     [edi + Q_ADDED], ebp
        mov     [edi + Q_USED], ebx
        mov     dword [edi + Q_LOCK], 0
        ret
%endif

; reap: consume the used elements from ebx up to used.idx, checking that each has the
; expected id (the slot) and length. Returns eax = elements consumed.
reap:
        mov     edi, PARAM(P_USED)
        ; Read used.idx until two reads agree: KVM's emulator reads guest memory with a
        ; plain memory copy, which does not promise one 16-bit access, so a read racing
        ; the back end's store could see half of it.
        movzx   eax, word [edi + 2]
.reread:
        mov     edx, eax
        movzx   eax, word [edi + 2]
        cmp     eax, edx
        jne     .reread
        sub     eax, ebx
        movzx   ecx, ax                         ; new elements, modulo 2^16
        jecxz   .none
        push    ecx
.each:
        mov     eax, ebx
        and     eax, PARAM(S_RING_MASK)
        cmp     [edi + 4 + eax * 8], eax        ; used.ring[i].id
        jne     .bad
        mov     edx, PARAM(P_REQUEST_BYTES)
        cmp     [edi + 8 + eax * 8], edx        ; used.ring[i].len
        je      .good
.bad:
        inc     PARAM(R_BAD_USED)
.good:
        inc     ebx
        dec     ecx
        jnz     .each
        pop     eax
        add     PARAM(R_COMPLETED), eax
        ret
.none:
        xor     eax, eax
        ret

; The back end's interrupt. It is only ever taken in wait_used's sti; hlt (IF is clear
; everywhere else), so instead of iret it drops its frame (eip, cs, eflags) and resumes the
; wait loop with interrupts off, as after the cli. KVM's instruction emulator, which runs
; every guest instruction on a host without VMX/SVM, implements iret only in real mode.
irq_handler:
        add     esp, 12
        inc     PARAM(R_INTERRUPTS)
        mov     al, 0x20                        ; non-specific EOI to the 8259
        out     0x20, al
        jmp     wait_used.again
