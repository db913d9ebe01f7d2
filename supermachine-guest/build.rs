//! Bundles `artifacts/<target arch>/{kernel,agent}.zst` when build-artifacts.sh made them: sets
//! `cfg(bundled)` (src/lib.rs then includes them) and writes their recorded SHA-256s (from `SHA256SUMS`) to
//! `$OUT_DIR/artifacts.rs`. Without them the crate builds with nothing bundled.

use std::path::Path;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(bundled)");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let manifest = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    let dir = Path::new(&manifest).join("artifacts").join(&arch);
    println!("cargo::rerun-if-changed={}", dir.display());
    let sums = dir.join("SHA256SUMS");
    println!("cargo::rerun-if-changed={}", sums.display());
    let Ok(text) = std::fs::read_to_string(&sums) else {
        return;
    };
    // `<sha256 of the uncompressed file>  <name>` lines, as sha256sum writes them.
    let sum = |name: &str| {
        text.lines().find_map(|line| {
            let (hash, file) = line.split_once("  ")?;
            (file.trim() == name && hash.len() == 64).then(|| hash.to_owned())
        })
    };
    let (Some(kernel), Some(agent)) = (sum("kernel"), sum("agent")) else {
        println!(
            "cargo::warning={} lacks the kernel or agent line; nothing bundled",
            sums.display()
        );
        return;
    };
    for file in ["kernel.zst", "agent.zst"] {
        if !dir.join(file).is_file() {
            println!(
                "cargo::warning={} is missing; nothing bundled",
                dir.join(file).display()
            );
            return;
        }
    }
    let out = Path::new(&std::env::var("OUT_DIR").unwrap_or_default()).join("artifacts.rs");
    let code = format!(
        "/// SHA-256 of the uncompressed kernel.\npub(crate) const KERNEL_SHA256: &str = {kernel:?};\n\
         /// SHA-256 of the uncompressed agent.\npub(crate) const AGENT_SHA256: &str = {agent:?};\n"
    );
    if std::fs::write(&out, code).is_ok() {
        println!("cargo::rustc-cfg=bundled");
    }
}
