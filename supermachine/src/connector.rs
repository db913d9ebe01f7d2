use std::fmt;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite};

/// A byte stream to the guest agent.
pub trait AgentStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> AgentStream for T {}

/// A boxed `AgentStream` (`AsyncRead + AsyncWrite + Send + Unpin`): what a [`Connector`] hands out.
pub type BoxedStream = Box<dyn AgentStream>;

/// The future a [`Connector`] returns.
pub type ConnectFuture = Pin<Box<dyn Future<Output = io::Result<BoxedStream>> + Send>>;

/// Opens a fresh stream to the guest agent for each exec or control call.
///
/// The library ships [`UnixConnector`] (agent in host mode, or a VM worker's vsock muxer); a VM
/// provides one that dials the guest's vsock port in-process.
pub trait Connector: Send + Sync + fmt::Debug + 'static {
    /// Opens one connection.
    fn connect(&self) -> ConnectFuture;

    /// Where this connects to, for error messages.
    fn describe(&self) -> String;
}

/// Connects to an agent listening on a Unix socket: directly (host mode), or through a VM's
/// vsock muxer ([`Vm::serve_vsock_unix`](crate::Vm::serve_vsock_unix); what `supermachine run
/// -d` workers serve).
#[derive(Debug, Clone)]
pub struct UnixConnector {
    path: PathBuf,
    /// Through a muxer: the vsock port to ask it for.
    vsock_port: Option<u32>,
}

/// The longest muxer answer accepted (`OK 4294967295\n` is 14 bytes).
const MAX_MUXER_REPLY: usize = 64;

impl UnixConnector {
    /// A connector for an agent listening on the socket at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        UnixConnector {
            path: path.into(),
            vsock_port: None,
        }
    }

    /// A connector for the agent of a VM whose vsock muxer listens at `path`: each connection
    /// asks for the agent's vsock port (`CONNECT <port>\n` → `OK <host-side port>\n`), so it
    /// also talks to agents inside Firecracker or Cloud Hypervisor through their muxers.
    pub fn muxed(path: impl Into<PathBuf>) -> Self {
        UnixConnector {
            path: path.into(),
            vsock_port: Some(supermachine_codec::AGENT_VSOCK_PORT),
        }
    }
}

impl Connector for UnixConnector {
    fn connect(&self) -> ConnectFuture {
        let path = self.path.clone();
        let vsock_port = self.vsock_port;
        Box::pin(async move {
            let mut stream = tokio::net::UnixStream::connect(&path).await?;
            if let Some(port) = vsock_port {
                muxer_handshake(&mut stream, port).await?;
            }
            Ok(Box::new(stream) as BoxedStream)
        })
    }

    fn describe(&self) -> String {
        match self.vsock_port {
            None => format!("unix socket {}", self.path.display()),
            Some(port) => format!("vsock port {port} via muxer {}", self.path.display()),
        }
    }
}

/// `CONNECT <port>\n` → `OK <host-side port>\n` (Firecracker's and Cloud Hypervisor's muxers, and
/// ours, name the host side's port of the new connection there, so any port is accepted), read
/// byte by byte so nothing after the reply line (the
/// agent's first bytes) is consumed.
async fn muxer_handshake(stream: &mut tokio::net::UnixStream, port: u32) -> io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await?;
    let mut line = Vec::with_capacity(16);
    loop {
        let byte = stream.read_u8().await.map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("the vsock muxer closed the connection: the guest agent does not accept on vsock port {port}, or the VM is gone"),
            ),
            _ => e,
        })?;
        if byte == b'\n' {
            break;
        }
        if line.len() >= MAX_MUXER_REPLY {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the vsock muxer's reply line is too long",
            ));
        }
        line.push(byte);
    }
    let answered_ok = std::str::from_utf8(&line)
        .ok()
        .and_then(|line| line.strip_prefix("OK "))
        .is_some_and(|host_port| host_port.trim_end_matches('\r').parse::<u32>().is_ok());
    if !answered_ok {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the vsock muxer answered {:?} instead of \"OK <port>\"",
                String::from_utf8_lossy(&line)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::muxer_handshake;

    /// Runs the client side against a muxer that answers `reply`; returns the client's result
    /// and the request line the muxer saw.
    async fn handshake_against(reply: &'static [u8]) -> (std::io::Result<()>, String) {
        let (mut client, mut muxer) = tokio::net::UnixStream::pair().unwrap();
        let muxer = tokio::spawn(async move {
            let mut request = vec![0u8; "CONNECT 1024\n".len()];
            muxer.read_exact(&mut request).await.unwrap();
            muxer.write_all(reply).await.unwrap();
            String::from_utf8(request).unwrap()
        });
        let result = muxer_handshake(&mut client, 1024).await;
        (result, muxer.await.unwrap())
    }

    #[tokio::test]
    async fn accepts_the_host_side_port_in_the_answer() {
        // Firecracker's muxer names the host side's port, not the requested one.
        for reply in [&b"OK 1024\n"[..], b"OK 1073741824\n", b"OK 52000\r\n"] {
            let (result, request) = handshake_against(reply).await;
            assert_eq!(request, "CONNECT 1024\n");
            result.unwrap_or_else(|e| panic!("{reply:?}: {e}"));
        }
    }

    #[tokio::test]
    async fn refuses_anything_but_ok_and_a_port() {
        for reply in [&b"NO\n"[..], b"OK\n", b"OK port\n", b"ok 1024\n"] {
            let (result, _) = handshake_against(reply).await;
            let err = result.expect_err("a bad answer");
            assert_eq!(
                err.kind(),
                std::io::ErrorKind::InvalidData,
                "{reply:?}: {err}"
            );
        }
    }
}
