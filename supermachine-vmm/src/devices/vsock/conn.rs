//! One host-initiated vsock connection: its buffers, credit accounting and close state.
//!
//! The state is shared between the device worker (which moves packets between it and the
//! virtqueues) and the host's [`super::VsockStream`] (which reads and writes its buffers). Both
//! sides only flip flags and move bytes under the lock; deciding *which* packet goes out next is
//! [`ConnState::next_outgoing`], and what an incoming packet does is [`ConnState::on_packet`],
//! so the protocol logic lives here in one place and is testable without queues.
//!
//! Credit (virtio 1.2 §5.10.6.3): each side announces `buf_alloc` (its receive buffer size) and
//! `fwd_cnt` (bytes consumed so far) in every header; a sender may have at most
//! `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)` bytes in flight.

use std::io;
use std::num::Wrapping;
use std::sync::{Mutex, MutexGuard};
use std::task::Waker;
use std::time::Instant;

use bytes::{Buf, BytesMut};
use tokio::sync::oneshot;
use tracing::{debug, warn};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

use super::packet::{
    Header, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW,
    OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND,
};

/// A connection's identity: host-side port and guest-side port (the guest CID is fixed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// The host's (our) port, chosen by us.
    pub local_port: u32,
    /// The guest's port (what the host connected to).
    pub peer_port: u32,
}

/// Where the connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// REQUEST queued or sent, no answer yet.
    Connecting,
    /// RESPONSE received.
    Established,
    /// RST sent or received, or failed by a reset: no more packets either way.
    Closed,
}

/// A connection shared by the worker and the host stream.
#[derive(Debug)]
pub struct Conn {
    /// Identity (immutable).
    pub key: ConnKey,
    state: Mutex<ConnState>,
}

impl Conn {
    /// A new connection in [`Phase::Connecting`]; `connected` is completed on RESPONSE/RST.
    pub fn new(
        key: ConnKey,
        buf_alloc: u32,
        tx_cap: usize,
        connected: oneshot::Sender<io::Result<()>>,
    ) -> Self {
        Conn {
            key,
            state: Mutex::new(ConnState {
                phase: Phase::Connecting,
                connected: Some(connected),
                request_sent: false,
                rx: BytesMut::new(),
                rx_cnt: Wrapping(0),
                fwd_cnt: Wrapping(0),
                fwd_cnt_sent: Wrapping(0),
                peer_shut_send: false,
                buf_alloc,
                tx: BytesMut::new(),
                tx_cap,
                tx_lost: false,
                tx_cnt: Wrapping(0),
                peer_buf_alloc: 0,
                peer_fwd_cnt: Wrapping(0),
                peer_shut_rcv: false,
                credit_requested: false,
                credit_update_due: false,
                local_shut_send: false,
                released: false,
                shutdown_sent: 0,
                rst_due: false,
                error: None,
                read_waker: None,
                write_waker: None,
                dirty: false,
                scheduled: false,
                close_deadline: None,
            }),
        }
    }

    /// Locks the state. A panic while holding the lock leaves consistent-enough state (flags
    /// and buffers), so poisoning is ignored rather than spreading the panic.
    pub fn lock(&self) -> MutexGuard<'_, ConnState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One packet the worker should send next, as decided by [`ConnState::next_outgoing`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// Operation.
    pub op: u16,
    /// SHUTDOWN flags.
    pub flags: u32,
    /// Payload bytes, taken from the front of the tx buffer (RW only).
    pub len: u32,
}

/// Mutable connection state. Fields are `pub(super)` for the worker and the stream, which are
/// the only users; the protocol decisions are methods.
#[derive(Debug)]
pub struct ConnState {
    pub(super) phase: Phase,
    /// Completes the host's `connect()`.
    connected: Option<oneshot::Sender<io::Result<()>>>,
    request_sent: bool,

    // Guest → host.
    /// Received and not yet read by the host.
    pub(super) rx: BytesMut,
    rx_cnt: Wrapping<u32>,
    /// Bytes the host has read (announced to the guest as `fwd_cnt`).
    pub(super) fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    fwd_cnt_sent: Wrapping<u32>,
    /// The guest will send nothing more (reads end with EOF once `rx` is empty).
    pub(super) peer_shut_send: bool,
    /// Our receive buffer size, announced as `buf_alloc`.
    pub(super) buf_alloc: u32,

    // Host → guest.
    /// Written by the host, not yet placed in guest rx buffers.
    pub(super) tx: BytesMut,
    pub(super) tx_cap: usize,
    /// Written data was discarded undelivered (the connection ended first).
    pub(super) tx_lost: bool,
    tx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// The guest will receive nothing more (writes fail with BrokenPipe).
    pub(super) peer_shut_rcv: bool,
    credit_requested: bool,
    credit_update_due: bool,

    // Local intent and teardown.
    /// The host shut down its write side (SHUTDOWN SEND once `tx` is flushed).
    pub(super) local_shut_send: bool,
    /// The host dropped its stream or cancelled `connect()`.
    pub(super) released: bool,
    shutdown_sent: u32,
    rst_due: bool,
    /// What reads/writes fail with once `rx` is drained, if the end was not orderly.
    pub(super) error: Option<io::ErrorKind>,
    pub(super) read_waker: Option<Waker>,
    pub(super) write_waker: Option<Waker>,

    /// On the shared dirty list (owned by the stream side / `Shared`).
    pub(super) dirty: bool,
    /// On the worker's round-robin list (owned by the worker).
    pub(super) scheduled: bool,
    /// Released and fully shut down: RST the guest if it has not by then.
    pub(super) close_deadline: Option<Instant>,
}

impl ConnState {
    /// Bytes we may still send before exhausting the guest's announced buffer.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// The host stream is gone (or the connect was cancelled) and nothing more will be sent:
    /// the worker can forget this connection.
    pub fn is_finished(&self) -> bool {
        match self.phase {
            Phase::Closed => true,
            Phase::Connecting => self.released && !self.request_sent,
            Phase::Established => false,
        }
    }

    /// SHUTDOWN flags we want the guest to have seen.
    fn shutdown_wanted(&self) -> u32 {
        let mut f = 0;
        if self.local_shut_send {
            f |= SHUTDOWN_SEND;
        }
        if self.released {
            f |= SHUTDOWN_SEND | SHUTDOWN_RCV;
        }
        f
    }

    /// Pending data can never reach the guest (it shut its receive side).
    fn tx_flushed(&self) -> bool {
        self.tx.is_empty() || self.peer_shut_rcv
    }

    /// Whether [`Self::next_outgoing`] would produce a packet for a buffer with room for data.
    pub fn has_outgoing(&self) -> bool {
        match self.phase {
            Phase::Closed => false,
            Phase::Connecting => (!self.request_sent && !self.released) || self.rst_due,
            Phase::Established => {
                let deliverable = !self.tx.is_empty() && !self.peer_shut_rcv;
                // Data goes out while there is credit; without credit, one CREDIT_REQUEST.
                let data_or_request =
                    deliverable && (self.peer_credit() > 0 || !self.credit_requested);
                self.rst_due
                    || data_or_request
                    || (self.tx_flushed() && self.shutdown_wanted() & !self.shutdown_sent != 0)
                    || self.credit_update_due
            }
        }
    }

    /// Decides the next packet for this connection, given room for `room` payload bytes in the
    /// guest's rx buffer. Does not change state; [`Self::commit`] does once it is written.
    pub fn next_outgoing(&self, room: usize) -> Option<Outgoing> {
        let pkt = |op, flags, len| Some(Outgoing { op, flags, len });
        match self.phase {
            Phase::Closed => None,
            Phase::Connecting if self.rst_due => pkt(OP_RST, 0, 0),
            Phase::Connecting if !self.request_sent && !self.released => pkt(OP_REQUEST, 0, 0),
            Phase::Connecting => None,
            Phase::Established => {
                if self.rst_due {
                    return pkt(OP_RST, 0, 0);
                }
                if !self.tx.is_empty() && !self.peer_shut_rcv {
                    let credit = self.peer_credit() as usize;
                    let n = self
                        .tx
                        .len()
                        .min(credit)
                        .min(room)
                        .min(super::packet::MAX_PKT_PAYLOAD as usize);
                    if n > 0 {
                        return pkt(OP_RW, 0, n as u32);
                    }
                    if credit == 0 && !self.credit_requested {
                        return pkt(OP_CREDIT_REQUEST, 0, 0);
                    }
                }
                let wanted = self.shutdown_wanted();
                if self.tx_flushed() && wanted & !self.shutdown_sent != 0 {
                    return pkt(OP_SHUTDOWN, wanted, 0);
                }
                if self.credit_update_due {
                    return pkt(OP_CREDIT_UPDATE, 0, 0);
                }
                None
            }
        }
    }

    /// The fields of our header for this connection (ports and CIDs are filled by the worker).
    pub fn credit_fields(&self) -> (u32, u32) {
        (self.buf_alloc, self.fwd_cnt.0)
    }

    /// `out` was written to the guest (its payload taken from the front of `tx`).
    pub fn commit(&mut self, out: &Outgoing) {
        // Every header carries our credit, so the guest is now up to date.
        self.fwd_cnt_sent = self.fwd_cnt;
        self.credit_update_due = false;
        match out.op {
            OP_REQUEST => self.request_sent = true,
            OP_RST => {
                self.rst_due = false;
                self.close(None);
            }
            OP_RW => {
                let n = out.len as usize;
                self.tx.advance(n.min(self.tx.len()));
                self.tx_cnt += Wrapping(out.len);
                wake(&mut self.write_waker);
            }
            OP_CREDIT_REQUEST => self.credit_requested = true,
            OP_SHUTDOWN => self.shutdown_sent |= out.flags,
            _ => {}
        }
    }

    /// Ends the connection: no more packets; wakes both directions and fails a pending
    /// connect. `error` (if any) is what the host sees once buffered data is read.
    pub fn close(&mut self, error: Option<io::ErrorKind>) {
        if self.phase == Phase::Closed {
            return;
        }
        if let Some(tx) = self.connected.take() {
            let kind = error.unwrap_or(io::ErrorKind::ConnectionRefused);
            let _ = tx.send(Err(io::Error::new(kind, "vsock connection failed")));
        }
        self.phase = Phase::Closed;
        if self.error.is_none() {
            self.error = error;
        }
        self.drop_tx();
        wake(&mut self.read_waker);
        wake(&mut self.write_waker);
    }

    /// The guest stopped answering our close: reset the connection.
    pub fn force_rst(&mut self) {
        if self.phase != Phase::Closed {
            self.rst_due = true;
        }
    }

    /// The host dropped its stream, or cancelled `connect()`: flush what was written, then
    /// SHUTDOWN both ways (or RST a connection the guest has not accepted yet). Unread data
    /// is discarded.
    pub fn release(&mut self) {
        self.released = true;
        self.rx = BytesMut::new();
        self.connected = None;
        self.read_waker = None;
        self.write_waker = None;
        if self.phase == Phase::Connecting && self.request_sent {
            self.rst_due = true;
        }
    }

    /// Marks the connection as needing the worker's attention; true if the caller must put it
    /// on the shared dirty list (it was not there yet).
    pub fn mark_dirty(&mut self) -> bool {
        !std::mem::replace(&mut self.dirty, true)
    }

    /// The host read `n` bytes from `rx`. Returns true when the guest should get a credit
    /// update now (it may be about to stall on a buffer it thinks is full).
    ///
    /// Lazy on purpose: every packet we send already carries `fwd_cnt`, and a standalone
    /// CREDIT_UPDATE costs the guest an interrupt and an rx buffer. So we only send one when
    /// the guest believes less than half of its send window is free *and* at least a quarter
    /// of it has been freed since we last told it — which a stalled guest (believing 0 free)
    /// always reaches as the host drains, so it can never deadlock.
    ///
    /// The window is `min(our buf_alloc, the guest's own buf_alloc)`, not just ours: Linux
    /// caps its tx credit at its local buffer size ("vsock/virtio: limit the memory used per
    /// socket", in 6.1 stable too) and never asks for credit itself, so measuring against our
    /// larger buffer alone left a guest stalled at 256 KiB sent while we believed it still had
    /// room — found by `tests/devices_in_guest.rs` against the real kernel.
    pub fn consumed(&mut self, n: usize) -> bool {
        self.fwd_cnt += Wrapping(n as u32);
        if self.credit_update_due || self.phase != Phase::Established || self.peer_shut_send {
            return false;
        }
        let window = match self.peer_buf_alloc {
            0 => self.buf_alloc,
            peer => peer.min(self.buf_alloc),
        };
        let unreported = (self.fwd_cnt - self.fwd_cnt_sent).0;
        let believed_used = (self.rx_cnt - self.fwd_cnt_sent).0;
        let believed_free = window.saturating_sub(believed_used);
        if believed_free < window / 2 && unreported >= window / 4 {
            self.credit_update_due = true;
            return true;
        }
        false
    }

    /// Applies a packet the guest sent on this connection. `data` is its payload (RW).
    pub fn on_packet<B: BitmapSlice>(&mut self, hdr: &Header, data: Option<&VolatileSlice<'_, B>>) {
        // Every header refreshes the guest's credit.
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
        match (self.phase, hdr.op) {
            (Phase::Closed, _) => {}
            (Phase::Connecting, OP_RESPONSE) => {
                self.phase = Phase::Established;
                if let Some(tx) = self.connected.take() {
                    if tx.send(Ok(())).is_err() {
                        // connect() was cancelled between the check and now.
                        self.released = true;
                    }
                }
                if self.released {
                    // Nobody wants this connection any more.
                    self.rst_due = true;
                }
            }
            (Phase::Connecting, OP_RST) => self.close(Some(io::ErrorKind::ConnectionRefused)),
            (Phase::Connecting, op) => {
                warn!(
                    op,
                    port = hdr.src_port,
                    "unexpected vsock packet while connecting"
                );
                self.rst_due = true;
                if let Some(tx) = self.connected.take() {
                    let _ = tx.send(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "guest answered a vsock connect with a protocol error",
                    )));
                }
                self.error = Some(io::ErrorKind::ConnectionReset);
            }
            (Phase::Established, OP_RW) => self.on_data(hdr, data),
            (Phase::Established, OP_CREDIT_UPDATE) => {}
            (Phase::Established, OP_CREDIT_REQUEST) => self.credit_update_due = true,
            (Phase::Established, OP_SHUTDOWN) => {
                if hdr.flags & SHUTDOWN_RCV != 0 && !self.peer_shut_rcv {
                    self.peer_shut_rcv = true;
                    // Undeliverable now; writers get BrokenPipe.
                    self.drop_tx();
                    wake(&mut self.write_waker);
                }
                if hdr.flags & SHUTDOWN_SEND != 0 && !self.peer_shut_send {
                    self.peer_shut_send = true;
                    wake(&mut self.read_waker);
                }
                if self.peer_shut_rcv && self.peer_shut_send {
                    // Full close from the guest: it waits for our RST (Linux's close path).
                    self.rst_due = true;
                }
            }
            (Phase::Established, OP_RST) => {
                // After the guest's SHUTDOWN SEND this is an orderly close (EOF); otherwise the
                // host sees ECONNRESET once it has read what arrived before.
                let err = (!self.peer_shut_send).then_some(io::ErrorKind::ConnectionReset);
                self.close(err);
            }
            (Phase::Established, op) => {
                warn!(
                    op,
                    port = hdr.src_port,
                    "unexpected vsock op on an established connection"
                );
                self.error = Some(io::ErrorKind::ConnectionReset);
                self.rst_due = true;
                wake(&mut self.read_waker);
                wake(&mut self.write_waker);
            }
        }
    }

    fn on_data<B: BitmapSlice>(&mut self, hdr: &Header, data: Option<&VolatileSlice<'_, B>>) {
        let len = hdr.len as usize;
        let Some(slice) = data.filter(|_| len > 0) else {
            return;
        };
        self.rx_cnt += Wrapping(hdr.len);
        if self.released || self.peer_shut_send {
            // Nobody will read it; count it as consumed so the guest's credit stays sane.
            self.fwd_cnt += Wrapping(hdr.len);
            return;
        }
        // The guest may have at most `buf_alloc` bytes beyond the last fwd_cnt we told it
        // (it may know an older one, never a newer one). This also bounds `rx`.
        if (self.rx_cnt - self.fwd_cnt_sent).0 > self.buf_alloc {
            warn!(
                port = hdr.src_port,
                len,
                buffered = self.rx.len(),
                "guest overran vsock credit; resetting"
            );
            self.error = Some(io::ErrorKind::ConnectionReset);
            self.rst_due = true;
            wake(&mut self.read_waker);
            return;
        }
        let start = self.rx.len();
        self.rx.resize(start + len, 0);
        let copied = slice.copy_to(&mut self.rx[start..]);
        if copied != len {
            debug!(copied, len, "short vsock payload");
            self.rx.truncate(start + copied);
        }
        wake(&mut self.read_waker);
    }
}

impl ConnState {
    /// Discards data that can no longer be delivered, remembering that it was lost so a
    /// pending `flush` fails instead of reporting success.
    fn drop_tx(&mut self) {
        if !self.tx.is_empty() {
            self.tx_lost = true;
            self.tx.clear();
        }
    }
}

fn wake(w: &mut Option<Waker>) {
    if let Some(w) = w.take() {
        w.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::vsock::packet::TYPE_STREAM;

    fn established(buf_alloc: u32) -> ConnState {
        let (tx, _rx) = oneshot::channel();
        let c = Conn::new(
            ConnKey {
                local_port: 5000,
                peer_port: 1024,
            },
            buf_alloc,
            1 << 20,
            tx,
        );
        let mut st = c.state.into_inner().unwrap();
        st.phase = Phase::Established;
        st.request_sent = true;
        st.connected = None;
        st
    }

    fn hdr(op: u16, len: u32, buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            op,
            len,
            buf_alloc,
            fwd_cnt,
            type_: TYPE_STREAM,
            ..Header::default()
        }
    }

    fn recv(st: &mut ConnState, bytes: &[u8]) {
        let mut v = bytes.to_vec();
        let slice = VolatileSlice::from(&mut v[..]);
        st.on_packet(&hdr(OP_RW, bytes.len() as u32, 4096, 0), Some(&slice));
    }

    #[test]
    fn credit_limits_data_and_requests_more_once() {
        let mut st = established(1 << 20);
        st.on_packet::<()>(&hdr(OP_CREDIT_UPDATE, 0, 100, 0), None);
        st.tx.extend_from_slice(&[7u8; 250]);
        let out = st.next_outgoing(4096).unwrap();
        assert_eq!(
            out,
            Outgoing {
                op: OP_RW,
                flags: 0,
                len: 100
            }
        );
        st.commit(&out);
        assert_eq!(st.peer_credit(), 0);
        let out = st.next_outgoing(4096).unwrap();
        assert_eq!(out.op, OP_CREDIT_REQUEST);
        st.commit(&out);
        assert!(!st.has_outgoing(), "one credit request per stall");
        // The guest consumed 60 bytes.
        st.on_packet::<()>(&hdr(OP_CREDIT_UPDATE, 0, 100, 60), None);
        assert_eq!(st.peer_credit(), 60);
        assert_eq!(st.next_outgoing(4096).unwrap().len, 60);
        // Room in the rx buffer bounds the packet too.
        assert_eq!(st.next_outgoing(10).unwrap().len, 10);
    }

    #[test]
    fn credit_updates_are_lazy_but_never_deadlock() {
        let mut st = established(1000);
        // Guest sends 400 bytes: believed free 600 ≥ half → nothing to say after reading.
        recv(&mut st, &[1; 400]);
        assert!(!st.consumed(400));
        // 500 more (900 unreported in flight): believed free 100.
        recv(&mut st, &[2; 500]);
        st.rx.clear();
        assert!(st.consumed(100), "900 freed, guest believes 100 free");
        assert!(st.has_outgoing());
        let out = st.next_outgoing(4096).unwrap();
        assert_eq!(out.op, OP_CREDIT_UPDATE);
        st.commit(&out);
        assert!(!st.has_outgoing());
        // A data packet carries fwd_cnt too: no separate update afterwards.
        st.credit_update_due = true;
        st.tx.extend_from_slice(b"x");
        st.on_packet::<()>(&hdr(OP_CREDIT_UPDATE, 0, 10, 0), None);
        let out = st.next_outgoing(4096).unwrap();
        assert_eq!(out.op, OP_RW);
        st.commit(&out);
        assert!(!st.credit_update_due);
    }

    #[test]
    fn credit_window_is_capped_by_the_guests_own_buffer() {
        // We offer 512 KiB; the guest's own buffer is 256 KiB, and Linux never lets more than
        // that be in flight. Once it has sent 256 KiB and the host read it all, it must hear.
        let mut st = established(512 * 1024);
        let chunk = vec![3u8; 64 * 1024];
        let mut v = chunk.clone();
        let slice = VolatileSlice::from(&mut v[..]);
        for _ in 0..4 {
            st.on_packet(&hdr(OP_RW, chunk.len() as u32, 256 * 1024, 0), Some(&slice));
        }
        let mut asked = false;
        for _ in 0..4 {
            st.rx.advance(64 * 1024);
            asked |= st.consumed(64 * 1024);
        }
        assert!(
            asked,
            "a guest stalled at its own 256 KiB cap must get a credit update"
        );
    }

    #[test]
    fn guest_overrunning_credit_is_reset() {
        let mut st = established(8);
        recv(&mut st, &[0; 8]);
        recv(&mut st, &[0; 1]);
        assert_eq!(st.error, Some(io::ErrorKind::ConnectionReset));
        assert_eq!(st.next_outgoing(4096).unwrap().op, OP_RST);
    }

    #[test]
    fn shutdown_waits_for_tx_to_drain() {
        let mut st = established(1000);
        st.on_packet::<()>(&hdr(OP_CREDIT_UPDATE, 0, 1000, 0), None);
        st.tx.extend_from_slice(&[1; 10]);
        st.local_shut_send = true;
        let out = st.next_outgoing(4096).unwrap();
        assert_eq!(out.op, OP_RW);
        st.commit(&out);
        let out = st.next_outgoing(4096).unwrap();
        assert_eq!((out.op, out.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
        st.commit(&out);
        assert!(!st.has_outgoing());
        st.released = true;
        let out = st.next_outgoing(4096).unwrap();
        assert_eq!(
            (out.op, out.flags),
            (OP_SHUTDOWN, SHUTDOWN_SEND | SHUTDOWN_RCV)
        );
    }
}
