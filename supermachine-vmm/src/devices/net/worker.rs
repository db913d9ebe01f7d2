//! The NIC's data path: one tokio task per activation that owns both queues.
//!
//! Each wake-up (a queue kick, a frame from the stack, room again toward the stack) runs one
//! *pass* under the [`WorkerGate`]: every transmit chain the guest posted goes to the stack
//! (until the stack's channel is full), then every frame the stack has goes into a receive
//! buffer (until the guest has none left), then at most one interrupt is raised, and only if
//! the guest asked for one (event idx). Everything in a pass is a copy between guest memory and
//! a frame: nothing blocks the runtime thread.
//!
//! The guest is not trusted: descriptor chains are bounds-checked by `vm-memory`, frames of the
//! wrong shape (too short, too long, writable where readable is needed) are dropped with a
//! debug log, and nothing here panics on guest input.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::os::EventFd;
use tokio::sync::mpsc::{self, error::TrySendError};
use tracing::{debug, error, trace, warn};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestMemoryMmap};

use super::{checksum, RX, TX};
use crate::devices::virtio::kick::{async_eventfd, drain};
use crate::devices::virtio::ring::add_used;
use crate::devices::virtio::worker_gate::{Entry, WorkerGate};
use crate::devices::virtio::{IrqTrigger, VIRTIO_MMIO_INT_VRING};
use crate::net::link::ETHERNET_HEADER;
use crate::net::{Frame, GuestLink};

/// `struct virtio_net_hdr_v1` (with `num_buffers`): what precedes every frame in both
/// directions once `VERSION_1` is negotiated.
pub(super) const NET_HDR_LEN: usize = 12;
/// The largest frame the guest may send: MTU + Ethernet header + one VLAN tag.
pub(super) const MAX_FRAME: usize = crate::net::addressing::MTU + ETHERNET_HEADER + 4;

type Mem = GuestMemoryMmap<()>;

/// The stack's channels, kept by the device across activations (a reset ends one task and a
/// later activation starts another on the same link).
#[derive(Debug)]
pub(super) struct Link {
    to_stack: mpsc::Sender<Frame>,
    from_stack: Arc<tokio::sync::Mutex<mpsc::Receiver<Frame>>>,
}

impl Link {
    pub(super) fn new(link: GuestLink) -> Self {
        Link {
            to_stack: link.to_stack,
            from_stack: Arc::new(tokio::sync::Mutex::new(link.from_stack)),
        }
    }
}

/// What one activation's task owns.
pub(super) struct Worker {
    mem: Arc<Mem>,
    /// The driver accepted `VIRTIO_NET_F_GUEST_CSUM`: frames go in marked `DATA_VALID`;
    /// otherwise their TCP checksums are filled first.
    guest_csum: bool,
    queues: [Queue; 2],
    irq: IrqTrigger,
    link: Arc<Link>,
    gate: Arc<WorkerGate>,
    needs_reset: Arc<AtomicBool>,
    /// A frame from the stack waiting for a receive buffer.
    rx_pending: Option<Frame>,
    /// A frame from the guest waiting for room in the stack's channel.
    tx_pending: Option<Frame>,
    /// The stack ended (its task was dropped): frames from the guest are dropped.
    stack_gone: bool,
}

impl Worker {
    pub(super) fn new(
        mem: Arc<Mem>,
        guest_csum: bool,
        queues: [Queue; 2],
        irq: IrqTrigger,
        link: Arc<Link>,
        gate: Arc<WorkerGate>,
        needs_reset: Arc<AtomicBool>,
    ) -> Self {
        Worker {
            mem,
            guest_csum,
            queues,
            irq,
            link,
            gate,
            needs_reset,
            rx_pending: None,
            tx_pending: None,
            stack_gone: false,
        }
    }
}

/// Why the task woke.
enum Woke {
    Kick,
    Frame(Frame),
    Room,
    StackGone,
}

/// Runs one activation until the device is reset or dropped (the gate closes / the task is
/// aborted).
pub(super) async fn run(mut w: Worker, notify: [EventFd; 2]) {
    let [rx_fd, tx_fd] = notify;
    let (rx_kick, tx_kick) = match (async_eventfd(rx_fd), async_eventfd(tx_fd)) {
        (Ok(rx), Ok(tx)) => (rx, tx),
        (Err(e), _) | (_, Err(e)) => {
            error!(%e, "virtio-net cannot watch its queue eventfds");
            return;
        }
    };
    // The previous activation's task (aborted on reset) lets go of the receiver when it is
    // dropped; wait for that.
    let mut from_stack = Arc::clone(&w.link.from_stack).lock_owned().await;
    let to_stack = w.link.to_stack.clone();
    let gate = Arc::clone(&w.gate);
    debug!("virtio-net worker started");
    loop {
        // The gate's lock is not held across an await (the future must stay Send).
        let paused = match gate.enter() {
            Entry::Pass(mut pass) => {
                let result = w.pass(&mut from_stack);
                pass.record(&w.queues);
                if let Err(e) = result {
                    // A broken ring: the driver is confused or hostile. Stop and report
                    // DEVICE_NEEDS_RESET rather than guess.
                    error!(%e, "virtio-net virtqueue error; device needs reset");
                    w.needs_reset.store(true, Ordering::SeqCst);
                    return;
                }
                false
            }
            Entry::Paused => true,
            Entry::Closed => return,
        };
        if paused {
            gate.resumed().await;
            continue;
        }
        let want_frame = w.rx_pending.is_none() && !w.stack_gone;
        let want_room = w.tx_pending.is_some() && !w.stack_gone;
        let woke = tokio::select! {
            r = tx_kick.readable() => { drain(r, "virtio-net"); Woke::Kick }
            r = rx_kick.readable() => { drain(r, "virtio-net"); Woke::Kick }
            frame = from_stack.recv(), if want_frame => frame.map_or(Woke::StackGone, Woke::Frame),
            room = to_stack.reserve(), if want_room => match room {
                Ok(permit) => {
                    if let Some(frame) = w.tx_pending.take() {
                        permit.send(frame);
                    }
                    Woke::Room
                }
                Err(_) => Woke::StackGone,
            },
        };
        match woke {
            Woke::Frame(frame) => w.rx_pending = Some(frame),
            Woke::StackGone => {
                warn!("virtio-net: the user-mode network ended; the guest's frames are dropped");
                w.stack_gone = true;
                w.tx_pending = None;
            }
            Woke::Kick | Woke::Room => {}
        }
    }
}

impl Worker {
    /// One pass: transmit, receive, one interrupt.
    fn pass(&mut self, from_stack: &mut mpsc::Receiver<Frame>) -> Result<(), virtio_queue::Error> {
        let mem = Arc::clone(&self.mem);
        let sent = self.process_tx(&mem)?;
        let received = self.process_rx(&mem, from_stack)?;
        // Each queue that moved must be asked (event idx bookkeeping), even if the other
        // already wants an interrupt.
        let mut irq = false;
        if sent > 0 {
            irq |= self.queues[TX].needs_notification(&*mem)?;
        }
        if received > 0 {
            irq |= self.queues[RX].needs_notification(&*mem)?;
        }
        if irq {
            if let Err(e) = self.irq.trigger(VIRTIO_MMIO_INT_VRING) {
                warn!(%e, "virtio-net interrupt");
            }
        }
        trace!(sent, received, irq, "virtio-net pass");
        Ok(())
    }

    /// Moves every transmit chain to the stack until its channel is full; returns the chains
    /// used.
    fn process_tx(&mut self, mem: &Mem) -> Result<usize, virtio_queue::Error> {
        let mut used = 0;
        if self.tx_pending.is_some() {
            // Wait for room first; the guest's chains stay in its ring meanwhile.
            return Ok(0);
        }
        loop {
            self.queues[TX].disable_notification(mem)?;
            while let Some(chain) = self.queues[TX].iter(mem)?.next() {
                let head = chain.head_index();
                let descs: Vec<Descriptor> = chain.collect();
                let frame = read_frame(mem, &descs);
                add_used(&mut self.queues[TX], mem, head, 0)?;
                used += 1;
                let Some(frame) = frame else { continue };
                if self.stack_gone {
                    continue;
                }
                match self.link.to_stack.try_send(frame) {
                    Ok(()) => {}
                    Err(TrySendError::Full(frame)) => {
                        // Notifications stay off: the task comes back once there is room.
                        self.tx_pending = Some(frame);
                        return Ok(used);
                    }
                    Err(TrySendError::Closed(_)) => self.stack_gone = true,
                }
            }
            if !self.queues[TX].enable_notification(mem)? {
                return Ok(used);
            }
        }
    }

    /// Puts frames from the stack into receive buffers until either runs out; returns the
    /// buffers used.
    fn process_rx(
        &mut self,
        mem: &Mem,
        from_stack: &mut mpsc::Receiver<Frame>,
    ) -> Result<usize, virtio_queue::Error> {
        let mut used = 0;
        loop {
            let mut frame = match self.rx_pending.take() {
                Some(frame) => frame,
                None => match from_stack.try_recv() {
                    Ok(frame) => frame,
                    Err(_) => return Ok(used),
                },
            };
            let Some(chain) = self.queues[RX].iter(mem)?.next() else {
                self.rx_pending = Some(frame);
                // Out of buffers: ask the guest to kick when it posts more, unless it just
                // did.
                if self.queues[RX].enable_notification(mem)? {
                    continue;
                }
                return Ok(used);
            };
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.collect();
            let flags = if self.guest_csum {
                checksum::HDR_F_DATA_VALID
            } else {
                checksum::fill_tcp(&mut frame);
                0
            };
            let len = write_frame(mem, &descs, &frame, flags);
            add_used(&mut self.queues[RX], mem, head, len)?;
            used += 1;
        }
    }
}

/// The frame in a transmit chain (after its virtio-net header), or `None` for a chain of the
/// wrong shape.
fn read_frame(mem: &Mem, descs: &[Descriptor]) -> Option<Frame> {
    if descs.iter().any(|d| d.is_write_only()) {
        debug!("virtio-net transmit chain with a device-writable buffer; dropped");
        return None;
    }
    let total: usize = descs.iter().map(|d| d.len() as usize).sum();
    let Some(len) = total.checked_sub(NET_HDR_LEN) else {
        debug!(
            total,
            "virtio-net transmit chain shorter than its header; dropped"
        );
        return None;
    };
    if !(ETHERNET_HEADER..=MAX_FRAME).contains(&len) {
        debug!(len, "virtio-net frame of an impossible size; dropped");
        return None;
    }
    let mut frame = vec![0u8; len];
    let mut skip = NET_HDR_LEN;
    let mut filled = 0;
    for d in descs {
        let dlen = d.len() as usize;
        if skip >= dlen {
            skip -= dlen;
            continue;
        }
        let take = dlen - skip;
        let at = d.addr().checked_add(skip as u64)?;
        if mem
            .read_slice(&mut frame[filled..filled + take], at)
            .is_err()
        {
            debug!("virtio-net transmit buffer outside guest memory; dropped");
            return None;
        }
        filled += take;
        skip = 0;
    }
    Some(frame)
}

/// Writes a header and `frame` into a receive chain; returns the bytes written (0 when the
/// chain cannot take the frame, which the guest counts as a bad frame).
fn write_frame(mem: &Mem, descs: &[Descriptor], frame: &[u8], flags: u8) -> u32 {
    if descs.iter().any(|d| !d.is_write_only()) {
        debug!("virtio-net receive chain with a device-readable buffer");
        return 0;
    }
    let total: usize = descs.iter().map(|d| d.len() as usize).sum();
    if total < NET_HDR_LEN + frame.len() {
        debug!(
            total,
            frame = frame.len(),
            "virtio-net receive buffer too small; frame dropped"
        );
        return 0;
    }
    // flags as given; gso_type, hdr_len, gso_size, csum_start, csum_offset: none;
    // num_buffers = 1.
    let mut header = [0u8; NET_HDR_LEN];
    header[0] = flags;
    header[10..12].copy_from_slice(&1u16.to_le_bytes());
    let mut parts = [&header[..], frame];
    let mut done = 0usize;
    for d in descs {
        let mut room = d.len() as usize;
        let mut at = d.addr();
        while room > 0 {
            let Some(part) = parts.iter_mut().find(|p| !p.is_empty()) else {
                break;
            };
            let take = room.min(part.len());
            if mem.write_slice(&part[..take], at).is_err() {
                debug!("virtio-net receive buffer outside guest memory");
                return 0;
            }
            *part = &part[take..];
            room -= take;
            done += take;
            let Some(next) = at.checked_add(take as u64) else {
                return 0;
            };
            at = next;
        }
    }
    // At most 12 + MTU + 18 bytes.
    u32::try_from(done).unwrap_or(0)
}
