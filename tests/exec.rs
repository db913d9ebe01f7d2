//! The exec API end to end against a real agent process in host mode (Unix socket).
//!
//! Every test starts its own agent, so a test that kills the agent cannot disturb another. Leaked
//! processes are looked for in /proc by a marker unique to each test (an odd `sleep` duration).

use std::time::{Duration, Instant};

use supermachine::{Error, ExecOutcome, StagedFile, Stdio};
use supermachine_e2e::{kill_matching, wait_until_gone, wait_until_running, HostAgent};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

fn agent() -> HostAgent {
    HostAgent::start().expect("start the agent in host mode")
}

async fn sh(agent: &HostAgent, script: &str) -> ExecOutcome {
    agent
        .agent()
        .exec(["sh", "-c", script])
        .output()
        .await
        .expect("exec runs")
}

const GONE: Duration = Duration::from_secs(2);

#[tokio::test]
async fn exit_codes_are_reported() {
    let agent = agent();
    assert_eq!(sh(&agent, "true").await.status.code(), 0);
    let seven = sh(&agent, "exit 7").await.status;
    assert_eq!(seven.code(), 7);
    assert!(!seven.success());
    let killed = sh(&agent, "kill -9 $$").await.status;
    assert_eq!(killed.code(), 128 + 9);
    assert_eq!(killed.signal(), Some(9));
}

#[tokio::test]
async fn stdout_and_stderr_stay_separate() {
    let agent = agent();
    let out = sh(&agent, "echo out; echo err >&2; echo out2").await;
    assert_eq!(&out.stdout[..], b"out\nout2\n");
    assert_eq!(&out.stderr[..], b"err\n");
    assert!(out.status.success());
    assert!(out.peak_rss_kib.is_some_and(|kib| kib > 0), "{out:?}");
}

#[tokio::test]
async fn stdin_streams_through_cat() {
    let agent = agent();
    let mut child = agent.agent().exec(["cat"]).spawn().await.unwrap();
    let mut stdin = child.take_stdin().unwrap();
    let mut stdout = BufReader::new(child.take_stdout().unwrap());
    // Line by line: each line must come back before the next is sent, so this proves streaming
    // rather than buffering until EOF.
    for i in 0..20 {
        stdin
            .write_all(format!("line {i}\n").as_bytes())
            .await
            .unwrap();
        let mut line = String::new();
        stdout.read_line(&mut line).await.unwrap();
        assert_eq!(line, format!("line {i}\n"));
    }
    // 1 MiB more, to cross several frames and the stdin queue.
    let blob: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    let writer = {
        let blob = blob.clone();
        tokio::spawn(async move {
            stdin.write_all(&blob).await.unwrap();
            stdin.shutdown().await.unwrap(); // EOF, connection stays open
        })
    };
    let mut echoed = Vec::new();
    stdout.read_to_end(&mut echoed).await.unwrap();
    writer.await.unwrap();
    assert_eq!(echoed.len(), blob.len());
    assert!(echoed == blob);
    assert!(child.wait().await.unwrap().success());
}

#[tokio::test]
async fn pty_sees_initial_size_and_resize() {
    let agent = agent();
    let mut child = agent
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

#[tokio::test]
async fn sigterm_reaches_a_trapping_shell() {
    let agent = agent();
    let mut child = agent
        .agent()
        .exec([
            "sh",
            "-c",
            "trap 'echo got-term; exit 3' TERM; echo ready; sleep 100.17 & wait",
        ])
        .spawn()
        .await
        .unwrap();
    let mut stdout = BufReader::new(child.take_stdout().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).await.unwrap();
    assert_eq!(line, "ready\n");
    child.signal(15).unwrap();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).await.unwrap();
    assert_eq!(rest, "got-term\n");
    assert_eq!(child.wait().await.unwrap().code(), 3);
    assert_eq!(wait_until_gone("100.17", GONE).await, Vec::<u32>::new());
}

#[tokio::test]
async fn timeout_kills_the_whole_process_group() {
    let agent = agent();
    let started = Instant::now();
    let out = agent
        .agent()
        .exec(["sh", "-c", "sleep 100.21 & sleep 100.21"])
        .timeout(Duration::from_millis(500))
        .output()
        .await
        .unwrap();
    assert!(out.timed_out);
    assert_eq!(out.status.code(), 128 + 9);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(wait_until_gone("100.21", GONE).await, Vec::<u32>::new());

    // wait() on a spawned child reports the timeout as an error.
    let mut child = agent
        .agent()
        .exec(["sleep", "100.22"])
        .timeout(Duration::from_millis(200))
        .spawn()
        .await
        .unwrap();
    assert!(matches!(child.wait().await, Err(Error::TimedOut(_))));
    assert_eq!(wait_until_gone("100.22", GONE).await, Vec::<u32>::new());
}

#[tokio::test]
async fn cancellation_token_kills_promptly() {
    let agent = agent();
    let token = CancellationToken::new();
    let exec = agent
        .agent()
        .exec(["sh", "-c", "sleep 100.31 & sleep 100.31"])
        .cancel_on(token.clone())
        .output();
    let task = tokio::spawn(async move {
        let result = exec.await;
        (result, Instant::now())
    });
    assert!(wait_until_running("100.31", GONE).await);
    let cancelled_at = Instant::now();
    token.cancel();
    let (result, returned_at) = task.await.unwrap();
    assert!(matches!(result, Err(Error::Cancelled)), "{result:?}");
    let latency = returned_at - cancelled_at;
    assert!(latency < Duration::from_millis(100), "took {latency:?}");
    assert_eq!(wait_until_gone("100.31", GONE).await, Vec::<u32>::new());
}

#[tokio::test]
async fn select_cancellation_kills_promptly() {
    let agent = agent();
    let client = agent.agent();
    // Boxed (not `tokio::pin!`) so that dropping it below really drops the future.
    let mut exec = Box::pin(
        client
            .exec(["sh", "-c", "sleep 100.32 & sleep 100.32"])
            .output(),
    );
    let running = wait_until_running("100.32", GONE);
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
    assert!(cancelled_at.elapsed() < Duration::from_millis(100) + Duration::from_millis(50));
    assert_eq!(wait_until_gone("100.32", GONE).await, Vec::<u32>::new());
}

#[tokio::test]
async fn dropping_the_child_kills_the_guest_process() {
    let agent = agent();
    let child = agent
        .agent()
        .exec(["sleep", "100.41"])
        .spawn()
        .await
        .unwrap();
    assert!(wait_until_running("100.41", GONE).await);
    drop(child);
    assert_eq!(wait_until_gone("100.41", GONE).await, Vec::<u32>::new());
}

#[tokio::test]
async fn killing_the_agent_fails_every_pending_exec_promptly() {
    let mut agent = agent();
    let client = agent.agent();
    let mut children = Vec::new();
    for _ in 0..5 {
        children.push(client.exec(["sleep", "30.51"]).spawn().await.unwrap());
    }
    let mut reader = children[0].take_stdout().unwrap();
    let read = tokio::spawn(async move {
        let mut sink = Vec::new();
        reader.read_to_end(&mut sink).await
    });
    agent.kill();
    let started = Instant::now();
    for mut child in children {
        let result = tokio::time::timeout(Duration::from_secs(2), child.wait())
            .await
            .expect("a pending exec must not hang when the agent dies");
        assert!(
            matches!(result, Err(Error::ConnectionLost { .. })),
            "{result:?}"
        );
    }
    let read = tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .expect("a pending read must not hang")
        .unwrap();
    assert!(
        read.is_err(),
        "truncated output must read as an error: {read:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    // The agent died by SIGKILL, so its children were orphaned on purpose; clean them up.
    kill_matching("30.51");
}

#[tokio::test]
async fn two_hundred_concurrent_execs() {
    let agent = agent();
    let client = agent.agent();
    let runs = (0..200).map(|i| {
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
    assert_eq!(results.len(), 200);
    for (i, out) in results {
        assert!(out.status.success());
        assert_eq!(out.stdout, format!("{i}\n").as_bytes());
        assert_eq!(out.stderr, format!("e{i}\n").as_bytes());
    }
}

#[tokio::test]
async fn staged_files_and_chain() {
    let agent = agent();
    let dir = tempfile::tempdir().unwrap();
    let script = format!("{}/sub/run.sh", dir.path().display());
    let data = format!("{}/data.bin", dir.path().display());
    let out = agent
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

    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&script).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o755);

    // A failing link stops the chain and its code is the exec's.
    let out = agent
        .agent()
        .exec(["sh", "-c", "echo first; exit 3"])
        .chain(["echo", "never"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), 3);
    assert_eq!(&out.stdout[..], b"first\n");
}

#[tokio::test]
async fn missing_program_is_a_typed_error_naming_it() {
    let agent = agent();
    let result = agent.agent().exec(["no-such-program-xyz"]).spawn().await;
    match result {
        Err(Error::ProgramNotFound { program }) => assert!(program.contains("no-such-program-xyz")),
        other => panic!("expected ProgramNotFound, got {other:?}"),
    }
    // In a chain link, too.
    let result = agent
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

#[tokio::test]
async fn empty_argv_is_rejected() {
    let agent = agent();
    let result = agent.agent().exec(Vec::<String>::new()).output().await;
    assert!(
        matches!(result, Err(Error::InvalidRequest(_))),
        "{result:?}"
    );
    let result = agent
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

#[tokio::test]
async fn control_actions() {
    let agent = agent();
    let client = agent.agent();
    let info = client.ping().await.unwrap();
    assert!(!info.version.is_empty());
    assert!(!info.boot_id.is_empty());

    let dir = tempfile::tempdir().unwrap();
    let path = format!("{}/nested/file.bin", dir.path().display());
    let contents: Vec<u8> = (0..100_000).map(|i| (i % 256) as u8).collect();
    client
        .write_file(&path, contents.clone(), Some(0o600))
        .await
        .unwrap();
    assert_eq!(client.read_file(&path).await.unwrap(), contents);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let missing = client.read_file("/no/such/file").await;
    assert!(matches!(missing, Err(Error::Control { .. })), "{missing:?}");
}

#[tokio::test]
async fn awaiting_exit_without_reading_output_neither_deadlocks_nor_drops() {
    let agent = agent();
    // 4 MiB is far more than the pipe, socket and window buffers hold together.
    let mut child = agent
        .agent()
        .exec(["head", "-c", "4194304", "/dev/zero"])
        .spawn()
        .await
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("awaiting the exit must not deadlock on unread output")
        .unwrap();
    assert!(status.success());
    let mut out = Vec::new();
    child.read_to_end(&mut out).await.unwrap();
    assert_eq!(
        out.len(),
        4 * 1024 * 1024,
        "buffered output is still readable"
    );

    // Past the read-ahead limit the wait says so instead of hanging or dropping output...
    let mut child = agent
        .agent()
        .exec(["head", "-c", "8388608", "/dev/zero"])
        .max_buffered_output(1024 * 1024)
        .spawn()
        .await
        .unwrap();
    let result = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("must not hang");
    assert!(
        matches!(result, Err(Error::OutputLimitExceeded { .. })),
        "{result:?}"
    );
    // ...and the process is still there: reading while waiting completes it with every byte.
    let mut stdout = child.take_stdout().unwrap();
    let mut out = Vec::new();
    let (read, status) = tokio::join!(stdout.read_to_end(&mut out), child.wait());
    read.unwrap();
    assert!(status.unwrap().success());
    assert_eq!(out.len(), 8 * 1024 * 1024);
}

#[tokio::test]
async fn null_stdio_and_abort() {
    let agent = agent();
    let out = agent
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

    let mut child = agent
        .agent()
        .exec(["sleep", "100.61"])
        .spawn()
        .await
        .unwrap();
    let signaler = child.signaler();
    child.abort();
    assert!(matches!(child.wait().await, Err(Error::Aborted)));
    assert_eq!(wait_until_gone("100.61", GONE).await, Vec::<u32>::new());
    // Signals after the end are refused rather than lost silently.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(matches!(signaler.kill(), Err(Error::NotRunning)));
}
