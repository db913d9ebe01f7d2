//! The task that owns one exec's connection.

use std::future::pending;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use supermachine_codec::{ExecCodec, ExecRequest, ExitInfo, Frame, WindowSize};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use super::state::{ExecState, Finished, Stream};
use crate::connector::BoxedStream;
use crate::error::Error;

/// How long a killed exec gets to report its exit status before the connection is dropped (the
/// agent then kills the group itself when it sees the connection go).
const KILL_GRACE: Duration = Duration::from_secs(2);

/// How long teardown after a drop waits for the SIGKILL frame to be written.
const DROP_GRACE: Duration = Duration::from_millis(500);

const SIGKILL: u32 = 9;

/// Initial read buffer of an exec connection.
const READ_BUFFER: usize = 256 * 1024;

/// What the handles ask the driver to send.
#[derive(Debug)]
pub(crate) enum Command {
    Signal(u32),
    Resize(WindowSize),
}

pub(crate) struct Driver {
    pub(crate) stream: BoxedStream,
    pub(crate) request: ExecRequest,
    pub(crate) state: Arc<ExecState>,
    pub(crate) commands: mpsc::UnboundedReceiver<Command>,
    /// The driver's own sender, for the SIGKILL it sends during teardown.
    pub(crate) command_tx: mpsc::UnboundedSender<Command>,
    pub(crate) stdin: Option<mpsc::Receiver<Bytes>>,
    /// Resolves when the `ExecChild` (or the spawn future) is dropped: with `()` to detach
    /// (`kill_on_drop(false)`), with an error to kill.
    pub(crate) dropped: oneshot::Receiver<()>,
    pub(crate) cancel: Option<CancellationToken>,
    pub(crate) deadline: Option<Instant>,
}

type Reader = FramedRead<ReadHalf<BoxedStream>, ExecCodec>;
type Writer = FramedWrite<WriteHalf<BoxedStream>, ExecCodec>;

/// Why the writing side stopped.
enum WriteEnd {
    Failed(Error),
}

impl Driver {
    pub(crate) async fn run(self) {
        let Driver {
            stream,
            request,
            state,
            commands,
            command_tx,
            stdin,
            mut dropped,
            cancel,
            deadline,
        } = self;
        let (read_half, write_half) = tokio::io::split(stream);
        // Room for several full-size output frames per socket read.
        let mut reader = FramedRead::with_capacity(read_half, ExecCodec::new(), READ_BUFFER);
        let mut writer = FramedWrite::new(write_half, ExecCodec::new());

        if let Err(e) = writer.send(Frame::Request(request)).await {
            state.finish(Finished {
                result: Err(Error::from_codec("sending the exec request", e)),
                timed_out: false,
            });
            return;
        }

        let read = read_frames(&mut reader, &state);
        let write = write_frames(&mut writer, commands, stdin);
        tokio::pin!(read, write);
        let cancelled = async {
            match &cancel {
                Some(token) => token.cancelled().await,
                None => pending().await,
            }
        };
        let expired = async {
            match deadline {
                Some(at) => sleep_until(at).await,
                None => pending().await,
            }
        };
        // Completes only for a drop that should kill. A detaching drop (`kill_on_drop(false)`)
        // leaves this pending forever: the driver then keeps the connection open, discarding
        // output nobody reads, until the exit or until the agent goes away.
        let drop_kills = async {
            if (&mut dropped).await.is_ok() {
                pending::<()>().await;
            }
        };

        tokio::select! {
            result = &mut read => {
                state.finish(Finished { result, timed_out: false });
            }
            WriteEnd::Failed(error) = &mut write => {
                // The agent may still have the exit status on its way; give it the grace period.
                let result = match timeout(KILL_GRACE, &mut read).await {
                    Ok(result) => result,
                    Err(_) => Err(error),
                };
                state.finish(Finished { result, timed_out: false });
            }
            _ = cancelled => {
                // Report at once; the kill and its acknowledgement finish in the background.
                state.finish(Finished { result: Err(Error::Cancelled), timed_out: false });
                kill_and_wait(&command_tx, &mut read, &mut write, KILL_GRACE).await;
            }
            _ = expired => {
                // A timeout is not an error (see ExecBuilder::timeout): the status is the killed
                // process's. Without an answer within the grace period the connection is closed
                // below, and the agent ends the group (SIGHUP, then SIGKILL) when it sees that;
                // report the SIGKILL the process was sent.
                let result = kill_and_wait(&command_tx, &mut read, &mut write, KILL_GRACE).await;
                let info = match result {
                    Some(Ok(info)) => info,
                    _ => ExitInfo::signaled(SIGKILL),
                };
                state.finish(Finished { result: Ok(info), timed_out: true });
            }
            _ = state.abort.notified() => {
                state.finish(Finished { result: Err(Error::Aborted), timed_out: false });
            }
            _ = drop_kills => {
                state.finish(Finished { result: Err(Error::Cancelled), timed_out: false });
                kill_and_wait(&command_tx, &mut read, &mut write, DROP_GRACE).await;
            }
        }
        // Dropping the reader and writer closes the connection; the agent kills whatever of the
        // exec is still running when it sees that.
    }
}

/// Sends SIGKILL to the exec's process group and waits up to `grace` for its exit status. The
/// write side keeps running meanwhile so the kill frame can get out.
async fn kill_and_wait<R, W>(
    commands: &mpsc::UnboundedSender<Command>,
    read: &mut std::pin::Pin<&mut R>,
    write: &mut std::pin::Pin<&mut W>,
    grace: Duration,
) -> Option<Result<ExitInfo, Error>>
where
    R: std::future::Future<Output = Result<ExitInfo, Error>>,
    W: std::future::Future<Output = WriteEnd>,
{
    let _ = commands.send(Command::Signal(SIGKILL));
    let both = async {
        tokio::select! {
            result = read.as_mut() => result,
            WriteEnd::Failed(error) = write.as_mut() => Err(error),
        }
    };
    timeout(grace, both).await.ok()
}

/// Routes incoming frames into the shared state until the exec ends.
async fn read_frames(reader: &mut Reader, state: &ExecState) -> Result<ExitInfo, Error> {
    const DURING: &str = "while the exec was running";
    loop {
        state.room_for_output().await;
        match reader.next().await {
            Some(Ok(Frame::Stdout(bytes))) => state.push(Stream::Stdout, bytes),
            Some(Ok(Frame::Stderr(bytes))) => state.push(Stream::Stderr, bytes),
            Some(Ok(Frame::Started { pid })) => state.started(pid),
            Some(Ok(Frame::Exit(info))) => return Ok(info),
            Some(Ok(Frame::Error(error))) => return Err(Error::from_agent(error)),
            Some(Ok(Frame::Unknown { .. })) => continue,
            Some(Ok(other)) => {
                return Err(Error::Protocol(format!(
                    "the agent sent a frame of kind {:#04x}, which only a host sends",
                    other.kind()
                )))
            }
            Some(Err(e)) => return Err(Error::from_codec(DURING, e)),
            None => {
                return Err(Error::ConnectionLost {
                    during: DURING,
                    reason: "the agent closed the connection before reporting an exit status"
                        .to_owned(),
                })
            }
        }
    }
}

/// Writes stdin bytes and control frames; control frames go first so a signal is not stuck
/// behind stdin the guest process is not reading.
async fn write_frames(
    writer: &mut Writer,
    mut commands: mpsc::UnboundedReceiver<Command>,
    mut stdin: Option<mpsc::Receiver<Bytes>>,
) -> WriteEnd {
    loop {
        let frame = tokio::select! {
            biased;
            Some(command) = commands.recv() => match command {
                Command::Signal(signal) => Frame::Signal(signal),
                Command::Resize(size) => Frame::Resize(size),
            },
            data = next_stdin(&mut stdin) => match data {
                Some(bytes) => Frame::Stdin(bytes),
                None => {
                    // Every stdin handle is gone: tell the child (empty STDIN = EOF).
                    stdin = None;
                    Frame::Stdin(Bytes::new())
                }
            },
        };
        if let Err(e) = writer.send(frame).await {
            return WriteEnd::Failed(Error::from_codec("writing to the exec", e));
        }
    }
}

async fn next_stdin(stdin: &mut Option<mpsc::Receiver<Bytes>>) -> Option<Bytes> {
    match stdin {
        Some(rx) => rx.recv().await,
        None => pending().await,
    }
}
