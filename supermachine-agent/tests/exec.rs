//! Exec connections against a real agent process in host mode.
//!
//! Leaked processes are looked for in /proc by a marker unique to each test (an odd `sleep`
//! duration).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures::{SinkExt, StreamExt};
use supermachine_codec::{ErrorCode, ExecRequest, Frame, StagedFile, StdioMode, WindowSize};

const GONE: Duration = Duration::from_secs(2);

#[tokio::test]
async fn true_sends_started_then_exit_zero() {
    let agent = Agent::start();
    let out = agent.run(ExecRequest::new(["true"])).await;
    assert!(out.started_first, "{out:?}");
    assert!(out.started.is_some_and(|pid| pid > 1), "{out:?}");
    assert_eq!(out.code(), 0);
    assert!(out.stdout.is_empty() && out.stderr.is_empty());
    let rss = out.exit.and_then(|e| e.peak_rss_kib);
    assert!(rss.is_some_and(|kib| kib > 0), "{out:?}");
}

#[tokio::test]
async fn exit_codes_and_signals() {
    let agent = Agent::start();
    let seven = agent.sh("exit 7").await;
    assert_eq!((seven.code(), seven.signal()), (7, None));
    // EXIT says which it was: a kill, or a program that exits with a 128+N code itself.
    let killed = agent.sh("kill -9 $$").await;
    assert_eq!((killed.code(), killed.signal()), (128 + 9, Some(9)));
    let termed = agent.sh("kill -TERM $$").await;
    assert_eq!((termed.code(), termed.signal()), (128 + 15, Some(15)));
    let lookalike = agent.sh("exit 137").await;
    assert_eq!((lookalike.code(), lookalike.signal()), (137, None));
}

#[tokio::test]
async fn a_version_1_host_gets_version_1_exit_frames() {
    // A host from before protocol version 2 refuses an EXIT longer than 12 bytes, so its
    // requests are answered without the signal (a kill is then only `128 + N`).
    let agent = Agent::start();
    let mut request = ExecRequest::new(["sh", "-c", "kill -9 $$"]);
    request.version = 1;
    let killed = agent.run(request).await;
    assert_eq!((killed.code(), killed.signal()), (128 + 9, None));
}

#[tokio::test]
async fn stdout_and_stderr_stay_separate() {
    let agent = Agent::start();
    let out = agent.sh("echo out; echo err >&2; echo out2").await;
    assert_eq!(out.out(), "out\nout2\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(out.code(), 0);
}

#[tokio::test]
async fn environment_and_cwd_are_applied() {
    let agent = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let mut request = ExecRequest::new(["sh", "-c", "echo \"$GREETING\"; pwd"]);
    request.env.insert("GREETING".into(), "hello there".into());
    request.cwd = Some(dir.path().to_str().unwrap().into());
    let out = agent.run(request).await;
    let expected = format!("hello there\n{}\n", dir.path().display());
    assert_eq!(out.out(), expected);
}

#[tokio::test]
async fn env_clear_and_env_remove_apply_to_the_agents_own_environment() {
    // Host mode: the base environment is the agent's own, which has PATH and HOME.
    let agent = Agent::start();
    let mut cleared = ExecRequest::new(["/usr/bin/env"]);
    cleared.env_clear = true;
    cleared.env.insert("ONLY".into(), "this".into());
    assert_eq!(agent.run(cleared).await.out(), "ONLY=this\n");

    let mut removed = ExecRequest::new(["sh", "-c", "echo \"${HOME-unset}\""]);
    removed.env_remove = vec!["HOME".into()];
    assert_eq!(agent.run(removed).await.out(), "unset\n");
}

#[tokio::test]
async fn user_is_applied() {
    let agent = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let staged = dir.path().join("owned");
    let mut request = ExecRequest::new(["sh", "-c", "echo $(id -u):$(id -g)"]);
    request.user = Some("4711:4712".into());
    request.stage_files = vec![StagedFile::new(staged.to_str().unwrap(), "x")];
    let out = agent.run(request).await;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        assert_eq!(out.out(), "4711:4712\n", "{out:?}");
        assert_eq!(out.code(), 0);
        let meta = std::fs::metadata(&staged).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            (meta.uid(), meta.gid()),
            (4711, 4712),
            "staged file not owned by the user"
        );
    } else {
        // Without privileges, switching users fails at spawn.
        let error = out.error.expect("ERROR frame");
        assert_eq!(error.code, ErrorCode::PermissionDenied, "{error}");
    }
}

#[tokio::test]
async fn stdin_streams_through_cat_and_eof_keeps_the_connection() {
    let agent = Agent::start();
    let mut conn = agent.exec(ExecRequest::new(["cat"])).await;
    let mut seen = Vec::new();
    // One line at a time: each must come back before the next is sent (streaming, not
    // buffering until EOF).
    for i in 0..5 {
        conn.send(stdin(&format!("line {i}\n"))).await.unwrap();
        read_stdout_until(&mut conn, &mut seen, &format!("line {i}\n")).await;
    }
    // EOF on the child's stdin; the connection stays open and EXIT still arrives on it.
    conn.send(stdin_eof()).await.unwrap();
    let out = collect(conn).await;
    assert_eq!(out.code(), 0);
    assert!(out.stdout.is_empty(), "{out:?}");
    assert_eq!(
        String::from_utf8(seen).unwrap(),
        "line 0\nline 1\nline 2\nline 3\nline 4\n"
    );
}

#[tokio::test]
async fn chain_links_share_stdin_like_a_shell() {
    let agent = Agent::start();
    let mut request = ExecRequest::new(["sh", "-c", "read x; echo first:$x"]);
    request.chain = vec![vec![
        "sh".into(),
        "-c".into(),
        "read y; echo second:$y; cat".into(),
    ]];
    let mut conn = agent.exec(request).await;
    conn.send(stdin("one\ntwo\nthree\n")).await.unwrap();
    conn.send(stdin_eof()).await.unwrap();
    let out = collect(conn).await;
    assert_eq!(out.out(), "first:one\nsecond:two\nthree\n");
    assert_eq!(out.code(), 0);
}

#[tokio::test]
async fn a_megabyte_of_stdin_round_trips() {
    let agent = Agent::start();
    let conn = agent.exec(ExecRequest::new(["cat"])).await;
    let (mut tx, rx) = conn.split();
    let blob: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    let sent = blob.clone();
    let writer = tokio::spawn(async move {
        for chunk in sent.chunks(100_000) {
            tx.send(Frame::Stdin(Bytes::copy_from_slice(chunk)))
                .await
                .unwrap();
        }
        tx.send(stdin_eof()).await.unwrap();
        tx
    });
    let mut rx = rx;
    let mut echoed = Vec::new();
    let code = loop {
        match rx.next().await.unwrap().unwrap() {
            Frame::Stdout(bytes) => echoed.extend_from_slice(&bytes),
            Frame::Started { .. } => {}
            Frame::Exit(exit) => break exit.code,
            other => panic!("unexpected {other:?}"),
        }
    };
    let _tx = writer.await.unwrap();
    assert_eq!(code, 0);
    assert_eq!(echoed.len(), blob.len());
    assert!(echoed == blob, "stdin bytes were reordered or corrupted");
}

#[tokio::test]
async fn null_stdio_modes() {
    let agent = Agent::start();
    let mut request = ExecRequest::new(["sh", "-c", "cat; echo out; echo err >&2"]);
    request.stdin = StdioMode::Null;
    request.stderr = StdioMode::Null;
    // cat reads /dev/null: immediate EOF, no STDIN needed.
    let out = agent.run(request).await;
    assert_eq!(out.out(), "out\n");
    assert!(out.stderr.is_empty());
    assert_eq!(out.code(), 0);
}

#[tokio::test]
async fn program_not_found_is_an_error_frame() {
    let agent = Agent::start();
    let out = agent
        .run(ExecRequest::new(["no-such-program-4711", "arg"]))
        .await;
    let error = out.error.expect("ERROR frame");
    assert_eq!(error.code, ErrorCode::NotFound, "{error}");
    assert!(error.message.ends_with("no-such-program-4711"), "{error}");
    assert!(out.started.is_none() && out.exit.is_none());
}

#[tokio::test]
async fn invalid_requests_are_refused() {
    let agent = Agent::start();
    let empty = agent.run(ExecRequest::new(Vec::<String>::new())).await;
    let error = empty.error.expect("ERROR frame");
    assert_eq!(error.code, ErrorCode::InvalidRequest, "{error}");
    assert!(error.message.contains("argv"), "{error}");

    // A missing cwd is reported as such, not as "program not found".
    let mut request = ExecRequest::new(["true"]);
    request.cwd = Some("/no/such/dir/4711".into());
    let error = agent.run(request).await.error.expect("ERROR frame");
    assert_eq!(error.code, ErrorCode::InvalidRequest, "{error}");
    assert!(error.message.contains("/no/such/dir/4711"), "{error}");

    let mut request = ExecRequest::new(["true"]);
    request.user = Some("no-such-user-4711".into());
    let error = agent.run(request).await.error.expect("ERROR frame");
    assert_eq!(error.code, ErrorCode::InvalidRequest, "{error}");

    let mut request = ExecRequest::new(["true"]);
    request.version = 99;
    let error = agent.run(request).await.error.expect("ERROR frame");
    assert_eq!(error.code, ErrorCode::InvalidRequest, "{error}");
}

#[tokio::test]
async fn a_first_frame_that_is_not_a_request_is_refused() {
    let agent = Agent::start();
    let mut conn = agent.connect().await;
    // Unknown kinds are skipped, even before the first frame.
    conn.send(Frame::Unknown {
        kind: 0x42,
        payload: Bytes::from_static(b"future"),
    })
    .await
    .unwrap();
    conn.send(stdin("hello")).await.unwrap();
    let out = collect(conn).await;
    let error = out.error.expect("ERROR frame");
    assert_eq!(error.code, ErrorCode::InvalidRequest, "{error}");
}

#[tokio::test]
async fn staged_files_and_chain() {
    let agent = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("x");
    let script = base.join("script.sh");
    let data = base.join("sub/data.txt");
    let mut request = ExecRequest::new(["sh", script.to_str().unwrap()]);
    request.stage_files = vec![
        StagedFile::new(script.to_str().unwrap(), "echo from-script\n").with_mode(0o700),
        StagedFile::new(data.to_str().unwrap(), "staged data\n"),
    ];
    request.chain = vec![vec!["cat".into(), data.to_str().unwrap().into()]];
    // The cwd is created by staging.
    request.cwd = Some(base.to_str().unwrap().into());
    let out = agent.run(request).await;
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(out.out(), "from-script\nstaged data\n");
    assert_eq!(
        std::fs::metadata(&script).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert_eq!(
        std::fs::metadata(&data).unwrap().permissions().mode() & 0o777,
        0o644
    );

    // A failing link stops the chain and its code is the exec's.
    let mut request = ExecRequest::new(["echo", "first"]);
    request.chain = vec![
        vec!["sh".into(), "-c".into(), "echo second; exit 4".into()],
        vec!["echo".into(), "never".into()],
    ];
    let out = agent.run(request).await;
    assert_eq!(out.code(), 4);
    assert_eq!(out.out(), "first\nsecond\n");

    // A link that cannot be spawned ends the exec with an ERROR naming it.
    let mut request = ExecRequest::new(["true"]);
    request.chain = vec![vec!["true".into()], vec!["no-such-program-4712".into()]];
    let error = agent.run(request).await.error.expect("ERROR frame");
    assert_eq!(error.code, ErrorCode::NotFound);
    assert_eq!(
        error.message,
        "chain[1]: program not found: no-such-program-4712"
    );
}

#[tokio::test]
async fn a_program_without_exec_permission_is_permission_denied() {
    let agent = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("not-executable.sh");
    let mut request = ExecRequest::new([script.to_str().unwrap()]);
    request.stage_files = vec![StagedFile::new(
        script.to_str().unwrap(),
        "#!/bin/sh\ntrue\n",
    )];
    let out = agent.run(request).await;
    let error = out.error.expect("ERROR frame");
    assert_eq!(error.code, ErrorCode::PermissionDenied, "{error}");
    assert!(out.started.is_none());
}

#[tokio::test]
async fn staging_into_an_unwritable_place_fails() {
    let agent = Agent::start();
    let mut request = ExecRequest::new(["true"]);
    // A regular file cannot be a parent directory.
    request.stage_files = vec![StagedFile::new("/etc/passwd/nope", "x")];
    let error = agent.run(request).await.error.expect("ERROR frame");
    assert!(
        error.message.starts_with("staging /etc/passwd/nope: "),
        "{error}"
    );
}

#[tokio::test]
async fn tty_sees_initial_size_and_resize() {
    let agent = Agent::start();
    let mut request = ExecRequest::new(["sh", "-c", "stty size; read x; stty size; tty"]);
    request.tty = true;
    request.cols = Some(100);
    request.rows = Some(40);
    let mut conn = agent.exec(request).await;
    let mut seen = Vec::new();
    read_stdout_until(&mut conn, &mut seen, "40 100").await;
    conn.send(Frame::Resize(WindowSize {
        cols: 120,
        rows: 50,
    }))
    .await
    .unwrap();
    conn.send(stdin("\n")).await.unwrap();
    read_stdout_until(&mut conn, &mut seen, "50 120").await;
    let out = collect(conn).await;
    assert_eq!(out.code(), 0);
    assert!(out.stderr.is_empty(), "STDERR frame in tty mode");
    let all = String::from_utf8_lossy(&seen).into_owned() + &out.out();
    assert!(all.contains("/dev/pts/"), "not on a pty: {all:?}");
}

#[tokio::test]
async fn tty_defaults_and_eof() {
    let agent = Agent::start();
    let mut request = ExecRequest::new(["sh", "-c", "stty size; echo \"$TERM\"; cat; echo after"]);
    request.tty = true;
    let mut conn = agent.exec(request).await;
    let mut seen = Vec::new();
    read_stdout_until(&mut conn, &mut seen, "xterm-256color").await;
    // ^D ends cat's input; the shell goes on.
    conn.send(stdin_eof()).await.unwrap();
    let out = collect(conn).await;
    let all = String::from_utf8_lossy(&seen).into_owned() + &out.out();
    assert!(all.contains("24 80"), "{all:?}");
    assert!(all.contains("after"), "{all:?}");
    assert_eq!(out.code(), 0);
}

#[tokio::test]
async fn tty_chain_gets_a_terminal_per_link_with_the_latest_size() {
    let agent = Agent::start();
    let mut request = ExecRequest::new(["sh", "-c", "stty size; read x"]);
    request.tty = true;
    request.chain = vec![vec!["stty".into(), "size".into()]];
    let mut conn = agent.exec(request).await;
    let mut seen = Vec::new();
    read_stdout_until(&mut conn, &mut seen, "24 80").await;
    conn.send(Frame::Resize(WindowSize { cols: 90, rows: 30 }))
        .await
        .unwrap();
    conn.send(stdin("\n")).await.unwrap();
    let out = collect(conn).await;
    assert_eq!(out.code(), 0);
    assert!(out.out().contains("30 90"), "{:?}", out.out());
}

#[tokio::test]
async fn sigterm_reaches_a_trapping_shell() {
    let agent = Agent::start();
    let mut conn = agent
        .exec(ExecRequest::new([
            "sh",
            "-c",
            "trap 'echo got; exit 3' TERM; echo ready; sleep 1000.53 & wait",
        ]))
        .await;
    let mut seen = Vec::new();
    read_stdout_until(&mut conn, &mut seen, "ready\n").await;
    conn.send(Frame::Signal(15)).await.unwrap();
    let out = collect(conn).await;
    assert_eq!(out.out(), "got\n");
    assert_eq!(out.code(), 3);
    let gone = gone_within("1000.53", GONE).await;
    kill_matching("1000.53");
    assert!(gone, "the background sleep survived its exec");
}

#[tokio::test]
async fn sigkill_leaves_no_survivors_in_the_group() {
    let agent = Agent::start();
    let mut conn = agent
        .exec(ExecRequest::new([
            "sh",
            "-c",
            "sleep 1000.41 & sleep 1000.42",
        ]))
        .await;
    assert!(running_within("1000.41", GONE).await);
    assert!(running_within("1000.42", GONE).await);
    conn.send(Frame::Signal(9)).await.unwrap();
    let out = collect(conn).await;
    assert_eq!(out.code(), 128 + 9);
    let gone = gone_within("1000.41", GONE).await && gone_within("1000.42", GONE).await;
    kill_matching("1000.41");
    kill_matching("1000.42");
    assert!(gone, "a process of the group survived SIGKILL");
}

#[tokio::test]
async fn leftover_group_members_die_with_the_leader() {
    let agent = Agent::start();
    // The leader exits at once; its background child would sleep on.
    let started = Instant::now();
    let out = agent.sh("sleep 1000.43 & echo bye").await;
    assert_eq!(out.out(), "bye\n");
    assert_eq!(out.code(), 0);
    // The background sleep held stdout open: the agent must not wait for it.
    assert!(started.elapsed() < Duration::from_secs(5));
    let gone = gone_within("1000.43", GONE).await;
    kill_matching("1000.43");
    assert!(gone, "a background process outlived its exec");
}

#[tokio::test]
async fn host_disconnect_kills_the_exec() {
    let agent = Agent::start();
    let mut conn = agent.exec(ExecRequest::new(["sleep", "1000.37"])).await;
    match conn.next().await {
        Some(Ok(Frame::Started { .. })) => {}
        other => panic!("expected STARTED, got {other:?}"),
    }
    assert!(running_within("1000.37", GONE).await);
    drop(conn);
    let gone = gone_within("1000.37", GONE).await;
    kill_matching("1000.37");
    assert!(gone, "the exec outlived its connection");
}

#[tokio::test]
async fn host_disconnect_is_noticed_while_stdin_is_stuck() {
    let agent = Agent::start();
    let mut conn = agent.exec(ExecRequest::new(["sleep", "1000.38"])).await;
    assert!(running_within("1000.38", GONE).await);
    // The child never reads stdin: fill the pipe, the agent's stdin queue and the socket until
    // our writes stall, so the agent's reader is stuck waiting and cannot see EOF.
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let mut stalled = false;
    for _ in 0..1024 {
        let send = conn.send(Frame::Stdin(chunk.clone()));
        if tokio::time::timeout(Duration::from_millis(300), send)
            .await
            .is_err()
        {
            stalled = true;
            break;
        }
    }
    assert!(
        stalled,
        "64 MiB of stdin went into a child that does not read it"
    );
    drop(conn);
    let gone = gone_within("1000.38", GONE).await;
    kill_matching("1000.38");
    assert!(gone, "the exec outlived its connection");
}

#[tokio::test]
async fn signal_before_started_is_not_lost() {
    let agent = Agent::start();
    let mut conn = agent.connect().await;
    conn.send(Frame::Request(ExecRequest::new(["sleep", "1000.44"])))
        .await
        .unwrap();
    conn.send(Frame::Signal(9)).await.unwrap();
    let out = collect(conn).await;
    assert_eq!(out.code(), 137);
    assert!(gone_within("1000.44", GONE).await);
}

#[tokio::test]
async fn large_output_is_chunked_and_complete() {
    let agent = Agent::start();
    let conn = agent
        .exec(ExecRequest::new(["head", "-c", "10000000", "/dev/zero"]))
        .await;
    let out = collect(conn).await;
    assert_eq!(out.code(), 0);
    assert_eq!(out.stdout.len(), 10_000_000);
    // Frames never exceed the agent's 256 KiB chunk, and a bulk stream grows into large ones.
    assert!(out.largest_frame <= 256 * 1024, "{}", out.largest_frame);
    assert!(out.largest_frame > 64 * 1024, "{}", out.largest_frame);
    assert!(out.stdout_frames >= 10_000_000 / (256 * 1024));
}

#[tokio::test]
async fn a_slow_host_blocks_the_child_not_agent_memory() {
    let agent = Agent::start();
    let rss_before = rss_kib(agent.pid());
    let mut conn = agent
        .exec(ExecRequest::new([
            "sh",
            "-c",
            "head -c 200000000 /dev/zero; echo done-1000.45 >&2",
        ]))
        .await;
    // Not reading: the child must block once the pipes and socket buffers are full.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rss_stalled = rss_kib(agent.pid());
    assert!(
        rss_stalled < rss_before + 64 * 1024,
        "agent grew from {rss_before} KiB to {rss_stalled} KiB while the host was not reading"
    );
    let (count, exit) = count_until_exit(&mut conn).await;
    assert_eq!(exit.code, 0);
    assert_eq!(count, 200_000_000);
}

#[tokio::test]
async fn two_hundred_concurrent_execs() {
    let agent = Agent::start();
    let socket = agent.socket().to_owned();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let socket = socket.clone();
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
            let mut conn =
                tokio_util::codec::Framed::new(stream, supermachine_codec::ExecCodec::new());
            conn.send(Frame::Request(ExecRequest::new(["echo", &format!("n{i}")])))
                .await
                .unwrap();
            let out = collect(conn).await;
            (i, out)
        }));
    }
    for task in tasks {
        let (i, out) = task.await.unwrap();
        assert_eq!(out.code(), 0, "exec {i}: {out:?}");
        assert_eq!(out.out(), format!("n{i}\n"));
    }
}

#[test]
fn sigterm_stops_the_agent_kills_execs_and_removes_the_socket() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut agent = Agent::start();
    let conn = runtime.block_on(async {
        let conn = agent.exec(ExecRequest::new(["sleep", "1000.61"])).await;
        assert!(running_within("1000.61", GONE).await);
        conn
    });
    let code = agent.terminate(Duration::from_secs(5));
    assert_eq!(code, Some(0), "agent did not exit cleanly on SIGTERM");
    assert!(!agent.socket().exists(), "socket file left behind");
    let gone = runtime.block_on(gone_within("1000.61", GONE));
    kill_matching("1000.61");
    drop(conn);
    assert!(gone, "an exec survived the agent's SIGTERM");
}
