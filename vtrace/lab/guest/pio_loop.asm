; Exit-cost guest: P_REQUESTS byte writes to PORT_LOOP in a tight loop, then PORT_DONE.
; Handled in user space, each write is one KVM_EXIT_IO round trip; with PORT_LOOP
; registered as an ioeventfd, each write stays in the kernel and bumps the eventfd counter.

bits 32
%include "layout.inc"
org CODE_BASE

start:
        mov     ecx, [PARAM_BASE + P_REQUESTS]
        mov     dx, PORT_LOOP
again:
        out     dx, al
        dec     ecx
        jnz     again
done:
        mov     dx, PORT_DONE
        xor     eax, eax
        out     dx, al
        hlt
        jmp     done
