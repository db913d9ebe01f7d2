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
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use supermachine_codec::{ControlAction, ControlMessage, ExecCodec, Frame};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio_util::codec::Encoder;

use crate::connector::BoxedStream;

/// Bytes of host entropy in each preamble (the kernel's CRNG key is 32).
const SEED_BYTES: usize = 64;

/// A restored guest's reseed: whether one has been handed to a connection and whether the
/// guest has been seen to apply one; shared by an agent's clones.
#[derive(Debug)]
pub(crate) struct Reseed {
    /// Names this restore in its preambles, so the agent tells its preambles from those of an
    /// earlier restore of the snapshot's VM (whose newest time a snapshot of it may carry).
    restore_id: u64,
    /// Requests between their connect and the end of their stream (which carries a preamble).
    in_flight: AtomicUsize,
    sent: AtomicBool,
    answered: AtomicBool,
    answer: Notify,
}

/// One request that will carry the preamble, from before its connect until its stream is
/// dropped ([`Reseed::in_flight`]).
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Reseed>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Reseed {
    /// A reseed not applied yet: every connection carries the preamble until one is answered.
    pub(crate) fn pending() -> io::Result<Arc<Reseed>> {
        let mut id = [0u8; 8];
        id.copy_from_slice(&host_entropy(8)?);
        Ok(Arc::new(Reseed {
            restore_id: u64::from_le_bytes(id),
            in_flight: AtomicUsize::new(0),
            sent: AtomicBool::new(false),
            answered: AtomicBool::new(false),
            answer: Notify::new(),
        }))
    }

    /// Whether a connection that carried the preamble has been answered.
    pub(crate) fn answered(&self) -> bool {
        self.answered.load(Ordering::Acquire)
    }

    /// Whether a preamble has gone out on some connection (its request may still be waiting
    /// for an answer, or have been dropped).
    pub(crate) fn sent(&self) -> bool {
        self.sent.load(Ordering::Acquire)
    }

    /// Counts a request that will carry the preamble, from before its connect (a restored
    /// guest may take a while to accept it) until its stream is dropped.
    pub(crate) fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(self))
    }

    /// How many requests are between their connect and the end of their stream.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Waits until a connection that carried the preamble has been answered.
    pub(crate) async fn wait_answered(&self) {
        loop {
            let answer = self.answer.notified();
            tokio::pin!(answer);
            // Registered before the check, so an answer in between is not missed.
            answer.as_mut().enable();
            if self.answered() {
                return;
            }
            answer.await;
        }
    }

    fn set_answered(&self) {
        self.answered.store(true, Ordering::Release);
        self.answer.notify_waiters();
    }

    /// The stream the request goes on, for the fresh connection `stream`: unless the guest
    /// has applied a preamble already, one that sends the preamble in front of the request's
    /// first bytes (one write, so one vsock packet) and records the reseed as applied on the
    /// first byte the agent sends back.
    pub(crate) fn prepare(
        self: &Arc<Self>,
        stream: BoxedStream,
        request: InFlight,
    ) -> io::Result<BoxedStream> {
        if self.answered() {
            return Ok(stream);
        }
        let preamble = Frame::Control {
            message: ControlMessage::Action(ControlAction::Restored {
                unix_nanos: unix_nanos_now(),
                restore_id: self.restore_id,
            }),
            data: host_entropy(SEED_BYTES)?,
        };
        let mut out = BytesMut::new();
        ExecCodec::new()
            .encode(preamble, &mut out)
            .map_err(io::Error::other)?;
        Ok(Box::new(Preambled {
            inner: stream,
            out,
            merged: false,
            reseed: Some(Arc::clone(self)),
            _request: request,
        }))
    }
}

/// A connection that carries the preamble: any byte read from it was sent by an agent that
/// had applied it (the agent answers nothing on a connection before its preamble is applied,
/// and powers off if it cannot apply it).
struct Preambled {
    inner: BoxedStream,
    /// Bytes accepted but not yet written: the preamble, then with it the first write's bytes.
    out: BytesMut,
    /// Whether the first write's bytes have joined the preamble.
    merged: bool,
    reseed: Option<Arc<Reseed>>,
    _request: InFlight,
}

impl Preambled {
    /// Writes out what is buffered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out.advance(n);
        }
        Poll::Ready(Ok(()))
    }
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
                reseed.set_answered();
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
        let this = &mut *self;
        if !this.merged {
            // The first bytes are taken whole and go out behind the preamble; whatever the
            // stream does not take now goes on the next write or flush.
            this.merged = true;
            this.out.extend_from_slice(buf);
            if let Some(reseed) = &this.reseed {
                reseed.sent.store(true, Ordering::Release);
            }
            if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(buf.len()));
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if !self.merged || !self.out.is_empty() {
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &**b);
            return self.poll_write(cx, first);
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// `n` bytes of fresh host entropy (`/dev/urandom`, which never blocks once the host's pool is
/// initialised).
fn host_entropy(n: usize) -> io::Result<Bytes> {
    use std::io::Read;
    let mut seed = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut seed)?;
    Ok(Bytes::from(seed))
}

/// The host's wall clock, in nanoseconds since the Unix epoch.
fn unix_nanos_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::codec::FramedRead;

    #[tokio::test]
    async fn a_preamble_goes_first_until_an_answer_is_read() {
        let reseed = Reseed::pending().unwrap();
        let (host, guest) = tokio::io::duplex(4096);
        let mut stream = reseed.prepare(Box::new(host), reseed.begin()).unwrap();
        assert_eq!(reseed.in_flight(), 1);
        assert!(!reseed.sent());
        stream.write_all(b"request").await.unwrap();
        stream.flush().await.unwrap();
        assert!(reseed.sent());
        let (guest_read, mut guest_write) = tokio::io::split(guest);
        let mut frames = FramedRead::new(guest_read, ExecCodec::new());
        match frames.next().await {
            Some(Ok(Frame::Control {
                message:
                    ControlMessage::Action(ControlAction::Restored {
                        unix_nanos,
                        restore_id,
                    }),
                data,
            })) => {
                assert!(unix_nanos > 0);
                assert_eq!(restore_id, reseed.restore_id);
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
        // Waiters learn of it, also those that come later.
        tokio::time::timeout(std::time::Duration::from_secs(5), reseed.wait_answered())
            .await
            .unwrap();
        drop(stream);
        assert_eq!(reseed.in_flight(), 0);
        // Once answered, connections go out as they are.
        let (host, mut guest) = tokio::io::duplex(64);
        let mut stream = reseed.prepare(Box::new(host), reseed.begin()).unwrap();
        assert_eq!(reseed.in_flight(), 0, "a plain stream is not counted");
        stream.write_all(b"plain").await.unwrap();
        drop(stream);
        let mut got = Vec::new();
        guest.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"plain");
    }
}
