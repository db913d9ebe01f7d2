//! Boots the project's guest kernel with a busybox initramfs on this host's /dev/kvm.
//!
//! Boots are slow on PVM hosts (~10 s each), so there are only two, run one after the other.

mod support;

use std::time::{Duration, Instant};

use supermachine_vmm::{ExitReason, Machine, MachineConfig};

/// Serialises the boots: two guests at once on a small host distort the timing and gain nothing.
static ONE_BOOT_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

const MARKER: &str = "SM-BOOT-MARKER";

fn config(initramfs: &std::path::Path) -> MachineConfig {
    let mut c = MachineConfig::new(support::kernel());
    c.memory_mib = 256;
    c.initramfs = Some(initramfs.to_path_buf());
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_to_init_and_exits_with_reset() {
    if !support::kvm_available_or_skip("boots_to_init_and_exits_with_reset") {
        return;
    }
    let _one = ONE_BOOT_AT_A_TIME.lock().await;
    let initramfs = support::build_initramfs(&format!(
        r#"#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
echo "{MARKER} uptime=$(cut -d' ' -f1 /proc/uptime)"
echo "SM: kernel $(uname -r), cmdline: $(cat /proc/cmdline)"
echo "SM: $(grep -c ^processor /proc/cpuinfo) cpu(s), $(grep MemTotal /proc/meminfo)"
reboot -f
"#
    ));
    let config = config(&initramfs.path);

    let t0 = Instant::now();
    let machine = Machine::start(config).expect("machine starts");
    let started = t0.elapsed();
    let seen = support::wait_for_console(&machine, MARKER, BOOT_TIMEOUT).await;
    let console = String::from_utf8_lossy(&machine.console()).into_owned();
    let Some(seen) = seen else {
        panic!(
            "marker not seen; exit: {:?}\n--- console ---\n{console}",
            machine.exit_status()
        );
    };
    eprintln!(
        "boot time: config -> marker on console {:.2} s (Machine::start returned after {:.1} ms)",
        (seen - t0).as_secs_f64(),
        started.as_secs_f64() * 1e3
    );

    let exit = tokio::time::timeout(Duration::from_secs(60), machine.wait_exit())
        .await
        .unwrap_or_else(|_| panic!("no exit after reboot -f\n--- console ---\n{console}"));
    eprintln!(
        "exit after {:.2} s: {}",
        t0.elapsed().as_secs_f64(),
        exit.reason
    );
    assert_eq!(exit.reason, ExitReason::Reset, "{exit}");
    let console = String::from_utf8_lossy(&machine.console()).into_owned();
    assert!(console.contains("SM: kernel"), "{console}");
    assert!(console.contains("console=ttyS0"), "{console}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_panic_is_reported_with_the_console_tail() {
    if !support::kvm_available_or_skip("kernel_panic_is_reported_with_the_console_tail") {
        return;
    }
    let _one = ONE_BOOT_AT_A_TIME.lock().await;
    // The guest kernel has no CONFIG_MAGIC_SYSRQ, so panic by letting PID 1 exit.
    let initramfs = support::build_initramfs(
        r#"#!/bin/sh
echo "SM-PANIC-TEST: init exiting"
# Let the tty drain first: the panic resets at once, dropping unsent tty output.
sleep 1
exit 3
"#,
    );
    let t0 = Instant::now();
    let machine = Machine::start(config(&initramfs.path)).expect("machine starts");
    let exit = tokio::time::timeout(BOOT_TIMEOUT, machine.wait_exit())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no exit after the panic\n--- console ---\n{}",
                String::from_utf8_lossy(&machine.console())
            )
        });
    eprintln!(
        "panic exit after {:.2} s: {}",
        t0.elapsed().as_secs_f64(),
        exit.reason
    );
    match &exit.reason {
        ExitReason::Panic { message } => {
            assert!(message.contains("Attempted to kill init"), "{exit}")
        }
        other => panic!("expected a panic, got {other:?}\n{exit}"),
    }
    assert!(exit.console_tail.contains("SM-PANIC-TEST"), "{exit}");
    assert!(
        exit.console_tail.contains("Kernel panic - not syncing"),
        "{exit}"
    );
}
