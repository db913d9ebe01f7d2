//! OCI images running as VMs, end to end: images made here from real files, pushed to a real
//! local registry (`docker-registry`), pulled with `Image::pull`, turned into an ext4 rootfs
//! and run with `VmConfig::image` — the image config's `Env`, `WorkingDir`, `User` (resolved
//! from the image's own `/etc/passwd`) and `Entrypoint` + `Cmd` honoured in the guest.
//!
//! Needs `/dev/kvm`, root (rootfs images keep the layers' owners), `docker-registry`, `skopeo`
//! and, for the Debian test, `debootstrap` with a Debian mirror (once; the result is cached).

use std::path::Path;

use supermachine::{Image, Vm, VmConfig};
use supermachine_e2e::exec_output as out;
use supermachine_e2e::images::{self, LayerBlob, TarBuilder};
use supermachine_e2e::registry::Registry;

fn vm_config(image: Image) -> VmConfig {
    VmConfig::new()
        .kernel(supermachine_e2e::guest_kernel().expect("kernel"))
        .agent(supermachine_e2e::agent_binary().expect("agent"))
        .image(image)
}

/// busybox with a non-root user `app` (1234:5678) whose home is the working dir, and `/data`
/// with an owned setuid file, links and a whiteout across two layers.
fn app_image(dir: &Path) -> images::WrittenImage {
    let busybox =
        std::fs::read(supermachine_e2e::static_busybox().expect("busybox")).expect("read");
    let mut tar = TarBuilder::new();
    tar.busybox(
        &busybox,
        [
            "sh", "echo", "id", "pwd", "cat", "touch", "ls", "stat", "readlink", "test", "uniq",
            "wc",
        ],
    )
    .skeleton(b"root:x:0:0:root:/root:/bin/sh\napp:x:1234:5678:app:/home/app:/bin/sh\n")
    .file("etc/group", b"root:x:0:\napp:x:5678:\n", 0o644, 0, 0)
    .dir("home", 0o755, 0, 0)
    .dir("home/app", 0o755, 1234, 5678)
    .dir("data", 0o755, 0, 0)
    .file("data/owned", b"owned\n", 0o4750, 1234, 5678)
    .hardlink("data/hardlink", "data/owned")
    .symlink("data/symlink", "owned", 1234, 5678)
    .file("data/gone", b"deleted by the next layer\n", 0o644, 0, 0);
    let base = LayerBlob::gzip(tar.finish()).expect("gzip");
    let mut tar = TarBuilder::new();
    tar.dir("data", 0o755, 0, 0)
        .file("data/.wh.gone", b"", 0o644, 0, 0)
        .hardlink("data/hardlink2", "data/owned");
    let top = LayerBlob::tar(tar.finish());
    images::write_oci_layout(
        dir,
        "v1",
        &[base, top],
        serde_json::json!({
            "Env": ["PATH=/bin", "GREETING=hello"],
            "WorkingDir": "/home/app",
            "User": "app",
            "Entrypoint": ["sh", "-c"],
            "Cmd": ["echo default $GREETING"],
        }),
    )
    .expect("layout")
}

#[test]
fn an_image_runs_with_its_env_workdir_user_and_command() {
    if !supermachine_e2e::kvm_available_or_skip(
        "an_image_runs_with_its_env_workdir_user_and_command",
    ) {
        return;
    }
    supermachine_e2e::shared_runtime().block_on(async {
        let work = tempfile::tempdir().expect("temp dir");
        let layout = app_image(&work.path().join("layout"));
        let registry = Registry::start().expect("registry");
        registry
            .push_layout(&layout.dir, "v1", "test/app:v1", false)
            .expect("push");
        let image = Image::pull(&registry.reference("test/app:v1"))
            .await
            .expect("pull");
        runs_with_its_env_workdir_user_and_command(image).await;
    });
}

/// The same image from an OCI layout directory, no registry: the whole pipeline (layout →
/// layers → rootfs → VM) where a registry cannot run (the arm64 nested lane's L1), on the host's
/// own architecture (the layout's busybox is this machine's).
#[test]
fn an_oci_layout_image_runs_with_its_env_workdir_user_and_command() {
    if !supermachine_e2e::kvm_available_or_skip(
        "an_oci_layout_image_runs_with_its_env_workdir_user_and_command",
    ) {
        return;
    }
    supermachine_e2e::shared_runtime().block_on(async {
        let work = tempfile::tempdir().expect("temp dir");
        let layout = app_image(&work.path().join("layout"));
        let image = Image::from_oci_layout(&layout.dir, Some("v1"))
            .await
            .expect("image from the OCI layout");
        runs_with_its_env_workdir_user_and_command(image).await;
    });
}

/// What [`app_image`] must do in a VM: its layers' owners, modes, links and whiteouts, its
/// config's `Env`, `WorkingDir`, `User`, `Entrypoint` + `Cmd`, the request's settings winning,
/// and writes staying in the VM.
async fn runs_with_its_env_workdir_user_and_command(image: Image) {
    {
        let rootfs = image.rootfs().await.expect("rootfs");
        let before = supermachine_e2e::sha256sum(&rootfs.path);

        let vm = Vm::start(vm_config(image)).await.expect("start");
        // The layers' owners, modes, links and whiteouts, as `stat` in the guest sees them.
        assert_eq!(
            out(vm.exec([
                "sh",
                "-c",
                "stat -c '%u:%g %a %h' /data/owned; readlink /data/symlink; \
                 stat -c '%u:%g' /data/symlink; test -e /data/gone || echo whited-out; \
                 stat -c %i /data/owned /data/hardlink /data/hardlink2 | uniq | wc -l",
            ]))
            .await,
            (
                0,
                "1234:5678 4750 3\nowned\n1234:5678\nwhited-out\n1".into()
            )
        );
        assert_eq!(
            out(vm.exec(["sh", "-c", "echo $GREETING; pwd; id -u; id -g"])).await,
            (0, "hello\n/home/app\n1234\n5678".into())
        );
        // Entrypoint + Cmd, and Entrypoint + the caller's arguments.
        assert_eq!(
            out(vm.run(Vec::<String>::new()).expect("run")).await,
            (0, "default hello".into())
        );
        assert_eq!(
            out(vm.run(["echo override"]).expect("run")).await,
            (0, "override".into())
        );
        // The request's own settings win over the image's.
        assert_eq!(
            out(vm
                .exec(["sh", "-c", "id -u; pwd; echo $GREETING"])
                .user("root")
                .current_dir("/")
                .env("GREETING", "hi"))
            .await,
            (0, "0\n/\nhi".into())
        );
        // Writes stay in this VM: the shared rootfs image is untouched.
        assert_eq!(
            out(vm.exec(["sh", "-c", "touch /home/app/mine && ls /home/app"])).await,
            (0, "mine".into())
        );
        drop(vm);
        assert_eq!(
            supermachine_e2e::sha256sum(&rootfs.path),
            before,
            "a VM wrote to the image"
        );
    }
}

#[test]
fn debian_runs_apt_get_and_bash_with_the_image_env() {
    if !supermachine_e2e::kvm_available_or_skip("debian_runs_apt_get_and_bash_with_the_image_env") {
        return;
    }
    supermachine_e2e::shared_runtime().block_on(async {
        let work = tempfile::tempdir().expect("temp dir");
        let layout = tokio::task::spawn_blocking({
            let dir = work.path().join("layout");
            move || images::debian_layout(&dir, "bookworm")
        })
        .await
        .expect("join")
        .expect("debian layout (debootstrap)");
        let registry = Registry::start().expect("registry");
        registry
            .push_layout(&layout.dir, "bookworm", "debian/minbase:bookworm", false)
            .expect("push");
        let image = Image::pull(&registry.reference("debian/minbase:bookworm"))
            .await
            .expect("pull");

        let vm = Vm::start(vm_config(image)).await.expect("start");
        let (code, version) = out(vm.exec(["apt-get", "--version"])).await;
        assert_eq!(code, 0, "{version}");
        assert!(version.starts_with("apt "), "{version}");
        assert_eq!(
            out(vm.exec(["bash", "-c", "echo $HOME"])).await,
            (0, "/root".into())
        );
        assert!(vm.image_config().is_some_and(|c| c.cmd == ["bash"]));
    });
}
