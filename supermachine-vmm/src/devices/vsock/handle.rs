//! [`VsockHandle`]: the host's side of the device — connect to guest ports, serve the Unix
//! muxer, reset the transport.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::oneshot;
use tracing::debug;

use super::conn::{Conn, ConnKey};
use super::shared::Shared;
use super::stream::VsockStream;

/// A cheap, cloneable handle to a vsock device's host side.
#[derive(Debug, Clone)]
pub struct VsockHandle {
    pub(super) shared: Arc<Shared>,
}

/// Cancels a connect whose future was dropped before the guest answered.
struct PendingConnect {
    shared: Arc<Shared>,
    conn: Option<Arc<Conn>>,
}

impl Drop for PendingConnect {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            let notify = {
                let mut st = conn.lock();
                st.release();
                st.mark_dirty()
            };
            if notify {
                self.shared.push_dirty(&conn);
            }
        }
    }
}

impl VsockHandle {
    /// The guest's context ID.
    pub fn guest_cid(&self) -> u64 {
        self.shared.config.guest_cid
    }

    /// Connections the device tracks (open, connecting or closing). Zero means the guest has
    /// no connected vsock socket that this host side knows of.
    pub fn connection_count(&self) -> usize {
        self.shared.lock().conns.len()
    }

    /// Connects to `port` in the guest.
    ///
    /// Fails with [`io::ErrorKind::ConnectionRefused`] when nothing listens there (the guest
    /// answers RST), [`io::ErrorKind::NotConnected`] while the guest's vsock driver is not up
    /// (before boot finished, or after a device reset) and
    /// [`io::ErrorKind::ConnectionAborted`] if the device goes away meanwhile. There is no
    /// built-in timeout: wrap the call in `tokio::time::timeout` if the guest may hang;
    /// dropping the future cancels the attempt cleanly.
    pub async fn connect(&self, port: u32) -> io::Result<VsockStream> {
        let (tx, rx) = oneshot::channel();
        let conn = {
            let mut inner = self.shared.lock();
            if inner.device_gone {
                return Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "vsock device is gone",
                ));
            }
            if inner.active_gen.is_none() {
                return Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "guest vsock driver is not ready",
                ));
            }
            let local_port = inner.allocate_port(port).ok_or_else(|| {
                io::Error::new(io::ErrorKind::AddrInUse, "no free vsock host port")
            })?;
            let key = ConnKey {
                local_port,
                peer_port: port,
            };
            let config = &self.shared.config;
            let conn = Arc::new(Conn::new(
                key,
                config.host_buf_alloc,
                config.host_tx_buf,
                tx,
            ));
            conn.lock().mark_dirty();
            inner.conns.insert(key, conn.clone());
            inner.dirty.push(conn.clone());
            conn
        };
        self.shared.wake.notify_one();
        debug!(port, local_port = conn.key.local_port, "vsock connect");
        let mut pending = PendingConnect {
            shared: self.shared.clone(),
            conn: Some(conn),
        };
        match rx.await {
            Ok(Ok(())) => {
                let conn = pending
                    .conn
                    .take()
                    .ok_or_else(|| io::Error::other("connect state"))?;
                Ok(VsockStream::new(self.shared.clone(), conn))
            }
            Ok(Err(e)) => {
                pending.conn = None;
                Err(e)
            }
            Err(_) => {
                pending.conn = None;
                Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "vsock device went away",
                ))
            }
        }
    }

    /// Tells the guest that every connection is gone (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on
    /// the event queue) and fails all host streams with [`io::ErrorKind::ConnectionReset`].
    /// Needed after restoring a snapshot: the guest's sockets refer to connections this
    /// process never had.
    pub fn reset_transport(&self) {
        let mut inner = self.shared.lock();
        inner.fail_all(io::ErrorKind::ConnectionReset);
        if inner.active_gen.is_some() {
            inner.events_due += 1;
            drop(inner);
            self.shared.wake.notify_one();
        }
    }

    /// Serves the Unix-socket muxer at `path` until the returned future is dropped (it
    /// returns early only if binding fails): each client writes `CONNECT <port>\n`, gets `OK <port>\n`, and from
    /// then on the socket is the guest connection. Malformed requests and failed connects
    /// close the client socket. A stale socket file at `path` is replaced; the file is removed
    /// when serving stops. Dropping the future also closes every client it accepted.
    pub fn serve_unix(
        &self,
        path: impl Into<PathBuf>,
    ) -> impl Future<Output = io::Result<()>> + Send + 'static {
        super::muxer::serve(self.clone(), path.into(), None)
    }

    /// [`serve_unix`](Self::serve_unix), where each client, once it has asked for a port,
    /// waits for `gate` before its guest connection is made, and is closed if `gate` fails.
    pub fn serve_unix_gated(
        &self,
        path: impl Into<PathBuf>,
        gate: super::muxer::ClientGate,
    ) -> impl Future<Output = io::Result<()>> + Send + 'static {
        super::muxer::serve(self.clone(), path.into(), Some(gate))
    }
}
