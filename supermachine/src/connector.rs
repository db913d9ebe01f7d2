use std::fmt;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite};

/// A byte stream to the guest agent.
pub trait AgentStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> AgentStream for T {}

/// A boxed [`AgentStream`]: what a [`Connector`] hands out.
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

/// Connects to an agent listening on a Unix socket.
#[derive(Debug, Clone)]
pub struct UnixConnector {
    path: PathBuf,
}

impl UnixConnector {
    /// A connector for the socket at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        UnixConnector { path: path.into() }
    }
}

impl Connector for UnixConnector {
    fn connect(&self) -> ConnectFuture {
        let path = self.path.clone();
        Box::pin(async move {
            let stream = tokio::net::UnixStream::connect(&path).await?;
            Ok(Box::new(stream) as BoxedStream)
        })
    }

    fn describe(&self) -> String {
        format!("unix socket {}", self.path.display())
    }
}
