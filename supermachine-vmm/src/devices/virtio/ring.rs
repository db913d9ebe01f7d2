//! Small helpers over `virtio_queue` shared by the devices.

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

/// Puts `head` in the used ring. A head index outside the queue (a guest that published
/// garbage in its avail ring) cannot be returned at all; it is logged and skipped so one bad
/// entry does not stop the device. Other errors (rings no longer in guest memory) are
/// returned: the queue is unusable.
pub(crate) fn add_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap<()>,
    head: u16,
    len: u32,
) -> Result<(), virtio_queue::Error> {
    match queue.add_used(mem, head, len) {
        Err(virtio_queue::Error::InvalidDescriptorIndex) => {
            tracing::warn!(
                head,
                size = queue.size(),
                "guest published an out-of-range descriptor head; skipped"
            );
            Ok(())
        }
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn out_of_range_heads_are_skipped_not_fatal() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut q = Queue::new(16).unwrap();
        q.set_size(16);
        q.set_desc_table_address(Some(0x1000), None);
        q.set_avail_ring_address(Some(0x2000), None);
        q.set_used_ring_address(Some(0x3000), None);
        q.set_ready(true);
        assert!(add_used(&mut q, &mem, 1000, 0).is_ok());
        assert_eq!(q.next_used(), 0);
        assert!(add_used(&mut q, &mem, 3, 7).is_ok());
        assert_eq!(q.next_used(), 1);
        q.set_used_ring_address(Some(0xfff0), None);
        assert!(
            add_used(&mut q, &mem, 3, 7).is_err(),
            "ring outside memory is fatal"
        );
    }
}
