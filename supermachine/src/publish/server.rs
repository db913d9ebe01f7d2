//! The host side of published ports: bound listeners, and the tasks that accept on them and
//! splice each connection into a [`GuestTcpStream`](super::GuestTcpStream).

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, warn};

use super::PortMapping;
use crate::agent::Agent;
use crate::error::Error;

/// A port a VM publishes, as bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct PublishedPort {
    /// The address the host listens on (with the actual port when 0 was asked for).
    pub host: SocketAddr,
    /// The guest port its connections go to.
    pub guest_port: u16,
}

/// Listeners bound before the VM starts, so an address in use fails the start before any VM
/// exists.
#[derive(Debug, Default)]
pub(crate) struct Listeners {
    bound: Vec<(std::net::TcpListener, PublishedPort)>,
}

impl Listeners {
    /// Binds every mapping; the first that fails fails them all (the others close again).
    pub(crate) fn bind(mappings: &[PortMapping]) -> Result<Listeners, Error> {
        let mut bound = Vec::with_capacity(mappings.len());
        for mapping in mappings {
            let publish_error = |source| Error::Publish {
                host: mapping.host,
                guest_port: mapping.guest_port,
                source,
            };
            let listener = std::net::TcpListener::bind(mapping.host).map_err(publish_error)?;
            listener.set_nonblocking(true).map_err(publish_error)?;
            let host = listener.local_addr().map_err(publish_error)?;
            bound.push((
                listener,
                PublishedPort {
                    host,
                    guest_port: mapping.guest_port,
                },
            ));
        }
        Ok(Listeners { bound })
    }

    /// Serves every listener on `publisher`, into `agent`'s guest; returns what was bound.
    /// Must run inside a tokio runtime.
    pub(crate) fn serve_on(
        self,
        publisher: &Publisher,
        agent: &Agent,
    ) -> Result<Vec<PublishedPort>, Error> {
        let mut served = Vec::with_capacity(self.bound.len());
        for (listener, port) in self.bound {
            let listener = TcpListener::from_std(listener).map_err(|source| Error::Publish {
                host: port.host,
                guest_port: port.guest_port,
                source,
            })?;
            publisher.spawn(listener, port, agent.clone());
            served.push(port);
        }
        Ok(served)
    }
}

/// Serves published ports until dropped; dropping it closes the listeners and every forwarded
/// connection.
#[derive(Debug)]
pub(crate) struct Publisher {
    ports: std::sync::Mutex<Vec<PublishedPort>>,
    stop: CancellationToken,
    _stop_on_drop: DropGuard,
}

impl Publisher {
    pub(crate) fn new() -> Self {
        let stop = CancellationToken::new();
        Publisher {
            ports: std::sync::Mutex::new(Vec::new()),
            _stop_on_drop: stop.clone().drop_guard(),
            stop,
        }
    }

    /// Serves one more listener.
    pub(crate) fn spawn(&self, listener: TcpListener, port: PublishedPort, agent: Agent) {
        self.ports
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(port);
        tokio::spawn(accept_loop(listener, port, agent, self.stop.clone()));
    }

    /// Stops serving: listeners close and forwarded connections are cut.
    pub(crate) fn close(&self) {
        self.stop.cancel();
    }

    /// The ports being served, in the order they were published.
    pub(crate) fn ports(&self) -> Vec<PublishedPort> {
        self.ports
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// Accepts until `stop`; the connections it started end with it (their `JoinSet` is dropped).
async fn accept_loop(
    listener: TcpListener,
    port: PublishedPort,
    agent: Agent,
    stop: CancellationToken,
) {
    debug!(host = %port.host, guest_port = port.guest_port, "publishing");
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    connections.spawn(forward(tcp, peer, port.guest_port, agent.clone()));
                }
                // Out of fds, a client gone mid-accept: transient; pause rather than spin.
                Err(e) => {
                    warn!(host = %port.host, "accepting a published-port connection: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            // Reap finished connections so the set does not grow with every one served.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    debug!(host = %port.host, "stopped publishing");
}

/// Carries one host connection to the guest port.
async fn forward(mut tcp: TcpStream, peer: SocketAddr, guest_port: u16, agent: Agent) {
    // Small request/response writes (HTTP) should not wait for Nagle on either leg.
    let _ = tcp.set_nodelay(true);
    let mut guest = match agent.connect_tcp(guest_port).await {
        Ok(guest) => guest,
        Err(e) => {
            // Reset rather than close, so the client sees a refused-like failure instead of
            // an empty reply. A zero linger resets at once; the blocking close that got
            // `set_linger` deprecated only happens with a non-zero linger.
            debug!(%peer, guest_port, "published port: {}", crate::Report(&e));
            #[allow(deprecated)]
            let _ = tcp.set_linger(Some(std::time::Duration::ZERO));
            return;
        }
    };
    match tokio::io::copy_bidirectional(&mut tcp, &mut guest).await {
        Ok((to_guest, to_host)) => debug!(%peer, guest_port, to_guest, to_host, "connection done"),
        Err(e) => debug!(%peer, guest_port, "connection ended: {e}"),
    }
}
