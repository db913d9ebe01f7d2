//! The tasks that move bytes for one exec connection.
//!
//! * [`write_frames`]: the connection's single writer. Everything the agent sends (STARTED,
//!   output, EXIT/ERROR) goes through one small bounded queue, so order is preserved and a slow
//!   host fills the queue, which stops the output pumps, which stops reading the child's pipes,
//!   which blocks the child: backpressure all the way, bounded memory.
//! * [`pump_output`]: child stdout/stderr (or the pty master) → STDOUT/STDERR frames.
//! * [`read_input`]: host frames → signals and resizes at once, stdin bytes to a queue.
//! * [`feed_stdin`]: that queue → the child's stdin pipe or the pty master.
//!
//! Stdin has its own task so that a child that does not read its stdin can only block that task,
//! not the handling of SIGNAL and RESIZE frames.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use supermachine_codec::{CodecError, ExecCodec, Frame, WindowSize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, FramedWrite};

use super::pty::{Pty, PtyIo};
use crate::reaper::LeaderAlive;
use crate::sys;

/// Largest output payload per frame; the read size grows up to it.
pub const CHUNK: usize = 256 * 1024;
/// First read size of an output pump. Reads that fill the buffer double it up to [`CHUNK`]:
/// an idle or chatty exec keeps a small buffer (hundreds of execs fit in a small guest), a bulk
/// stream quickly moves to large frames, which cost fewer syscalls and wakeups per byte.
const FIRST_CHUNK: usize = 16 * 1024;
/// Reads up to this size are copied out of the read buffer instead of split off it. A split
/// hands the buffer to the frame writer, so the next read needs a fresh allocation, which musl
/// serves with mmap (and frees with munmap): two syscalls and a page fault per chunk, each very
/// expensive in a guest on a nested (PVM) host. Interactive output is small; bulk output fills
/// the buffer and is still split off without a copy.
const COPY_AT_MOST: usize = FIRST_CHUNK;
/// Frames queued between the pumps and the connection writer.
pub const OUT_QUEUE: usize = 8;
/// Stdin bytes queued between the connection reader and the stdin writer, at most. (A single
/// larger frame is let through alone, taking the whole budget.)
const STDIN_BUDGET: usize = 1024 * 1024;
/// The FramedWrite buffer is flushed once it holds this much.
const WRITE_BUFFER: usize = 256 * 1024;
/// After the leader exits, output is drained until EOF, but a pipe that stays silent this long
/// is held open by something outside the (killed) group, and is abandoned.
pub const DRAIN_IDLE: Duration = Duration::from_secs(1);
/// Draining never waits for pipe data longer than this in total after the leader exits, even if
/// an escaped process keeps writing.
pub const DRAIN_MAX: Duration = Duration::from_secs(10);
/// ASCII EOT, the default VEOF character: "end of input" on a terminal in canonical mode.
const VEOF: u8 = 0x04;

/// Which output stream a pump carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutStream {
    /// STDOUT frames (everything, in tty mode).
    Stdout,
    /// STDERR frames.
    Stderr,
}

/// One item for the stdin writer.
#[derive(Debug)]
pub enum StdinMsg {
    /// Bytes for the child.
    Data(Bytes),
    /// Close the child's stdin (empty STDIN frame).
    Eof,
}

/// The sending half of the stdin queue: bounded by bytes, not frames, since frame sizes are the
/// host's choice.
#[derive(Debug)]
pub struct StdinSender {
    tx: mpsc::UnboundedSender<Queued>,
    budget: Arc<Semaphore>,
}

/// The receiving half of the stdin queue.
#[derive(Debug)]
pub struct StdinQueue {
    rx: mpsc::UnboundedReceiver<Queued>,
}

/// A queued message; its share of the byte budget is returned when it is dropped, i.e. once it
/// has been written to the child.
#[derive(Debug)]
pub struct Queued {
    msg: StdinMsg,
    _budget: OwnedSemaphorePermit,
}

/// A new, empty stdin queue.
pub fn stdin_queue() -> (StdinSender, StdinQueue) {
    let (tx, rx) = mpsc::unbounded_channel();
    let budget = Arc::new(Semaphore::new(STDIN_BUDGET));
    (StdinSender { tx, budget }, StdinQueue { rx })
}

impl StdinSender {
    /// Queues `msg`, waiting while the budget is used up. Fails once the receiver is gone.
    async fn send(&self, msg: StdinMsg) -> Result<(), ()> {
        let cost = match &msg {
            StdinMsg::Data(bytes) => bytes.len().clamp(1, STDIN_BUDGET),
            StdinMsg::Eof => 1,
        };
        // The budget fits in u32 (1 MiB); the semaphore is never closed.
        let permit = self
            .budget
            .clone()
            .acquire_many_owned(cost as u32)
            .await
            .map_err(drop)?;
        self.tx
            .send(Queued {
                msg,
                _budget: permit,
            })
            .map_err(drop)
    }
}

impl StdinQueue {
    async fn recv(&mut self) -> Option<Queued> {
        self.rx.recv().await
    }
}

/// Where stdin bytes go.
#[derive(Debug)]
pub enum StdinTarget {
    /// Stdin is /dev/null (or the exec has none): bytes are dropped.
    Discard,
    /// The write end of the stdin pipe that every link of the chain shares.
    Pipe(pipe::Sender),
    /// The current link's pty master (it changes along a tty chain).
    Pty {
        /// The current pty, `None` between links.
        current: watch::Receiver<Option<Arc<Pty>>>,
        /// Stdin starts closed (`stdin: null` in tty mode): every pty gets `^D` up front.
        closed: bool,
    },
}

/// Writes every queued frame to the connection until the queue closes, then shuts down the
/// write side. Returns the first write error, which means the host is gone.
pub async fn write_frames<W>(
    mut sink: FramedWrite<W, ExecCodec>,
    mut queue: mpsc::Receiver<Frame>,
) -> Result<(), CodecError>
where
    W: AsyncWrite + Unpin,
{
    sink.set_backpressure_boundary(WRITE_BUFFER);
    while let Some(frame) = queue.recv().await {
        sink.feed(frame).await?;
        // Batch whatever else is ready into one flush.
        while let Ok(frame) = queue.try_recv() {
            sink.feed(frame).await?;
        }
        SinkExt::<Frame>::flush(&mut sink).await?;
    }
    SinkExt::<Frame>::close(&mut sink).await
}

/// Copies child output into frames until EOF.
///
/// Once `leader_exited` turns true, reads are bounded by [`DRAIN_IDLE`] and [`DRAIN_MAX`]. With
/// `forward == false` the output is read and dropped (tty mode with `stdout: null`: the pty
/// must still be drained or the child blocks).
pub async fn pump_output<R>(
    mut source: R,
    stream: OutStream,
    out: mpsc::Sender<Frame>,
    mut leader_exited: watch::Receiver<bool>,
    forward: bool,
) where
    R: AsyncRead + Unpin,
{
    let mut chunk = FIRST_CHUNK;
    let mut buf = BytesMut::with_capacity(chunk);
    let mut drain_until: Option<Instant> = None;
    loop {
        // Reclaims the allocation once the writer has dropped the previous chunk.
        buf.reserve(chunk);
        let read = match drain_until {
            None => tokio::select! {
                read = source.read_buf(&mut buf) => read,
                _ = leader_exited.wait_for(|&exited| exited) => {
                    drain_until = Some(Instant::now() + DRAIN_MAX);
                    continue;
                }
            },
            Some(hard) => {
                let deadline = hard.min(Instant::now() + DRAIN_IDLE);
                match tokio::time::timeout_at(deadline, source.read_buf(&mut buf)).await {
                    Ok(read) => read,
                    Err(_elapsed) => {
                        tracing::debug!(
                            ?stream,
                            "output still open after the process group died; not draining further"
                        );
                        return;
                    }
                }
            }
        };
        match read {
            Ok(0) => return,
            Ok(n) => {
                if n >= chunk {
                    chunk = (chunk * 2).min(CHUNK);
                }
                let chunk = if n <= COPY_AT_MOST {
                    let bytes = Bytes::copy_from_slice(&buf);
                    buf.clear();
                    bytes
                } else {
                    buf.split().freeze()
                };
                if !forward {
                    continue;
                }
                let frame = match stream {
                    OutStream::Stdout => Frame::Stdout(chunk),
                    OutStream::Stderr => Frame::Stderr(chunk),
                };
                if out.send(frame).await.is_err() {
                    return; // The writer is gone, and so is the host.
                }
            }
            Err(e) => {
                tracing::warn!(?stream, "reading child output: {e}");
                return;
            }
        }
    }
}

/// Writes queued stdin to the child until the queue closes.
pub async fn feed_stdin(mut queue: StdinQueue, target: StdinTarget) {
    match target {
        StdinTarget::Discard => while queue.recv().await.is_some() {},
        StdinTarget::Pipe(pipe) => feed_pipe(queue, pipe).await,
        StdinTarget::Pty { current, closed } => feed_pty(queue, current, closed).await,
    }
}

async fn feed_pipe(mut queue: StdinQueue, pipe: pipe::Sender) {
    let mut pipe = Some(pipe);
    while let Some(queued) = queue.recv().await {
        match &queued.msg {
            // Dropping the write end is the EOF; nothing holds another copy.
            StdinMsg::Eof => pipe = None,
            StdinMsg::Data(bytes) => {
                let Some(sink) = pipe.as_mut() else { continue };
                if let Err(e) = sink.write_all(bytes).await {
                    // EPIPE: every reader is gone; later bytes have nowhere to go either.
                    if e.kind() != io::ErrorKind::BrokenPipe {
                        tracing::warn!("writing child stdin: {e}");
                    }
                    pipe = None;
                }
            }
        }
    }
}

async fn feed_pty(
    mut queue: StdinQueue,
    mut current: watch::Receiver<Option<Arc<Pty>>>,
    mut closed: bool,
) {
    if closed {
        let pty = current.borrow_and_update().clone();
        if let Some(pty) = pty {
            write_pty(&pty, &[VEOF]).await;
        }
    }
    loop {
        tokio::select! {
            queued = queue.recv() => match queued.as_ref().map(|q| &q.msg) {
                None => return,
                Some(StdinMsg::Data(bytes)) => {
                    let pty = match current.wait_for(Option::is_some).await {
                        Ok(pty) => pty.clone(),
                        Err(_) => return, // The exec is over.
                    };
                    if let Some(pty) = pty {
                        write_pty(&pty, bytes).await;
                    }
                }
                Some(StdinMsg::Eof) => {
                    closed = true;
                    let pty = current.borrow_and_update().clone();
                    if let Some(pty) = pty {
                        write_pty(&pty, &[VEOF]).await;
                    }
                }
            },
            // A new link's pty: stdin was closed already, so it starts at end of input too.
            changed = current.changed(), if closed => {
                if changed.is_err() {
                    return;
                }
                let pty = current.borrow_and_update().clone();
                if let Some(pty) = pty {
                    write_pty(&pty, &[VEOF]).await;
                }
            }
        }
    }
}

async fn write_pty(pty: &Arc<Pty>, bytes: &[u8]) {
    if let Err(e) = PtyIo(pty.clone()).write_all(bytes).await {
        // EIO: the link's processes closed the terminal (they exited); its input is moot.
        if e.raw_os_error() != Some(libc::EIO) {
            tracing::warn!("writing to the pty: {e}");
        }
    }
}

/// What the connection reader acts on: the running link's process group and pty.
///
/// Shared between the reader task and the exec task that spawns links.
#[derive(Debug)]
pub struct LinkControl {
    inner: Mutex<LinkState>,
}

#[derive(Debug)]
struct LinkState {
    /// The running link's group, while its leader is unreaped.
    pgid: Option<(i32, LeaderAlive)>,
    pty: Option<Arc<Pty>>,
    size: WindowSize,
    /// Signals that arrived while no link was running; delivered to the next one.
    pending_signals: Vec<i32>,
}

/// Signals remembered between links, at most (a host repeating a signal gains nothing more).
const MAX_PENDING_SIGNALS: usize = 8;

impl LinkControl {
    /// Control for an exec whose terminal (if any) starts at `size`.
    pub fn new(size: WindowSize) -> LinkControl {
        LinkControl {
            inner: Mutex::new(LinkState {
                pgid: None,
                pty: None,
                size,
                pending_signals: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, LinkState> {
        // Plain field updates only: consistent even after a panic elsewhere.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The terminal size a new pty should get (the latest RESIZE, or the initial size).
    pub fn size(&self) -> WindowSize {
        self.lock().size
    }

    /// A link is running in group `pgid`: signals go there from now on, starting with any that
    /// arrived while no link was running.
    pub fn start_link(&self, pgid: i32, alive: LeaderAlive, pty: Option<Arc<Pty>>) {
        let mut state = self.lock();
        state.pty = pty;
        for signal in std::mem::take(&mut state.pending_signals) {
            deliver(pgid, signal);
        }
        state.pgid = Some((pgid, alive));
    }

    /// The link's leader was reaped (and its group killed): its pgid may be reused from now on,
    /// so nothing may be sent to it any more.
    pub fn end_link(&self) {
        let mut state = self.lock();
        state.pgid = None;
        state.pty = None;
    }

    /// SIGNAL: to the running link's group at once, or to the next link.
    pub fn signal(&self, signal: i32) {
        let mut state = self.lock();
        match &state.pgid {
            Some((pgid, alive)) if alive.get() => deliver(*pgid, signal),
            // Reaped (and its group killed) a moment ago; the exec is about to move on.
            Some(_) => tracing::debug!(signal, "dropping signal: the link just ended"),
            None if state.pending_signals.len() < MAX_PENDING_SIGNALS => {
                state.pending_signals.push(signal)
            }
            None => tracing::debug!(signal, "dropping signal: too many pending"),
        }
    }

    /// RESIZE: the running pty (if any) and every later one.
    pub fn resize(&self, size: WindowSize) {
        let mut state = self.lock();
        state.size = size;
        if let Some(pty) = &state.pty {
            if let Err(e) = pty.resize(size) {
                tracing::warn!("resizing the pty: {e}");
            }
        }
    }
}

fn deliver(pgid: i32, signal: i32) {
    match sys::killpg(pgid, signal) {
        Ok(()) => tracing::debug!(pgid, signal, "signalled"),
        // The group emptied out before its leader was reaped: nothing left to signal.
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
        Err(e) => tracing::warn!(pgid, signal, "cannot signal the process group: {e}"),
    }
}

/// Reads host frames until the host goes away (EOF, error, or a malformed frame).
///
/// STDIN bytes go to the byte-bounded stdin queue. When it is full (the child is not reading its
/// stdin and the host keeps sending) this task waits, so frames behind those bytes, SIGNAL
/// included, wait too. That is the trade-off for bounded memory: the queue (1 MiB) plus the pipe
/// absorb ordinary bursts, the host's own writes block beyond that, and a host that needs to kill
/// a child that stopped reading can still close the connection, which kills the group (the exec
/// notices through [`crate::hangup`] even while this task waits).
pub async fn read_input<R>(
    mut frames: FramedRead<R, ExecCodec>,
    control: Arc<LinkControl>,
    stdin: StdinSender,
) where
    R: AsyncRead + Unpin,
{
    while let Some(frame) = frames.next().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(CodecError::Io(e)) => {
                tracing::debug!("exec connection read failed: {e}");
                return;
            }
            Err(e) => {
                tracing::warn!(
                    "malformed frame from the host, dropping the exec: {}",
                    crate::error::chain(&e)
                );
                return;
            }
        };
        tracing::trace!(kind = frame.kind(), "frame from the host");
        match frame {
            Frame::Stdin(bytes) => {
                let msg = if bytes.is_empty() {
                    StdinMsg::Eof
                } else {
                    StdinMsg::Data(bytes)
                };
                // An error means the stdin writer is gone (exec ending); keep reading anyway
                // so SIGNAL and EOF are still seen.
                let _ = stdin.send(msg).await;
            }
            Frame::Signal(n) => match i32::try_from(n) {
                Ok(signal) => control.signal(signal),
                Err(_) => tracing::warn!(n, "ignoring out-of-range signal number"),
            },
            Frame::Resize(size) => control.resize(size),
            Frame::Unknown { kind, .. } => tracing::debug!(kind, "skipping unknown frame"),
            other => tracing::warn!(kind = other.kind(), "ignoring unexpected frame from host"),
        }
    }
}
