//! `cargo add supermachine` is enough: the crates as `cargo package` packs them (the guest kernel
//! and agent inside supermachine-guest), unpacked as a registry delivers them, used by a fresh
//! cargo project outside the workspace whose `main.rs` is the README's library example, built,
//! and run as an unprivileged user with an empty environment (no SUPERMACHINE_* variable, no
//! install directory, no setup.sh), against an image in a real local registry. It must print the
//! guest's `uname -a`.
//!
//! Needs root (to run the example as `nobody`: a private mount namespace gives `nobody` its own
//! `/dev/kvm` node, so the host's stays as it is), `/dev/kvm`, `docker-registry`, `skopeo`,
//! `zstd`, and the guest kernel build (cached). The app's build is cached under
//! `~/.cache/supermachine/package-test/`. Prints the packed crate sizes; fails when one passes
//! crates.io's 10 MB limit.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use supermachine_e2e::images;
use supermachine_e2e::registry::Registry;

/// crates.io's limit on a `.crate` file.
const CRATE_SIZE_LIMIT: u64 = 10 * 1024 * 1024;
/// The crates the library is made of, dependencies first.
const CRATES: &[&str] = &[
    "supermachine-codec",
    "supermachine-vmm",
    "supermachine-guest",
    "supermachine",
];
/// Debian's `nobody`.
const NOBODY: u32 = 65534;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `cmd`, panicking with its output when it fails; returns its stdout.
fn run(what: &str, cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A `cargo` command that does not inherit the outer `cargo test`'s build settings.
fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy().into_owned();
        if name.starts_with("CARGO_") && name != "CARGO_HOME" || name == "RUSTFLAGS" {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// The README's library example (the first `rust` block after "### The library"), pulling
/// `reference` instead of Docker Hub's busybox.
fn readme_example(reference: &str) -> String {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let section = readme
        .split_once("### The library")
        .expect("README has a library section")
        .1;
    let code = section
        .split_once("```rust")
        .and_then(|(_, rest)| rest.split_once('\n'))
        .and_then(|(_, rest)| rest.split_once("```"))
        .expect("a rust block in the library section")
        .0;
    assert!(
        code.contains("docker.io/library/busybox:latest"),
        "the README example pulls busybox: {code}"
    );
    code.replace("docker.io/library/busybox:latest", reference)
}

#[test]
fn the_packed_crates_run_the_readme_example_as_a_user_with_nothing_installed() {
    let test = "the_packed_crates_run_the_readme_example_as_a_user_with_nothing_installed";
    if !supermachine_e2e::kvm_available_or_skip(test) {
        return;
    }
    if std::fs::metadata("/proc/self").map(|m| m.uid()).ok() != Some(0) {
        assert!(
            std::env::var_os("SUPERMACHINE_REQUIRE_KVM").is_none(),
            "{test}: needs root (to run the example as nobody), and SUPERMACHINE_REQUIRE_KVM is set"
        );
        eprintln!("{test}: skipped: needs root, to run the example as nobody");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let world = |p: &Path| {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap()
    };
    world(work.path());

    // The artifacts for both architectures (the crate carries both; a build includes its own),
    // then the crates as `cargo package` packs them.
    run(
        "build-artifacts.sh",
        Command::new(repo().join("supermachine-guest/build-artifacts.sh"))
            .args(["--arch", "x86_64", "--arch", "aarch64"]),
    );
    let pack = work.path().join("pack");
    let mut package = cargo();
    package
        .current_dir(repo())
        .args([
            "package",
            "-q",
            "--no-verify",
            "--allow-dirty",
            "--target-dir",
        ])
        .arg(&pack);
    for name in CRATES {
        package.args(["-p", name]);
    }
    run("cargo package", &mut package);
    let crates = work.path().join("crates");
    std::fs::create_dir(&crates).unwrap();
    let mut patch = String::new();
    for name in CRATES {
        let file = pack.join(format!("package/{name}-0.1.0.crate"));
        let size = std::fs::metadata(&file).unwrap().len();
        println!("packed {name}: {size} bytes ({:.2} MB)", size as f64 / 1e6);
        assert!(
            size <= CRATE_SIZE_LIMIT,
            "{name}.crate is {size} bytes, over crates.io's {CRATE_SIZE_LIMIT}"
        );
        run(
            "tar",
            Command::new("tar")
                .arg("-xzf")
                .arg(&file)
                .arg("-C")
                .arg(&crates),
        );
        patch.push_str(&format!(
            "{name} = {{ path = \"{}\" }}\n",
            crates.join(format!("{name}-0.1.0")).display()
        ));
    }

    // The local registry and its busybox image.
    let registry = Registry::start().expect("registry");
    let layout = images::busybox_layout(&work.path().join("layout"), "v1").expect("layout");
    registry
        .push_layout(&layout.dir, "v1", "library/busybox:v1", false)
        .expect("push");
    let reference = registry.reference("library/busybox:v1");

    // A fresh project outside the workspace, as `cargo new` + `cargo add` make it; the crates
    // come from their packages (crates.io does not have them), everything else from crates.io.
    let app = work.path().join("app");
    std::fs::create_dir_all(app.join("src")).unwrap();
    std::fs::write(
        app.join("Cargo.toml"),
        format!(
            "[package]\nname = \"quickstart\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n\
             [dependencies]\nsupermachine = \"0.1.0\"\n\
             tokio = {{ version = \"1\", features = [\"full\"] }}\n\n\
             [patch.crates-io]\n{patch}\n[workspace]\n"
        ),
    )
    .unwrap();
    std::fs::write(app.join("src/main.rs"), readme_example(&reference)).unwrap();
    let target = supermachine::cache::root()
        .expect("cache root")
        .join("package-test/target");
    let started = Instant::now();
    run(
        "cargo build (the fresh project)",
        cargo()
            .current_dir(&app)
            .args(["build", "-q", "--release", "--target-dir"])
            .arg(&target),
    );
    println!(
        "fresh project built in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let bin = work.path().join("quickstart");
    std::fs::copy(target.join("release/quickstart"), &bin).unwrap();
    world(&bin);

    // As nobody, with an empty environment but for HOME and PATH: the bundled guest unpacks
    // into ~/.cache, the image is pulled and converted without root, the VM boots.
    let home = work.path().join("home");
    std::fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(NOBODY), Some(NOBODY)).unwrap();
    let kvm = std::fs::metadata("/dev/kvm").unwrap().rdev();
    let (major, minor) = (libc::major(kvm), libc::minor(kvm));
    let script = format!(
        "set -e; d=$(mktemp -d); mount -t tmpfs -o mode=0755 none \"$d\"; \
         mknod \"$d/kvm\" c {major} {minor}; chown {NOBODY}:{NOBODY} \"$d/kvm\"; chmod 0600 \"$d/kvm\"; \
         mount --bind \"$d/kvm\" /dev/kvm; \
         exec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups -- \"$0\""
    );
    let started = Instant::now();
    let stdout = run(
        "the README example as nobody",
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(&script)
            .arg(&bin)
            .env_clear()
            .env("HOME", &home)
            .env("PATH", "/usr/bin:/bin"),
    );
    println!(
        "the example ran as nobody in {:.1} s (first use: unpack, pull, rootfs, cold boot, \
         snapshot):\n{stdout}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        stdout.starts_with("Linux ") && stdout.contains("/bin"),
        "uname -a and $PATH from the guest: {stdout}"
    );
    let unpacked = home.join(".cache/supermachine/guest");
    assert!(
        unpacked.is_dir(),
        "the bundled guest was unpacked into the user's cache"
    );
}
