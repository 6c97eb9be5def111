; Real-mode guest: one loop touches every kind of I/O access KVM traces, forever.
;
;   out OUT_PORT          kvm_pio write, exits to user space (KVM_EXIT_IO), value LOOP_FIRST
;   out KICK_PORT         kvm_pio write claimed by an ioeventfd: handled in the kernel
;   in  OUT_PORT          kvm_pio read, exits to user space
;   mov [es:MMIO_OUT]     kvm_mmio write, exits to user space (KVM_EXIT_MMIO)
;   mov [es:MMIO_KICK]    kvm_mmio write claimed by an ioeventfd
;   mov al, [es:MMIO_IN]  kvm_mmio read, exits to user space
;   rep outsb             MSG_BYTES writes to OUT_PORT; KVM's emulator exits once per byte,
;                         and the last byte written is LOOP_LAST
;
; Load with Vm.load_real_mode(entry=CODE_AT, segments={"es": MMIO_SEG}) into a VM whose
; memory ends below MMIO_SEG x 16, so that es points at unbacked (MMIO) addresses.

bits 16

CODE_AT           equ 0x0000      ; where the program is loaded (cs = ds = 0, ip = CODE_AT)
OUT_PORT          equ 0x500
KICK_PORT         equ 0x504
MMIO_SEG          equ 0x1000      ; es: guest-physical 0x10000
MMIO_OUT          equ 0           ; offsets in es
MMIO_IN           equ 4
MMIO_KICK         equ 8
LOOP_FIRST        equ 0x41        ; the loop's first write to OUT_PORT
LOOP_LAST         equ 10          ; the loop's last write to OUT_PORT (the message's last byte)
MSG_BYTES         equ 4

org CODE_AT

start:
        mov     dx, OUT_PORT
        mov     al, LOOP_FIRST
        out     dx, al
        mov     dx, KICK_PORT
        out     dx, al
        mov     dx, OUT_PORT
        in      al, dx
        mov     [es:MMIO_OUT], al
        mov     [es:MMIO_KICK], al
        mov     al, [es:MMIO_IN]
        mov     si, msg
        mov     cx, MSG_BYTES
        rep outsb
        jmp     start
msg:    db      "vtr", LOOP_LAST
