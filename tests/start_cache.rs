//! A start's inputs are read, hashed and packed once: file digests are remembered by `stat`
//! stamp (`cache/file_digest.rs`) and an initramfs built before is found by its recipe
//! (`vm/initramfs/recipe.rs`), so a CLI start does not hash the kernel and pack the agent
//! again. None of that may hand a start a stale archive when a file changes. No VM runs here.

use std::path::Path;
use std::time::Duration;

use supermachine::VmConfig;

/// How long a file must be left alone before its digest is remembered (the module's 2 s, and
/// a margin).
const SETTLE: Duration = Duration::from_millis(2_200);

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn archive(config: &VmConfig) -> (std::path::PathBuf, Vec<u8>) {
    let (_kernel, initramfs, _cmdline) = supermachine::boot_files(config).unwrap();
    let bytes = std::fs::read(&initramfs).unwrap();
    (initramfs, bytes)
}

fn entries(dir: &Path, suffix: &str) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(suffix))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn a_changed_agent_or_file_gets_its_own_initramfs_and_a_reverted_one_the_first() {
    let cache = tempfile::tempdir().unwrap();
    // The only test in this binary: nothing else reads the variable concurrently.
    std::env::set_var("SUPERMACHINE_CACHE_DIR", cache.path());
    let dir = tempfile::tempdir().unwrap();
    let (kernel, agent, conf) = (
        dir.path().join("vmlinux"),
        dir.path().join("agent"),
        dir.path().join("app.conf"),
    );
    std::fs::write(&kernel, b"kernel").unwrap();
    std::fs::write(&agent, b"agent-v1").unwrap();
    std::fs::write(&conf, b"conf-v1").unwrap();
    std::thread::sleep(SETTLE);
    let config = VmConfig::new()
        .kernel(&kernel)
        .agent(&agent)
        .add_file("/etc/app.conf", &conf);

    let (first, bytes) = archive(&config);
    assert!(contains(&bytes, b"agent-v1") && contains(&bytes, b"conf-v1"));
    assert_eq!(
        entries(&cache.path().join("digests"), ""),
        2,
        "agent and file"
    );
    assert_eq!(entries(&cache.path().join("initramfs"), ".recipe"), 1);
    assert_eq!(archive(&config).0, first, "found again");

    // Same length, new bytes: a new recipe, a new archive.
    std::fs::write(&agent, b"agent-v2").unwrap();
    let (second, bytes) = archive(&config);
    assert_ne!(second, first);
    assert!(contains(&bytes, b"agent-v2") && !contains(&bytes, b"agent-v1"));

    std::fs::write(&conf, b"conf-v2").unwrap();
    let (third, bytes) = archive(&config);
    assert_ne!(third, second);
    assert!(contains(&bytes, b"agent-v2") && contains(&bytes, b"conf-v2"));

    // The old bytes back under new stamps: the first archive, unchanged.
    std::fs::write(&agent, b"agent-v1").unwrap();
    std::fs::write(&conf, b"conf-v1").unwrap();
    let (again, bytes) = archive(&config);
    assert_eq!(again, first);
    assert!(contains(&bytes, b"agent-v1") && contains(&bytes, b"conf-v1"));
}
