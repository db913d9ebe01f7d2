//! The Unix-socket vsock muxer (Firecracker's host-initiated connection protocol):
//! `CONNECT <port>\n` → `OK <port>\n`, then raw bytes both ways.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::handle::VsockHandle;

/// Longest request line accepted (`CONNECT 4294967295\n` is 19 bytes).
const MAX_LINE: u64 = 64;
/// Copy buffer per direction; large enough to fill several guest rx buffers per round.
const COPY_BUF: usize = 64 * 1024;

/// What each client waits for before its guest connection is made (the embedding library: a
/// restored guest's reseed); a failure closes that client.
pub type ClientGate =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = io::Result<()>> + Send>> + Send + Sync>;

/// Removes the socket file when serving stops.
struct Unlink(PathBuf);

impl Drop for Unlink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn bind(path: &Path) -> io::Result<UnixListener> {
    match UnixListener::bind(path) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            // Only replace a socket (a previous worker's), never a regular file.
            use std::os::unix::fs::FileTypeExt;
            if std::fs::symlink_metadata(path)?.file_type().is_socket() {
                std::fs::remove_file(path)?;
                UnixListener::bind(path)
            } else {
                Err(e)
            }
        }
        r => r,
    }
}

pub(super) async fn serve(
    handle: VsockHandle,
    path: PathBuf,
    gate: Option<ClientGate>,
) -> io::Result<()> {
    let listener = bind(&path)?;
    let _unlink = Unlink(path.clone());
    debug!(path = %path.display(), "vsock muxer listening");
    let mut clients = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    clients.spawn(client(handle.clone(), stream, gate.clone()));
                }
                // Out of fds, a client that vanished mid-accept: transient. Back off briefly
                // rather than spin or stop serving everyone else.
                Err(e) => {
                    warn!(%e, "vsock muxer accept");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            Some(_) = clients.join_next(), if !clients.is_empty() => {}
        }
    }
}

/// Parses `CONNECT <port>\n`.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?.strip_suffix('\n')?;
    let port = line.strip_prefix("CONNECT ")?;
    port.trim_end_matches('\r').parse().ok()
}

async fn client(handle: VsockHandle, stream: UnixStream, gate: Option<ClientGate>) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::with_capacity(32);
    if let Err(e) = (&mut reader)
        .take(MAX_LINE)
        .read_until(b'\n', &mut line)
        .await
    {
        debug!(%e, "vsock muxer client read");
        return;
    }
    let Some(port) = parse_connect(&line) else {
        warn!(line = %String::from_utf8_lossy(&line), "vsock muxer: bad request; closing");
        return;
    };
    if let Some(gate) = gate {
        if let Err(e) = gate().await {
            warn!(port, %e, "vsock muxer: the client's gate failed; closing client");
            return;
        }
    }
    let mut vsock = match handle.connect(port).await {
        Ok(s) => s,
        Err(e) => {
            debug!(port, %e, "vsock muxer: connect failed; closing client");
            return;
        }
    };
    // Firecracker's muxer, whose handshake this one follows, answers with the host side's port of
    // the new connection, not the requested one; clients (ours included) accept any port there.
    let host_port = vsock.local_port();
    if let Err(e) = reader
        .write_all(format!("OK {host_port}\n").as_bytes())
        .await
    {
        debug!(%e, "vsock muxer client write");
        return;
    }
    // Bytes the client sent after the request line are still in `reader`'s buffer and are
    // forwarded first, since the copy reads through the BufReader.
    match tokio::io::copy_bidirectional_with_sizes(&mut reader, &mut vsock, COPY_BUF, COPY_BUF)
        .await
    {
        Ok((up, down)) => debug!(port, up, down, "vsock muxer connection finished"),
        Err(e) => debug!(port, %e, "vsock muxer connection ended with an error"),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_connect;

    #[test]
    fn parses_only_well_formed_requests() {
        assert_eq!(parse_connect(b"CONNECT 1024\n"), Some(1024));
        assert_eq!(parse_connect(b"CONNECT 1024\r\n"), Some(1024));
        assert_eq!(parse_connect(b"CONNECT 4294967295\n"), Some(u32::MAX));
        for bad in [
            &b"CONNECT 1024"[..],
            b"CONNECT 4294967296\n",
            b"CONNECT -1\n",
            b"connect 1\n",
            b"CONNECT\n",
            b"\xff\n",
            b"",
        ] {
            assert_eq!(parse_connect(bad), None, "{bad:?}");
        }
    }
}
