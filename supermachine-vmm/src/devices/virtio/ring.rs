//! Small helpers over `virtio_queue` shared by the devices.

use std::sync::atomic::{fence, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

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

/// Asks the driver to notify the device once its avail index moves past `at`, i.e. when
/// the driver next publishes a buffer while its avail index is `at`. Returns whether the avail
/// index has already moved past `at` (that buffer is there already, so no kick will come for
/// it).
///
/// `enable_notification` alone arms the kick at the device's own position (`next_avail`),
/// which is only right when the device has consumed everything: the driver kicks only when its
/// avail index crosses the armed value (`vring_need_event`), so for a ring with buffers still
/// posted behind the device's position — a vsock event queue, where Linux keeps eight — no
/// kick would ever come. `virtio_queue` has no public setter for `avail_event`, so it is written
/// here at its place in the used ring (virtio 1.2, 2.7.8: after the `size` used elements).
pub(crate) fn arm_kick_after(
    queue: &mut Queue,
    mem: &GuestMemoryMmap<()>,
    at: u16,
) -> Result<bool, virtio_queue::Error> {
    // Clears VRING_USED_F_NO_NOTIFY without event idx; with it, writes avail_event = next_avail,
    // corrected below.
    queue.enable_notification(mem)?;
    if queue.event_idx_enabled() {
        // flags + idx (4 bytes), then `size` elements of 8 bytes: cannot overflow for a u16 size.
        let offset = 4 + 8 * u64::from(queue.size());
        let addr = queue
            .used_ring()
            .checked_add(offset)
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        mem.store(at.to_le(), GuestAddress(addr), Ordering::Release)
            .map_err(virtio_queue::Error::GuestMemory)?;
    }
    // The driver may have published between our reading `at` and the store above, having seen
    // the old threshold: look again after it.
    fence(Ordering::SeqCst);
    Ok(queue.avail_idx(mem, Ordering::Acquire)?.0 != at)
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
