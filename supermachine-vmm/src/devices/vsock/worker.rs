//! The vsock device's data path: one tokio task per activation that owns the three queues.
//!
//! Each wake-up (a queue kick through its EventFd, a host stream with news, a close timer) runs
//! one *pass*:
//! 1. pick up connections the host side touched,
//! 2. drain **every** available tx chain (guest → host packets), re-enabling notifications
//!    only when the ring is empty (event idx: `avail_event = next_avail`), so the guest does not
//!    kick while we are busy,
//! 3. fill as many rx buffers as there are packets to send, round-robin over connections so
//!    one bulk sender cannot starve a small reply; only when we run out of rx buffers with data
//!    still queued do we ask the guest to kick us when it adds more,
//! 4. deliver pending transport-reset events,
//! 5. raise at most **one** interrupt for the whole pass, and only if some queue's
//!    `used_event` (event idx) says the guest is waiting for it. An interrupt that would only
//!    report consumed tx buffers is held back for `tx_interrupt_delay` (250 ms by default, or
//!    until a quarter of the tx ring is waiting): Linux only reclaims memory on it, and if a
//!    reply goes out meanwhile its rx interrupt covers both.
//!
//! The guest's interrupts and kicks are what is expensive on this host (a virtqueue round costs
//! milliseconds under PVM), so everything here is about doing more per round.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::os::EventFd;
use tokio::time::Instant;
use tracing::{debug, error, trace, warn};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::{Bytes, GuestMemoryMmap};

use super::conn::{Conn, Outgoing, Phase};
use super::packet::{
    Header, EVENT_TRANSPORT_RESET, HDR_LEN, HOST_CID, MAX_PKT_PAYLOAD, OP_REQUEST, OP_RST,
    TYPE_STREAM,
};
use super::shared::Shared;
use crate::devices::virtio::kick::{async_eventfd, drain};
use crate::devices::virtio::ring::{add_used, arm_kick_after};
use crate::devices::virtio::worker_gate::{Entry, WorkerGate};
use crate::devices::virtio::{IrqTrigger, VIRTIO_MMIO_INT_VRING};

/// Queue indices (virtio 1.2 §5.10.2).
pub const RX: usize = 0;
/// Guest → host packets.
pub const TX: usize = 1;
/// Device → driver events.
pub const EVENT: usize = 2;

/// Replies to packets for unknown connections waiting for an rx buffer; a guest spraying
/// packets at closed ports cannot make this grow without bound.
const MAX_CONTROL_BACKLOG: usize = 1024;
/// Upper bound on drain / re-enable rounds per queue per pass (each round normally ends the
/// loop; this only guards against a ring whose avail index moves but yields nothing).
const MAX_ROUNDS: usize = 64;
/// Largest rx buffer payload we accept from the guest (stock Linux posts 4 KiB, our kernel
/// 16 KiB).
const MAX_RX_BUF: u32 = 1 << 20;

type Mem = GuestMemoryMmap<()>;

/// The worker's state; see the module docs.
pub struct Worker {
    mem: Arc<Mem>,
    queues: [Queue; 3],
    irq: IrqTrigger,
    shared: Arc<Shared>,
    gate: Arc<WorkerGate>,
    generation: u64,
    guest_cid: u64,
    /// Connections with packets to send, served one packet at a time in turn.
    pending: VecDeque<Arc<Conn>>,
    /// Released connections waiting for the guest's RST, with their deadline set.
    closing: Vec<Arc<Conn>>,
    /// Connectionless replies (RST for unknown connections).
    control: VecDeque<Header>,
    /// Reused buffers (no allocation per pass).
    scratch: Vec<Arc<Conn>>,
    finished: Vec<Arc<Conn>>,
    events_due: u32,
    /// The guest wants an interrupt for rx or event buffers we used: raise it this pass.
    irq_due: bool,
    /// The guest would like an interrupt for consumed tx buffers. Nobody in the guest waits
    /// for that (Linux only reclaims the descriptors), so it is held back briefly in the hope
    /// that a reply's rx interrupt covers it — one interrupt (vm_interrupt services every
    /// queue) instead of two per request/response round trip.
    tx_irq_deadline: Option<Instant>,
    /// Tx chains returned since the last interrupt. Past a quarter of the ring the guest may
    /// be about to run out of tx descriptors, so the interrupt is not held back any longer.
    tx_unannounced: u16,
    /// A transport reset went out and the guest has not handled it yet (until then, nothing is
    /// sent on rx: see [`Worker::reset_handled`]); with the time it went out and the event
    /// queue's avail index at that moment.
    reset_unhandled: Option<(Instant, u16)>,
}

/// How long rx waits for the guest to handle a transport reset before going on regardless.
const RESET_HANDLING_TIMEOUT: Duration = Duration::from_secs(10);

/// On exit for any reason other than a reset (runtime shutdown, panic, broken ring), fail the
/// host's streams instead of leaving them hanging.
struct ExitGuard {
    shared: Arc<Shared>,
    generation: u64,
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        if inner.active_gen == Some(self.generation) {
            debug!("vsock worker exited; failing its connections");
            inner.active_gen = None;
            inner.fail_all(std::io::ErrorKind::ConnectionAborted);
        }
    }
}

impl Worker {
    /// A worker for one activation. `queues` are rx, tx, event in that order.
    pub fn new(
        mem: Arc<Mem>,
        queues: [Queue; 3],
        irq: IrqTrigger,
        shared: Arc<Shared>,
        gate: Arc<WorkerGate>,
        generation: u64,
    ) -> Self {
        let guest_cid = shared.config.guest_cid;
        Worker {
            mem,
            queues,
            irq,
            shared,
            gate,
            generation,
            guest_cid,
            pending: VecDeque::new(),
            closing: Vec::new(),
            control: VecDeque::new(),
            scratch: Vec::new(),
            finished: Vec::new(),
            events_due: 0,
            irq_due: false,
            tx_irq_deadline: None,
            tx_unannounced: 0,
            reset_unhandled: None,
        }
    }

    /// Runs until the device is reset or dropped (the gate closes / the task is aborted).
    pub async fn run(mut self, notify: Vec<EventFd>) {
        let _exit = ExitGuard {
            shared: self.shared.clone(),
            generation: self.generation,
        };
        let fds = match notify
            .into_iter()
            .map(async_eventfd)
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(fds) if fds.len() == 3 => fds,
            Ok(_) => {
                error!("vsock worker needs three queue eventfds");
                return;
            }
            Err(e) => {
                error!(%e, "vsock worker cannot watch queue eventfds");
                return;
            }
        };
        debug!(cid = self.guest_cid, "vsock worker started");
        let gate = self.gate.clone();
        loop {
            // The gate's lock must not be held across an await (the future must stay Send).
            let paused = match gate.enter() {
                Entry::Pass(mut pass) => {
                    let result = self.pass();
                    pass.record(&self.queues);
                    if let Err(e) = result {
                        error!(%e, "vsock virtqueue error; device needs reset");
                        self.shared.needs_reset.store(true, Ordering::SeqCst);
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
            let deadline = self.next_deadline();
            let far = Instant::now() + Duration::from_secs(3600);
            tokio::select! {
                r = fds[TX].readable() => drain(r, "vsock"),
                r = fds[RX].readable() => drain(r, "vsock"),
                r = fds[EVENT].readable() => drain(r, "vsock"),
                _ = self.shared.wake.notified() => {}
                _ = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => {}
            }
        }
    }

    /// One pass over everything; see the module docs.
    pub(super) fn pass(&mut self) -> Result<(), virtio_queue::Error> {
        self.collect_shared();
        self.expire_closing();
        let tx_irq = self.process_tx()?;
        // A pending transport reset goes out before new connection requests, and those wait
        // until the guest has handled it.
        self.process_events()?;
        if self.reset_handled()? {
            self.process_rx()?;
        }
        self.forget_finished();
        if tx_irq && self.tx_irq_deadline.is_none() {
            self.tx_irq_deadline = Some(Instant::now() + self.shared.config.tx_interrupt_delay);
        }
        let tx_irq_expired = self.tx_irq_deadline.is_some_and(|d| d <= Instant::now())
            || (self.tx_irq_deadline.is_some()
                && self.tx_unannounced >= self.queues[TX].size() / 4);
        if std::mem::take(&mut self.irq_due) || tx_irq_expired {
            // One interrupt covers every queue, including tx completions held back.
            self.tx_irq_deadline = None;
            self.tx_unannounced = 0;
            if let Err(e) = self.irq.trigger(VIRTIO_MMIO_INT_VRING) {
                warn!(%e, "vsock interrupt");
            }
            trace!(tx_irq, "vsock interrupt");
        }
        trace!(
            tx_next = self.queues[TX].next_avail(),
            rx_next = self.queues[RX].next_avail(),
            rx_used = self.queues[RX].next_used(),
            pending = self.pending.len(),
            "vsock pass"
        );
        Ok(())
    }

    /// Picks up connections the host side changed and transport-reset requests.
    fn collect_shared(&mut self) {
        {
            let mut inner = self.shared.lock();
            std::mem::swap(&mut self.scratch, &mut inner.dirty);
            let events = std::mem::take(&mut inner.events_due);
            if events > 0 {
                // A transport reset drops every connection, including ones we hold.
                self.events_due += events;
                self.pending.clear();
                self.closing.clear();
                self.control.clear();
            }
        }
        let mut dirty = std::mem::take(&mut self.scratch);
        for conn in dirty.drain(..) {
            let mut st = conn.lock();
            st.dirty = false;
            self.schedule(&conn, &mut st);
        }
        self.scratch = dirty;
    }

    /// Queues `conn` for sending if it has something to send; notes it for removal if done.
    fn schedule(&mut self, conn: &Arc<Conn>, st: &mut super::conn::ConnState) {
        if st.is_finished() {
            self.finished.push(conn.clone());
            return;
        }
        if st.released && st.phase == Phase::Established && st.close_deadline.is_none() {
            // The host is gone: flush, SHUTDOWN and the guest's RST must each make progress
            // within `close_timeout`, or the connection is reset.
            self.arm_close_timer(conn, st);
        }
        if st.has_outgoing() && !st.scheduled {
            st.scheduled = true;
            self.pending.push_back(conn.clone());
        }
    }

    /// (Re)starts a released connection's close timer.
    fn arm_close_timer(&mut self, conn: &Arc<Conn>, st: &mut super::conn::ConnState) {
        let first = st.close_deadline.is_none();
        st.close_deadline = Some(std::time::Instant::now() + self.shared.config.close_timeout);
        if first {
            self.closing.push(conn.clone());
        }
    }

    /// Released connections that stopped making progress (no credit for the rest of their
    /// data, or no RST answering our SHUTDOWN) get an RST.
    fn expire_closing(&mut self) {
        let now = std::time::Instant::now();
        let mut closing = std::mem::take(&mut self.closing);
        closing.retain(|conn| {
            let mut st = conn.lock();
            if st.phase == Phase::Closed {
                return false;
            }
            match st.close_deadline {
                Some(d) if d <= now => {
                    debug!(
                        port = conn.key.peer_port,
                        "vsock close timed out; sending RST"
                    );
                    st.close_deadline = None;
                    st.error.get_or_insert(std::io::ErrorKind::TimedOut);
                    st.force_rst();
                    self.schedule(conn, &mut st);
                    false
                }
                _ => true,
            }
        });
        self.closing = closing;
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.closing
            .iter()
            .filter_map(|c| c.lock().close_deadline.map(Instant::from_std))
            .chain(self.tx_irq_deadline)
            .chain(
                self.reset_unhandled
                    .map(|(t, _)| t + RESET_HANDLING_TIMEOUT),
            )
            .min()
    }

    /// Whether the guest has handled the last transport reset we sent.
    ///
    /// Linux handles the event queue and the rx queue in separate work items, in no fixed
    /// order: a connection request delivered together with a reset can be accepted first and
    /// then reset with every other connection (seen right after restoring a snapshot: the
    /// host's first connection died). Its event handler re-posts the event buffer once it has
    /// reset its sockets, so a moved avail index on the event queue (we asked for a kick) says
    /// the reset is done.
    fn reset_handled(&mut self) -> Result<bool, virtio_queue::Error> {
        let Some((sent, avail_then)) = self.reset_unhandled else {
            return Ok(true);
        };
        let reposted = self.queues[EVENT]
            .avail_idx(&*self.mem, Ordering::Acquire)?
            .0
            != avail_then;
        if reposted || sent.elapsed() >= RESET_HANDLING_TIMEOUT {
            if reposted {
                debug!(after = ?sent.elapsed(), "the guest handled the vsock transport reset");
            } else {
                warn!("the guest did not acknowledge a vsock transport reset; going on");
            }
            self.reset_unhandled = None;
            return Ok(true);
        }
        Ok(false)
    }

    /// Removes finished connections from the shared table.
    fn forget_finished(&mut self) {
        if self.finished.is_empty() {
            return;
        }
        let mut inner = self.shared.lock();
        for conn in self.finished.drain(..) {
            self.shared.remove(&mut inner, &conn);
        }
    }

    /// Drains the tx queue: every available chain, until it stays empty. Returns whether the
    /// guest asked for an interrupt for the buffers we used.
    fn process_tx(&mut self) -> Result<bool, virtio_queue::Error> {
        let mem = self.mem.clone();
        let mut used = false;
        for _ in 0..MAX_ROUNDS {
            self.queues[TX].disable_notification(&*mem)?;
            loop {
                let chain = self.queues[TX].iter(&*mem)?.next();
                let Some(mut chain) = chain else { break };
                let head = chain.head_index();
                self.handle_tx(&mem, &mut chain);
                add_used(&mut self.queues[TX], &mem, head, 0)?;
                used = true;
                self.tx_unannounced = self.tx_unannounced.saturating_add(1);
            }
            if !self.queues[TX].enable_notification(&*mem)? {
                break;
            }
        }
        Ok(used && self.queues[TX].needs_notification(&*mem)?)
    }

    /// One guest → host packet.
    fn handle_tx(&mut self, mem: &Mem, chain: &mut DescriptorChain<&Mem>) {
        let pkt = match VsockPacket::from_tx_virtq_chain(mem, chain, MAX_PKT_PAYLOAD) {
            Ok(p) => p,
            Err(e) => {
                warn!(%e, "malformed vsock tx packet dropped");
                return;
            }
        };
        let hdr = Header::of(&pkt);
        trace!(
            op = hdr.op,
            len = hdr.len,
            src = hdr.src_port,
            dst = hdr.dst_port,
            buf_alloc = hdr.buf_alloc,
            fwd_cnt = hdr.fwd_cnt,
            flags = hdr.flags,
            "vsock tx packet"
        );
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            debug!(
                src = hdr.src_cid,
                dst = hdr.dst_cid,
                "vsock packet with foreign CIDs dropped"
            );
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            self.reply_rst(&hdr);
            return;
        }
        let key = super::conn::ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        let Some(conn) = self.shared.lookup(&key) else {
            if hdr.op == OP_REQUEST {
                debug!(
                    port = hdr.dst_port,
                    "guest-initiated vsock connection refused"
                );
            }
            self.reply_rst(&hdr);
            return;
        };
        let mut st = conn.lock();
        let was_closed = st.phase == Phase::Closed;
        st.on_packet(&hdr, pkt.data_slice());
        if !was_closed && st.phase == Phase::Closed {
            debug!(
                port = key.peer_port,
                op = hdr.op,
                "vsock connection closed by guest"
            );
        }
        self.schedule(&conn, &mut st);
    }

    /// Answers a packet nobody owns with RST (never answering an RST, which would ping-pong).
    fn reply_rst(&mut self, hdr: &Header) {
        if hdr.op == OP_RST {
            return;
        }
        if self.control.len() >= MAX_CONTROL_BACKLOG {
            debug!("vsock control backlog full; RST reply dropped");
            return;
        }
        self.control.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Header::default()
        });
    }

    fn has_rx_work(&self) -> bool {
        !self.control.is_empty() || !self.pending.is_empty()
    }

    /// Fills rx buffers while there is something to send.
    fn process_rx(&mut self) -> Result<(), virtio_queue::Error> {
        let mem = self.mem.clone();
        let mut used = false;
        for _ in 0..MAX_ROUNDS {
            let mut starved = false;
            while self.has_rx_work() {
                let chain = self.queues[RX].iter(&*mem)?.next();
                let Some(mut chain) = chain else {
                    starved = true;
                    break;
                };
                let head = chain.head_index();
                match self.fill_rx(&mem, &mut chain) {
                    Some(len) => {
                        add_used(&mut self.queues[RX], &mem, head, len)?;
                        used = true;
                    }
                    None => {
                        // Nothing after all (every pending connection turned out idle).
                        self.queues[RX].go_to_previous_position();
                        break;
                    }
                }
            }
            if !starved {
                // Not waiting for buffers: no need for the guest to kick us when it refills.
                // (A no-op with event idx, where a stale avail_event already means "don't".)
                self.queues[RX].disable_notification(&*mem)?;
                break;
            }
            // Out of buffers with data queued: ask for a kick when the guest adds more, and
            // re-check in case it just did.
            if !self.queues[RX].enable_notification(&*mem)? {
                break;
            }
        }
        if used && self.queues[RX].needs_notification(&*mem)? {
            self.irq_due = true;
        }
        Ok(())
    }

    /// Writes the next packet into one rx chain; the used length, or `None` (chain untouched)
    /// when there turned out to be nothing to send.
    fn fill_rx(&mut self, mem: &Mem, chain: &mut DescriptorChain<&Mem>) -> Option<u32> {
        let mut pkt = match VsockPacket::from_rx_virtq_chain(mem, chain, MAX_RX_BUF) {
            Ok(p) => p,
            Err(e) => {
                warn!(%e, "unusable vsock rx buffer returned empty");
                return Some(0);
            }
        };
        let room = pkt.data_slice().map_or(0, |s| s.len());
        if let Some(hdr) = self.control.pop_front() {
            return Some(write_header(&mut pkt, &hdr));
        }
        if room == 0 {
            // A header-only buffer cannot carry data; Linux never posts one.
            warn!("vsock rx buffer without room for data returned empty");
            return Some(0);
        }
        while let Some(conn) = self.pending.pop_front() {
            let mut st = conn.lock();
            let Some(out) = st.next_outgoing(room) else {
                st.scheduled = false;
                if st.is_finished() {
                    self.finished.push(conn.clone());
                }
                continue;
            };
            let (buf_alloc, fwd_cnt) = st.credit_fields();
            let hdr = Header {
                src_cid: HOST_CID,
                dst_cid: self.guest_cid,
                src_port: conn.key.local_port,
                dst_port: conn.key.peer_port,
                len: out.len,
                type_: TYPE_STREAM,
                op: out.op,
                flags: out.flags,
                buf_alloc,
                fwd_cnt,
            };
            if out.len > 0 {
                if let Some(data) = pkt.data_slice() {
                    data.copy_from(&st.tx[..out.len as usize]);
                }
            }
            if write_header(&mut pkt, &hdr) == 0 {
                // Not committed: the packet is produced again for the next buffer.
                self.pending.push_front(conn.clone());
                return Some(0);
            }
            let used = HDR_LEN as u32 + out.len;
            trace!(
                op = out.op,
                len = out.len,
                port = conn.key.peer_port,
                fwd_cnt,
                credit = st.peer_credit(),
                "vsock rx packet"
            );
            st.commit(&out);
            self.after_send(&conn, &mut st, &out);
            return Some(used);
        }
        None
    }

    /// Bookkeeping after a packet went out: round-robin, close timers, removal.
    fn after_send(&mut self, conn: &Arc<Conn>, st: &mut super::conn::ConnState, out: &Outgoing) {
        if st.released && st.phase == Phase::Established && out.op != OP_RST {
            // Progress on a closing connection: the guest gets a fresh timeout.
            self.arm_close_timer(conn, st);
        }
        if st.has_outgoing() {
            self.pending.push_back(conn.clone());
        } else {
            st.scheduled = false;
            if st.is_finished() {
                self.finished.push(conn.clone());
            }
        }
    }

    /// Delivers pending transport-reset events.
    fn process_events(&mut self) -> Result<(), virtio_queue::Error> {
        if self.events_due == 0 {
            return Ok(());
        }
        let mem = self.mem.clone();
        // The guest's avail index just before our last event went into the used ring: the
        // guest cannot have re-posted that event's buffer yet, so an index past it means it did.
        let mut avail_before_last = None;
        for _ in 0..MAX_ROUNDS {
            while self.events_due > 0 {
                let chain = self.queues[EVENT].iter(&*mem)?.next();
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                let len = match chain.writable().next() {
                    Some(d) if d.len() >= 4 => {
                        match mem.write_obj(EVENT_TRANSPORT_RESET.to_le(), d.addr()) {
                            Ok(()) => 4,
                            Err(e) => {
                                warn!(%e, "vsock event buffer outside guest memory");
                                0
                            }
                        }
                    }
                    _ => {
                        warn!("vsock event buffer too small");
                        0
                    }
                };
                avail_before_last = Some(self.queues[EVENT].avail_idx(&*mem, Ordering::Acquire)?.0);
                add_used(&mut self.queues[EVENT], &mem, head, len)?;
                if len == 4 {
                    self.events_due -= 1;
                }
            }
            if self.events_due == 0 || !self.queues[EVENT].enable_notification(&*mem)? {
                break;
            }
        }
        if let Some(avail) = avail_before_last {
            if self.queues[EVENT].needs_notification(&*mem)? {
                self.irq_due = true;
            }
            // Ask for a kick when the guest re-posts the buffer: that is its "handled". The
            // guest keeps other event buffers posted (Linux: eight), so the kick is armed at
            // its avail index, not at our position in the ring (see `arm_kick_after`): armed
            // there, Linux never kicked and the first request after a restore waited for some
            // other wake-up of this worker (up to RESET_HANDLING_TIMEOUT).
            let reposted = arm_kick_after(&mut self.queues[EVENT], &mem, avail)?;
            self.reset_unhandled = Some((Instant::now(), avail));
            if reposted {
                // Already handled (the guest saw the event before our interrupt): logged there.
                self.reset_handled()?;
            }
        }
        Ok(())
    }
}

/// Writes `hdr` into the packet's header slice; returns the header's length (0 on failure, in
/// which case the buffer goes back to the guest empty).
fn write_header(pkt: &mut VsockPacket<'_, ()>, hdr: &Header) -> u32 {
    match pkt.set_header_from_raw(&hdr.encode()) {
        Ok(()) => HDR_LEN as u32,
        Err(e) => {
            warn!(%e, "writing vsock rx header");
            0
        }
    }
}
