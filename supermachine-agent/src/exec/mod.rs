//! One exec connection, following SEMANTICS.md "Exec lifecycle": validate, stage files, run
//! `argv` and its chain one link at a time in their own process groups, stream their I/O, and
//! end with exactly one EXIT or ERROR (or, if the host left, with nothing and no survivors).

mod io;
mod plan;
mod pty;
mod spawn;

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use supermachine_codec::{ExecCodec, ExecRequest, ExitInfo, Frame, StdioMode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::codec::{FramedRead, FramedWrite};

use self::io::{LinkControl, OutStream, StdinQueue, StdinTarget};
use self::plan::Plan;
use self::pty::{Pty, PtyIo};
use self::spawn::LinkStdio;
use crate::error::{ExecError, Link};
use crate::hangup::HangupWatch;
use crate::staging;
use crate::state::Agent;
use crate::sys::{self, Reaped};
use crate::task::Task;

/// How long a disconnected exec's group gets between SIGHUP and SIGKILL.
const HANGUP_GRACE: Duration = Duration::from_millis(200);
/// After the last frame, how long we wait for the host to close its side before closing ours.
/// Closing a socket with unread input resets it, which could cost the host our last frame.
pub const LINGER: Duration = Duration::from_secs(1);

/// How the links ended, when the exec did not fail.
enum Outcome {
    /// Send EXIT.
    Exited(ExitInfo),
    /// The host went away; there is nobody to tell.
    HostGone,
}

/// The connection's two sides, as tasks.
struct Conn {
    out: mpsc::Sender<Frame>,
    writer: Task<Result<(), supermachine_codec::CodecError>>,
    reader: Task<()>,
    hangup: Option<HangupWatch>,
    gone: bool,
}

impl Conn {
    /// Completes when the host is gone: the reader saw EOF or an error, a write failed, or the
    /// connection reports a hangup (which the reader misses while it waits on a full stdin
    /// queue).
    /// Cancel-safe; once it has completed it completes at once.
    async fn host_gone(&mut self) {
        if self.gone {
            return;
        }
        let hangup = async {
            match &self.hangup {
                Some(hangup) => hangup.closed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut self.reader => {}
            _ = &mut self.writer => {}
            _ = hangup => {}
        }
        self.gone = true;
    }

    /// Sends the final frame, closes our side once it is written, and lingers for the host to
    /// close its side.
    async fn finish(mut self, last: Frame) {
        if self.gone || self.out.send(last).await.is_err() {
            return;
        }
        drop(self.out);
        tokio::select! {
            written = &mut self.writer => {
                if let Ok(Err(e)) = written {
                    tracing::debug!(
                        "writing the last frames failed: {}",
                        crate::error::chain(&e)
                    );
                }
            }
            // The host left without reading everything; nothing more to do.
            _ = &mut self.reader => return,
        }
        let _ = tokio::time::timeout(LINGER, &mut self.reader).await;
    }
}

/// Runs the exec `request` on a connection whose first frame (the request) has been read.
pub async fn run<R, W>(
    agent: Arc<Agent>,
    request: ExecRequest,
    frames: FramedRead<R, ExecCodec>,
    sink: FramedWrite<W, ExecCodec>,
    hangup: Option<HangupWatch>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (out, out_rx) = mpsc::channel(io::OUT_QUEUE);
    let writer = Task::spawn(io::write_frames(sink, out_rx));
    let program = request.argv.first().cloned().unwrap_or_default();
    let plan = plan::plan(request, agent.mode, agent.boot_flags);
    let size = plan.as_ref().map_or(plan::DEFAULT_SIZE, |plan| plan.size);
    let control = Arc::new(LinkControl::new(size));
    // The reader starts at once: SIGNALs sent before the first link is up are kept for it, and
    // a host that goes away during staging is noticed.
    let (stdin_tx, stdin_rx) = io::stdin_queue();
    let reader = Task::spawn(io::read_input(frames, control.clone(), stdin_tx));
    let mut conn = Conn {
        out,
        writer,
        reader,
        hangup,
        gone: false,
    };
    let result = match plan {
        Ok(plan) => run_plan(&agent, plan, &control, &mut conn, stdin_rx).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(Outcome::Exited(info)) => {
            tracing::debug!(
                program,
                code = info.code,
                signal = info.signal,
                "exec finished"
            );
            conn.finish(Frame::Exit(info)).await;
        }
        Ok(Outcome::HostGone) => tracing::debug!(program, "host went away; exec killed"),
        Err(e) => {
            tracing::info!(program, "exec failed: {}", crate::error::chain(&e));
            conn.finish(Frame::Error(e.to_agent_error())).await;
        }
    }
}

/// Steps 2–7: stage files, then run each link.
async fn run_plan(
    agent: &Agent,
    plan: Plan,
    control: &Arc<LinkControl>,
    conn: &mut Conn,
    stdin_rx: StdinQueue,
) -> Result<Outcome, ExecError> {
    let report_signal = plan.report_signal;
    let (pty_tx, pty_rx) = watch::channel(None);
    let (target, mut stdin_read) = stdin_plumbing(&plan, pty_rx)?;
    let _stdin = Task::spawn(io::feed_stdin(stdin_rx, target));

    for (path, file) in &plan.files {
        let owner = plan.launch.user.as_ref().map(crate::user::ids);
        let mode = file.mode().unwrap_or(staging::DEFAULT_MODE);
        let write = staging::write_atomic_async(path.clone(), file.contents().clone(), mode, owner);
        tokio::select! {
            written = write => written.map_err(|source| ExecError::Staging {
                path: file.path().to_owned(),
                source,
            })?,
            _ = conn.host_gone() => return Ok(Outcome::HostGone),
        }
    }

    let mut code = 0;
    let mut signal = None;
    let mut peak_rss_kib = 0;
    let links = plan.links.len();
    for (i, argv) in plan.links.iter().enumerate() {
        let link = Link(i);
        plan::check_cwd(plan.launch.cwd.as_deref(), link)?;
        let last = i + 1 == links;
        let (stdio, pty) = link_stdio(&plan, control, &mut stdin_read, last)?;
        let spawned = spawn::spawn(argv, link, &plan.launch, stdio)?;
        let pid = spawned.pid;
        // Registered before the next await, so the reaper cannot miss it (see Reaper::register).
        let (mut exit, alive) = agent.reaper.register(pid, true);
        let registration = agent.workload.register(pid, alive.clone());
        control.start_link(pid, alive, pty.clone());
        pty_tx.send_replace(pty.clone());
        tracing::debug!(pid, ?argv, "spawned");

        let (exited_tx, exited_rx) = watch::channel(false);
        let mut pumps =
            match start_pumps(&plan, spawned.stdout, spawned.stderr, pty, conn, exited_rx) {
                Ok(pumps) => pumps,
                Err(e) => {
                    // Nobody would read its output: it must not run on unobserved.
                    let _ = sys::killpg(pid, libc::SIGKILL);
                    let _ = exit.await;
                    return Err(e);
                }
            };
        if i == 0 {
            let started = Frame::Started {
                pid: u32::try_from(pid).unwrap_or(0),
            };
            if conn.out.send(started).await.is_err() {
                hang_up(pid, &mut exit).await;
                return Ok(Outcome::HostGone);
            }
        }

        let reaped = tokio::select! {
            // An exit that is already in wins: the group id may be reused once it is reaped.
            biased;
            reaped = &mut exit => reaped,
            _ = conn.host_gone() => {
                hang_up(pid, &mut exit).await;
                return Ok(Outcome::HostGone);
            }
        };
        // The reaper has killed the rest of the group; its id is free for reuse from here on.
        control.end_link();
        pty_tx.send_replace(None);
        drop(registration);
        let reaped = reaped.map_err(|_| ExecError::Internal {
            what: format!("{link}waiting for pid {pid}"),
            source: std::io::Error::other("the reaper dropped the registration"),
        })?;
        tracing::debug!(pid, code = reaped.code(), "leader exited");

        // Drain what the link wrote before it died, then decide on the chain.
        exited_tx.send_replace(true);
        tokio::select! {
            _ = async { for pump in &mut pumps { let _ = pump.await; } } => {}
            _ = conn.host_gone() => return Ok(Outcome::HostGone),
        }
        code = reaped.code();
        signal = reaped.signal();
        peak_rss_kib = peak_rss_kib.max(reaped.max_rss_kib);
        if code != 0 {
            break;
        }
    }
    Ok(Outcome::Exited(ExitInfo {
        code,
        peak_rss_kib: Some(peak_rss_kib),
        // A version-1 host refuses the longer EXIT frame that carries it.
        signal: signal.filter(|_| report_signal),
    }))
}

/// Step 8: the host went away before EXIT. SIGHUP the group, SIGKILL it if the leader is still
/// there after a grace period, and reap the leader (the reaper kills what is left of the group
/// when it does).
async fn hang_up(pgid: i32, exit: &mut oneshot::Receiver<Reaped>) {
    if !matches!(exit.try_recv(), Err(oneshot::error::TryRecvError::Empty)) {
        return; // Already reaped: the group is gone and its id no longer ours to signal.
    }
    let _ = sys::killpg(pgid, libc::SIGHUP);
    if tokio::time::timeout(HANGUP_GRACE, &mut *exit)
        .await
        .is_err()
    {
        let _ = sys::killpg(pgid, libc::SIGKILL);
        let _ = exit.await;
    }
}

/// Where stdin goes, and (pipes mode) the read end of the stdin pipe shared by every link.
///
/// One pipe for the whole chain, as a shell gives `a && b` one stdin: what `a` leaves unread is
/// there for `b`, and EOF stays EOF.
fn stdin_plumbing(
    plan: &Plan,
    ptys: watch::Receiver<Option<Arc<Pty>>>,
) -> Result<(StdinTarget, Option<OwnedFd>), ExecError> {
    let internal = |what: &str| {
        let what = what.to_owned();
        move |source| ExecError::Internal { what, source }
    };
    if plan.tty {
        let target = StdinTarget::Pty {
            current: ptys,
            closed: plan.stdin == StdioMode::Null,
        };
        return Ok((target, None));
    }
    match plan.stdin {
        StdioMode::Null => Ok((StdinTarget::Discard, None)),
        StdioMode::Piped => {
            let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(std::io::Error::from)
                .map_err(internal("creating the stdin pipe"))?;
            let sender = pipe::Sender::from_owned_fd(write)
                .map_err(internal("registering the stdin pipe"))?;
            Ok((StdinTarget::Pipe(sender), Some(read)))
        }
    }
}

/// The stdio for the next link, and its pty in tty mode.
fn link_stdio(
    plan: &Plan,
    control: &LinkControl,
    stdin_read: &mut Option<OwnedFd>,
    last: bool,
) -> Result<(LinkStdio, Option<Arc<Pty>>), ExecError> {
    if plan.tty {
        let (pty, slave) = Pty::open(control.size()).map_err(|source| ExecError::Internal {
            what: "opening a pty".into(),
            source,
        })?;
        return Ok((LinkStdio::Pty { slave }, Some(Arc::new(pty))));
    }
    // The last link takes our copy of the read end, so that once it exits nothing reads the
    // pipe and stdin writes fail fast with EPIPE instead of filling a pipe nobody drains.
    let stdin = if last {
        stdin_read.take()
    } else {
        match stdin_read {
            Some(fd) => Some(fd.try_clone().map_err(|source| ExecError::Internal {
                what: "duplicating the stdin pipe".into(),
                source,
            })?),
            None => None,
        }
    };
    Ok((
        LinkStdio::Pipes {
            stdin,
            stdout: plan.stdout == StdioMode::Piped,
            stderr: plan.stderr == StdioMode::Piped,
        },
        None,
    ))
}

/// Starts the output pumps of a link.
fn start_pumps(
    plan: &Plan,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    pty: Option<Arc<Pty>>,
    conn: &Conn,
    exited: watch::Receiver<bool>,
) -> Result<Vec<Task<()>>, ExecError> {
    let mut pumps = Vec::with_capacity(2);
    if let Some(pty) = pty {
        // tty mode: one stream; with `stdout: null` it is read and dropped, or the child would
        // block on a full terminal.
        let forward = plan.stdout == StdioMode::Piped;
        pumps.push(Task::spawn(io::pump_output(
            PtyIo(pty),
            OutStream::Stdout,
            conn.out.clone(),
            exited,
            forward,
        )));
        return Ok(pumps);
    }
    for (fd, stream) in [(stdout, OutStream::Stdout), (stderr, OutStream::Stderr)] {
        let Some(fd) = fd else { continue };
        let receiver = pipe::Receiver::from_owned_fd(fd).map_err(|source| ExecError::Internal {
            what: format!("registering the {stream:?} pipe"),
            source,
        })?;
        pumps.push(Task::spawn(io::pump_output(
            receiver,
            stream,
            conn.out.clone(),
            exited.clone(),
            true,
        )));
    }
    Ok(pumps)
}
