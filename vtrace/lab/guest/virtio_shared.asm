; virtio guest for a virtqueue shared by several vCPUs: virtio.asm with SHARED defined (each
; vCPU adds and takes back used elements under the queue's lock; see virtio.asm).
%define SHARED
%include "virtio.asm"
