//! Shared fixture for the agent's protocol tests: a real agent process in host mode on a Unix
//! socket in a temp dir, spoken to with the raw codec.

#![allow(dead_code)] // Each test binary uses a different subset.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use supermachine_codec::{AgentError, ExecCodec, ExecRequest, ExitInfo, Frame};
use tokio::net::UnixStream;
use tokio_util::codec::Framed;

/// Generous bound for anything that should happen "at once".
pub const PROMPTLY: Duration = Duration::from_secs(10);

/// A connection speaking frames.
pub type Conn = Framed<UnixStream, ExecCodec>;

/// An agent process; killed on drop.
pub struct Agent {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    /// Starts the agent and waits for its `ready` line.
    pub fn start() -> Agent {
        let dir = tempfile::Builder::new()
            .prefix("sm-agent-test")
            .tempdir()
            .expect("temp dir");
        let socket = dir.path().join("agent.sock");
        let mut child = Command::new(env!("CARGO_BIN_EXE_supermachine-agent"))
            .arg("--unix")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the agent");
        let stdout = child.stdout.take().expect("agent stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the ready line");
        assert_eq!(line, "supermachine-agent ready\n");
        assert!(socket.exists(), "ready before the socket exists");
        Agent {
            child,
            socket,
            _dir: dir,
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits (up to `limit`) for the agent to exit; returns its exit code.
    pub fn terminate(&mut self, limit: Duration) -> Option<i32> {
        // SAFETY: kill() with a pid we own and a valid signal number touches no memory.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// A fresh connection.
    pub async fn connect(&self) -> Conn {
        let stream = UnixStream::connect(&self.socket)
            .await
            .expect("connect to the agent");
        Framed::new(stream, ExecCodec::new())
    }

    /// Opens a connection and sends `request`.
    pub async fn exec(&self, request: ExecRequest) -> Conn {
        let mut conn = self.connect().await;
        conn.send(Frame::Request(request))
            .await
            .expect("send request");
        conn
    }

    /// Runs `request` to the end with no stdin, collecting everything.
    pub async fn run(&self, request: ExecRequest) -> Outcome {
        let conn = self.exec(request).await;
        collect(conn).await
    }

    /// `sh -c script`, run to the end.
    pub async fn sh(&self, script: &str) -> Outcome {
        self.run(ExecRequest::new(["sh", "-c", script])).await
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Everything an exec sent.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Pid from STARTED.
    pub started: Option<u32>,
    /// Whether STARTED was the first frame.
    pub started_first: bool,
    /// Concatenated STDOUT.
    pub stdout: Vec<u8>,
    /// Concatenated STDERR.
    pub stderr: Vec<u8>,
    /// Number of STDOUT frames, and the largest payload.
    pub stdout_frames: usize,
    /// Largest STDOUT/STDERR payload.
    pub largest_frame: usize,
    /// The EXIT frame.
    pub exit: Option<ExitInfo>,
    /// The ERROR frame.
    pub error: Option<AgentError>,
}

impl Outcome {
    /// The exit code; panics with the whole outcome if there was none.
    pub fn code(&self) -> u32 {
        match self.exit {
            Some(exit) => exit.code,
            None => panic!("no EXIT: {self:?}"),
        }
    }

    /// The terminating signal the EXIT frame reported; panics if there was no EXIT.
    pub fn signal(&self) -> Option<u32> {
        match self.exit {
            Some(exit) => exit.signal,
            None => panic!("no EXIT: {self:?}"),
        }
    }

    /// Stdout as text.
    pub fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Reads frames until EXIT or ERROR, then checks the agent closes the connection.
pub async fn collect(mut conn: Conn) -> Outcome {
    let mut outcome = Outcome::default();
    let mut first = true;
    loop {
        let frame = tokio::time::timeout(PROMPTLY, conn.next())
            .await
            .unwrap_or_else(|_| panic!("no frame in time; so far {outcome:?}"))
            .unwrap_or_else(|| panic!("connection closed before EXIT/ERROR: {outcome:?}"))
            .expect("valid frame");
        match frame {
            Frame::Started { pid } => {
                assert!(outcome.started.is_none(), "two STARTED frames");
                outcome.started = Some(pid);
                outcome.started_first = first;
            }
            Frame::Stdout(bytes) => {
                outcome.stdout_frames += 1;
                outcome.largest_frame = outcome.largest_frame.max(bytes.len());
                outcome.stdout.extend_from_slice(&bytes);
            }
            Frame::Stderr(bytes) => {
                outcome.largest_frame = outcome.largest_frame.max(bytes.len());
                outcome.stderr.extend_from_slice(&bytes);
            }
            Frame::Exit(exit) => {
                outcome.exit = Some(exit);
                break;
            }
            Frame::Error(error) => {
                outcome.error = Some(error);
                break;
            }
            other => panic!("unexpected frame {other:?}"),
        }
        first = false;
    }
    // Exactly one EXIT or ERROR, then the agent closes.
    let after = tokio::time::timeout(PROMPTLY, conn.next())
        .await
        .expect("the agent closes the connection after the last frame");
    assert!(after.is_none(), "frame after EXIT/ERROR: {after:?}");
    outcome
}

/// Reads frames until the accumulated STDOUT contains `needle`; returns it all.
pub async fn read_stdout_until(conn: &mut Conn, seen: &mut Vec<u8>, needle: &str) {
    while !String::from_utf8_lossy(seen).contains(needle) {
        let frame = tokio::time::timeout(PROMPTLY, conn.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "waiting for {needle:?}; have {:?}",
                    String::from_utf8_lossy(seen)
                )
            })
            .expect("connection open")
            .expect("valid frame");
        match frame {
            Frame::Stdout(bytes) => seen.extend_from_slice(&bytes),
            Frame::Started { .. } => {}
            other => panic!("unexpected frame {other:?} while waiting for {needle:?}"),
        }
    }
}

/// A STDIN frame.
pub fn stdin(data: &str) -> Frame {
    Frame::Stdin(Bytes::copy_from_slice(data.as_bytes()))
}

/// The STDIN frame that closes the child's stdin.
pub fn stdin_eof() -> Frame {
    Frame::Stdin(Bytes::new())
}

/// Pids of live processes (not zombies) whose command line contains `marker`.
pub fn processes_matching(marker: &str) -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|cmd| {
                    String::from_utf8_lossy(&cmd)
                        .replace('\0', " ")
                        .contains(marker)
                })
                .unwrap_or(false)
        })
        .collect()
}

/// Polls until no process matches `marker` (returns true) or `limit` passes (false).
pub async fn gone_within(marker: &str, limit: Duration) -> bool {
    let start = Instant::now();
    loop {
        if processes_matching(marker).is_empty() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls until a process matches `marker`.
pub async fn running_within(marker: &str, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if !processes_matching(marker).is_empty() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Kills leftovers of a failed test so they do not outlive it.
pub fn kill_matching(marker: &str) {
    for pid in processes_matching(marker) {
        // SAFETY: kill() touches no memory; a wrong pid only fails.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}

/// Resident set size of `pid` in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Reads the rest of the exec, counting STDOUT bytes instead of keeping them.
pub async fn count_until_exit(conn: &mut Conn) -> (usize, ExitInfo) {
    let mut count = 0;
    loop {
        match tokio::time::timeout(PROMPTLY, conn.next())
            .await
            .expect("frame in time")
            .expect("connection open")
            .expect("valid frame")
        {
            Frame::Stdout(bytes) => count += bytes.len(),
            Frame::Stderr(_) | Frame::Started { .. } => {}
            Frame::Exit(exit) => return (count, exit),
            other => panic!("unexpected frame {other:?}"),
        }
    }
}
