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
    let list = String::from_utf8_lossy(&list.stdout);
    let applets = list
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/'));
    let mut tar = TarBuilder::new();
    tar.busybox(&busybox, applets)
        .skeleton(b"root:x:0:0:root:/root:/bin/sh\n")
        .file("etc/group", b"root:x:0:\n", 0o644, 0, 0)
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
