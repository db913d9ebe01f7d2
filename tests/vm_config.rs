//! `Vm::start` refuses what cannot work with typed errors that say how to fix it, before
//! anything is created: bad sizes, missing kernel or agent, and no usable `/dev/kvm`.

use std::process::Command;

use supermachine::{ConfigError, Error, Vm, VmConfig};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A config whose kernel and agent exist (their contents do not matter: validation fails first).
fn config_with_files(dir: &tempfile::TempDir) -> VmConfig {
    std::fs::write(dir.path().join("vmlinux"), b"kernel").unwrap();
    std::fs::write(dir.path().join("agent"), b"agent").unwrap();
    VmConfig::new()
        .kernel(dir.path().join("vmlinux"))
        .agent(dir.path().join("agent"))
}

#[test]
fn invalid_configs_fail_with_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let base = config_with_files(&dir);
    let rt = runtime();
    let start = |config: VmConfig| rt.block_on(Vm::start(config)).err().unwrap();

    assert!(matches!(
        start(base.clone().vcpus(0)),
        Error::InvalidConfig(ConfigError::NoVcpus)
    ));
    let small = start(base.clone().memory_mib(8));
    assert!(
        matches!(
            small,
            Error::InvalidConfig(ConfigError::MemoryTooSmall { mib: 8, .. })
        ),
        "{small}"
    );
    let report = supermachine::Report(&small).to_string();
    assert!(report.contains("at least 64 MiB"), "{report}");
    let missing = start(base.clone().kernel("/nonexistent/vmlinux"));
    assert!(
        matches!(
            missing,
            Error::InvalidConfig(ConfigError::KernelUnreadable { .. })
        ),
        "{missing}"
    );
    assert!(supermachine::Report(&missing)
        .to_string()
        .contains("/nonexistent/vmlinux"));
    let missing = start(base.clone().agent("/nonexistent/agent"));
    assert!(
        matches!(
            missing,
            Error::InvalidConfig(ConfigError::AgentUnreadable { .. })
        ),
        "{missing}"
    );
    let bad_file = start(base.add_file("relative/path", dir.path().join("agent")));
    assert!(
        matches!(bad_file, Error::InvalidConfig(ConfigError::Initramfs(_))),
        "{bad_file}"
    );
}

/// Child half of `missing_dev_kvm_is_reported_with_a_fix`: runs in a mount namespace where
/// `/dev` is an empty tmpfs.
#[test]
fn child_start_without_dev_kvm() {
    if std::env::var_os("SM_NO_KVM_CHILD").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let result = runtime().block_on(Vm::start(config_with_files(&dir)));
    match result {
        Err(Error::HypervisorUnavailable(message)) => println!("TYPED-ERROR: {message}"),
        other => panic!("expected HypervisorUnavailable, got {other:?}"),
    }
}

#[test]
fn missing_dev_kvm_is_reported_with_a_fix() {
    // Hiding /dev/kvm needs a private mount namespace, i.e. root (as in CI) and unshare(1).
    let is_root = nix_is_root();
    let has_unshare = Command::new("unshare").arg("--help").output().is_ok();
    if !is_root || !has_unshare {
        eprintln!("skipped: needs root and unshare(1) to hide /dev/kvm");
        return;
    }
    let me = std::env::current_exe().unwrap();
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(r#"mount -t tmpfs none /dev && exec "$0" --exact child_start_without_dev_kvm --nocapture"#)
        .arg(&me)
        .env("SM_NO_KVM_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("TYPED-ERROR: "))
        .unwrap_or_else(|| panic!("no typed error in {stdout}"));
    assert!(line.contains("/dev/kvm"), "{line}");
    assert!(line.contains("Fix:"), "{line}");
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
