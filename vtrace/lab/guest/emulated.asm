; Emulated device guest: per request, program a legacy-style device through PIO registers
; (buffer address, length, command) and read its status register. With no in-kernel device
; behind these ports, every access is a user-space exit the VMM's device model handles:
; 4 exits per request, plus one final write to PORT_DONE.
;
; Parameters (PARAM_BASE): P_REQUESTS, P_REQUEST_BYTES, P_DATA. Results: R_COMPLETED.

bits 32
%include "layout.inc"
org CODE_BASE

start:
        mov     ecx, [PARAM_BASE + P_REQUESTS]
        mov     esi, [PARAM_BASE + P_DATA]
        mov     edi, [PARAM_BASE + P_REQUEST_BYTES]
        test    ecx, ecx
        jz      done
request:
        mov     dx, PORT_DEV_ADDR
        mov     eax, esi
        out     dx, eax                 ; exit 1: buffer address
        mov     dx, PORT_DEV_LEN
        mov     eax, edi
        out     dx, eax                 ; exit 2: length
        mov     dx, PORT_DEV_CMD
        mov     eax, DEV_CMD_READ
        out     dx, eax                 ; exit 3: command, the device does the work
        mov     dx, PORT_DEV_STATUS
        in      eax, dx                 ; exit 4: status
        cmp     eax, DEV_STATUS_DONE
        jne     bad_status
        inc     dword [PARAM_BASE + R_COMPLETED]
        dec     ecx
        jnz     request
done:
        mov     dx, PORT_DONE
        xor     eax, eax
        out     dx, al                  ; final exit: finished
        hlt
        jmp     done
bad_status:
        inc     dword [PARAM_BASE + R_BAD_USED]
        mov     dx, PORT_STALL
        mov     al, 1
        out     dx, al
        hlt
        jmp     bad_status
