//! The exec test cases, written once and run against every transport: the agent in host mode
//! over a Unix socket (`tests/exec.rs`) and a real microVM over vsock (`tests/exec_vm.rs`).
//!
//! A [`Target`] says how to reach the agent and how to look for leftover processes (host
//! `/proc`, or `ps` inside the guest), and scales what is slow in a VM on a nested host.

#![allow(dead_code)] // each test binary runs its own subset

use std::time::{Duration, Instant};

use supermachine::{Agent, Error, ExecOutcome, StagedFile, Stdio};
use supermachine_e2e::{processes_matching, HostAgent};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

/// Where the cases run.
pub enum Target {
    /// The agent in host mode, one per test.
    Host(HostAgent),
    /// A shared microVM.
    Vm(&'static supermachine::Vm),
}

impl Target {
    pub fn agent(&self) -> Agent {
        match self {
            Target::Host(host) => host.agent(),
            Target::Vm(vm) => vm.agent().clone(),
        }
    }

    fn is_vm(&self) -> bool {
        matches!(self, Target::Vm(_))
    }

    /// How long leftover processes get to disappear, and running ones to show up. Guest
    /// process work is slow on nested (PVM) hosts.
    fn settle(&self) -> Duration {
        if self.is_vm() {
            Duration::from_secs(60)
        } else {
            Duration::from_secs(2)
        }
    }

    /// How quickly a cancelled exec must return on the host (host-side work only).
    fn prompt(&self) -> Duration {
        if self.is_vm() {
            Duration::from_millis(500)
        } else {
            Duration::from_millis(100)
        }
    }

    /// A scratch directory path in the agent's filesystem; the `u32` keeps cases apart.
    fn scratch(&self, case: u32) -> (Option<tempfile::TempDir>, String) {
        match self {
            Target::Host(_) => {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().display().to_string();
                (Some(dir), path)
            }
            Target::Vm(_) => (None, format!("/tmp/case-{case}")),
        }
    }

    /// Command lines of the agent's processes that contain `marker`.
    async fn running(&self, marker: &str) -> Vec<String> {
        match self {
            Target::Host(_) => processes_matching(marker)
                .into_iter()
                .map(|pid| pid.to_string())
                .collect(),
            Target::Vm(vm) => {
                let out = vm
                    .exec(["ps", "-o", "args"])
                    .output()
                    .await
                    .expect("ps in the guest");
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|line| line.contains(marker))
                    .map(str::to_owned)
                    .collect()
            }
        }
    }

    /// Waits until nothing matching `marker` runs; returns what is left at the deadline.
    async fn wait_until_gone(&self, marker: &str) -> Vec<String> {
        let deadline = Instant::now() + self.settle();
        loop {
            let left = self.running(marker).await;
            if left.is_empty() || Instant::now() > deadline {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until something matching `marker` runs.
    async fn wait_until_running(&self, marker: &str) -> bool {
        let deadline = Instant::now() + self.settle();
        loop {
            if !self.running(marker).await.is_empty() {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// File mode bits (`stat -c %a`) as the agent's side sees them.
    async fn mode_of(&self, path: &str) -> String {
        let out = sh(self, &format!("stat -c %a '{path}'")).await;
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

async fn sh(target: &Target, script: &str) -> ExecOutcome {
    target
        .agent()
        .exec(["sh", "-c", script])
        .output()
        .await
        .expect("exec runs")
}

pub async fn exit_codes_are_reported(t: &Target) {
    assert_eq!(sh(t, "true").await.status.code(), Some(0));
    let seven = sh(t, "exit 7").await.status;
    assert_eq!((seven.code(), seven.signal()), (Some(7), None));
    assert!(!seven.success());
    assert_eq!(seven.to_string(), "exit status: 7");
    let killed = sh(t, "kill -9 $$").await.status;
    assert_eq!((killed.code(), killed.signal()), (None, Some(9)));
    assert_eq!(killed.to_string(), "signal: 9 (SIGKILL)");
    // The agent says which it was: an exit with a 128+N code is not a signal.
    let lookalike = sh(t, "exit 137").await.status;
    assert_eq!((lookalike.code(), lookalike.signal()), (Some(137), None));
}

pub async fn stdout_and_stderr_stay_separate(t: &Target) {
    let out = sh(t, "echo out; echo err >&2; echo out2").await;
    assert_eq!(&out.stdout[..], b"out\nout2\n");
    assert_eq!(&out.stderr[..], b"err\n");
    assert!(out.status.success());
    assert!(out.peak_rss_kib.is_some_and(|kib| kib > 0), "{out:?}");
}

/// Line-by-line echo through `cat` (each line must come back before the next is sent, which
/// proves streaming), then `blob` bytes in bulk with EOF.
pub async fn stdin_streams_through_cat(t: &Target, lines: usize, blob: usize) {
    let mut child = t.agent().exec(["cat"]).spawn().await.unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    for i in 0..lines {
        stdin
            .write_all(format!("line {i}\n").as_bytes())
            .await
            .unwrap();
        let mut line = String::new();
        stdout.read_line(&mut line).await.unwrap();
        assert_eq!(line, format!("line {i}\n"));
    }
    let data: Vec<u8> = (0..blob).map(|i| (i % 251) as u8).collect();
    let writer = {
        let data = data.clone();
        tokio::spawn(async move {
            stdin.write_all(&data).await.unwrap();
            stdin.shutdown().await.unwrap(); // EOF, connection stays open
        })
    };
    let mut echoed = Vec::new();
    stdout.read_to_end(&mut echoed).await.unwrap();
    writer.await.unwrap();
    assert_eq!(echoed.len(), data.len());
    assert!(echoed == data);
    assert!(child.wait().await.unwrap().success());
}

pub async fn pty_sees_initial_size_and_resize(t: &Target) {
    let mut child = t
        .agent()
        .exec(["sh", "-c", "stty size; read x; stty size"])
        .tty(true)
        .winsize(100, 40)
        .spawn()
        .await
        .unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 256];
    while !seen.contains("40 100") {
        let n = child.read(&mut buf).await.unwrap();
        assert!(n > 0, "pty closed early: {seen:?}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    child.resize(120, 50).unwrap();
    child.write_all(b"\n").await.unwrap();
    while !seen.contains("50 120") {
        let n = child.read(&mut buf).await.unwrap();
        assert!(n > 0, "pty closed before the resized size: {seen:?}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(child.wait().await.unwrap().success());
}

pub async fn sigterm_reaches_a_trapping_shell(t: &Target) {
    let mut child = t
        .agent()
        .exec([
            "sh",
            "-c",
            "trap 'echo got-term; exit 3' TERM; echo ready; sleep 100.17 & wait",
        ])
        .spawn()
        .await
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).await.unwrap();
    assert_eq!(line, "ready\n");
    child.signal(15).unwrap();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).await.unwrap();
    assert_eq!(rest, "got-term\n");
    assert_eq!(child.wait().await.unwrap().code(), Some(3));
    assert_eq!(t.wait_until_gone("100.17").await, Vec::<String>::new());
}

pub async fn timeout_kills_the_whole_process_group(t: &Target) {
    // The timeout counts from the request; guest process creation is slow in a VM.
    let limit = if t.is_vm() {
        Duration::from_secs(5)
    } else {
        Duration::from_millis(500)
    };
    let out = t
        .agent()
        .exec(["sh", "-c", "sleep 100.21 & sleep 100.21"])
        .timeout(limit)
        .output()
        .await
        .unwrap();
    assert!(out.timed_out && out.status.timed_out(), "{out:?}");
    assert_eq!(out.status.signal(), Some(9));
    assert_eq!(t.wait_until_gone("100.21").await, Vec::<String>::new());

    // wait() on a spawned child has the same shape: the killed process's status, not an error.
    let mut child = t
        .agent()
        .exec(["sleep", "100.22"])
        .timeout(limit / 2)
        .spawn()
        .await
        .unwrap();
    let status = child.wait().await.unwrap();
    assert!(status.timed_out(), "{status}");
    assert_eq!((status.code(), status.signal()), (None, Some(9)));
    assert_eq!(t.wait_until_gone("100.22").await, Vec::<String>::new());
}

pub async fn cancellation_token_kills_promptly(t: &Target) {
    let token = CancellationToken::new();
    let exec = t
        .agent()
        .exec(["sh", "-c", "sleep 100.31 & sleep 100.31"])
        .cancel_on(token.clone())
        .output();
    let task = tokio::spawn(async move {
        let result = exec.await;
        (result, Instant::now())
    });
    assert!(t.wait_until_running("100.31").await);
    let cancelled_at = Instant::now();
    token.cancel();
    let (result, returned_at) = task.await.unwrap();
    assert!(matches!(result, Err(Error::Cancelled)), "{result:?}");
    let latency = returned_at - cancelled_at;
    assert!(latency < t.prompt(), "took {latency:?}");
    assert_eq!(t.wait_until_gone("100.31").await, Vec::<String>::new());
}

pub async fn select_cancellation_kills_promptly(t: &Target) {
    let client = t.agent();
    // Boxed (not `tokio::pin!`) so that dropping it below really drops the future.
    let mut exec = Box::pin(
        client
            .exec(["sh", "-c", "sleep 100.32 & sleep 100.32"])
            .output(),
    );
    let running = t.wait_until_running("100.32");
    tokio::select! {
        out = &mut exec => panic!("exec finished early: {out:?}"),
        ok = running => assert!(ok),
    }
    let cancelled_at = Instant::now();
    tokio::select! {
        out = &mut exec => panic!("exec finished: {out:?}"),
        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
    }
    // Leaving select! and dropping the future is the cancellation.
    drop(exec);
    assert!(cancelled_at.elapsed() < t.prompt() + Duration::from_millis(50));
    assert_eq!(t.wait_until_gone("100.32").await, Vec::<String>::new());
}

pub async fn dropping_the_child_kills_the_guest_process(t: &Target) {
    let child = t.agent().exec(["sleep", "100.41"]).spawn().await.unwrap();
    assert!(t.wait_until_running("100.41").await);
    drop(child);
    assert_eq!(t.wait_until_gone("100.41").await, Vec::<String>::new());
}

pub async fn concurrent_execs(t: &Target, n: usize) {
    let client = t.agent();
    let runs = (0..n).map(|i| {
        let client = client.clone();
        async move {
            let out = client
                .exec(["sh", "-c", &format!("echo {i}; echo e{i} >&2")])
                .output()
                .await
                .unwrap();
            (i, out)
        }
    });
    let results = futures::future::join_all(runs).await;
    assert_eq!(results.len(), n);
    for (i, out) in results {
        assert!(out.status.success(), "{out:?}");
        assert_eq!(out.stdout, format!("{i}\n").as_bytes());
        assert_eq!(out.stderr, format!("e{i}\n").as_bytes());
    }
}

pub async fn staged_files_and_chain(t: &Target) {
    let (_dir, dir) = t.scratch(1);
    let script = format!("{dir}/sub/run.sh");
    let data = format!("{dir}/data.bin");
    let out = t
        .agent()
        .exec([script.as_str()])
        .stage_file(StagedFile::new(&script, "#!/bin/sh\necho script ran\n").with_mode(0o755))
        .stage_file(StagedFile::new(&data, vec![0u8, 1, 2, 255]))
        .chain(["cat", data.as_str()])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(&out.stdout[..], b"script ran\n\x00\x01\x02\xff");
    assert_eq!(t.mode_of(&script).await, "755");

    // A failing link stops the chain and its code is the exec's.
    let out = t
        .agent()
        .exec(["sh", "-c", "echo first; exit 3"])
        .chain(["echo", "never"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(&out.stdout[..], b"first\n");
}

pub async fn missing_program_is_a_typed_error_naming_it(t: &Target) {
    let result = t.agent().exec(["no-such-program-xyz"]).spawn().await;
    match result {
        Err(Error::ProgramNotFound { program }) => assert!(program.contains("no-such-program-xyz")),
        other => panic!("expected ProgramNotFound, got {other:?}"),
    }
    // In a chain link, too.
    let result = t
        .agent()
        .exec(["true"])
        .chain(["no-such-link-xyz"])
        .output()
        .await;
    match result {
        Err(Error::ProgramNotFound { program }) => assert!(program.contains("no-such-link-xyz")),
        other => panic!("expected ProgramNotFound, got {other:?}"),
    }
}

pub async fn empty_argv_is_rejected(t: &Target) {
    let result = t.agent().exec(Vec::<String>::new()).output().await;
    assert!(
        matches!(result, Err(Error::InvalidRequest(_))),
        "{result:?}"
    );
    let result = t
        .agent()
        .exec(["true"])
        .chain(Vec::<String>::new())
        .output()
        .await;
    assert!(
        matches!(result, Err(Error::InvalidRequest(_))),
        "{result:?}"
    );
}

pub async fn control_actions(t: &Target, size: usize) {
    let client = t.agent();
    let info = client.ping().await.unwrap();
    assert!(!info.version.is_empty());
    assert!(!info.boot_id.is_empty());

    let (_dir, dir) = t.scratch(2);
    let path = format!("{dir}/nested/file.bin");
    let contents: Vec<u8> = (0..size).map(|i| (i % 256) as u8).collect();
    client
        .write_file(&path, contents.clone(), Some(0o600))
        .await
        .unwrap();
    assert_eq!(client.read_file(&path).await.unwrap(), contents);
    assert_eq!(t.mode_of(&path).await, "600");
    let missing = client.read_file("/no/such/file").await;
    assert!(matches!(missing, Err(Error::Control { .. })), "{missing:?}");
}

pub async fn null_stdio_and_abort(t: &Target) {
    let out = t
        .agent()
        .exec(["sh", "-c", "echo hidden; cat"])
        .stdout(Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "stdin is /dev/null for output(): cat ends"
    );
    assert!(out.stdout.is_empty());

    let mut child = t.agent().exec(["sleep", "100.61"]).spawn().await.unwrap();
    let signaler = child.signaler();
    child.abort();
    assert!(matches!(child.wait().await, Err(Error::Aborted)));
    assert_eq!(t.wait_until_gone("100.61").await, Vec::<String>::new());
    // Signals after the end are refused rather than lost silently.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(matches!(signaler.kill(), Err(Error::NotRunning)));
}

/// `connect_tcp` reaches a TCP server on the agent side's loopback (the guest's, in a VM)
/// over the agent transport, both directions, with TCP's half-close: the server reads to EOF
/// and still answers. A port nothing listens on is a typed, refused error.
pub async fn connect_tcp_reaches_a_loopback_server_with_half_close(t: &Target) {
    let agent = t.agent();
    // Host mode shares the host's ports with parallel test runs; keep them apart.
    let port = 20_000 + (std::process::id() % 20_000) as u16;
    let script = r#"n=$(wc -c); echo "got $n bytes""#;
    let mut server = supermachine_e2e::start_nc_server(&agent, port, script, t.settle()).await;
    let mut stream = agent
        .connect_tcp(port)
        .await
        .unwrap_or_else(|e| panic!("connect_tcp {port}: {e}"));
    let payload = vec![b'x'; 3000];
    stream.write_all(&payload).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.unwrap();
    assert_eq!(reply.trim(), "got 3000 bytes");
    assert!(server.wait().await.unwrap().success());

    match agent.connect_tcp(port).await {
        Err(Error::Control { action, message }) => {
            assert_eq!(action, "connect_tcp");
            assert!(message.contains("refused"), "{message}");
        }
        other => panic!("connect_tcp to a closed port: {other:?}"),
    }
}
