/* QEMU's virtio trace points as its dtrace trace backend declares them
 * (scripts/tracetool/format/d.py over hw/virtio/trace-events): provider qemu,
 * same probe names, same argument lists. */
provider qemu {
probe virtqueue_flush(void *vq, unsigned int count);
probe virtqueue_pop(void *vq, void *elem, unsigned int in_num, unsigned int out_num);
probe virtio_queue_notify(void *vdev, int n, void *vq);
probe virtio_notify_irqfd(void *vdev, void *vq);
probe virtio_notify(void *vdev, void *vq);
};
