//! `tokio::process` idioms, ported to `vm.exec` / `agent.exec`: the exec API should read like
//! `tokio::process::Command` and `Child` wherever a difference would only be an accident.
//!
//! Every case runs twice: against the agent in host mode (a Unix socket, one agent per test)
//! and in a real microVM (one VM for all cases, booted once, like `exec_vm.rs`; needs
//! `/dev/kvm`, and skips without it only when `SUPERMACHINE_REQUIRE_KVM` is unset). The last
//! case, `kill_on_drop(false)`, makes the agent go away (kills the host-mode agent, stops the VM),
//! so it consumes the target.

use std::time::{Duration, Instant};

use supermachine::{Error, ExecBuilder, ExecOutcome, Vm};
use supermachine_e2e::{kill_matching, processes_matching, HostAgent};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// Where the cases run.
enum Target {
    Host(HostAgent),
    Vm(Box<Vm>),
}

impl Target {
    /// `vm.exec(argv)`, or the host-mode agent's `exec(argv)`: both give an [`ExecBuilder`].
    fn exec<const N: usize>(&self, argv: [&str; N]) -> ExecBuilder {
        match self {
            Target::Host(host) => host.agent().exec(argv),
            Target::Vm(vm) => vm.exec(argv),
        }
    }

    fn is_vm(&self) -> bool {
        matches!(self, Target::Vm(_))
    }

    /// How long to wait for guest process work (slow on nested PVM hosts).
    fn settle(&self) -> Duration {
        if self.is_vm() {
            Duration::from_secs(30)
        } else {
            Duration::from_secs(2)
        }
    }

    /// A scratch directory in the agent's filesystem, and what keeps it alive (host mode).
    fn scratch(&self) -> (Option<tempfile::TempDir>, String) {
        match self {
            Target::Host(_) => {
                let dir = tempfile::tempdir().expect("tempdir");
                let path = dir.path().display().to_string();
                (Some(dir), path)
            }
            Target::Vm(_) => (None, "/tmp".to_owned()),
        }
    }

    async fn sh(&self, script: &str) -> ExecOutcome {
        self.exec(["sh", "-c", script])
            .output()
            .await
            .unwrap_or_else(|e| panic!("exec {script:?}: {e}"))
    }

    /// Whether the process whose pid is in `pidfile` is alive, asked from a second exec.
    async fn alive(&self, pidfile: &str) -> bool {
        let out = self.sh(&format!("kill -0 \"$(cat {pidfile})\"")).await;
        out.status.success()
    }
}

/// `let mut cmd = ...; if x { cmd.env(..); }`, `arg`/`args`, `current_dir`, `env_remove`,
/// `env_clear`, and futures that do not borrow the builder.
async fn conditional_builder_calls(t: &Target) {
    let (_keep, dir) = t.scratch();
    let mut cmd = t.exec(["sh"]);
    cmd.arg("-c")
        .arg("echo \"$A:${B-unset}:${HOME-nohome}:$(pwd)\"; echo \"$0 $1\" >&2")
        .args(["zero", "one"]);
    for (key, value, wanted) in [("A", "a", true), ("B", "b", false)] {
        if wanted {
            cmd.env(key, value);
        }
    }
    cmd.current_dir(&dir).env_remove("HOME");
    // The future owns its settings: the builder can change afterwards without affecting it.
    let output = cmd.output();
    cmd.env("A", "changed");
    let out = output.await.expect("output");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("a:unset:nohome:{dir}\n")
    );
    assert_eq!(&out.stderr[..], b"zero one\n");

    // Reused builder, with the later change.
    let out = cmd.output().await.expect("output again");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("changed:"));

    // `let fut = vm.exec(..).arg(..).spawn();` compiles: the temporary builder is not borrowed.
    let spawn = t.exec(["sh", "-c"]).arg("exit 5").spawn();
    let status = spawn.await.expect("spawn").wait().await.expect("wait");
    assert_eq!(status.code(), Some(5));

    // env_clear: only what is set afterwards (on PVM guests also the GLIBC_TUNABLES workaround).
    let mut env = t.exec(["env"]);
    env.env("DROPPED", "x").env_clear().env("ONLY", "this");
    let out = env.output().await.expect("env");
    let vars: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| !line.starts_with("GLIBC_TUNABLES="))
        .map(str::to_owned)
        .collect();
    assert_eq!(vars, ["ONLY=this"], "{out:?}");
}

/// `child.stdin.take()`, `child.stdout.take()`, `id()`, `wait()`.
async fn take_the_pipes_and_wait(t: &Target) {
    let mut child = t
        .exec(["sh", "-c", "read line; echo \"got $line\"; exit 0"])
        .spawn()
        .await
        .expect("spawn");
    assert!(child.id().is_some_and(|pid| pid > 0));
    assert!(child.stderr.is_some());
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let mut stdout = child.stdout.take().expect("stdout is piped");
    assert!(child.stdin.is_none() && child.stdout.is_none());
    stdin.write_all(b"hello\n").await.expect("write");
    drop(stdin);
    let mut text = String::new();
    stdout.read_to_string(&mut text).await.expect("read");
    assert_eq!(text, "got hello\n");
    let status = child.wait().await.expect("wait");
    assert_eq!(status.code(), Some(0));
    assert!(status.success());
    assert_eq!(child.id(), None, "no pid once reaped");
}

/// `kill().await` kills and reaps; `try_wait` then has the status; a second kill is refused.
async fn kill_waits_for_the_exit(t: &Target) {
    let (_keep, dir) = t.scratch();
    let pidfile = format!("{dir}/kill.pid");
    let mut child = t
        .exec([
            "sh",
            "-c",
            &format!("echo $$ > {pidfile}; echo up; exec sleep 100.81"),
        ])
        .spawn()
        .await
        .expect("spawn");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .await
        .expect("read");
    assert_eq!(line, "up\n");
    assert!(t.alive(&pidfile).await);
    child.kill().await.expect("kill");
    let status = child
        .try_wait()
        .expect("try_wait")
        .expect("kill().await has reaped the process");
    assert_eq!((status.code(), status.signal()), (None, Some(9)));
    assert!(!status.success() && !status.timed_out());
    assert_eq!(child.id(), None);
    assert!(matches!(child.kill().await, Err(Error::NotRunning)));
    assert!(matches!(child.start_kill(), Err(Error::NotRunning)));
    assert!(!t.alive(&pidfile).await, "killed means gone");
}

/// Polling `try_wait` until the process exits; `start_kill` + `wait` gives `signal() == 9`.
async fn try_wait_polling_and_start_kill(t: &Target) {
    let mut child = t
        .exec(["sh", "-c", "sleep 0.5; exit 4"])
        .spawn()
        .await
        .expect("spawn");
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "still running"
    );
    let deadline = Instant::now() + t.settle();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "never exited");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!((status.code(), status.signal()), (Some(4), None));
    assert_eq!(status.to_string(), "exit status: 4");
    // Polled again: the same status.
    assert_eq!(child.try_wait().expect("try_wait"), Some(status));

    let mut child = t.exec(["sleep", "100.82"]).spawn().await.expect("spawn");
    child.start_kill().expect("start_kill");
    let status = child.wait().await.expect("wait");
    assert_eq!(status.signal(), Some(9));
    assert_eq!(status.code(), None);
    assert_eq!(status.to_string(), "signal: 9 (SIGKILL)");
}

/// `wait_with_output` closes stdin, collects both streams, and carries the exit code.
async fn wait_with_output_collects_everything(t: &Target) {
    let mut child = t
        .exec(["sh", "-c", "cat; echo err >&2; exit 2"])
        .spawn()
        .await
        .expect("spawn");
    child
        .stdin
        .as_mut()
        .expect("stdin")
        .write_all(b"from stdin\n")
        .await
        .expect("write");
    // Stdin is still held by the child: wait_with_output closes it, so `cat` ends.
    let out = child.wait_with_output().await.expect("wait_with_output");
    assert_eq!(&out.stdout[..], b"from stdin\n");
    assert_eq!(&out.stderr[..], b"err\n");
    assert_eq!(out.status.code(), Some(2));
    assert!(!out.timed_out);

    // A signal death, exactly: not an exit code of 137.
    let out = t.sh("kill -9 $$").await;
    assert_eq!((out.status.code(), out.status.signal()), (None, Some(9)));
    let out = t.sh("exit 137").await;
    assert_eq!((out.status.code(), out.status.signal()), (Some(137), None));
}

/// `kill_on_drop(false)`: the guest process outlives its `ExecChild` (checked from a second
/// exec through its pidfile) and its connection stays open (a stdout handle taken earlier
/// still works) until the agent goes away.
async fn kill_on_drop_false_detaches_until_the_agent_goes(t: Target) {
    let (_keep, dir) = t.scratch();
    let pidfile = format!("{dir}/detached.pid");
    let mut child = t
        .exec([
            "sh",
            "-c",
            &format!("echo $$ > {pidfile}; echo started; exec sleep 100.83"),
        ])
        .kill_on_drop(false)
        .spawn()
        .await
        .expect("spawn");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).await.expect("read");
    assert_eq!(line, "started\n");
    drop(child);
    // Long enough for a kill, had the drop sent one, to land.
    tokio::time::sleep(if t.is_vm() {
        Duration::from_secs(2)
    } else {
        Duration::from_millis(300)
    })
    .await;
    assert!(t.alive(&pidfile).await, "the detached process was killed");
    let mut rest = Vec::new();
    let still_open =
        tokio::time::timeout(Duration::from_millis(300), stdout.read_to_end(&mut rest)).await;
    assert!(
        still_open.is_err(),
        "the connection ended early: {still_open:?}"
    );

    // The agent goes away: the connection ends, and the taken stdout with it.
    match t {
        Target::Host(mut host) => {
            host.kill();
            // A SIGKILLed host-mode agent cannot kill anything: clean its orphan up.
            kill_matching("100.83");
        }
        Target::Vm(vm) => {
            vm.stop().await;
            drop(vm);
        }
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), stdout.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the connection outlived the agent");
}

// ---------------------------------------------------------------------------------------------
// Host mode: one agent per test.

fn host() -> Target {
    Target::Host(HostAgent::start().expect("start the agent in host mode"))
}

macro_rules! host_cases {
    ($($name:ident;)*) => {$(
        #[tokio::test]
        async fn $name() {
            super::$name(&host()).await;
        }
    )*};
}

mod host {
    use super::*;

    host_cases! {
        conditional_builder_calls;
        take_the_pipes_and_wait;
        kill_waits_for_the_exit;
        try_wait_polling_and_start_kill;
        wait_with_output_collects_everything;
    }

    #[tokio::test]
    async fn kill_on_drop_false_detaches_until_the_agent_goes() {
        super::kill_on_drop_false_detaches_until_the_agent_goes(host()).await;
    }

    /// What the agent does when a detached exec's connection ends while the agent lives: the
    /// host side here is a runtime that shuts down (its driver task goes with it), and the
    /// agent kills the process group as for any host that left.
    #[test]
    fn a_detached_exec_ends_with_its_connection() {
        let host = HostAgent::start().expect("agent");
        let agent = host.agent();
        let detached_runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        detached_runtime.block_on(async {
            let child = agent
                .exec(["sleep", "100.84"])
                .kill_on_drop(false)
                .spawn()
                .await
                .expect("spawn");
            drop(child);
            // The driver runs meanwhile: a kill, had the drop sent one, would land.
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(!processes_matching("100.84").is_empty(), "killed at drop");
        });
        let checks = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        drop(detached_runtime);
        let left = checks.block_on(supermachine_e2e::wait_until_gone(
            "100.84",
            Duration::from_secs(3),
        ));
        assert!(
            left.is_empty(),
            "still running after its connection closed: {left:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// In a VM: every case in one test, on one VM.

#[test]
fn in_a_vm() {
    if !supermachine_e2e::kvm_available_or_skip("in_a_vm") {
        return;
    }
    supermachine_e2e::shared_runtime().block_on(async {
        let config = supermachine_e2e::test_vm_config().expect("VM config");
        let vm = Vm::start(config).await.expect("start the VM");
        eprintln!("VM ready in {:.1} s", vm.boot_time().as_secs_f64());
        let t = Target::Vm(Box::new(vm));
        let step = |name: &str| eprintln!("in_a_vm: {name}");
        step("conditional_builder_calls");
        conditional_builder_calls(&t).await;
        step("take_the_pipes_and_wait");
        take_the_pipes_and_wait(&t).await;
        step("kill_waits_for_the_exit");
        kill_waits_for_the_exit(&t).await;
        step("try_wait_polling_and_start_kill");
        try_wait_polling_and_start_kill(&t).await;
        step("wait_with_output_collects_everything");
        wait_with_output_collects_everything(&t).await;
        step("kill_on_drop_false_detaches_until_the_agent_goes");
        kill_on_drop_false_detaches_until_the_agent_goes(t).await;
    });
}
