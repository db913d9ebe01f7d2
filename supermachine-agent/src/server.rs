//! Listening, accepting, and dispatching each connection on its first frame: REQUEST → exec,
//! CONTROL → control (`connect_tcp` → a TCP splice), anything else → `ERROR invalid-request` and close.
//! A restored VM's `restored` preambles before the first frame are applied first.

use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, VsockAddr};
use supermachine_codec::{
    AgentError, CodecError, ControlAck, ControlAction, ControlMessage, ErrorCode, ExecCodec, Frame,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_vsock::VsockListener;

use crate::control;
use crate::error::ServeError;
use crate::exec;
use crate::forward;
use crate::hangup::HangupWatch;
use crate::state::Agent;

/// Pending connections the kernel queues for us; 200 execs may arrive at once.
const BACKLOG: i32 = 1024;
/// Pause after an accept error that a moment may cure (out of fds, memory).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A bound listener.
#[derive(Debug)]
pub enum Listener {
    /// Host mode: a Unix socket, removed again when this is dropped.
    Unix(UnixListener, SocketFile),
    /// Guest mode: AF_VSOCK, any CID.
    Vsock(VsockListener, u32),
}

/// Removes the socket file on drop.
#[derive(Debug)]
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!("removing {}: {e}", self.0.display());
            }
        }
    }
}

impl Listener {
    /// Binds a Unix socket at `path`, replacing a stale socket file.
    pub fn unix(path: &Path) -> Result<Listener, ServeError> {
        let listen_error = |source| ServeError::Listen {
            what: path.display().to_string(),
            source,
        };
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(listen_error(e)),
        }
        // tokio listens with the system maximum backlog (somaxconn).
        let listener = UnixListener::bind(path).map_err(listen_error)?;
        Ok(Listener::Unix(listener, SocketFile(path.to_owned())))
    }

    /// Binds AF_VSOCK `port` on any CID.
    pub fn vsock(port: u32) -> Result<Listener, ServeError> {
        let listen_error = |source: io::Error| ServeError::Listen {
            what: format!("vsock port {port}"),
            source,
        };
        // Set up by hand for the backlog: tokio-vsock's bind listens with 128.
        let fd = socket::socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(|e| listen_error(e.into()))?;
        socket::bind(
            fd.as_raw_fd(),
            &VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, port),
        )
        .map_err(|e| listen_error(e.into()))?;
        let backlog = Backlog::new(BACKLOG).unwrap_or(Backlog::MAXCONN);
        socket::listen(&fd, backlog).map_err(|e| listen_error(e.into()))?;
        Ok(Listener::Vsock(VsockListener::from(fd), port))
    }

    fn describe(&self) -> String {
        match self {
            Listener::Unix(_, file) => file.0.display().to_string(),
            Listener::Vsock(_, port) => format!("vsock port {port}"),
        }
    }
}

/// Prints the readiness line test fixtures wait for.
pub fn announce_ready() -> Result<(), ServeError> {
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "supermachine-agent ready")
        .and_then(|()| stdout.flush())
        .map_err(ServeError::Ready)
}

/// SIGTERM and SIGINT, for a graceful stop.
pub struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    /// Installs the handlers.
    pub fn install() -> Result<StopSignals, ServeError> {
        let setup = |source| ServeError::Setup {
            what: "installing SIGTERM/SIGINT handlers",
            source,
        };
        Ok(StopSignals {
            term: signal(SignalKind::terminate()).map_err(setup)?,
            int: signal(SignalKind::interrupt()).map_err(setup)?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Accepts connections until a stop signal (if `stop` is given) or a fatal accept error.
///
/// On a stop signal every running exec's process group is killed before returning; the socket
/// file goes when the listener is dropped.
pub async fn serve(
    listener: Listener,
    agent: Arc<Agent>,
    mut stop: Option<StopSignals>,
) -> Result<(), ServeError> {
    let what = listener.describe();
    tracing::info!("listening on {what}");
    loop {
        let stop_signal = async {
            match stop.as_mut() {
                Some(stop) => stop.recv().await,
                None => std::future::pending().await,
            }
        };
        let accepted = tokio::select! {
            accepted = accept(&listener, &agent) => accepted,
            name = stop_signal => {
                tracing::info!("{name}: killing every exec and stopping");
                if let Err(e) = agent.workload.signal_all(libc::SIGKILL) {
                    tracing::warn!("killing the workload: {e}");
                }
                return Ok(());
            }
        };
        match accepted {
            Ok(()) => {}
            Err(e) if is_transient(&e) => {
                tracing::warn!("accepting on {what}: {e}; retrying");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
            Err(source) => return Err(ServeError::Accept { what, source }),
        }
    }
}

/// Accepts one connection and starts serving it on its own task.
async fn accept(listener: &Listener, agent: &Arc<Agent>) -> io::Result<()> {
    match listener {
        Listener::Unix(listener, _) => {
            let (stream, _) = listener.accept().await?;
            tokio::spawn(handle_connection(stream, agent.clone()));
        }
        Listener::Vsock(listener, _) => {
            let (stream, _) = listener.accept().await?;
            tokio::spawn(handle_connection(stream, agent.clone()));
        }
    }
    Ok(())
}

fn is_transient(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::ECONNABORTED
                | libc::EINTR
                | libc::EPROTO
                | libc::EPERM
        )
    )
}

/// Serves one connection: reads the first frame and hands over to exec or control.
pub async fn handle_connection<S>(stream: S, agent: Arc<Agent>)
where
    S: AsyncRead + AsyncWrite + AsFd + Send + Unpin + 'static,
{
    let hangup = match HangupWatch::new(&stream) {
        Ok(watch) => Some(watch),
        Err(e) => {
            tracing::warn!("cannot watch the connection for hangups: {e}");
            None
        }
    };
    let (read, write) = tokio::io::split(stream);
    let mut frames = FramedRead::new(read, ExecCodec::new());
    let sink = FramedWrite::new(write, ExecCodec::new());
    let first = loop {
        match frames.next().await {
            None => return,
            // Unknown kinds are skippable, also before the first frame.
            Some(Ok(Frame::Unknown { kind, .. })) => tracing::debug!(kind, "skipping"),
            // A restored VM's preamble: applied, never answered; the next frame is the first.
            Some(Ok(Frame::Control {
                message:
                    ControlMessage::Action(ControlAction::Restored {
                        unix_nanos,
                        restore_id,
                    }),
                data,
            })) => {
                if let Err(message) = control::restored(&agent, restore_id, unix_nanos, &data) {
                    refuse_unseeded(&agent, message, frames, sink).await;
                    return;
                }
            }
            Some(first) => break first,
        }
    };
    match first {
        Ok(Frame::Request(request)) => exec::run(agent, request, frames, sink, hangup).await,
        Ok(Frame::Control {
            message: ControlMessage::Action(ControlAction::ConnectTcp { port }),
            ..
        }) => forward::run(port, frames, sink).await,
        Ok(Frame::Control {
            message: ControlMessage::Action(ControlAction::Echo),
            ..
        }) => forward::echo(&agent, frames, sink).await,
        Ok(Frame::Control { message, data }) => {
            let (ack, data) = control::respond(&agent, message, data).await;
            let reply = Frame::Control {
                message: ControlMessage::Ack(ack),
                data,
            };
            reply_and_close(frames, sink, reply).await;
        }
        Ok(other) => {
            let error = AgentError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "expected REQUEST or CONTROL as the first frame, got kind {:#04x}",
                    other.kind()
                ),
            );
            reply_and_close(frames, sink, Frame::Error(error)).await;
        }
        Err(CodecError::Io(e)) => tracing::debug!("connection failed before its first frame: {e}"),
        // A control request we cannot parse still gets a control-shaped answer.
        Err(
            e @ CodecError::BadJson {
                frame: "CONTROL", ..
            },
        ) => {
            let ack = ControlAck::error(format!("invalid control request: {e}"));
            reply_and_close(frames, sink, Frame::control(ControlMessage::Ack(ack))).await;
        }
        Err(e) => {
            let error = AgentError::new(ErrorCode::InvalidRequest, e.to_string());
            reply_and_close(frames, sink, Frame::Error(error)).await;
        }
    }
}

/// A restored guest whose RNG could not be reseeded must run nothing the host asks for (its
/// random numbers would repeat those of every VM restored from the same snapshot): in the
/// guest the agent powers the VM off, which the host sees as the VM's end; in host mode, where
/// the preamble is refused, the connection gets the reason in an ack.
async fn refuse_unseeded<R, W>(
    agent: &Agent,
    message: String,
    frames: FramedRead<R, ExecCodec>,
    sink: FramedWrite<W, ExecCodec>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    match agent.mode {
        crate::state::Mode::Guest => {
            tracing::error!("{message}: powering the restored VM off");
            crate::init::power_off()
        }
        crate::state::Mode::Host => {
            let ack = ControlAck::error(message);
            reply_and_close(frames, sink, Frame::control(ControlMessage::Ack(ack))).await;
        }
    }
}

/// Sends `frame` as the last frame, closes our side, and gives the host a moment to close its
/// side first (see [`exec::LINGER`]).
pub(crate) async fn reply_and_close<R, W>(
    mut frames: FramedRead<R, ExecCodec>,
    mut sink: FramedWrite<W, ExecCodec>,
    frame: Frame,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if let Err(e) = sink.send(frame).await {
        tracing::debug!("sending the reply failed: {e}");
        return;
    }
    if SinkExt::<Frame>::close(&mut sink).await.is_err() {
        return;
    }
    let drain = async { while let Some(Ok(_)) = frames.next().await {} };
    let _ = tokio::time::timeout(exec::LINGER, drain).await;
}
