//! PVM is a special case, and only there: the guest workarounds for PVM hosts (the
//! `clearcpuid=`/`maxcpus=1`/RCU-stall command line, the agent's PVM flag and its glibc tunable)
//! are present in a guest on a PVM host (`/sys/module/kvm_pvm` exists) and absent everywhere
//! else, e.g. in the nested lane (`lane/ci.sh`), where the guest keeps XSAVE and the other CPU
//! features the host offers. Checked from inside the guest.

use supermachine::Vm;
use supermachine_e2e::exec_output;

/// Kernel parameters only a PVM host adds (`supermachine-vmm/guest/pvm-cmdline.txt`).
const PVM_ONLY_PARAMETERS: [&str; 3] = [
    "clearcpuid=",
    "maxcpus=1",
    "rcupdate.rcu_cpu_stall_suppress=1",
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
