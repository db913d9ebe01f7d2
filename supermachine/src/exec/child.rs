use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use supermachine_codec::WindowSize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::PollSender;

use super::driver::Command;
use super::state::{ExecState, Finished, Stream};
use super::status::ExitStatus;
use crate::error::Error;

/// Largest stdin chunk sent as one frame.
const STDIN_CHUNK: usize = 64 * 1024;

const SIGKILL: u32 = 9;

/// A running exec in the guest.
///
/// * [`AsyncRead`] reads its stdout (until taken with [`take_stdout`](Self::take_stdout)).
/// * [`AsyncWrite`] writes its stdin (until taken); shutting the writer down sends EOF.
/// * Awaiting it (it is a [`Future`]) gives the [`ExitStatus`]; like `tokio::process`, stdin is
///   closed first if it was not taken, so a program reading stdin to EOF can finish.
///
/// Dropping an `ExecChild` kills the exec's process group in the guest.
#[derive(Debug)]
pub struct ExecChild {
    pid: u32,
    started_at: Instant,
    stdin: Option<ExecStdin>,
    stdout: Option<ExecStdout>,
    stderr: Option<ExecStderr>,
    state: Arc<ExecState>,
    signaler: ExecSignaler,
    /// Dropping this tells the driver the child is gone.
    _drop_guard: oneshot::Sender<()>,
}

impl ExecChild {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        pid: u32,
        started_at: Instant,
        stdin: Option<ExecStdin>,
        stdout: ExecStdout,
        stderr: ExecStderr,
        state: Arc<ExecState>,
        signaler: ExecSignaler,
        drop_guard: oneshot::Sender<()>,
    ) -> Self {
        ExecChild {
            pid,
            started_at,
            stdin,
            stdout: Some(stdout),
            stderr: Some(stderr),
            state,
            signaler,
            _drop_guard: drop_guard,
        }
    }

    /// The guest pid of the first command.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub(crate) fn started_at(&self) -> Instant {
        self.started_at
    }

    /// Takes the stdin writer (absent with [`Stdio::null`](crate::Stdio::null)).
    pub fn take_stdin(&mut self) -> Option<ExecStdin> {
        self.stdin.take()
    }

    /// Takes the stdout reader.
    pub fn take_stdout(&mut self) -> Option<ExecStdout> {
        self.stdout.take()
    }

    /// Takes the stderr reader.
    pub fn take_stderr(&mut self) -> Option<ExecStderr> {
        self.stderr.take()
    }

    /// A handle other tasks can use to signal or resize this exec.
    pub fn signaler(&self) -> ExecSignaler {
        self.signaler.clone()
    }

    /// Sends signal `signal` to the exec's process group.
    pub fn signal(&self, signal: u32) -> Result<(), Error> {
        self.signaler.signal(signal)
    }

    /// Sends SIGKILL to the exec's process group; the exit status follows (`128 + 9`).
    pub fn kill(&self) -> Result<(), Error> {
        self.signaler.kill()
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

    /// Waits for the exit status. Equivalent to awaiting the child itself.
    pub async fn wait(&mut self) -> Result<ExitStatus, Error> {
        poll_fn(|cx| self.poll_exit(cx)).await
    }

    /// Waits for the end, returning the raw result and whether the timeout fired.
    pub(crate) async fn wait_finished(&mut self) -> Result<Finished, Error> {
        self.stdin = None;
        poll_fn(|cx| self.state.poll_finished(cx)).await
    }

    fn poll_exit(&mut self, cx: &mut Context<'_>) -> Poll<Result<ExitStatus, Error>> {
        // Close stdin first so a child reading it to EOF can exit (tokio::process does the same).
        self.stdin = None;
        let Finished { result, timed_out } = ready!(self.state.poll_finished(cx))?;
        Poll::Ready(match (result, timed_out) {
            (Ok(_), true) => Err(Error::TimedOut(self.state.timeout.unwrap_or_default())),
            (Ok(info), false) => Ok(ExitStatus::from_code(info.code)),
            (Err(e), _) => Err(e),
        })
    }

    /// Peak resident memory of the exec's processes in KiB, once it has exited.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        self.state.exit_info().and_then(|info| info.peak_rss_kib)
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

    /// Sends SIGKILL to the exec's process group.
    pub fn kill(&self) -> Result<(), Error> {
        self.send(Command::Signal(SIGKILL))
    }

    /// Changes the terminal size (tty mode; ignored otherwise).
    pub fn resize(&self, cols: u16, rows: u16) -> Result<(), Error> {
        self.send(Command::Resize(WindowSize { cols, rows }))
    }
}
