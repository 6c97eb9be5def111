; Real-mode guest: OUT_COUNT byte writes to OUT_PORT in a tight loop, then `hlt`.
; Handled in user space, each write is one KVM_EXIT_IO; with OUT_PORT registered as an
; ioeventfd, each write stays in the kernel. Without an in-kernel irqchip the final `hlt` is
; one KVM_EXIT_HLT. Load with Vm.load_real_mode(entry=CODE_AT) and write the count (a dword)
; at COUNT_AT; an OUT_COUNT of 0 loops 2^32 times.

bits 16

CODE_AT           equ 0x1000      ; where the program is loaded (cs = 0, ip = CODE_AT)
COUNT_AT          equ 0x0ff0      ; dword: writes to make (VMM -> guest)
OUT_PORT          equ 0x10

org CODE_AT

start:
        mov     dx, OUT_PORT
        mov     ecx, [COUNT_AT]
again:
        out     dx, al
        dec     ecx
        jnz     again
        hlt
