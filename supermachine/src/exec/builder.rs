use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use supermachine_codec::{ExecRequest, StagedFile, StdioMode};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::{CancellationToken, PollSender};

use super::child::{DropGuard, ExecChild, ExecSignaler, ExecStderr, ExecStdin, ExecStdout};
use super::driver::Driver;
use super::state::{ExecState, Stream, DEFAULT_MAX_BUFFERED_OUTPUT};
use super::status::ExecOutcome;
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

/// Describes an exec; made by [`Agent::exec`] or [`Vm::exec`](crate::Vm::exec), run by
/// [`spawn`](Self::spawn) or [`output`](Self::output). Shaped like [`tokio::process::Command`](https://docs.rs/tokio/latest/tokio/process/struct.Command.html):
/// the setters take and return `&mut Self`, so calls can be chained or made conditionally.
///
/// ```no_run
/// # async fn demo(vm: &supermachine::Vm, verbose: bool) -> Result<(), supermachine::Error> {
/// let mut cmd = vm.exec(["ls"]);
/// cmd.current_dir("/etc");
/// if verbose {
///     cmd.arg("-l");
/// }
/// let out = cmd.output().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use = "an ExecBuilder does nothing until spawned"]
pub struct ExecBuilder {
    agent: Agent,
    request: ExecRequest,
    stdin_set: bool,
    timeout: Option<Duration>,
    cancel: Option<CancellationToken>,
    max_buffered_output: usize,
    kill_on_drop: bool,
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
            kill_on_drop: true,
        }
    }

    /// Appends one argument to the command line.
    pub fn arg(&mut self, arg: impl Into<String>) -> &mut Self {
        self.request.argv.push(arg.into());
        self
    }

    /// Appends several arguments to the command line.
    pub fn args<I, S>(&mut self, args: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.request.argv.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets one environment variable, over the image's environment and the guest's defaults.
    pub fn env(&mut self, key: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.request.env.insert(key.into(), value.into());
        self
    }

    /// Sets several environment variables.
    pub fn envs<I, K, V>(&mut self, vars: I) -> &mut Self
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

    /// Removes a variable: one set on this builder, one from the image's `Env`, and the
    /// agent's default of that name (`PATH`, `HOME`, a tty's `TERM`, or in host mode the
    /// agent's own environment). A later [`env`](Self::env) of the same name sets it again.
    pub fn env_remove(&mut self, key: impl Into<String>) -> &mut Self {
        let key = key.into();
        self.request.env.remove(&key);
        if !self.request.env_remove.contains(&key) {
            self.request.env_remove.push(key);
        }
        self
    }

    /// Clears the environment: the process gets only the variables set on this builder after
    /// this call — not the image's `Env` (not even through a later
    /// [`image_defaults`](Self::image_defaults)) and not the agent's defaults (`PATH`, `HOME`,
    /// a tty's `TERM`). Programs named without a `/` are then found in
    /// `/usr/local/bin:/usr/bin:/bin`, as `execvp` does without `PATH`.
    ///
    /// One exception: on PVM hosts the guest adds `GLIBC_TUNABLES` to steer glibc off the
    /// host's broken AVX, a platform workaround rather than part of the environment; name it
    /// in [`env_remove`](Self::env_remove) after this call to go without it.
    pub fn env_clear(&mut self) -> &mut Self {
        self.request.env.clear();
        self.request.env_remove.clear();
        self.request.env_clear = true;
        self
    }

    /// Working directory in the guest (default: the image's `WorkingDir`). A guest path, so a
    /// string rather than a host `Path`.
    pub fn current_dir(&mut self, dir: impl Into<String>) -> &mut Self {
        self.request.cwd = Some(dir.into());
        self
    }

    /// User to run as: a name from the guest's `/etc/passwd`, or `uid[:gid]`.
    pub fn user(&mut self, user: impl Into<String>) -> &mut Self {
        self.request.user = Some(user.into());
        self
    }

    /// Takes an image's `Env` (`NAME=value`; entries without `=` are ignored, as Docker
    /// does), `WorkingDir` and `User` as this exec's defaults, the way [`Vm::exec`] does for
    /// the VM's own image. Defaults only: a variable, directory or user set on this builder,
    /// before or after this call, wins; a variable removed with [`env_remove`](Self::env_remove)
    /// or after [`env_clear`](Self::env_clear) stays out.
    ///
    /// [`Vm::exec`]: crate::Vm::exec
    pub fn image_defaults(&mut self, image: &crate::image::ImageConfig) -> &mut Self {
        if !self.request.env_clear {
            // Collected first so that, as in Docker, the image's last entry for a name wins.
            let image_env: BTreeMap<&str, &str> = image
                .env
                .iter()
                .filter_map(|kv| kv.split_once('='))
                .collect();
            for (key, value) in image_env {
                if self.request.env_remove.iter().any(|removed| removed == key) {
                    continue;
                }
                self.request
                    .env
                    .entry(key.to_owned())
                    .or_insert_with(|| value.to_owned());
            }
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

    /// Runs on a pseudo-terminal: stdout and stderr arrive merged on stdout (the child's
    /// `stderr` handle is then `None`).
    pub fn tty(&mut self, tty: bool) -> &mut Self {
        self.request.tty = tty;
        self
    }

    /// Initial terminal size (tty mode).
    pub fn winsize(&mut self, cols: u16, rows: u16) -> &mut Self {
        self.request.cols = Some(cols);
        self.request.rows = Some(rows);
        self
    }

    /// Kills the exec's process group if it has not exited `limit` after the spawn started.
    ///
    /// A timeout is not an error: [`ExecChild::wait`] and [`output`](Self::output) both return
    /// the killed process's [`ExitStatus`](crate::ExitStatus) (normally `signal() == Some(9)`) with
    /// [`ExitStatus::timed_out`](crate::ExitStatus::timed_out) set (and [`ExecOutcome::timed_out`]). One shape for both, and
    /// the same as a kill from anywhere else, because the process did end and its output up to
    /// the kill is still worth having; callers that treat a timeout as a failure check
    /// `timed_out()`. If the agent does not confirm the kill within 2 s the connection is
    /// closed (the agent then ends the group: SIGHUP, then SIGKILL) and the status reports the
    /// SIGKILL that was sent.
    pub fn timeout(&mut self, limit: Duration) -> &mut Self {
        self.timeout = Some(limit);
        self
    }

    /// Kills the exec's process group when `token` is cancelled; the exec then ends with
    /// [`Error::Cancelled`].
    pub fn cancel_on(&mut self, token: CancellationToken) -> &mut Self {
        self.cancel = Some(token);
        self
    }

    /// Whether dropping the [`ExecChild`] kills the exec's process group. **Default `true`** —
    /// the one intended inversion of `tokio::process`, whose default is `false`: a guest
    /// process nobody holds a handle to can no longer be waited for, signalled or read, and
    /// on a VM that outlives the handle it would be a leak.
    ///
    /// With `false`, dropping the child detaches it: the process keeps running, its exec's
    /// driver task keeps the connection to the agent open and discards output nobody reads
    /// (handles taken from the child, such as `stdout`, keep working), and the connection ends
    /// at the process's exit, or when the agent goes away (the VM stops or is dropped, or a
    /// host-mode agent exits) or the tokio runtime shuts down — then the agent kills the group
    /// as it does for any exec whose host left. A [`timeout`](Self::timeout) or
    /// [`cancel_on`](Self::cancel_on) token still applies after the drop.
    ///
    /// Dropping the future returned by [`spawn`](Self::spawn) before it resolves always kills
    /// the exec: there was never a child to detach.
    pub fn kill_on_drop(&mut self, kill_on_drop: bool) -> &mut Self {
        self.kill_on_drop = kill_on_drop;
        self
    }

    /// Writes a file in the guest (atomically) before the command starts.
    pub fn stage_file(&mut self, file: StagedFile) -> &mut Self {
        self.request.stage_files.push(file);
        self
    }

    /// Runs `argv` after the previous command if it exited 0 (`&&`); the exit status is the last
    /// one that ran.
    pub fn chain<I, S>(&mut self, argv: I) -> &mut Self
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
    pub fn stdin(&mut self, stdio: Stdio) -> &mut Self {
        self.request.stdin = stdio.0;
        self.stdin_set = true;
        self
    }

    /// Where the child's stdout goes (default: piped).
    pub fn stdout(&mut self, stdio: Stdio) -> &mut Self {
        self.request.stdout = stdio.0;
        self
    }

    /// Where the child's stderr goes (default: piped).
    pub fn stderr(&mut self, stdio: Stdio) -> &mut Self {
        self.request.stderr = stdio.0;
        self
    }

    /// Bounds the output read ahead while the exit is awaited and nobody reads it
    /// (default 64 MiB); see the crate docs.
    pub fn max_buffered_output(&mut self, bytes: usize) -> &mut Self {
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

    /// Starts the exec; the future resolves once the guest process is running.
    ///
    /// The future owns a copy of the settings, so it does not borrow the builder:
    /// `let fut = vm.exec(["true"]).arg("x").spawn();` works, and the builder can be reused.
    ///
    /// Fails with [`Error::ProgramNotFound`] when the program does not exist in the guest, and
    /// with the other [`Error`] variants when the agent cannot be reached or refuses the request.
    pub fn spawn(&mut self) -> impl Future<Output = Result<ExecChild, Error>> + Send + 'static {
        let this = self.clone();
        this.spawn_owned()
    }

    async fn spawn_owned(self) -> Result<ExecChild, Error> {
        self.validate()?;
        let started_at = Instant::now();
        let deadline = self.timeout.map(|t| tokio::time::Instant::now() + t);
        if self.cancel.as_ref().is_some_and(|t| t.is_cancelled()) {
            return Err(Error::Cancelled);
        }
        let stream = self.agent.connect().await?;

        let (started_tx, started_rx) = oneshot::channel();
        let state = Arc::new(ExecState::new(started_tx, self.max_buffered_output));
        let (command_tx, commands) = mpsc::unbounded_channel();
        let (drop_tx, dropped) = oneshot::channel();
        // Kills on drop until the child exists (see `kill_on_drop`).
        let mut drop_guard = DropGuard::new(drop_tx);
        let (stdin, stdin_rx) = match self.request.stdin {
            StdioMode::Piped => {
                let (tx, rx) = mpsc::channel(STDIN_QUEUE);
                (Some(ExecStdin::new(PollSender::new(tx))), Some(rx))
            }
            StdioMode::Null => (None, None),
        };
        let stdout_piped = self.request.stdout == StdioMode::Piped;
        // In tty mode stderr is merged into stdout: no stderr frames will come.
        let stderr_piped = self.request.stderr == StdioMode::Piped && !self.request.tty;
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
        drop_guard.detach_on_drop(!self.kill_on_drop);
        let stdout = if stdout_piped {
            Some(ExecStdout::new(state.clone(), Stream::Stdout))
        } else {
            state.detach(Stream::Stdout);
            None
        };
        let stderr = if stderr_piped {
            Some(ExecStderr::new(state.clone(), Stream::Stderr))
        } else {
            state.detach(Stream::Stderr);
            None
        };
        Ok(ExecChild::new(
            pid,
            started_at,
            stdin,
            stdout,
            stderr,
            state,
            ExecSignaler::new(command_tx),
            drop_guard,
        ))
    }

    /// Runs the exec to completion, collecting its output (like `tokio`'s `Command::output`,
    /// plus what [`ExecOutcome`] adds). Like [`spawn`](Self::spawn), the future does not
    /// borrow the builder.
    ///
    /// Stdin is `/dev/null` unless set with [`stdin`](Self::stdin). A timeout is not an error
    /// (see [`timeout`](Self::timeout)): the outcome says `timed_out` and carries the killed
    /// process's status.
    pub fn output(&mut self) -> impl Future<Output = Result<ExecOutcome, Error>> + Send + 'static {
        let mut this = self.clone();
        if !this.stdin_set {
            this.request.stdin = StdioMode::Null;
        }
        async move { this.spawn_owned().await?.wait_with_output().await }
    }
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
        let mut before = agent.exec(["true"]);
        before
            .env("A", "mine")
            .current_dir("/mine")
            .image_defaults(&image());
        let mut after = agent.exec(["true"]);
        after
            .image_defaults(&image())
            .env("A", "mine")
            .current_dir("/mine");
        for b in [before, after] {
            assert_eq!(b.request.env.get("A").map(String::as_str), Some("mine"));
            assert_eq!(b.request.env.get("PATH").map(String::as_str), Some("/bin"));
            assert!(!b.request.env.contains_key("NOEQUALS"));
            assert_eq!(b.request.cwd.as_deref(), Some("/mine"));
            assert_eq!(b.request.user.as_deref(), Some("app"));
        }
        let mut plain = agent.exec(["true"]);
        plain.image_defaults(&image());
        assert_eq!(
            plain.request.env.get("A").map(String::as_str),
            Some("image-last")
        );
        assert_eq!(plain.request.cwd.as_deref(), Some("/work"));
    }

    #[test]
    fn env_remove_and_env_clear_keep_the_image_env_out() {
        let agent = Agent::unix("/nonexistent");
        let mut removed = agent.exec(["true"]);
        removed
            .env("A", "mine")
            .env_remove("A")
            .env_remove("A")
            .image_defaults(&image());
        assert!(!removed.request.env.contains_key("A"));
        assert_eq!(removed.request.env_remove, ["A"]);
        assert_eq!(
            removed.request.env.get("PATH").map(String::as_str),
            Some("/bin")
        );
        // Set again after the removal: set (the agent applies env after env_remove).
        removed.env("A", "again");
        assert_eq!(
            removed.request.env.get("A").map(String::as_str),
            Some("again")
        );

        let mut cleared = agent.exec(["true"]);
        cleared
            .image_defaults(&image())
            .env_remove("X")
            .env_clear()
            .env("B", "b")
            .image_defaults(&image());
        assert!(cleared.request.env_clear);
        assert!(cleared.request.env_remove.is_empty());
        assert_eq!(
            cleared.request.env,
            BTreeMap::from([("B".to_owned(), "b".to_owned())])
        );
        // Directory and user are still defaults after env_clear.
        assert_eq!(cleared.request.cwd.as_deref(), Some("/work"));
    }

    #[test]
    fn args_append_and_futures_do_not_borrow_the_builder() {
        let agent = Agent::unix("/nonexistent");
        let mut cmd = agent.exec(["echo"]);
        cmd.arg("a").args(["b", "c"]);
        assert_eq!(cmd.request.argv, ["echo", "a", "b", "c"]);
        // Both futures own their settings: the builder stays usable while they exist.
        let spawn = agent.exec(["true"]).arg("x").spawn();
        let output = cmd.output();
        cmd.arg("d");
        drop((spawn, output));
        assert_eq!(cmd.request.argv.len(), 5);
    }
}
