//! Writes the demo image `setup.sh` runs: an OCI image layout with the host's static busybox
//! (`apt-get install busybox-static`), a link for each of its applets, and `sh` as the default
//! command.
//!
//! ```sh
//! cargo run --release --example demo_image -- ~/.local/share/supermachine/demo
//! supermachine run oci:$HOME/.local/share/supermachine/demo:latest uname -a
//! ```

use std::path::PathBuf;
use std::process::Command;

use supermachine_e2e::images::{write_oci_layout, LayerBlob, TarBuilder};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir: PathBuf = std::env::args_os()
        .nth(1)
        .ok_or("usage: demo_image DIR (an OCI image layout is written there)")?
        .into();
    let busybox_path = supermachine_e2e::static_busybox()?;
    let busybox = std::fs::read(&busybox_path)?;
    let list = Command::new(&busybox_path).arg("--list").output()?;
    if !list.status.success() {
        return Err(format!("{} --list failed", busybox_path.display()).into());
    }
    let mut tar = TarBuilder::new();
    tar.dir("bin", 0o755, 0, 0)
        .file("bin/busybox", &busybox, 0o755, 0, 0);
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if !applet.is_empty() && applet != "busybox" && !applet.contains('/') {
            tar.symlink(&format!("bin/{applet}"), "busybox", 0, 0);
        }
    }
    tar.dir("etc", 0o755, 0, 0)
        .file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\n",
            0o644,
            0,
            0,
        )
        .file("etc/group", b"root:x:0:\n", 0o644, 0, 0)
        .dir("root", 0o700, 0, 0)
        .dir("tmp", 0o1777, 0, 0)
        .dir("www", 0o755, 0, 0)
        .file(
            "www/index.html",
            b"<h1>Hello from a supermachine microVM</h1>\n",
            0o644,
            0,
            0,
        );
    std::fs::create_dir_all(&dir)?;
    let image = write_oci_layout(
        &dir,
        "latest",
        &[LayerBlob::gzip(tar.finish())?],
        serde_json::json!({
            "Env": ["PATH=/bin", "HOME=/root"],
            "WorkingDir": "/root",
            "Cmd": ["sh"],
        }),
    )?;
    println!("oci:{}:latest {}", dir.display(), image.config_digest);
    Ok(())
}
