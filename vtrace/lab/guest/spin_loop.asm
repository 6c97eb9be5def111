; Baseline for the exit-cost guest: the same loop without the write (dec, jnz), P_REQUESTS
; times, then PORT_DONE. Its time per iteration is what KVM's instruction emulation of the
; loop itself costs, to subtract from pio_loop's.

bits 32
%include "layout.inc"
org CODE_BASE

start:
        mov     ecx, [PARAM_BASE + P_REQUESTS]
        mov     dx, PORT_LOOP
again:
        nop
        dec     ecx
        jnz     again
done:
        mov     dx, PORT_DONE
        xor     eax, eax
        out     dx, al
        hlt
        jmp     done
