//! Shared helpers for the tests that boot real guests: the kernel (built or taken from the cache
//! by `guest/build-kernel.sh`), a busybox initramfs generated at test time, and console polling.

#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use supermachine_vmm::Machine;

/// Whether tests needing `/dev/kvm` should run. They may skip only when `/dev/kvm` is absent
/// and `SUPERMACHINE_REQUIRE_KVM` is unset; with the variable set a missing `/dev/kvm` fails.
pub fn kvm_available_or_skip(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var_os("SUPERMACHINE_REQUIRE_KVM").is_some() {
        panic!("{test}: /dev/kvm is missing but SUPERMACHINE_REQUIRE_KVM is set");
    }
    eprintln!("{test}: skipped (no /dev/kvm; set SUPERMACHINE_REQUIRE_KVM=1 to fail instead)");
    false
}

/// The guest kernel: `$SUPERMACHINE_KERNEL`, or what `guest/build-kernel.sh` prints (a cache
/// hit is instant; a miss builds the kernel, several minutes).
pub fn kernel() -> PathBuf {
    if let Some(k) = std::env::var_os("SUPERMACHINE_KERNEL") {
        return PathBuf::from(k);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build-kernel.sh");
    let out = Command::new(&script)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        path.is_file(),
        "build-kernel.sh printed {path:?}, not a file"
    );
    path
}

/// A generated initramfs; the temp dir goes away with it.
pub struct Initramfs {
    _dir: tempfile::TempDir,
    /// The uncompressed newc cpio archive.
    pub path: PathBuf,
}

fn find_busybox() -> PathBuf {
    for p in ["/bin/busybox", "/usr/bin/busybox"] {
        let p = Path::new(p);
        let is_static = Command::new("file")
            .arg("-L")
            .arg(p)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("statically linked"))
            // Without `file`, trust Debian's busybox-static layout.
            .unwrap_or(true);
        if p.is_file() && is_static {
            return p.to_path_buf();
        }
    }
    panic!("a static busybox is needed: apt-get install -y busybox-static cpio");
}

/// Builds an initramfs whose `/init` is `init_script` (a `#!/bin/sh` script) with a static
/// busybox in `/bin` and links for `sh` and every applet named in the script.
///
/// Kept small on purpose: on PVM hosts the guest kernel unpacks an initramfs slowly (every new
/// page and inode goes through trap-and-emulate), so all ~270 applet links cost several seconds
/// of boot. Uncompressed for the same reason. `/dev/console` comes from the kernel's built-in
/// initramfs.
pub fn build_initramfs(init_script: &str) -> Initramfs {
    let busybox = find_busybox();
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().join("root");
    for d in ["bin", "dev", "proc", "sys", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(&busybox, root.join("bin/busybox")).unwrap();
    let list = Command::new(&busybox).arg("--list").output().unwrap();
    let words: std::collections::HashSet<&str> = init_script
        .split(|c: char| !(c.is_ascii_alphanumeric() || "[_.-".contains(c)))
        .chain(["sh"])
        .collect();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && words.contains(applet) {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
    }
    let init = root.join("init");
    std::fs::write(&init, init_script).unwrap();
    std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let path = dir.path().join("initramfs.cpio");
    let status = Command::new("sh")
        .arg("-c")
        .arg(r#"cd "$1" && find . -print0 | cpio --null -o -H newc -R 0:0 --quiet > "$2""#)
        .arg("sh")
        .arg(&root)
        .arg(&path)
        .status()
        .expect("running cpio (apt-get install -y cpio)");
    assert!(status.success(), "cpio failed");
    Initramfs { _dir: dir, path }
}

/// Polls the console until it contains `needle`; returns when it appeared, or `None` on timeout
/// or if the machine ended first.
pub async fn wait_for_console(
    machine: &Machine,
    needle: &str,
    timeout: Duration,
) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    let needle = needle.as_bytes();
    loop {
        let console = machine.console();
        if console.windows(needle.len()).any(|w| w == needle) {
            return Some(Instant::now());
        }
        if machine.exit_status().is_some() || Instant::now() > deadline {
            // One last look: output may have landed just before the exit.
            let console = machine.console();
            return console
                .windows(needle.len())
                .any(|w| w == needle)
                .then(Instant::now);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// This process's own threads. KVM runs per-VM worker threads (e.g. `kvm-nx-lpage-recovery`,
/// started once the VM's vCPUs run, on hosts that need it) inside the thread group of the
/// process that owns the VM; they belong to the VM fd and end with it, so they are not ours.
pub fn count_own_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(Result::ok)
        .filter(|task| {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            !comm.starts_with("kvm-")
        })
        .count()
}

/// Entries in a /proc/self directory (threads: `task`, descriptors: `fd`).
pub fn count_proc_self(what: &str) -> usize {
    std::fs::read_dir(format!("/proc/self/{what}"))
        .unwrap()
        .count()
}
