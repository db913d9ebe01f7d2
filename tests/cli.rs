//! The `supermachine` CLI end to end, as a user runs it: images pushed to a real local registry
//! (`docker-registry`) or read from an OCI layout, real microVMs, a real pty.
//!
//! - `run -d -p` with busybox `httpd`: 100 page fetches over 10 concurrent connections, every
//!   byte checked; `ps`, `exec`, `logs`, `cp`, `stop`, and nothing left behind.
//! - `run -it` through a pty: type, read, resize, Ctrl-C a `sleep`, exit with a code.
//! - Bad input: one-line errors, non-zero exits, nothing left running.
//!
//! Each test has its own runtime directory (`SUPERMACHINE_RUNTIME_DIR`), so they run in
//! parallel without seeing each other's VMs.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use supermachine_e2e::images::{self, LayerBlob, TarBuilder};
use supermachine_e2e::registry::Registry;

/// The page `httpd` serves: deterministic bytes of every value, a few KiB.
fn page() -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..6000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

/// busybox with the applets these tests use, `/www/page.bin`, and `httpd` as its Cmd.
fn web_layout(dir: &Path) -> images::WrittenImage {
    let busybox =
        std::fs::read(supermachine_e2e::static_busybox().expect("busybox")).expect("read busybox");
    let mut tar = TarBuilder::new();
    tar.busybox(
        &busybox,
        [
            "sh", "httpd", "sleep", "stty", "echo", "cat", "id", "pwd", "uname",
        ],
    )
    .skeleton(b"root:x:0:0:root:/root:/bin/sh\n")
    .dir("www", 0o755, 0, 0)
    .file("www/page.bin", &page(), 0o644, 0, 0);
    let layer = LayerBlob::gzip(tar.finish()).expect("gzip");
    images::write_oci_layout(
        dir,
        "1",
        &[layer],
        serde_json::json!({
            "Env": ["PATH=/bin", "GREETING=hello from the image"],
            "WorkingDir": "/root",
            "Cmd": ["httpd", "-f", "-p", "80", "-h", "/www"],
        }),
    )
    .expect("write layout")
}

/// The CLI with this test's runtime directory, kernel and agent.
struct Cli {
    runtime: tempfile::TempDir,
    binary: PathBuf,
}

impl Cli {
    fn new() -> Cli {
        use std::os::unix::fs::PermissionsExt;
        let runtime = tempfile::Builder::new()
            .prefix("sm-cli-")
            .tempdir()
            .expect("tempdir");
        // The CLI refuses a runtime dir others can enter (its sockets control VMs).
        std::fs::set_permissions(runtime.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        Cli {
            runtime,
            binary: supermachine_e2e::cli_binary().expect("build the CLI"),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.args(args)
            .env("SUPERMACHINE_RUNTIME_DIR", self.runtime.path())
            .env(
                "SUPERMACHINE_KERNEL",
                supermachine_e2e::guest_kernel().expect("kernel"),
            )
            .env(
                "SUPERMACHINE_AGENT_BIN",
                supermachine_e2e::agent_binary().expect("agent"),
            )
            .env_remove("RUST_LOG");
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args)
            .stdin(Stdio::null())
            .output()
            .expect("run the CLI")
    }

    /// Runs and expects success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "supermachine {args:?}: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs, expects failure with a single `supermachine: ...` line on stderr containing
    /// `needle`, and returns the exit code.
    fn fails(&self, args: &[&str], needle: &str) -> i32 {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "supermachine {args:?} succeeded");
        assert_eq!(stderr.lines().count(), 1, "supermachine {args:?}: {stderr}");
        assert!(stderr.starts_with("supermachine: "), "{stderr}");
        assert!(stderr.contains(needle), "supermachine {args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        out.status.code().unwrap_or(-1)
    }

    /// Registered VMs (entries in the runtime dir).
    fn registered(&self) -> Vec<String> {
        std::fs::read_dir(self.runtime.path())
            .map(|dir| {
                dir.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Processes of this test's CLI (the runtime dir is in every worker's command line).
    fn workers(&self) -> Vec<u32> {
        supermachine_e2e::processes_matching(&self.runtime.path().display().to_string())
    }
}

/// A failed test must not leave its detached VMs' workers running.
impl Drop for Cli {
    fn drop(&mut self) {
        supermachine_e2e::kill_matching(&self.runtime.path().display().to_string());
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// One HTTP/1.0 GET; returns the status line and the body.
fn fetch(port: u16, path: &str) -> std::io::Result<(String, Vec<u8>)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| {
            std::io::Error::other(format!("no header end in {} bytes", response.len()))
        })?;
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let status = head.lines().next().unwrap_or_default().to_owned();
    Ok((status, response[split + 4..].to_vec()))
}

#[test]
fn detached_httpd_serves_100_fetches_over_10_connections() {
    if !supermachine_e2e::kvm_available_or_skip(
        "detached_httpd_serves_100_fetches_over_10_connections",
    ) {
        return;
    }
    let cli = Cli::new();
    let registry = Registry::start().expect("registry");
    let layout = tempfile::tempdir().expect("tempdir");
    web_layout(layout.path());
    registry
        .push_layout(layout.path(), "1", "web:1", false)
        .expect("push");
    let image = registry.reference("web:1");
    let port = free_port();
    let publish = format!("{port}:80");

    // `pull` first, as a user would; `run` then finds it in the local cache.
    let pulled = cli.ok(&["pull", &image]);
    assert!(pulled.contains(&image), "{pulled}");
    assert!(cli.ok(&["images"]).contains(&image));
    assert_eq!(
        cli.ok(&["run", "-d", "--name", "web", "-p", &publish, &image])
            .trim(),
        "web"
    );

    let ps = cli.ok(&["ps"]);
    assert!(
        ps.contains("web") && ps.contains(&format!("127.0.0.1:{port}->80/tcp")),
        "{ps}"
    );
    // httpd starts listening shortly after the VM is up: seconds, but a PVM host with both
    // cores busy (CI beside other builds) has taken over a minute, so wait long; a hang still
    // fails.
    let deadline = Instant::now() + Duration::from_secs(240);
    while !fetch(port, "/page.bin").is_ok_and(|(status, _)| status.contains("200")) {
        assert!(Instant::now() < deadline, "httpd never answered");
        std::thread::sleep(Duration::from_millis(250));
    }

    let expected = Arc::new(page());
    let started = Instant::now();
    let failures: Vec<String> = (0..10)
        .map(|_| {
            let expected = expected.clone();
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                for _ in 0..10 {
                    match fetch(port, "/page.bin") {
                        Ok((status, body)) if status.contains("200") && body == *expected => {}
                        Ok((status, body)) => {
                            failures.push(format!("{status}: {} bytes", body.len()))
                        }
                        Err(e) => failures.push(e.to_string()),
                    }
                }
                failures
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .flat_map(|t| t.join().expect("fetch thread"))
        .collect();
    eprintln!("100 fetches over 10 connections: {:?}", started.elapsed());
    assert!(
        failures.is_empty(),
        "{} of 100 fetches failed: {failures:?}",
        failures.len()
    );
    assert_eq!(
        fetch(port, "/missing").expect("fetch").0.split(' ').nth(1),
        Some("404")
    );

    // exec sees the image's Env and WorkingDir; cp both ways; logs.
    let out = cli.ok(&["exec", "web", "sh", "-c", "echo $GREETING; pwd"]);
    assert_eq!(out, "hello from the image\n/root\n");
    let host_file = layout.path().join("note.txt");
    std::fs::write(&host_file, b"copied in\n").expect("write");
    cli.ok(&["cp", &host_file.display().to_string(), "web:/tmp/"]);
    assert_eq!(
        cli.ok(&["exec", "web", "cat", "/tmp/note.txt"]),
        "copied in\n"
    );
    let back = layout.path().join("back.bin");
    cli.ok(&["cp", "web:/www/page.bin", &back.display().to_string()]);
    assert_eq!(std::fs::read(&back).expect("read"), *expected);
    let code = cli
        .run(&["exec", "web", "sh", "-c", "exit 9"])
        .status
        .code();
    assert_eq!(code, Some(9));
    cli.ok(&["logs", "web"]);

    // pause / unpause: `ps` says so, and a fetch made while paused is served after unpause.
    assert_eq!(cli.ok(&["pause", "web"]).trim(), "web");
    assert!(
        cli.ok(&["ps"]).contains("paused, pid"),
        "ps does not show the pause"
    );
    let fetcher = std::thread::spawn(move || fetch(port, "/page.bin"));
    std::thread::sleep(Duration::from_secs(2));
    assert!(!fetcher.is_finished(), "a paused VM served a page");
    assert_eq!(cli.ok(&["unpause", "web"]).trim(), "web");
    let (status, body) = fetcher
        .join()
        .expect("fetch thread")
        .expect("fetch after unpause");
    assert!(status.contains("200"), "{status}");
    assert_eq!(body, *expected);
    assert!(
        cli.ok(&["ps"]).contains("up, pid"),
        "ps still shows a pause"
    );

    assert_eq!(cli.ok(&["stop", "web"]).trim(), "web");
    assert_eq!(cli.ok(&["ps"]).lines().count(), 1, "only the header");
    assert!(cli.registered().is_empty(), "{:?}", cli.registered());
    assert!(cli.workers().is_empty(), "{:?}", cli.workers());
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port still open"
    );

    // A worker killed outright cannot clean up; `ps` never lists its dead VM, and the name is
    // free again.
    assert_eq!(
        cli.ok(&["run", "-d", "--name", "victim", &image, "sleep", "1000"])
            .trim(),
        "victim"
    );
    let workers = cli.workers();
    assert_eq!(workers.len(), 1, "{workers:?}");
    // SAFETY: kill takes two integers; the pid is this test's own worker.
    assert_eq!(unsafe { libc::kill(workers[0] as i32, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cli.workers().is_empty() {
        assert!(Instant::now() < deadline, "the killed worker lingers");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(cli.ok(&["ps"]).lines().count(), 1, "a dead VM is listed");
    assert!(cli.registered().is_empty(), "{:?}", cli.registered());
    cli.fails(&["exec", "victim", "true"], "no running VM named");
}

#[test]
fn pull_images_rmi_manage_the_cache() {
    let cli = Cli::new();
    let registry = Registry::start().expect("registry");
    let layout = tempfile::tempdir().expect("tempdir");
    // Content no other test uses, so removing it cannot pull a rootfs from under a VM.
    let stamp = format!("{:?}", std::time::SystemTime::now());
    let mut tar = TarBuilder::new();
    tar.dir("etc", 0o755, 0, 0)
        .file("etc/only-in-this-test", stamp.as_bytes(), 0o644, 0, 0);
    images::write_oci_layout(
        layout.path(),
        "1",
        &[LayerBlob::gzip(tar.finish()).expect("gzip")],
        serde_json::json!({ "Cmd": ["true"] }),
    )
    .expect("layout");
    registry
        .push_layout(layout.path(), "1", "cache-test:1", false)
        .expect("push");
    let image = registry.reference("cache-test:1");
    cli.ok(&["pull", &image]);
    let listed = cli.ok(&["images"]);
    let line = listed
        .lines()
        .find(|l| l.starts_with(&image))
        .unwrap_or_else(|| panic!("{image} not in\n{listed}"));
    // The last column is the rootfs size, which `pull` built.
    assert!(!line.trim_end().ends_with('-'), "no rootfs size: {line}");
    let removed = cli.ok(&["rmi", &image]);
    assert!(
        removed.starts_with(&format!("Deleted {image}")),
        "{removed}"
    );
    assert!(!cli.ok(&["images"]).contains(&image));
    cli.fails(&["rmi", &image], "no local image");
}

#[test]
fn run_flags_and_bad_input_one_line_errors_nothing_left() {
    if !supermachine_e2e::kvm_available_or_skip(
        "run_flags_and_bad_input_one_line_errors_nothing_left",
    ) {
        return;
    }
    let cli = Cli::new();
    let registry = Registry::start().expect("registry");
    let layout = tempfile::tempdir().expect("tempdir");
    web_layout(layout.path());
    let image = format!("oci:{}:1", layout.path().display());

    let missing = registry.reference("no-such-image:1");
    assert_eq!(cli.fails(&["run", &missing, "true"], "cannot pull"), 125);
    assert_eq!(
        cli.fails(&["run", "-p", "8080:99999", &image], "invalid port mapping"),
        125
    );
    assert_eq!(cli.fails(&["run", "-p", "80/udp", &image], "only tcp"), 125);
    assert_eq!(
        cli.fails(&["exec", "nope", "true"], "no running VM named \"nope\""),
        125
    );
    cli.fails(&["stop", "nope"], "no running VM named");
    cli.fails(&["pause", "nope"], "no running VM named");
    cli.fails(&["unpause", "nope"], "no running VM named");
    cli.fails(&["logs", "nope"], "no running VM named");
    cli.fails(&["cp", "nope:/etc/passwd", "/tmp/x"], "no running VM named");
    cli.fails(&["run", "--name", "bad/name", &image], "invalid VM name");
    // Network options are checked before anything starts.
    cli.fails(&["run", "--allow", "10.0.0.0/33", &image], "network rule");
    cli.fails(&["run", "--deny", "a b", &image], "network rule");
    cli.fails(
        &["run", "--network", "host", &image],
        "expected `none` or `public`",
    );
    cli.fails(
        &["run", "--network", "none", "--allow", "any", &image],
        "--network none has no NIC",
    );
    assert!(cli.registered().is_empty(), "{:?}", cli.registered());

    // A host port in use: the start fails before a VM exists, detached or not.
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let publish = format!("{}:80", taken.local_addr().expect("addr").port());
    for detach in [true, false] {
        let mut args = vec!["run", "-p", &publish, "--name", "busy"];
        if detach {
            args.insert(1, "-d");
        }
        args.push(&image);
        cli.fails(&args, "Address already in use");
        assert!(cli.registered().is_empty(), "{:?}", cli.registered());
        assert!(cli.workers().is_empty(), "{:?}", cli.workers());
    }
    // `docker run` semantics: arguments replace Cmd and follow the Entrypoint, which
    // `--entrypoint` replaces; -e / -w / -u apply; the exit code passes through.
    let out = cli.run(&[
        "run",
        "-e",
        "A=from-e",
        "-w",
        "/tmp",
        "-u",
        "0",
        "--entrypoint",
        "sh",
        &image,
        "-c",
        "echo $A $(pwd) $(id -u) $GREETING; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "from-e /tmp 0 hello from the image\n"
    );
    // A program that does not exist in the image: exit 127, as in a shell.
    assert_eq!(
        cli.fails(&["run", &image, "no-such-program"], "no-such-program"),
        127
    );
    // --timeout kills the command and exits 124, as timeout(1) does.
    let args = [
        "run",
        "--timeout",
        "2",
        "--entrypoint",
        "sleep",
        &image,
        "100.91",
    ];
    assert_eq!(cli.fails(&args, "timed out"), 124);
    // A command killed by a signal exits 128 + N, as in a shell.
    let out = cli.run(&["run", "--entrypoint", "sh", &image, "-c", "kill -9 $$"]);
    assert_eq!(out.status.code(), Some(137), "{out:?}");
    assert!(cli.registered().is_empty(), "{:?}", cli.registered());
}

/// A child process on a fresh pty, and everything it printed so far.
struct PtySession {
    master: std::fs::File,
    output: Arc<Mutex<Vec<u8>>>,
    seen: usize,
    child: std::process::Child,
}

/// A failed test must not leave its CLI (and the VM it hosts) running on the pty.
impl Drop for PtySession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PtySession {
    fn spawn(mut cmd: Command, cols: u16, rows: u16) -> PtySession {
        let (mut master, mut slave) = (-1, -1);
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty writes two fds into the ints we pass; name and termios may be null,
        // and `size` is a valid winsize that outlives the call.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                &size,
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: openpty just returned these fds; nothing else owns them.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        cmd.stdin(slave.try_clone().expect("dup"))
            .stdout(slave.try_clone().expect("dup"))
            .stderr(slave.try_clone().expect("dup"));
        // SAFETY: setsid and ioctl(TIOCSCTTY) are async-signal-safe; the child gets a session
        // of its own with the pty (its stdin) as controlling terminal, as a shell would.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn on the pty");
        drop(slave);
        let master = std::fs::File::from(master);
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut reader = master.try_clone().expect("dup master");
        let sink = output.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // EIO once the child side is closed ends the loop.
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                sink.lock().expect("lock").extend_from_slice(&buf[..n]);
            }
        });
        PtySession {
            master,
            output,
            seen: 0,
            child,
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.master.write_all(bytes).expect("write to the pty");
    }

    /// Waits until `needle` appears after what earlier expects consumed.
    fn expect(&mut self, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            {
                let out = self.output.lock().expect("lock");
                let text = String::from_utf8_lossy(&out[self.seen..]);
                if let Some(at) = text.find(needle) {
                    self.seen += text[..at + needle.len()].len();
                    return;
                }
            }
            let exited = self.child.try_wait().ok().flatten();
            if Instant::now() > deadline || exited.is_some() {
                // Whatever the reader thread has not drained yet is lost to the message.
                std::thread::sleep(Duration::from_millis(200));
                let out = self.output.lock().expect("lock");
                panic!(
                    "{needle:?} did not appear within {within:?} (CLI exit: {exited:?}); \
                     output so far:\n{}",
                    String::from_utf8_lossy(&out)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn resize(&self, cols: u16, rows: u16) {
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize we own for the duration of the call.
        let rc = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        assert_eq!(rc, 0, "TIOCSWINSZ: {}", std::io::Error::last_os_error());
    }
}

#[test]
fn interactive_run_through_a_real_pty() {
    if !supermachine_e2e::kvm_available_or_skip("interactive_run_through_a_real_pty") {
        return;
    }
    let cli = Cli::new();
    let layout = tempfile::tempdir().expect("tempdir");
    web_layout(layout.path());
    let image = format!("oci:{}:1", layout.path().display());
    let mut session = PtySession::spawn(
        cli.command(&["run", "-it", "--name", "tty", &image, "sh"]),
        80,
        24,
    );
    let step = Duration::from_secs(300);

    // The guest shell's prompt, then its idea of the terminal size.
    session.expect("# ", step);
    session.send(b"stty size\r");
    session.expect("24 80", Duration::from_secs(60));
    session.expect("# ", Duration::from_secs(60));

    // A resize of the host terminal reaches the guest terminal.
    session.resize(100, 40);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        session.send(b"stty size\r");
        let found = {
            std::thread::sleep(Duration::from_secs(2));
            let out = session.output.lock().expect("lock");
            String::from_utf8_lossy(&out[session.seen..]).contains("40 100")
        };
        if found {
            session.expect("40 100", Duration::from_secs(1));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the resize never reached the guest"
        );
    }

    // Ctrl-C interrupts a guest `sleep`, not the session.
    // (An interactive shell abandons the rest of an interrupted line, so the status is
    // asked for on the next one.)
    session.send(b"sleep 1000\r");
    std::thread::sleep(Duration::from_secs(3));
    session.send(b"\x03");
    session.send(b"echo sleep-ended-$? still-$((20+1))\r");
    session.expect("sleep-ended-130 still-21", Duration::from_secs(60));

    // The guest shell's exit code is the CLI's.
    session.send(b"exit 7\r");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = session.child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the CLI did not exit");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(7));
    assert!(cli.registered().is_empty(), "{:?}", cli.registered());
}
