//! Pulls an image and builds its rootfs, printing progress events and timings.
//!
//! ```sh
//! cargo run --example pull_image -- 127.0.0.1:5000/debian/minbase:bookworm
//! cargo run --example pull_image -- --platform linux/arm64 ghcr.io/owner/image:tag
//! ```
//!
//! Credentials come from `~/.docker/config.json`; registries on loopback are spoken to over plain
//! HTTP. Building the rootfs needs root.

use std::time::Instant;

use supermachine::{Image, PullEvent, PullOptions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut options = PullOptions::new();
    let mut reference = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--platform" => {
                let platform = args.next().ok_or("--platform needs os/arch")?;
                options = options.platform(platform.parse()?);
            }
            "--insecure" => {
                options = options.insecure_registry(args.next().ok_or("--insecure needs a host")?);
            }
            _ => reference = Some(arg),
        }
    }
    let reference = reference.ok_or("usage: pull_image [--platform os/arch] REFERENCE")?;
    let started = Instant::now();
    let options = options.on_progress(move |event| match event {
        PullEvent::Resolved {
            manifest_digest,
            layers,
            total_bytes,
        } => eprintln!("manifest {manifest_digest}: {layers} layers, {total_bytes} bytes"),
        PullEvent::LayerStarted {
            digest,
            size,
            resumed_from,
        } => eprintln!("  {digest}: downloading {size} bytes (from {resumed_from})"),
        PullEvent::LayerDone { digest, cached, .. } => {
            eprintln!("  {digest}: done{}", if *cached { " (cached)" } else { "" })
        }
        _ => {}
    });
    let image = Image::pull_with(&reference, options).await?;
    let pulled = started.elapsed();
    let rootfs = image.rootfs().await?;
    let total = started.elapsed();
    println!("image {} from {}", image.digest(), image.source());
    println!(
        "pull {:.2}s, rootfs {:.2}s{}, total {:.2}s",
        pulled.as_secs_f64(),
        (total - pulled).as_secs_f64(),
        if rootfs.reused { " (cached)" } else { "" },
        total.as_secs_f64()
    );
    println!(
        "layers {} bytes compressed; rootfs {} ({} bytes, {} allocated)",
        image.compressed_size(),
        rootfs.path.display(),
        rootfs.size,
        rootfs.allocated
    );
    println!("default command: {:?}", image.config().default_command());
    Ok(())
}
