//! The exec API end to end against a real agent process in host mode (Unix socket).
//!
//! The cases shared with the VM transport live in `exec_cases/`; each runs here against its own
//! agent, so a test that kills the agent cannot disturb another. Leaked processes are looked for
//! in /proc by a marker unique to each test (an odd `sleep` duration).

mod exec_cases;

use std::time::{Duration, Instant};

use exec_cases::Target;
use supermachine::Error;
use supermachine_e2e::{kill_matching, HostAgent};
use tokio::io::AsyncReadExt;

fn agent() -> HostAgent {
    HostAgent::start().expect("start the agent in host mode")
}

fn host() -> Target {
    Target::Host(agent())
}

/// One `#[tokio::test]` per shared case, against a fresh host-mode agent.
macro_rules! host_cases {
    ($($name:ident $(($($arg:expr),*))?;)*) => {$(
        #[tokio::test]
        async fn $name() {
            exec_cases::$name(&host() $($(, $arg)*)?).await;
        }
    )*};
}

host_cases! {
    exit_codes_are_reported;
    stdout_and_stderr_stay_separate;
    stdin_streams_through_cat(20, 1024 * 1024);
    pty_sees_initial_size_and_resize;
    sigterm_reaches_a_trapping_shell;
    timeout_kills_the_whole_process_group;
    cancellation_token_kills_promptly;
    select_cancellation_kills_promptly;
    dropping_the_child_kills_the_guest_process;
    concurrent_execs(200);
    staged_files_and_chain;
    missing_program_is_a_typed_error_naming_it;
    empty_argv_is_rejected;
    control_actions(100_000);
    null_stdio_and_abort;
    connect_tcp_reaches_a_loopback_server_with_half_close;
}

#[tokio::test]
async fn killing_the_agent_fails_every_pending_exec_promptly() {
    let mut agent = agent();
    let client = agent.agent();
    let mut children = Vec::new();
    for _ in 0..5 {
        children.push(client.exec(["sleep", "30.51"]).spawn().await.unwrap());
    }
    let mut reader = children[0].stdout.take().unwrap();
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
    let mut stdout = child.stdout.take().unwrap();
    let mut out = Vec::new();
    let (read, status) = tokio::join!(stdout.read_to_end(&mut out), child.wait());
    read.unwrap();
    assert!(status.unwrap().success());
    assert_eq!(out.len(), 8 * 1024 * 1024);
}

/// The transport-benchmark `echo` hook is refused unless the guest was booted with test hooks
/// (host mode never is).
#[tokio::test]
async fn echo_hook_is_refused_without_test_hooks() {
    let host = agent();
    match host.agent().echo().await {
        Err(supermachine::Error::Control { action, message }) => {
            assert_eq!(action, "echo");
            assert!(message.contains("test hook"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}
