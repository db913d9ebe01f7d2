//! Guest UDP flows: one connected host `UdpSocket` per (guest port, destination), closed after
//! the idle timeout. Datagrams the guest sends while the host socket is busy are dropped, as a
//! congested path drops them; replies wait for room in the link toward the guest.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use smoltcp::wire::EthernetAddress;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::link::Frame;
use super::packet::{udp_to_guest, MAX_UDP_PAYLOAD};

/// Datagrams queued toward the host per flow.
const QUEUE: usize = 32;

/// The loop's handle on a UDP flow.
pub struct UdpFlow {
    to_host: mpsc::Sender<Vec<u8>>,
}

/// A UDP flow's fixed facts.
pub struct UdpEnds {
    /// The guest's MAC, for replies.
    pub guest_mac: EthernetAddress,
    /// The guest's end.
    pub guest: SocketAddrV4,
    /// The destination as the guest addressed it (the replies' source).
    pub destination: SocketAddrV4,
    /// Where the host socket sends.
    pub target: SocketAddr,
}

impl UdpFlow {
    /// Starts a flow: returns the loop's handle and the task to spawn.
    pub fn start(
        ends: UdpEnds,
        idle_timeout: Duration,
        to_guest: mpsc::Sender<Frame>,
        permit: OwnedSemaphorePermit,
    ) -> (UdpFlow, impl std::future::Future<Output = ()>) {
        let (to_host, from_guest) = mpsc::channel(QUEUE);
        let task = run(ends, idle_timeout, from_guest, to_guest, Arc::new(permit));
        (UdpFlow { to_host }, task)
    }

    /// Passes a datagram on; `false` when the flow has ended (make a new one).
    pub fn send(&self, payload: &[u8]) -> bool {
        match self.to_host.try_send(payload.to_vec()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::trace!("UDP datagram dropped: the host socket is behind");
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Whether the flow has ended (its task closed the host socket).
    pub fn ended(&self) -> bool {
        self.to_host.is_closed()
    }
}

async fn run(
    ends: UdpEnds,
    idle_timeout: Duration,
    mut from_guest: mpsc::Receiver<Vec<u8>>,
    to_guest: mpsc::Sender<Frame>,
    _permit: Arc<OwnedSemaphorePermit>,
) {
    let local: SocketAddr = match ends.target {
        SocketAddr::V4(v4) if v4.ip().is_loopback() => (Ipv4Addr::LOCALHOST, 0).into(),
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = match UdpSocket::bind(local).await {
        Ok(socket) => socket,
        Err(error) => {
            tracing::warn!(%error, "no host UDP socket for a guest flow");
            return;
        }
    };
    if let Err(error) = socket.connect(ends.target).await {
        tracing::debug!(destination = %ends.destination, %error, "UDP connect failed");
        return;
    }
    let mut buf = vec![0; MAX_UDP_PAYLOAD + 1];
    loop {
        tokio::select! {
            datagram = from_guest.recv() => match datagram {
                Some(datagram) => {
                    // Errors (an ICMP error from an earlier datagram, a full buffer) are
                    // what UDP has always been allowed to lose.
                    let _ = socket.send(&datagram).await;
                }
                None => return,
            },
            received = socket.recv(&mut buf) => {
                let Ok(len) = received else { continue };
                match udp_to_guest(ends.guest_mac, ends.destination, ends.guest, &buf[..len]) {
                    Some(frame) => {
                        if to_guest.send(frame).await.is_err() {
                            return;
                        }
                    }
                    None => tracing::debug!(len, "UDP reply too large for one frame; dropped"),
                }
            }
            () = tokio::time::sleep(idle_timeout) => {
                tracing::debug!(guest = %ends.guest, destination = %ends.destination, "UDP flow idle; closed");
                return;
            }
        }
    }
}
