//! The event loop's side of one guest TCP flow: held while the host connects, then a smoltcp
//! socket whose bytes, FINs and resets it moves to and from the flow's host task
//! ([`tcp_host`](super::tcp_host)).

use std::sync::Arc;
use std::time::{Duration, Instant};

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::{self, State};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit};

use super::admission::Refused;
use super::link::Frame;
use super::packet::Syn;
use super::tcp_host::{HostEvent, HostSide, CHANNEL_CHUNKS};

/// Where a flow is in its life.
enum Stage {
    /// The host is connecting; the guest's SYN waits (its retransmissions are dropped).
    Connecting {
        frame: Frame,
        connected: oneshot::Receiver<Result<(), Refused>>,
    },
    /// A smoltcp socket terminates the guest's side.
    Open(SocketHandle),
}

/// What [`TcpFlow::poll_connect`] found.
pub enum Connect {
    /// Still connecting.
    Waiting,
    /// Connected: give the guest a socket and this SYN.
    Connected(Frame),
    /// Refused: send the guest an RST.
    Refused(Refused),
}

/// What [`TcpFlow::service`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Service {
    /// Still open; `true` when bytes or flags moved (the interface should poll again).
    Open(bool),
    /// Closed both ways or reset: remove the socket and the flow.
    Finished,
}

/// One guest TCP flow, as the loop sees it.
pub struct TcpFlow {
    /// The guest's SYN.
    pub syn: Syn,
    stage: Stage,
    /// Bytes from the guest to the host task; dropped to pass on the guest's FIN.
    to_host: Option<mpsc::Sender<Vec<u8>>>,
    from_host: mpsc::Receiver<HostEvent>,
    /// Host bytes not yet taken by the smoltcp socket, and how many of them were taken.
    pending: Option<(Vec<u8>, usize)>,
    /// The host's FIN was passed on (the socket is closing its send side).
    host_fin: bool,
    /// The guest's FIN arrived.
    guest_fin: bool,
    /// Fired to make the host task reset its connection.
    reset: Option<oneshot::Sender<()>>,
    chunk: usize,
    opened: Instant,
    last_activity: Instant,
    /// The flow's place in the per-VM limit (shared with the host task).
    _permit: Arc<OwnedSemaphorePermit>,
}

impl TcpFlow {
    /// A flow for `syn` (whose frame is `frame`), and the host task's side of it.
    pub fn start(
        syn: Syn,
        frame: Frame,
        target: std::net::SocketAddr,
        connect_timeout: Duration,
        chunk: usize,
        permit: OwnedSemaphorePermit,
        wake: Arc<Notify>,
    ) -> (TcpFlow, HostSide) {
        let (to_host, from_guest) = mpsc::channel(CHANNEL_CHUNKS);
        let (to_guest, from_host) = mpsc::channel(CHANNEL_CHUNKS);
        let (connected_tx, connected) = oneshot::channel();
        let (reset, reset_rx) = oneshot::channel();
        let permit = Arc::new(permit);
        let now = Instant::now();
        let flow = TcpFlow {
            syn,
            stage: Stage::Connecting { frame, connected },
            to_host: Some(to_host),
            from_host,
            pending: None,
            host_fin: false,
            guest_fin: false,
            reset: Some(reset),
            chunk,
            opened: now,
            last_activity: now,
            _permit: Arc::clone(&permit),
        };
        let side = HostSide {
            target,
            connect_timeout,
            chunk,
            connected: connected_tx,
            from_guest,
            to_guest,
            reset: reset_rx,
            wake,
            permit,
        };
        (flow, side)
    }

    /// The socket, once open.
    pub fn handle(&self) -> Option<SocketHandle> {
        match self.stage {
            Stage::Open(handle) => Some(handle),
            Stage::Connecting { .. } => None,
        }
    }

    /// Whether the host's connect has finished, and how.
    pub fn poll_connect(&mut self) -> Connect {
        let Stage::Connecting { frame, connected } = &mut self.stage else {
            return Connect::Waiting;
        };
        match connected.try_recv() {
            Err(oneshot::error::TryRecvError::Empty) => Connect::Waiting,
            Ok(Ok(())) => Connect::Connected(std::mem::take(frame)),
            Ok(Err(refused)) => Connect::Refused(refused),
            Err(oneshot::error::TryRecvError::Closed) => {
                Connect::Refused(Refused::Connect(std::io::ErrorKind::Interrupted.into()))
            }
        }
    }

    /// Records that `handle` now terminates the guest's side.
    pub fn opened(&mut self, handle: SocketHandle) {
        self.stage = Stage::Open(handle);
        self.last_activity = Instant::now();
    }

    /// Moves what can move between `socket` and the host task, and checks the timeouts.
    pub fn service(
        &mut self,
        socket: &mut tcp::Socket<'_>,
        now: Instant,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> Service {
        let mut moved = self.guest_to_host(socket);
        match self.host_to_guest(socket) {
            Some(host_moved) => moved |= host_moved,
            // The host reset: the socket is aborted, the RST goes out on the next poll.
            None => return Service::Open(true),
        }
        if moved {
            self.last_activity = now;
        }
        let state = socket.state();
        let finished = match state {
            State::Closed if socket.remote_endpoint().is_none() => {
                if !(self.guest_fin && self.host_fin) {
                    // The guest reset (or the socket was aborted).
                    self.reset_host();
                }
                self.to_host.is_none() || self.reset.is_none()
            }
            State::TimeWait => self.to_host.is_none(),
            // An RST during the handshake puts smoltcp's socket back to listening.
            State::Listen => {
                self.reset_host();
                true
            }
            _ => false,
        };
        if finished {
            return Service::Finished;
        }
        let why = if state == State::SynReceived && now - self.opened > connect_timeout {
            Some("the guest did not complete the handshake in time")
        } else if now - self.last_activity > idle_timeout {
            Some("idle timeout")
        } else {
            None
        };
        if let Some(why) = why {
            if state != State::Closed {
                tracing::info!(guest = %self.syn.guest, destination = %self.syn.destination, why, "resetting TCP flow");
                socket.abort();
                self.reset_host();
                return Service::Open(true);
            }
        }
        Service::Open(moved)
    }

    fn guest_to_host(&mut self, socket: &mut tcp::Socket<'_>) -> bool {
        let mut moved = false;
        if matches!(
            socket.state(),
            State::CloseWait | State::LastAck | State::Closing | State::TimeWait
        ) {
            self.guest_fin = true;
        }
        let Some(to_host) = &self.to_host else {
            return false;
        };
        while socket.can_recv() {
            let Ok(permit) = to_host.try_reserve() else {
                break;
            };
            let chunk = self.chunk;
            match socket.recv(|buf| {
                let len = buf.len().min(chunk);
                (len, buf[..len].to_vec())
            }) {
                Ok(data) => permit.send(data),
                Err(_) => break,
            }
            moved = true;
        }
        if self.guest_fin && !socket.can_recv() {
            // Dropping the sender is the FIN toward the host.
            self.to_host = None;
            moved = true;
        }
        moved
    }

    /// `None` when the host reset the flow.
    fn host_to_guest(&mut self, socket: &mut tcp::Socket<'_>) -> Option<bool> {
        let mut moved = false;
        loop {
            if self.pending.is_none() && !self.host_fin {
                match self.from_host.try_recv() {
                    Ok(HostEvent::Data(data)) => self.pending = Some((data, 0)),
                    Ok(HostEvent::Eof) | Err(TryRecvError::Disconnected) => {
                        socket.close();
                        self.host_fin = true;
                        return Some(true);
                    }
                    Ok(HostEvent::Reset) => {
                        socket.abort();
                        // The host side is gone already.
                        self.reset = None;
                        self.to_host = None;
                        return None;
                    }
                    Err(TryRecvError::Empty) => return Some(moved),
                }
            }
            let Some((data, taken)) = &mut self.pending else {
                return Some(moved);
            };
            if !socket.may_send() {
                return Some(moved);
            }
            match socket.send_slice(&data[*taken..]) {
                Ok(0) | Err(_) => return Some(moved),
                Ok(sent) => {
                    *taken += sent;
                    moved = true;
                    if *taken == data.len() {
                        self.pending = None;
                    }
                }
            }
        }
    }

    /// Makes the host task reset its connection (once) and stops passing bytes to it.
    pub fn reset_host(&mut self) {
        if let Some(reset) = self.reset.take() {
            let _ = reset.send(());
        }
        self.to_host = None;
    }
}
