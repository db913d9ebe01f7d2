//! [`GuestTcpStream`]: a TCP connection to a guest port, carried over the agent's transport.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::connector::BoxedStream;

/// A connection to a TCP port on the guest's loopback address, from
/// [`Agent::connect_tcp`](crate::Agent::connect_tcp) or [`Vm::connect_tcp`](crate::Vm::connect_tcp).
///
/// Behaves like a `TcpStream`: bytes both ways, `shutdown` half-closes (the guest server reads
/// EOF and can still answer), EOF from the guest server reads as end of stream. Dropping it
/// closes the guest connection.
pub struct GuestTcpStream {
    /// Bytes the guest sent that arrived together with the agent's ack.
    early: Bytes,
    inner: BoxedStream,
}

impl GuestTcpStream {
    pub(crate) fn new(early: Bytes, inner: BoxedStream) -> Self {
        GuestTcpStream { early, inner }
    }
}

impl fmt::Debug for GuestTcpStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestTcpStream")
            .field("early", &self.early.len())
            .finish_non_exhaustive()
    }
}

impl AsyncRead for GuestTcpStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.early.is_empty() {
            let n = self.early.len().min(buf.remaining());
            buf.put_slice(&self.early[..n]);
            self.early.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for GuestTcpStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
