//! PVM is a special case, and only there: the guest workarounds for PVM hosts (the
//! `clearcpuid=`/`maxcpus=1`/RCU-stall command line, the agent's PVM flag and its glibc tunable)
//! are present in a guest on a PVM host (`/sys/module/kvm_pvm` exists) and absent everywhere
//! else, e.g. in the nested lane (`lane/ci.sh`), where the guest keeps XSAVE and the other CPU
//! features the host offers. Checked from inside the guest.
//!
//! Where the guest has AVX, its YMM registers must survive a snapshot: a guest program keeps a
//! pattern in all sixteen of them, spinning, while the VM is snapshotted and restored, and checks
//! them in the restored VM (`guest_programs/ymm_probe.S`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use supermachine::Vm;
use supermachine_e2e::exec_output;

/// Kernel parameters only a PVM host adds (`supermachine-vmm/guest/pvm-cmdline.txt`).
const PVM_ONLY_PARAMETERS: [&str; 4] = [
    "clearcpuid=",
    "maxcpus=1",
    "rcupdate.rcu_cpu_stall_suppress=1",
    "clocksource=kvm-clock",
];
/// The agent's PVM flag on the guest command line.
const PVM_AGENT_FLAG: &str = "supermachine.pvm=1";

/// The CPU feature flags of the first CPU in a `/proc/cpuinfo`.
fn cpu_flags(cpuinfo: &str) -> Vec<String> {
    cpuinfo
        .lines()
        .find(|line| line.starts_with("flags"))
        .and_then(|line| line.split_once(':'))
        .map(|(_, flags)| flags.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

#[test]
fn pvm_workarounds_are_applied_on_pvm_hosts_only() {
    if !supermachine_e2e::kvm_available_or_skip("pvm_workarounds_are_applied_on_pvm_hosts_only") {
        return;
    }
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    supermachine_e2e::shared_runtime().block_on(async {
        let vm = Vm::start(supermachine_e2e::test_vm_config().expect("config"))
            .await
            .expect("start");
        let cmdline = vm
            .agent()
            .read_file("/proc/cmdline")
            .await
            .expect("read /proc/cmdline");
        let cmdline = String::from_utf8_lossy(&cmdline).trim().to_owned();
        let guest_cpuinfo = vm
            .agent()
            .read_file("/proc/cpuinfo")
            .await
            .expect("read /proc/cpuinfo");
        let guest_flags = cpu_flags(&String::from_utf8_lossy(&guest_cpuinfo));
        let host_flags = cpu_flags(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default());
        let (_, env) = exec_output(vm.exec(["env"])).await;
        let tunables = env.lines().any(|l| l.starts_with("GLIBC_TUNABLES="));
        let notable = ["xsave", "avx", "avx2", "popcnt", "smep", "smap", "erms"];
        let shown = |flags: &[String]| -> Vec<&str> {
            notable
                .iter()
                .copied()
                .filter(|f| flags.iter().any(|g| g == f))
                .collect()
        };
        eprintln!(
            "{}: guest command line: {cmdline}\nhost CPU offers {:?}; guest sees {:?}; \
             GLIBC_TUNABLES in exec env: {tunables}",
            supermachine_e2e::lane(),
            shown(&host_flags),
            shown(&guest_flags),
        );
        vm.stop().await;

        for parameter in PVM_ONLY_PARAMETERS.iter().chain([&PVM_AGENT_FLAG]) {
            assert_eq!(
                cmdline.contains(parameter),
                pvm,
                "{parameter} on the guest command line (PVM host: {pvm}): {cmdline}"
            );
        }
        assert_eq!(
            tunables, pvm,
            "the agent's PVM glibc tunable (PVM host: {pvm})"
        );
        if pvm {
            assert!(
                !guest_flags.iter().any(|f| f == "xsave"),
                "PVM hides XSAVE from the guest: {guest_flags:?}"
            );
        } else {
            // Everywhere else the guest keeps what the host CPU offers.
            for feature in ["xsave", "avx", "avx2"] {
                if host_flags.iter().any(|f| f == feature) {
                    assert!(
                        guest_flags.iter().any(|f| f == feature),
                        "the host offers {feature} but the guest does not see it: {guest_flags:?}"
                    );
                }
            }
        }
    });
}

/// Assembles `tests/guest_programs/ymm_probe.S` into a static binary under `dir` (needs `cc`,
/// which the kernel build installs with build-essential).
fn build_ymm_probe(dir: &Path) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest_programs/ymm_probe.S");
    let out = dir.join("ymm_probe");
    let status = std::process::Command::new("cc")
        .args(["-nostdlib", "-static", "-o"])
        .arg(&out)
        .arg(&source)
        .status()
        .unwrap_or_else(|e| panic!("cc (build-essential) to assemble {}: {e}", source.display()));
    assert!(
        status.success(),
        "assembling {}: {status}",
        source.display()
    );
    out
}

/// Reads a guest file, or `None` while it does not exist.
async fn guest_file(vm: &Vm, path: &str) -> Option<String> {
    vm.agent()
        .read_file(path)
        .await
        .ok()
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
}

/// Polls a guest file until it exists, for at most `limit`.
async fn wait_for_guest_file(vm: &Vm, path: &str, limit: Duration) -> Option<String> {
    let start = Instant::now();
    loop {
        // The shell creates the file before it writes the status into it: empty is not yet.
        if let Some(content) = guest_file(vm, path).await.filter(|c| !c.is_empty()) {
            return Some(content);
        }
        if start.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A guest program holding values in YMM registers while its VM is snapshotted finds the same
/// values there after the restore: the vCPUs' XSAVE state (AVX upper halves included) is saved and
/// restored, not only the legacy FPU/SSE part. One spinning probe per vCPU, pinned, so the values
/// are live in each vCPU's registers at the pause rather than in a saved task context.
#[test]
fn ymm_registers_survive_a_snapshot() {
    const TEST: &str = "ymm_registers_survive_a_snapshot";
    if !supermachine_e2e::kvm_available_or_skip(TEST) {
        return;
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        // pvm_workarounds_are_applied_on_pvm_hosts_only asserts that the guest has no XSAVE here.
        eprintln!("{TEST}: not applicable on a PVM host, which hides XSAVE/AVX from the guest");
        return;
    }
    let work = tempfile::tempdir().expect("temp dir");
    let probe = build_ymm_probe(work.path());
    const VCPUS: u32 = 2;
    supermachine_e2e::shared_runtime().block_on(async {
        let config = supermachine_e2e::test_vm_config()
            .expect("config")
            .vcpus(VCPUS)
            .snapshot_cache(false)
            .add_file("/bin/ymm_probe", probe);
        let vm = Vm::start(config).await.expect("start");
        let cpuinfo = guest_file(&vm, "/proc/cpuinfo").await.unwrap_or_default();
        if !cpu_flags(&cpuinfo).iter().any(|f| f == "avx") {
            let host = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
            assert!(
                !cpu_flags(&host).iter().any(|f| f == "avx"),
                "the host offers AVX but the guest does not see it"
            );
            eprintln!("{TEST}: not applicable: this CPU has no AVX");
            vm.stop().await;
            return;
        }

        // Each probe in its own directory and session (so it outlives the exec that starts it,
        // and the restored VM's reset of in-flight exec connections), pinned to one vCPU. The
        // exec waits for the probe's ready file: ending earlier, it would take the probe's group
        // down with it before `setsid` has moved the probe out.
        for cpu in 0..VCPUS {
            let script = format!(
                "mkdir -p /tmp/p{cpu} && cd /tmp/p{cpu} && \
                 {{ setsid sh -c 'taskset -c {cpu} /bin/ymm_probe; echo $? > exit' \
                 </dev/null >/dev/null 2>&1 & }} && \
                 while [ ! -e ymm-ready ] && [ ! -e exit ]; do sleep 0.05; done; \
                 [ -e ymm-ready ] || {{ echo probe exited $(cat exit); exit 1; }}"
            );
            let started = tokio::time::timeout(
                Duration::from_secs(60),
                exec_output(vm.exec(["sh", "-c", &script])),
            )
            .await
            .unwrap_or_else(|_| panic!("probe {cpu} did not start within 60 s"));
            assert_eq!(started, (0, String::new()), "probe {cpu} start");
        }
        // Let the probes spin, then snapshot while they do: none may have exited yet.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let snapshot = vm
            .snapshot(work.path().join("snap"))
            .await
            .expect("snapshot with the probes spinning");
        for cpu in 0..VCPUS {
            assert_eq!(
                guest_file(&vm, &format!("/tmp/p{cpu}/exit")).await,
                None,
                "probe {cpu} ended before the snapshot"
            );
        }
        vm.stop().await;

        let restored = Vm::restore(&snapshot).await.expect("restore");
        // The probes run on in the restored VM; let them check their registers for a while.
        tokio::time::sleep(Duration::from_millis(500)).await;
        for cpu in 0..VCPUS {
            restored
                .agent()
                .write_file(format!("/tmp/p{cpu}/ymm-stop"), Vec::new(), None)
                .await
                .expect("write the stop file");
        }
        for cpu in 0..VCPUS {
            let exit = wait_for_guest_file(
                &restored,
                &format!("/tmp/p{cpu}/exit"),
                Duration::from_secs(60),
            )
            .await;
            assert_eq!(
                exit.as_deref(),
                Some("0"),
                "probe {cpu} after the restore: 0 = every YMM register held its pattern, \
                 1 = one differed, none = it never saw the stop file ({})",
                supermachine_e2e::lane()
            );
        }
        eprintln!(
            "{TEST}: {VCPUS} probes kept ymm0-15 across snapshot and restore ({})",
            supermachine_e2e::lane()
        );
        restored.stop().await;
    });
}
