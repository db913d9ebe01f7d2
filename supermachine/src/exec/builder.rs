use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use supermachine_codec::{ExecRequest, StagedFile, StdioMode};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::{CancellationToken, PollSender};

use super::child::{ExecChild, ExecSignaler, ExecStderr, ExecStdin, ExecStdout};
use super::driver::Driver;
use super::state::{ExecState, Finished, Stream, DEFAULT_MAX_BUFFERED_OUTPUT};
use super::status::{ExecOutcome, ExitStatus};
use crate::agent::Agent;
use crate::error::Error;

/// Stdin frames queued between the caller's writes and the connection.
const STDIN_QUEUE: usize = 8;

/// Where one of an exec's standard streams goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stdio(StdioMode);

impl Stdio {
    /// Carried over the connection to the [`ExecChild`] handles.
    pub fn piped() -> Self {
        Stdio(StdioMode::Piped)
    }

    /// `/dev/null` in the guest; nothing crosses the connection.
    pub fn null() -> Self {
        Stdio(StdioMode::Null)
    }
}

/// Describes an exec; made by [`Agent::exec`], run by [`spawn`](Self::spawn) or
/// [`output`](Self::output).
#[derive(Debug, Clone)]
#[must_use = "an ExecBuilder does nothing until spawned"]
pub struct ExecBuilder {
    agent: Agent,
    request: ExecRequest,
    stdin_set: bool,
    timeout: Option<Duration>,
    cancel: Option<CancellationToken>,
    max_buffered_output: usize,
}

impl ExecBuilder {
    pub(crate) fn new(agent: Agent, argv: Vec<String>) -> Self {
        ExecBuilder {
            agent,
            request: ExecRequest::new(argv),
            stdin_set: false,
            timeout: None,
            cancel: None,
            max_buffered_output: DEFAULT_MAX_BUFFERED_OUTPUT,
        }
    }

    /// Sets one environment variable (merged over the image's environment).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.request.env.insert(key.into(), value.into());
        self
    }

    /// Sets several environment variables.
    pub fn envs<I, K, V>(mut self, vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let vars: BTreeMap<String, String> = vars
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        self.request.env.extend(vars);
        self
    }

    /// Working directory in the guest (default: the image's `WorkingDir`).
    pub fn cwd(mut self, dir: impl Into<String>) -> Self {
        self.request.cwd = Some(dir.into());
        self
    }

    /// User to run as: a name from the guest's `/etc/passwd`, or `uid[:gid]`.
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.request.user = Some(user.into());
        self
    }

    /// Takes an image's `Env` (`NAME=value`; entries without `=` are ignored, as Docker
    /// does), `WorkingDir` and `User` as this exec's defaults, the way [`Vm::exec`] does for
    /// the VM's own image. Defaults only: a variable, directory or user set on this builder,
    /// before or after this call, wins.
    ///
    /// [`Vm::exec`]: crate::Vm::exec
    pub fn image_defaults(mut self, image: &crate::image::ImageConfig) -> Self {
        // Collected first so that, as in Docker, the image's last entry for a name wins.
        let image_env: BTreeMap<&str, &str> = image
            .env
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .collect();
        for (key, value) in image_env {
            self.request
                .env
                .entry(key.to_owned())
                .or_insert_with(|| value.to_owned());
        }
        let set_if_empty = |field: &mut Option<String>, value: Option<&str>| {
            if field.is_none() {
                *field = value.filter(|v| !v.is_empty()).map(str::to_owned);
            }
        };
        set_if_empty(&mut self.request.cwd, image.working_dir.as_deref());
        set_if_empty(&mut self.request.user, image.user.as_deref());
        self
    }

    /// Runs on a pseudo-terminal: stdout and stderr arrive merged on stdout.
    pub fn tty(mut self, tty: bool) -> Self {
        self.request.tty = tty;
        self
    }

    /// Initial terminal size (tty mode).
    pub fn winsize(mut self, cols: u16, rows: u16) -> Self {
        self.request.cols = Some(cols);
        self.request.rows = Some(rows);
        self
    }

    /// Kills the exec's process group if it has not exited `limit` after the spawn started.
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    /// Kills the exec's process group when `token` is cancelled; the exec then ends with
    /// [`Error::Cancelled`].
    pub fn cancel_on(mut self, token: CancellationToken) -> Self {
        self.cancel = Some(token);
        self
    }

    /// Writes a file in the guest (atomically) before the command starts.
    pub fn stage_file(mut self, file: StagedFile) -> Self {
        self.request.stage_files.push(file);
        self
    }

    /// Runs `argv` after the previous command if it exited 0 (`&&`); the exit status is the last
    /// one that ran.
    pub fn chain<I, S>(mut self, argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.request
            .chain
            .push(argv.into_iter().map(Into::into).collect());
        self
    }

    /// Where the child's stdin comes from: [`Stdio::piped`] (default for `spawn`) or
    /// [`Stdio::null`] (default for `output`).
    pub fn stdin(mut self, stdio: Stdio) -> Self {
        self.request.stdin = stdio.0;
        self.stdin_set = true;
        self
    }

    /// Where the child's stdout goes (default: piped).
    pub fn stdout(mut self, stdio: Stdio) -> Self {
        self.request.stdout = stdio.0;
        self
    }

    /// Where the child's stderr goes (default: piped).
    pub fn stderr(mut self, stdio: Stdio) -> Self {
        self.request.stderr = stdio.0;
        self
    }

    /// Bounds the output read ahead while the exit is awaited and nobody reads it
    /// (default 64 MiB); see the crate docs.
    pub fn max_buffered_output(mut self, bytes: usize) -> Self {
        self.max_buffered_output = bytes;
        self
    }

    fn validate(&self) -> Result<(), Error> {
        if self.request.argv.is_empty() {
            return Err(Error::InvalidRequest("argv is empty".into()));
        }
        if let Some(i) = self.request.chain.iter().position(|argv| argv.is_empty()) {
            return Err(Error::InvalidRequest(format!(
                "chain[{i}] has an empty argv"
            )));
        }
        if let Some(file) = self
            .request
            .stage_files
            .iter()
            .find(|f| !f.path().starts_with('/'))
        {
            return Err(Error::InvalidRequest(format!(
                "staged file path {:?} is not absolute",
                file.path()
            )));
        }
        Ok(())
    }

    /// Starts the exec and returns once the guest process is running.
    ///
    /// Fails with [`Error::ProgramNotFound`] when the program does not exist in the guest, and
    /// with the other [`Error`] variants when the agent cannot be reached or refuses the request.
    pub async fn spawn(self) -> Result<ExecChild, Error> {
        self.validate()?;
        let started_at = Instant::now();
        let deadline = self.timeout.map(|t| tokio::time::Instant::now() + t);
        if self.cancel.as_ref().is_some_and(|t| t.is_cancelled()) {
            return Err(Error::Cancelled);
        }
        let stream = self.agent.connect().await?;

        let (started_tx, started_rx) = oneshot::channel();
        let state = Arc::new(ExecState::new(
            started_tx,
            self.max_buffered_output,
            self.timeout,
        ));
        let (command_tx, commands) = mpsc::unbounded_channel();
        let (drop_guard, dropped) = oneshot::channel();
        let (stdin, stdin_rx) = match self.request.stdin {
            StdioMode::Piped => {
                let (tx, rx) = mpsc::channel(STDIN_QUEUE);
                (Some(ExecStdin::new(PollSender::new(tx))), Some(rx))
            }
            StdioMode::Null => (None, None),
        };
        let driver = Driver {
            stream,
            request: self.request,
            state: state.clone(),
            commands,
            command_tx: command_tx.clone(),
            stdin: stdin_rx,
            dropped,
            cancel: self.cancel,
            deadline,
        };
        tokio::spawn(driver.run());

        // If this future is dropped here, `drop_guard` goes with it and the driver kills the exec.
        let pid = match started_rx.await {
            Ok(result) => result?,
            Err(_) => {
                return Err(Error::ConnectionLost {
                    during: "starting the exec",
                    reason: "the exec's driver task ended unexpectedly".into(),
                })
            }
        };
        Ok(ExecChild::new(
            pid,
            started_at,
            stdin,
            ExecStdout::new(state.clone(), Stream::Stdout),
            ExecStderr::new(state.clone(), Stream::Stderr),
            state,
            ExecSignaler::new(command_tx),
            drop_guard,
        ))
    }

    /// Runs the exec to completion, collecting its output.
    ///
    /// Stdin is `/dev/null` unless set with [`stdin`](Self::stdin). A timeout is not an error
    /// here: the outcome says `timed_out` and carries the killed process's status.
    pub async fn output(mut self) -> Result<ExecOutcome, Error> {
        if !self.stdin_set {
            self.request.stdin = StdioMode::Null;
        }
        let mut child = self.spawn().await?;
        let mut stdout = child.take_stdout();
        let mut stderr = child.take_stderr();
        let (out, err, finished) = tokio::join!(
            collect(stdout.as_mut()),
            collect(stderr.as_mut()),
            child.wait_finished()
        );
        let Finished { result, timed_out } = finished?;
        let status = match (result, timed_out) {
            (Ok(info), _) => info,
            (Err(Error::TimedOut(_)), true) => supermachine_codec::ExitInfo {
                code: 128 + 9,
                peak_rss_kib: None,
            },
            (Err(e), _) => return Err(e),
        };
        Ok(ExecOutcome {
            status: ExitStatus::from_code(status.code),
            stdout: out.map_err(|e| io_to_error(e, "reading stdout"))?,
            stderr: err.map_err(|e| io_to_error(e, "reading stderr"))?,
            duration: child.started_at().elapsed(),
            peak_rss_kib: status.peak_rss_kib,
            timed_out,
        })
    }
}

async fn collect<R: tokio::io::AsyncRead + Unpin>(
    reader: Option<&mut R>,
) -> std::io::Result<Bytes> {
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

fn io_to_error(error: std::io::Error, during: &'static str) -> Error {
    Error::from_io(during, error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> crate::image::ImageConfig {
        crate::image::ImageConfig {
            env: vec![
                "PATH=/bin".into(),
                "A=image".into(),
                "A=image-last".into(),
                "NOEQUALS".into(),
            ],
            working_dir: Some("/work".into()),
            user: Some("app".into()),
            ..Default::default()
        }
    }

    #[test]
    fn image_defaults_fill_only_what_is_unset_in_any_order() {
        let agent = Agent::unix("/nonexistent");
        let before = agent
            .exec(["true"])
            .env("A", "mine")
            .cwd("/mine")
            .image_defaults(&image());
        let after = agent
            .exec(["true"])
            .image_defaults(&image())
            .env("A", "mine")
            .cwd("/mine");
        for b in [before, after] {
            assert_eq!(b.request.env.get("A").map(String::as_str), Some("mine"));
            assert_eq!(b.request.env.get("PATH").map(String::as_str), Some("/bin"));
            assert!(!b.request.env.contains_key("NOEQUALS"));
            assert_eq!(b.request.cwd.as_deref(), Some("/mine"));
            assert_eq!(b.request.user.as_deref(), Some("app"));
        }
        let plain = agent.exec(["true"]).image_defaults(&image());
        assert_eq!(
            plain.request.env.get("A").map(String::as_str),
            Some("image-last")
        );
        assert_eq!(plain.request.cwd.as_deref(), Some("/work"));
    }
}
