/* Fires QEMU's virtio USDT probes a given number of times, guarded by their is-enabled
 * semaphores exactly like a QEMU built with --enable-trace-backends=dtrace: a probe fires
 * only while a tracer has set its semaphore.
 *
 * Build: dtrace -h -s qemu_virtio_probes.d -o qemu_virtio_probes.h
 *        dtrace -G -s qemu_virtio_probes.d -o qemu_virtio_probes_sema.o
 *        gcc -O2 -I. qemu_virtio_probes.c qemu_virtio_probes_sema.o -o qemu-system-usdt
 * Run:   qemu-system-usdt COUNT; it prints {"pid": P}, then for each line read on stdin
 *        fires each probe COUNT times and prints how many times each probe's semaphore was
 *        set when reached (one JSON line); it exits at the end of stdin. A recording can
 *        attach between the pid line and the first input line.
 */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "qemu_virtio_probes.h"

/* Stand-ins for QEMU's VirtIODevice, VirtQueue and VirtQueueElement. */
static char vdev[64], vq[64], elem[64];

int main(int argc, char **argv) {
    char *end = NULL;
    long count = argc == 2 ? strtol(argv[1], &end, 10) : -1;
    if (count < 0 || end == argv[1] || *end != '\0') {
        fprintf(stderr, "usage: %s COUNT\n", argv[0]);
        return 2;
    }
    printf("{\"pid\": %d}\n", (int)getpid());
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        long notify = 0, pop = 0, flush = 0, irq = 0, irqfd = 0;
        for (long i = 0; i < count; i++) {
            /* The order of one request in QEMU: kick, pop, flush, interrupt. */
            if (QEMU_VIRTIO_QUEUE_NOTIFY_ENABLED()) {
                QEMU_VIRTIO_QUEUE_NOTIFY(vdev, (int)(i & 1), vq);
                notify++;
            }
            if (QEMU_VIRTQUEUE_POP_ENABLED()) {
                QEMU_VIRTQUEUE_POP(vq, elem, 1u, 1u);
                pop++;
            }
            if (QEMU_VIRTQUEUE_FLUSH_ENABLED()) {
                QEMU_VIRTQUEUE_FLUSH(vq, 1u);
                flush++;
            }
            if (QEMU_VIRTIO_NOTIFY_ENABLED()) {
                QEMU_VIRTIO_NOTIFY(vdev, vq);
                irq++;
            }
            if (QEMU_VIRTIO_NOTIFY_IRQFD_ENABLED()) {
                QEMU_VIRTIO_NOTIFY_IRQFD(vdev, vq);
                irqfd++;
            }
        }
        printf("{\"virtio_queue_notify\": %ld, \"virtqueue_pop\": %ld, "
               "\"virtqueue_flush\": %ld, \"virtio_notify\": %ld, "
               "\"virtio_notify_irqfd\": %ld}\n",
               notify, pop, flush, irq, irqfd);
        fflush(stdout);
    }
    return 0;
}
