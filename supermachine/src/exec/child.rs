use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use supermachine_codec::WindowSize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::PollSender;

use super::driver::Command;
use super::state::{ExecState, Finished, Stream};
use super::status::{ExecOutcome, ExitStatus};
use crate::error::Error;

/// Largest stdin chunk sent as one frame.
const STDIN_CHUNK: usize = 64 * 1024;

const SIGKILL: u32 = 9;

/// A running exec in the guest; shaped like
/// [`tokio::process::Child`](https://docs.rs/tokio/latest/tokio/process/struct.Child.html).
///
/// * `stdin`, `stdout` and `stderr` are public, as in tokio: `child.stdout.take()`. A stream
///   that was not piped (or stderr in tty mode, which is merged into stdout) is `None`.
/// * [`AsyncRead`] reads its stdout and [`AsyncWrite`] writes its stdin, while they have not
///   been taken; shutting the writer down sends EOF.
/// * Awaiting it (it is a [`Future`]) is [`wait`](Self::wait): like `tokio::process`, stdin is
///   closed first if it was not taken, so a program reading stdin to EOF can finish.
///
/// Dropping an `ExecChild` kills the exec's process group in the guest unless the builder set
/// [`kill_on_drop(false)`](crate::ExecBuilder::kill_on_drop).
#[derive(Debug)]
pub struct ExecChild {
    /// Writes to the process's stdin; `None` when stdin is not piped or has been taken.
    pub stdin: Option<ExecStdin>,
    /// Reads the process's stdout (and stderr, in tty mode); `None` when not piped or taken.
    pub stdout: Option<ExecStdout>,
    /// Reads the process's stderr; `None` when not piped, in tty mode, or taken.
    pub stderr: Option<ExecStderr>,
    pid: u32,
    started_at: Instant,
    state: Arc<ExecState>,
    signaler: ExecSignaler,
    /// Tells the driver, when dropped, whether to kill the exec or to detach from it.
    _drop_guard: DropGuard,
}

/// Sent to the driver when the [`ExecChild`] (or the spawn future, before the child exists)
/// is dropped: a `()` means "detach" (`kill_on_drop(false)`); the channel closing without one
/// means "kill".
#[derive(Debug)]
pub(crate) struct DropGuard {
    tx: Option<oneshot::Sender<()>>,
    detach: bool,
}

impl DropGuard {
    pub(crate) fn new(tx: oneshot::Sender<()>) -> Self {
        DropGuard {
            tx: Some(tx),
            detach: false,
        }
    }

    pub(crate) fn detach_on_drop(&mut self, detach: bool) {
        self.detach = detach;
    }
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        if let (true, Some(tx)) = (self.detach, self.tx.take()) {
            let _ = tx.send(());
        }
    }
}

impl ExecChild {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        pid: u32,
        started_at: Instant,
        stdin: Option<ExecStdin>,
        stdout: Option<ExecStdout>,
        stderr: Option<ExecStderr>,
        state: Arc<ExecState>,
        signaler: ExecSignaler,
        drop_guard: DropGuard,
    ) -> Self {
        ExecChild {
            stdin,
            stdout,
            stderr,
            pid,
            started_at,
            state,
            signaler,
            _drop_guard: drop_guard,
        }
    }

    /// The guest pid of the first command, or `None` once the exec has ended (the agent has
    /// reaped it by the time it reports the exit, and the pid may be reused), as
    /// `tokio::process::Child::id` does.
    pub fn id(&self) -> Option<u32> {
        (!self.state.is_finished()).then_some(self.pid)
    }

    /// A handle other tasks can use to signal or resize this exec.
    pub fn signaler(&self) -> ExecSignaler {
        self.signaler.clone()
    }

    /// Sends signal `signal` to the exec's process group.
    pub fn signal(&self, signal: u32) -> Result<(), Error> {
        self.signaler.signal(signal)
    }

    /// Sends SIGKILL to the exec's process group without waiting for it to die, like tokio's
    /// `start_kill`. Fails with [`Error::NotRunning`] once the exec has ended.
    pub fn start_kill(&self) -> Result<(), Error> {
        if self.state.is_finished() {
            return Err(Error::NotRunning);
        }
        self.signaler.kill()
    }

    /// Kills the exec's process group and waits for it to end, like tokio's `kill`: the exit
    /// status (`signal() == Some(9)`) is then available from [`try_wait`](Self::try_wait) and
    /// [`wait`](Self::wait). Fails with [`Error::NotRunning`] once the exec has ended.
    pub async fn kill(&mut self) -> Result<(), Error> {
        self.start_kill()?;
        self.wait().await?;
        Ok(())
    }

    /// Changes the terminal size (tty mode; ignored otherwise).
    pub fn resize(&self, cols: u16, rows: u16) -> Result<(), Error> {
        self.signaler.resize(cols, rows)
    }

    /// Tears the exec down from the host side at once, without waiting for the guest: the
    /// connection is closed (the agent then kills the process group) and the exit resolves to
    /// [`Error::Aborted`]. Works even when the agent or the VM is gone.
    pub fn abort(&self) {
        self.state.finish(Finished {
            result: Err(Error::Aborted),
            timed_out: false,
        });
        self.state.abort.notify_one();
    }

    /// Waits for the exec to end and returns its status. Equivalent to awaiting the child
    /// itself. Closes stdin first (if it was not taken), as tokio does. A timeout is not an
    /// error: see [`ExitStatus::timed_out`].
    pub async fn wait(&mut self) -> Result<ExitStatus, Error> {
        poll_fn(|cx| self.poll_exit(cx)).await
    }

    /// The exit status if the exec has ended, `Ok(None)` if it is still running; does not
    /// wait, and leaves stdin open.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, Error> {
        self.state.try_finished().map(status_of).transpose()
    }

    /// Waits for the end while collecting the stdout and stderr still held by the child (a
    /// stream taken earlier comes back empty), like tokio's `wait_with_output`. Closes stdin
    /// first if it was not taken.
    pub async fn wait_with_output(mut self) -> Result<ExecOutcome, Error> {
        self.stdin = None;
        let mut stdout = self.stdout.take();
        let mut stderr = self.stderr.take();
        let state = self.state.clone();
        let (out, err, finished) = tokio::join!(
            collect(stdout.as_mut()),
            collect(stderr.as_mut()),
            poll_fn(|cx| state.poll_finished(cx))
        );
        let finished = finished?;
        let timed_out = finished.timed_out;
        let info = finished.result?;
        Ok(ExecOutcome {
            status: ExitStatus::from_info(&info, timed_out),
            stdout: out.map_err(|e| Error::from_io("reading stdout", e))?,
            stderr: err.map_err(|e| Error::from_io("reading stderr", e))?,
            duration: self.started_at.elapsed(),
            peak_rss_kib: info.peak_rss_kib,
            timed_out,
        })
    }

    fn poll_exit(&mut self, cx: &mut Context<'_>) -> Poll<Result<ExitStatus, Error>> {
        // Close stdin first so a child reading it to EOF can exit (tokio::process does the same).
        self.stdin = None;
        let finished = ready!(self.state.poll_finished(cx))?;
        Poll::Ready(status_of(finished))
    }

    /// Peak resident memory of the exec's processes in KiB, once it has exited.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        self.state.exit_info().and_then(|info| info.peak_rss_kib)
    }
}

fn status_of(finished: Finished) -> Result<ExitStatus, Error> {
    let Finished { result, timed_out } = finished;
    result.map(|info| ExitStatus::from_info(&info, timed_out))
}

async fn collect<R: AsyncRead + Unpin>(reader: Option<&mut R>) -> io::Result<Bytes> {
    let Some(reader) = reader else {
        return Ok(Bytes::new());
    };
    let mut buf = BytesMut::new();
    loop {
        buf.reserve(64 * 1024);
        if reader.read_buf(&mut buf).await? == 0 {
            return Ok(buf.freeze());
        }
    }
}

impl Future for ExecChild {
    type Output = Result<ExitStatus, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.get_mut().poll_exit(cx)
    }
}

fn taken(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        format!("the exec's {what} has been taken or was not piped"),
    )
}

impl AsyncRead for ExecChild {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut().stdout.as_mut() {
            Some(stdout) => Pin::new(stdout).poll_read(cx, buf),
            None => Poll::Ready(Err(taken("stdout"))),
        }
    }
}

impl AsyncWrite for ExecChild {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().stdin.as_mut() {
            Some(stdin) => Pin::new(stdin).poll_write(cx, buf),
            None => Poll::Ready(Err(taken("stdin"))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().stdin.as_mut() {
            Some(stdin) => Pin::new(stdin).poll_flush(cx),
            None => Poll::Ready(Err(taken("stdin"))),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().stdin.as_mut() {
            Some(stdin) => Pin::new(stdin).poll_shutdown(cx),
            None => Poll::Ready(Err(taken("stdin"))),
        }
    }
}

/// Writes to an exec's stdin. Shutting it down, or dropping it, sends EOF; the connection stays
/// open for the output and the exit status.
#[derive(Debug)]
pub struct ExecStdin {
    tx: PollSender<Bytes>,
}

impl ExecStdin {
    pub(crate) fn new(tx: PollSender<Bytes>) -> Self {
        ExecStdin { tx }
    }
}

fn closed() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "the exec has ended or its stdin was closed",
    )
}

impl AsyncWrite for ExecStdin {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            // An empty STDIN frame means EOF on the wire; an empty write must not send one.
            return Poll::Ready(Ok(0));
        }
        ready!(self.tx.poll_reserve(cx)).map_err(|_| closed())?;
        let n = buf.len().min(STDIN_CHUNK);
        self.tx
            .send_item(Bytes::copy_from_slice(&buf[..n]))
            .map_err(|_| closed())?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Bytes handed to the queue are on their way; there is no further buffer to flush.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Closing the queue makes the driver send EOF after what is already queued.
        self.tx.close();
        Poll::Ready(Ok(()))
    }
}

/// Reads an exec's stdout. Dropping it discards the rest of the output (the exec keeps running).
#[derive(Debug)]
pub struct ExecStdout {
    reader: OutputReader,
}

/// Reads an exec's stderr. Dropping it discards the rest of the output (the exec keeps running).
#[derive(Debug)]
pub struct ExecStderr {
    reader: OutputReader,
}

impl ExecStdout {
    pub(crate) fn new(state: Arc<ExecState>, stream: Stream) -> Self {
        ExecStdout {
            reader: OutputReader { state, stream },
        }
    }
}

impl ExecStderr {
    pub(crate) fn new(state: Arc<ExecState>, stream: Stream) -> Self {
        ExecStderr {
            reader: OutputReader { state, stream },
        }
    }
}

struct OutputReader {
    state: Arc<ExecState>,
    stream: Stream,
}

impl std::fmt::Debug for OutputReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputReader")
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

impl Drop for OutputReader {
    fn drop(&mut self) {
        self.state.detach(self.stream);
    }
}

impl AsyncRead for ExecStdout {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let reader = &self.reader;
        reader.state.poll_read(reader.stream, cx, buf)
    }
}

impl AsyncRead for ExecStderr {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let reader = &self.reader;
        reader.state.poll_read(reader.stream, cx, buf)
    }
}

/// Signals or resizes an exec from any task. Cheap to clone, `Send + Sync`.
#[derive(Debug, Clone)]
pub struct ExecSignaler {
    commands: mpsc::UnboundedSender<Command>,
}

impl ExecSignaler {
    pub(crate) fn new(commands: mpsc::UnboundedSender<Command>) -> Self {
        ExecSignaler { commands }
    }

    fn send(&self, command: Command) -> Result<(), Error> {
        self.commands.send(command).map_err(|_| Error::NotRunning)
    }

    /// Sends signal `signal` to the exec's process group.
    pub fn signal(&self, signal: u32) -> Result<(), Error> {
        if signal == 0 || signal > 64 {
            return Err(Error::InvalidRequest(format!(
                "{signal} is not a signal number"
            )));
        }
        self.send(Command::Signal(signal))
    }

    /// Sends SIGKILL to the exec's process group; does not wait for it to die (the child's
    /// [`ExecChild::kill`] does).
    pub fn kill(&self) -> Result<(), Error> {
        self.send(Command::Signal(SIGKILL))
    }

    /// Changes the terminal size (tty mode; ignored otherwise).
    pub fn resize(&self, cols: u16, rows: u16) -> Result<(), Error> {
        self.send(Command::Resize(WindowSize { cols, rows }))
    }
}
