//! The exec test cases of `exec_cases/` against a real microVM over vsock: the project's guest
//! kernel, the agent as PID 1, a static busybox as the userland.
//!
//! The VM boots once per test binary and every test shares it (a cold boot takes 20–100 s on
//! the nested PVM hosts this runs on, and each guest fork+exec about 0.5–2 s), so the cases run
//! with smaller sizes than in host mode. Needs `/dev/kvm`; skips without it only when
//! `SUPERMACHINE_REQUIRE_KVM` is unset.

mod exec_cases;

use exec_cases::Target;
use supermachine::Vm;

/// The runtime every test runs on: the VM's devices live on the runtime it was started in, so
/// it must outlive every test.
fn runtime() -> &'static tokio::runtime::Runtime {
    supermachine_e2e::shared_runtime()
}

/// The shared VM, booted by the first test that needs it. A failed boot is reported by every
/// test (with the console tail), not retried.
async fn shared_vm() -> &'static Vm {
    static VM: tokio::sync::OnceCell<Result<Vm, String>> = tokio::sync::OnceCell::const_new();
    let vm = VM
        .get_or_init(|| async {
            let config = supermachine_e2e::test_vm_config()?;
            let vm = Vm::start(config).await.map_err(|e| e.to_string())?;
            eprintln!("shared VM ready in {:.1} s", vm.boot_time().as_secs_f64());
            Ok(vm)
        })
        .await;
    match vm {
        Ok(vm) => vm,
        Err(e) => panic!("the shared test VM did not start: {e}"),
    }
}

/// One `#[test]` per shared case, against the shared VM.
macro_rules! vm_cases {
    ($($name:ident $(($($arg:expr),*))?;)*) => {$(
        #[test]
        fn $name() {
            if !supermachine_e2e::kvm_available_or_skip(stringify!($name)) {
                return;
            }
            runtime().block_on(async {
                let target = Target::Vm(shared_vm().await);
                exec_cases::$name(&target $($(, $arg)*)?).await;
            });
        }
    )*};
}

vm_cases! {
    exit_codes_are_reported;
    stdout_and_stderr_stay_separate;
    stdin_streams_through_cat(5, 64 * 1024);
    pty_sees_initial_size_and_resize;
    sigterm_reaches_a_trapping_shell;
    timeout_kills_the_whole_process_group;
    cancellation_token_kills_promptly;
    select_cancellation_kills_promptly;
    dropping_the_child_kills_the_guest_process;
    concurrent_execs(8);
    staged_files_and_chain;
    missing_program_is_a_typed_error_naming_it;
    empty_argv_is_rejected;
    control_actions(64 * 1024);
    null_stdio_and_abort;
    connect_tcp_reaches_a_loopback_server_with_half_close;
}
