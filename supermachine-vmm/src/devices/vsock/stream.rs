//! [`VsockStream`]: the host end of a guest vsock connection, as an in-process async stream.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Buf;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::conn::{Conn, Phase};
use super::shared::Shared;

/// A connection to a port in the guest, from [`super::VsockHandle::connect`].
///
/// Reads return what the guest sent, then EOF once the guest shut down its sending side (or
/// closed the socket). Writes are buffered (up to [`super::VsockConfig::host_tx_buf`] bytes)
/// and handed to the guest as its receive credit allows; `flush` waits until everything
/// written was placed in guest buffers; `shutdown` half-closes (the guest reads EOF).
///
/// Dropping the stream flushes what was written, then closes the connection (SHUTDOWN, and
/// RST if the guest does not finish the close in time). If the device is reset or dropped,
/// pending and future operations fail with an error instead of hanging.
#[derive(Debug)]
pub struct VsockStream {
    shared: Arc<Shared>,
    conn: Arc<Conn>,
}

impl VsockStream {
    pub(super) fn new(shared: Arc<Shared>, conn: Arc<Conn>) -> Self {
        VsockStream { shared, conn }
    }

    /// The guest port this stream is connected to.
    pub fn peer_port(&self) -> u32 {
        self.conn.key.peer_port
    }

    /// The host-side port the guest sees as the source of this connection.
    pub fn local_port(&self) -> u32 {
        self.conn.key.local_port
    }

    fn notify_worker(&self, needed: bool) {
        if needed {
            self.shared.push_dirty(&self.conn);
        }
    }
}

fn store_waker(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

fn error(kind: io::ErrorKind) -> io::Error {
    io::Error::new(kind, "vsock connection closed")
}

impl AsyncRead for VsockStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut st = this.conn.lock();
        if !st.rx.is_empty() {
            let n = buf.remaining().min(st.rx.len());
            buf.put_slice(&st.rx[..n]);
            st.rx.advance(n);
            let notify = st.consumed(n) && st.mark_dirty();
            drop(st);
            this.notify_worker(notify);
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if let Some(kind) = st.error {
            return Poll::Ready(Err(error(kind)));
        }
        if st.peer_shut_send || st.phase == Phase::Closed {
            return Poll::Ready(Ok(()));
        }
        store_waker(&mut st.read_waker, cx);
        Poll::Pending
    }
}

impl AsyncWrite for VsockStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut st = this.conn.lock();
        if let Some(kind) = st.error {
            return Poll::Ready(Err(error(kind)));
        }
        if st.phase == Phase::Closed || st.peer_shut_rcv || st.local_shut_send {
            return Poll::Ready(Err(error(io::ErrorKind::BrokenPipe)));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let room = st.tx_cap.saturating_sub(st.tx.len());
        if room == 0 {
            store_waker(&mut st.write_waker, cx);
            return Poll::Pending;
        }
        let n = room.min(buf.len());
        st.tx.extend_from_slice(&buf[..n]);
        let notify = st.mark_dirty();
        drop(st);
        this.notify_worker(notify);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = self.conn.lock();
        if st.tx.is_empty() && !st.tx_lost {
            return Poll::Ready(Ok(()));
        }
        if let Some(kind) = st.error {
            return Poll::Ready(Err(error(kind)));
        }
        if st.phase == Phase::Closed || st.peer_shut_rcv {
            return Poll::Ready(Err(error(io::ErrorKind::BrokenPipe)));
        }
        store_waker(&mut st.write_waker, cx);
        Poll::Pending
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.as_mut().poll_flush(cx) {
            Poll::Pending => return Poll::Pending,
            // Nothing more can reach the guest anyway; the write side is as shut as it gets.
            Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
            Poll::Ready(Ok(())) => {}
        }
        let mut st = self.conn.lock();
        if st.local_shut_send || st.phase == Phase::Closed {
            return Poll::Ready(Ok(()));
        }
        st.local_shut_send = true;
        let notify = st.mark_dirty();
        drop(st);
        self.notify_worker(notify);
        Poll::Ready(Ok(()))
    }
}

impl Drop for VsockStream {
    fn drop(&mut self) {
        let mut st = self.conn.lock();
        if st.phase == Phase::Closed {
            return;
        }
        st.release();
        let notify = st.mark_dirty();
        drop(st);
        self.notify_worker(notify);
    }
}
