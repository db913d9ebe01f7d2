//! A VM running its execs inside a root filesystem image (`VmConfig::rootfs`): a real ext4
//! image made here from the host's static busybox (with files of chosen owners, modes, links),
//! attached read-only over virtio-blk, mounted by the guest agent under a tmpfs overlay.
//!
//! Needs `/dev/kvm`, root (to give image files arbitrary owners) and `mkfs.ext4`; skips
//! without `/dev/kvm` only when `SUPERMACHINE_REQUIRE_KVM` is unset.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use supermachine::{Vm, VmConfig};

/// Builds `dir/rootfs.ext4`: busybox with every applet in /bin, a minimal /etc, and /data with
/// an owned setuid file, a hard link and a symlink.
fn build_image(dir: &Path) -> PathBuf {
    let tree = dir.join("tree");
    for d in ["bin", "etc", "data", "root", "tmp"] {
        std::fs::create_dir_all(tree.join(d)).expect("mkdir");
    }
    let busybox = supermachine_e2e::static_busybox().expect("static busybox");
    std::fs::copy(&busybox, tree.join("bin/busybox")).expect("copy busybox");
    let list = Command::new(&busybox)
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.is_empty() {
            std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet)).expect("applet");
        }
    }
    std::fs::write(tree.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").expect("passwd");
    std::fs::write(tree.join("data/owned"), b"owned\n").expect("write");
    // chown first: it clears the setuid bit.
    std::os::unix::fs::chown(tree.join("data/owned"), Some(1234), Some(5678)).expect("chown");
    std::fs::set_permissions(
        tree.join("data/owned"),
        std::fs::Permissions::from_mode(0o4750),
    )
    .expect("chmod");
    std::fs::hard_link(tree.join("data/owned"), tree.join("data/hardlink")).expect("link");
    std::os::unix::fs::symlink("owned", tree.join("data/symlink")).expect("symlink");

    let image = dir.join("rootfs.ext4");
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "rootfs", "-d"])
        .arg(&tree)
        .arg(&image)
        .arg("32M")
        .status()
        .expect("mkfs.ext4");
    assert!(status.success(), "mkfs.ext4 failed");
    image
}

fn config(image: &Path) -> VmConfig {
    VmConfig::new()
        .kernel(supermachine_e2e::guest_kernel().expect("kernel"))
        .agent(supermachine_e2e::agent_binary().expect("agent"))
        .rootfs(image)
}

async fn sh(vm: &Vm, script: &str) -> (i32, String) {
    supermachine_e2e::exec_output(vm.exec(["sh", "-c", script])).await
}

#[test]
fn execs_run_in_the_image_and_writes_stay_in_the_vm() {
    if !supermachine_e2e::kvm_available_or_skip("execs_run_in_the_image_and_writes_stay_in_the_vm")
    {
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    supermachine_e2e::shared_runtime().block_on(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let image = build_image(dir.path());
        let before = supermachine_e2e::sha256sum(&image);
        // Every run makes a new image (mkfs stamps UUIDs and times), hence a new snapshot
        // cache entry; remove it at the end so CI caches do not grow.
        let cache = supermachine::cache::root()
            .expect("cache")
            .join("snapshots");
        let entries = || -> Vec<PathBuf> {
            std::fs::read_dir(&cache)
                .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
                .unwrap_or_default()
        };
        let old = entries();

        let vm = Vm::start(config(&image)).await.expect("start");
        // The image's files, owners, modes and links, as the guest sees them.
        let (code, out) = sh(
            &vm,
            "stat -c '%u:%g %a %h' /data/owned; readlink /data/symlink; cat /data/hardlink; \
             ls -di /data/owned /data/hardlink | cut -d' ' -f1 | uniq | wc -l",
        )
        .await;
        assert_eq!(code, 0, "{out}");
        assert_eq!(out, "1234:5678 4750 2\nowned\nowned\n1", "{out}");
        // The runtime files and mounts a container has.
        let (code, out) = sh(
            &vm,
            "grep -c '^127.0.0.1.*localhost' /etc/hosts; test -f /etc/resolv.conf && echo resolv; \
             grep -c ' / overlay ' /proc/mounts; test -c /dev/null && echo dev; \
             test -d /dev/pts && echo pts; test -d /proc/self && echo proc",
        )
        .await;
        assert_eq!(code, 0, "{out}");
        assert_eq!(out, "1\nresolv\n1\ndev\npts\nproc", "{out}");
        // Writes land in the VM's own layer.
        assert_eq!(
            sh(
                &vm,
                "echo mine > /data/new && rm /data/owned && cat /data/new"
            )
            .await,
            (0, "mine".into())
        );

        // Another VM of the same image (restored from the snapshot cache) sees none of it.
        let other = Vm::start(config(&image)).await.expect("second start");
        assert!(other.start_timings().restored, "the second start restores");
        assert_eq!(
            sh(&other, "test -e /data/new || cat /data/owned").await,
            (0, "owned".into())
        );
        drop((vm, other));
        assert_eq!(
            supermachine_e2e::sha256sum(&image),
            before,
            "the image was modified"
        );
        for new in entries().into_iter().filter(|e| !old.contains(e)) {
            let _ = std::fs::remove_dir_all(&new).or_else(|_| std::fs::remove_file(&new));
        }
    });
}

#[test]
fn unreadable_rootfs_is_a_config_error() {
    let err = supermachine_e2e::shared_runtime()
        .block_on(Vm::start(
            VmConfig::new()
                .kernel(supermachine_e2e::guest_kernel().expect("kernel"))
                .agent(supermachine_e2e::agent_binary().expect("agent"))
                .rootfs("/nonexistent/rootfs.ext4"),
        ))
        .expect_err("start fails");
    assert!(
        matches!(
            err,
            supermachine::Error::InvalidConfig(supermachine::ConfigError::RootfsUnreadable { .. })
        ),
        "{err}"
    );
}
