//! Boots a kernel + initramfs and prints the console with host timestamps, then how it ended.
//!
//! ```text
//! cargo run -p supermachine-vmm --example boot -- VMLINUX [INITRAMFS] [EXTRA CMDLINE...]
//! ```
//! Environment: `MARKER` (print the time until this string appears on the console),
//! `MEMORY_MIB` (default 256), `VCPUS` (default 1), `LOG` (tracing level for the VMM's own logs,
//! e.g. `debug`; they go to stderr).

use std::time::{Duration, Instant};

use supermachine_vmm::{Machine, MachineConfig};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    if let Ok(level) = std::env::var("LOG") {
        tracing_subscriber::fmt()
            .with_max_level(level.parse::<tracing::Level>()?)
            .with_writer(std::io::stderr)
            .init();
    }
    let mut args = std::env::args().skip(1);
    let kernel = args
        .next()
        .ok_or("usage: boot VMLINUX [INITRAMFS] [EXTRA CMDLINE...]")?;
    let mut config = MachineConfig::new(kernel);
    if let Some(initramfs) = args.next() {
        config.initramfs = Some(initramfs.into());
    }
    config.cmdline = args.collect::<Vec<_>>().join(" ");
    if let Ok(m) = std::env::var("MEMORY_MIB") {
        config.memory_mib = m.parse()?;
    }
    if let Ok(v) = std::env::var("VCPUS") {
        config.vcpus = v.parse()?;
    }
    let marker = std::env::var("MARKER").ok();

    let t0 = Instant::now();
    let machine = Machine::start(config)?;
    println!(
        "[{:8.3}] Machine::start returned",
        t0.elapsed().as_secs_f64()
    );
    let mut printed = 0usize;
    let mut partial = String::new();
    let mut marker_seen = false;
    loop {
        let done = machine.exit_status();
        let console = machine.console();
        let written = machine.console_log().total_written() as usize;
        // Print only what arrived since the last round (the ring may have dropped some).
        let new = written.saturating_sub(printed).min(console.len());
        let chunk = String::from_utf8_lossy(&console[console.len() - new..]).into_owned();
        printed = written;
        partial.push_str(&chunk);
        while let Some(nl) = partial.find('\n') {
            let line: String = partial.drain(..=nl).collect();
            println!(
                "[{:8.3}] {}",
                t0.elapsed().as_secs_f64(),
                line.trim_end_matches(['\r', '\n'])
            );
            if let Some(m) = &marker {
                if !marker_seen && line.contains(m.as_str()) {
                    marker_seen = true;
                    println!(
                        "[{:8.3}] === marker {m:?} seen: boot time {:.3} s",
                        t0.elapsed().as_secs_f64(),
                        t0.elapsed().as_secs_f64()
                    );
                }
            }
        }
        if let Some(exit) = done {
            if !partial.is_empty() {
                println!("[{:8.3}] {partial}", t0.elapsed().as_secs_f64());
            }
            println!(
                "[{:8.3}] machine ended: {}",
                t0.elapsed().as_secs_f64(),
                exit.reason
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
