//! Links the `supermachine` CLI against Hypervisor.framework weakly on macOS, so on a macOS
//! older than 15 (without the framework's GIC calls) it starts and says so plainly instead of
//! being refused by the loader (`supermachine_vmm::hypervisor::open` checks the version first).
//! A program of one's own can do the same: README, "macOS (Apple Silicon)".

fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("macos") {
        println!("cargo:rustc-link-arg-bins=-Wl,-weak_framework,Hypervisor");
    }
}
