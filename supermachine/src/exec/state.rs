//! State shared between an exec's driver task and the handles the caller holds.

use std::collections::VecDeque;
use std::io;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes};
use supermachine_codec::ExitInfo;
use tokio::io::ReadBuf;
use tokio::sync::{oneshot, Notify};

use crate::error::Error;

/// Output held per stream before the driver stops reading and backpressure reaches the guest.
pub(crate) const OUTPUT_WINDOW: usize = 1024 * 1024;

/// Default bound on output read ahead while the exit is awaited.
pub(crate) const DEFAULT_MAX_BUFFERED_OUTPUT: usize = 64 * 1024 * 1024;

/// Which output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

/// The end of an exec as the driver saw it.
#[derive(Debug)]
pub(crate) struct Finished {
    pub(crate) result: Result<ExitInfo, Error>,
    pub(crate) timed_out: bool,
}

impl Finished {
    fn duplicate(&self) -> Finished {
        Finished {
            result: match &self.result {
                Ok(info) => Ok(*info),
                Err(e) => Err(e.duplicate()),
            },
            timed_out: self.timed_out,
        }
    }
}

#[derive(Default)]
struct OutputBuffer {
    chunks: VecDeque<Bytes>,
    len: usize,
    /// No more bytes will arrive.
    closed: bool,
    /// Why the stream ended early, reported after the buffered bytes.
    error: Option<(io::ErrorKind, String)>,
    /// The reading handle is gone; what arrives is discarded.
    detached: bool,
    reader: Option<Waker>,
}

impl OutputBuffer {
    fn push(&mut self, bytes: Bytes) {
        if self.detached || self.closed || bytes.is_empty() {
            return;
        }
        self.len += bytes.len();
        self.chunks.push_back(bytes);
        if let Some(waker) = self.reader.take() {
            waker.wake();
        }
    }

    fn close(&mut self, error: Option<(io::ErrorKind, String)>) {
        if !self.closed {
            self.closed = true;
            self.error = error;
        }
        if let Some(waker) = self.reader.take() {
            waker.wake();
        }
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let mut copied = false;
        while buf.remaining() > 0 {
            let Some(chunk) = self.chunks.front_mut() else {
                break;
            };
            let n = chunk.len().min(buf.remaining());
            buf.put_slice(&chunk[..n]);
            chunk.advance(n);
            self.len -= n;
            copied = true;
            if chunk.is_empty() {
                self.chunks.pop_front();
            }
        }
        if copied {
            return Poll::Ready(Ok(()));
        }
        if self.closed {
            return Poll::Ready(match self.error.take() {
                Some((kind, message)) => Err(io::Error::new(kind, message)),
                None => Ok(()),
            });
        }
        self.reader = Some(cx.waker().clone());
        Poll::Pending
    }
}

struct Inner {
    stdout: OutputBuffer,
    stderr: OutputBuffer,
    finished: Option<Finished>,
    started: Option<oneshot::Sender<Result<u32, Error>>>,
    exit_waiter: Option<Waker>,
    /// Someone is awaiting the exit: read ahead past the window (up to `max_buffered`).
    exit_awaited: bool,
    /// The read-ahead limit was hit while the exit was awaited.
    overflowed: bool,
}

/// Shared between the driver and the handles.
pub(crate) struct ExecState {
    inner: Mutex<Inner>,
    /// Wakes the driver when output was consumed or the exit started being awaited.
    room: Notify,
    /// Wakes the driver to tear the connection down now.
    pub(crate) abort: Notify,
    max_buffered: usize,
}

impl std::fmt::Debug for ExecState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecState")
            .field("finished", &self.is_finished())
            .finish_non_exhaustive()
    }
}

impl ExecState {
    pub(crate) fn new(started: oneshot::Sender<Result<u32, Error>>, max_buffered: usize) -> Self {
        ExecState {
            inner: Mutex::new(Inner {
                stdout: OutputBuffer::default(),
                stderr: OutputBuffer::default(),
                finished: None,
                started: Some(started),
                exit_waiter: None,
                exit_awaited: false,
                overflowed: false,
            }),
            room: Notify::new(),
            abort: Notify::new(),
            max_buffered,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock can only come from a bug in this module; the state is
        // still consistent enough to tear down, so recover instead of cascading the panic.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn push(&self, stream: Stream, bytes: Bytes) {
        let mut inner = self.lock();
        match stream {
            Stream::Stdout => inner.stdout.push(bytes),
            Stream::Stderr => inner.stderr.push(bytes),
        }
    }

    pub(crate) fn started(&self, pid: u32) {
        if let Some(tx) = self.lock().started.take() {
            let _ = tx.send(Ok(pid));
        }
    }

    /// Records how the exec ended (first call wins), closes the output streams and wakes
    /// everyone waiting.
    pub(crate) fn finish(&self, finished: Finished) {
        let mut inner = self.lock();
        if inner.finished.is_some() {
            return;
        }
        let stream_error = finished.result.as_ref().err().and_then(|e| match e {
            // After a kill the streams simply end; the exit result says why.
            Error::Cancelled | Error::Aborted => None,
            other => Some((
                io::ErrorKind::ConnectionAborted,
                crate::Report(other).to_string(),
            )),
        });
        inner.stdout.close(stream_error.clone());
        inner.stderr.close(stream_error);
        if let Some(tx) = inner.started.take() {
            let _ = tx.send(match &finished.result {
                // The deadline passed before the program started (a slow guest; CI saw it on a
                // loaded PVM host): the spawn succeeds and the exit says `timed_out`, as for a
                // program killed later. The pid is never shown: `ExecChild::id` is `None` once
                // the exec has finished.
                Ok(_) if finished.timed_out => Ok(0),
                Ok(_) => Err(Error::Protocol(
                    "the agent sent EXIT without STARTED".to_owned(),
                )),
                Err(e) => Err(e.duplicate()),
            });
        }
        inner.finished = Some(finished);
        if let Some(waker) = inner.exit_waiter.take() {
            waker.wake();
        }
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.lock().finished.is_some()
    }

    /// How the exec ended, if it has; unlike `poll_finished` this does not count as awaiting
    /// the exit (no read-ahead past the window).
    pub(crate) fn try_finished(&self) -> Option<Finished> {
        self.lock().finished.as_ref().map(Finished::duplicate)
    }

    /// The exit information, if the exec has ended with one.
    pub(crate) fn exit_info(&self) -> Option<ExitInfo> {
        match &self.lock().finished {
            Some(Finished {
                result: Ok(info), ..
            }) => Some(*info),
            _ => None,
        }
    }

    /// Waits until the driver may read another frame without breaking the buffering policy.
    pub(crate) async fn room_for_output(&self) {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.has_room() {
                return;
            }
            notified.await;
        }
    }

    fn has_room(&self) -> bool {
        let mut inner = self.lock();
        if inner.finished.is_some() {
            // Output arriving now is discarded; keep reading so a kill's EXIT is seen at once.
            return true;
        }
        if inner.exit_awaited {
            let buffered = inner.stdout.len + inner.stderr.len;
            if buffered < self.max_buffered {
                return true;
            }
            inner.overflowed = true;
            if let Some(waker) = inner.exit_waiter.take() {
                waker.wake();
            }
            return false;
        }
        inner.stdout.len < OUTPUT_WINDOW && inner.stderr.len < OUTPUT_WINDOW
    }

    /// Polls for the end of the exec. While pending, marks the exit as awaited so the driver
    /// reads ahead instead of deadlocking on unread output.
    pub(crate) fn poll_finished(&self, cx: &mut Context<'_>) -> Poll<Result<Finished, Error>> {
        let mut inner = self.lock();
        if let Some(finished) = &inner.finished {
            return Poll::Ready(Ok(finished.duplicate()));
        }
        if inner.overflowed {
            inner.overflowed = false;
            inner.exit_awaited = false;
            let buffered = inner.stdout.len + inner.stderr.len;
            return Poll::Ready(Err(Error::OutputLimitExceeded {
                buffered,
                limit: self.max_buffered,
            }));
        }
        inner.exit_waiter = Some(cx.waker().clone());
        if !inner.exit_awaited {
            inner.exit_awaited = true;
            drop(inner);
            self.room.notify_one();
        }
        Poll::Pending
    }

    pub(crate) fn poll_read(
        &self,
        stream: Stream,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = {
            let mut inner = self.lock();
            match stream {
                Stream::Stdout => inner.stdout.poll_read(cx, buf),
                Stream::Stderr => inner.stderr.poll_read(cx, buf),
            }
        };
        if buf.filled().len() > before {
            self.room.notify_one();
        }
        poll
    }

    /// The reading handle of `stream` was dropped: discard what is buffered and what comes.
    pub(crate) fn detach(&self, stream: Stream) {
        {
            let mut inner = self.lock();
            let buffer = match stream {
                Stream::Stdout => &mut inner.stdout,
                Stream::Stderr => &mut inner.stderr,
            };
            buffer.detached = true;
            buffer.chunks.clear();
            buffer.len = 0;
        }
        self.room.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finish_before_started(timed_out: bool) -> Result<u32, Error> {
        let (tx, mut rx) = oneshot::channel();
        let state = ExecState::new(tx, 1024);
        state.finish(Finished {
            result: Ok(ExitInfo::signaled(9)),
            timed_out,
        });
        rx.try_recv().expect("the spawn is answered")
    }

    #[test]
    fn a_timeout_before_started_is_a_timed_out_exec_not_a_protocol_error() {
        assert!(matches!(finish_before_started(true), Ok(0)));
    }

    #[test]
    fn an_exit_without_started_is_still_a_protocol_error() {
        assert!(matches!(
            finish_before_started(false),
            Err(Error::Protocol(_))
        ));
    }
}
