//! The README's library example: pull an image (or use `oci:DIR:TAG`), start a VM on it with
//! a published port, run a command.
//!
//! ```sh
//! cargo run --release --example quickstart -- docker.io/library/busybox:latest
//! cargo run --release --example quickstart -- oci:$HOME/.local/share/supermachine/demo:latest
//! ```

use supermachine::{Image, Vm, VmConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let reference = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "docker.io/library/busybox:latest".into());
    let image = match reference.strip_prefix("oci:") {
        Some(layout) => match layout.rsplit_once(':') {
            Some((dir, tag)) => Image::from_oci_layout(dir, Some(tag)).await?,
            None => Image::from_oci_layout(layout, None).await?,
        },
        None => Image::pull(&reference).await?,
    };
    let vm = Vm::start(VmConfig::new().image(image).publish("8080:80".parse()?)).await?;
    let out = vm
        .exec(["sh", "-c", "uname -a; echo $PATH"])
        .output()
        .await?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    println!("published: {:?}", vm.published_ports());
    Ok(())
}
