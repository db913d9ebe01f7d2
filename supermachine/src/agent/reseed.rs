//! A restored guest's reseed (SEMANTICS.md "restored"): fresh host entropy and the host's time,
//! written as a preamble in front of the first request on each connection opened to a VM
//! restored from a snapshot, until one of those connections has been answered. The agent
//! applies the preamble before it reads the request, so the first request after a restore
//! costs no round trip of its own, and nothing the guest serves runs on the RNG state or clock
//! every VM restored from the same snapshot shares.
//!
//! Why "until answered" and not "once": an answer on a preambled connection is the only sign
//! the host has that the guest applied a preamble. Requests opened before that (concurrent
//! first requests, or one cancelled before its preamble was read) each carry their own; the
//! agent reseeds again and keeps the newest time, which costs microseconds.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use supermachine_codec::{ControlAction, ControlMessage, ExecCodec, Frame};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::codec::Encoder;

use crate::connector::BoxedStream;

/// Bytes of host entropy in each preamble (the kernel's CRNG key is 32).
const SEED_BYTES: usize = 64;

/// Whether a restored guest has been seen to apply its reseed; shared by an agent's clones.
#[derive(Debug, Default)]
pub(crate) struct Reseed {
    answered: AtomicBool,
}

impl Reseed {
    /// A reseed not applied yet: every connection carries the preamble until one is answered.
    pub(crate) fn pending() -> Arc<Reseed> {
        Arc::new(Reseed::default())
    }

    /// Whether a connection that carried the preamble has been answered.
    pub(crate) fn answered(&self) -> bool {
        self.answered.load(Ordering::Acquire)
    }

    /// Writes the preamble onto the fresh connection `stream`, unless the guest has applied
    /// one already, and returns the stream the request goes on: one that records the reseed
    /// as applied on the first byte the agent sends back.
    pub(crate) async fn prepare(
        self: &Arc<Self>,
        mut stream: BoxedStream,
    ) -> io::Result<BoxedStream> {
        if self.answered() {
            return Ok(stream);
        }
        let preamble = Frame::Control {
            message: ControlMessage::Action(ControlAction::Restored {
                unix_nanos: unix_nanos_now(),
            }),
            data: host_entropy()?,
        };
        let mut bytes = BytesMut::new();
        ExecCodec::new()
            .encode(preamble, &mut bytes)
            .map_err(io::Error::other)?;
        // Written with the request, not awaited: the agent answers nothing before it has
        // applied it.
        stream.write_all(&bytes).await?;
        Ok(Box::new(Preambled {
            inner: stream,
            reseed: Some(Arc::clone(self)),
        }))
    }
}

/// A connection that carried the preamble: any byte read from it was sent by an agent that
/// had applied it (the agent answers nothing on a connection before its preamble is applied,
/// and powers off if it cannot apply it).
struct Preambled {
    inner: BoxedStream,
    reseed: Option<Arc<Reseed>>,
}

impl AsyncRead for Preambled {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            if let Some(reseed) = self.reseed.take() {
                reseed.answered.store(true, Ordering::Release);
            }
        }
        polled
    }
}

impl AsyncWrite for Preambled {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Fresh host entropy for a restored guest (64 bytes of `/dev/urandom`, which never blocks
/// once the host's pool is initialised).
fn host_entropy() -> io::Result<Bytes> {
    use std::io::Read;
    let mut seed = vec![0u8; SEED_BYTES];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut seed)?;
    Ok(Bytes::from(seed))
}

/// The host's wall clock, in nanoseconds since the Unix epoch.
pub(crate) fn unix_nanos_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tokio::io::AsyncReadExt;
    use tokio_util::codec::FramedRead;

    #[tokio::test]
    async fn a_preamble_goes_first_until_an_answer_is_read() {
        let reseed = Reseed::pending();
        let (host, guest) = tokio::io::duplex(4096);
        let mut stream = reseed.prepare(Box::new(host)).await.unwrap();
        stream.write_all(b"request").await.unwrap();
        let (guest_read, mut guest_write) = tokio::io::split(guest);
        let mut frames = FramedRead::new(guest_read, ExecCodec::new());
        match frames.next().await {
            Some(Ok(Frame::Control {
                message: ControlMessage::Action(ControlAction::Restored { unix_nanos }),
                data,
            })) => {
                assert!(unix_nanos > 0);
                assert_eq!(data.len(), SEED_BYTES);
            }
            other => panic!("expected the preamble, got {other:?}"),
        }
        assert_eq!(&frames.read_buffer()[..], b"request");
        // Nothing read back yet: the next connection still carries one.
        assert!(!reseed.answered());
        guest_write.write_all(b"x").await.unwrap();
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.unwrap();
        assert!(reseed.answered());
        // Once answered, connections go out as they are.
        let (host, mut guest) = tokio::io::duplex(64);
        let mut stream = reseed.prepare(Box::new(host)).await.unwrap();
        stream.write_all(b"plain").await.unwrap();
        drop(stream);
        let mut got = Vec::new();
        guest.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"plain");
    }
}
