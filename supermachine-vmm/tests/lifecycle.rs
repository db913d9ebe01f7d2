//! Start/stop lifecycle without a full boot: stopping a vCPU that is inside the guest, virtio-mmio
//! slot allocation, and that nothing (threads, fds, mappings) outlives the machine.
//!
//! One test in this binary on purpose: it counts the process's threads and fds, which other
//! tests running in parallel would disturb.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use supermachine_vmm::bus::BusDevice;
use supermachine_vmm::{ExitReason, Machine, MachineBuilder, MachineConfig};

struct Dummy;
impl BusDevice for Dummy {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// Mappings that belong to a machine: guest RAM (exactly `ram` bytes) and vCPU run areas
/// (`anon_inode:kvm-vcpu`).
fn machine_mappings(ram: u64) -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| {
            let size = l
                .split_whitespace()
                .next()
                .and_then(|r| r.split_once('-'))
                .and_then(|(a, b)| {
                    Some(u64::from_str_radix(b, 16).ok()? - u64::from_str_radix(a, 16).ok()?)
                });
            size == Some(ram) || l.contains("kvm")
        })
        .count()
}

#[test]
fn start_stop_frees_everything() {
    if !support::kvm_available_or_skip("start_stop_frees_everything") {
        return;
    }
    let kernel = support::kernel();
    // A current-thread runtime has no worker threads of its own, so thread counts are exact.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Warm-up round: one-time process state (the kick signal handler, lazily opened
        // descriptors in libraries) must not count as a leak.
        let mut config = MachineConfig::new(&kernel);
        config.memory_mib = 512;
        drop(Machine::start(config.clone()).unwrap());

        let threads = support::count_own_threads();
        let fds = support::count_proc_self("fd");
        let ram = 512u64 << 20;
        let mapped = machine_mappings(ram);

        let mut builder = MachineBuilder::new(config.clone()).unwrap();
        let a = builder
            .add_virtio_mmio(Arc::new(Mutex::new(Dummy)), 2)
            .unwrap();
        let mut b = None;
        let (b_base, b_gsi) = builder
            .add_virtio_mmio_with(1, |slot| {
                b = Some(slot);
                Arc::new(Mutex::new(Dummy))
            })
            .unwrap();
        let b = b.unwrap();
        // Slot 0 and 1 of the platform: x86 0xd000_0000 on IOAPIC pin 5, arm64 0x0a00_0000
        // on SPI 16.
        let (base0, irq0) = if cfg!(target_arch = "aarch64") {
            (0x0a00_0000, 16)
        } else {
            (0xd000_0000, 5)
        };
        assert_eq!((a.base, a.irq_line, a.notify.len()), (base0, irq0, 2));
        assert_eq!(
            (b.base, b.irq_line, b.notify.len()),
            (base0 + 0x1000, irq0 + 1, 1)
        );
        assert_eq!((b_base, b_gsi), (b.base, b.irq_line));
        let cmdline = builder.cmdline();
        if cfg!(target_arch = "aarch64") {
            // arm64 announces devices in the device tree only.
            assert!(!cmdline.contains("virtio_mmio.device="), "{cmdline}");
        } else {
            assert!(
                cmdline.contains("virtio_mmio.device=4K@0xd0000000:5"),
                "{cmdline}"
            );
            assert!(
                cmdline.contains("virtio_mmio.device=4K@0xd0001000:6"),
                "{cmdline}"
            );
        }

        let mut machine = builder.start().unwrap();
        assert_eq!(
            support::count_own_threads(),
            threads + 1,
            "one thread per vCPU"
        );
        assert!(
            machine_mappings(ram) >= mapped + 2,
            "guest RAM + vCPU run area"
        );
        // Let the vCPU get deep into the guest (the kernel is decompressing/initialising).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            machine.exit_status().is_none(),
            "{:?}",
            machine.exit_status()
        );

        let t = Instant::now();
        let exit = machine.stop();
        let stop_time = t.elapsed();
        eprintln!("stop() took {stop_time:?}");
        assert_eq!(exit.reason, ExitReason::Stopped);
        assert!(
            stop_time < Duration::from_secs(2),
            "stop took {stop_time:?}"
        );
        assert_eq!(machine.stop().reason, ExitReason::Stopped, "idempotent");
        assert_eq!(
            machine.stop_unresponsive("too late".to_owned()).reason,
            ExitReason::Stopped,
            "a stopped machine keeps its reason"
        );
        assert_eq!(machine.wait_exit().await.reason, ExitReason::Stopped);
        drop(machine);
        drop((a, b));

        // A machine the host gives up on says so to everyone waiting on it; once ended, its
        // reason stays the first one recorded.
        let mut machine = Machine::start(config.clone()).unwrap();
        let unresponsive = ExitReason::Unresponsive {
            message: "nothing answered".to_owned(),
        };
        assert_eq!(
            machine
                .stop_unresponsive("nothing answered".to_owned())
                .reason,
            unresponsive
        );
        assert_eq!(machine.stop().reason, unresponsive, "idempotent");
        assert_eq!(machine.wait_exit().await.reason, unresponsive);
        assert_eq!(
            machine.stop_unresponsive("later".to_owned()).reason,
            unresponsive,
            "the first reason stays"
        );
        drop(machine);

        assert_eq!(support::count_own_threads(), threads, "threads leaked");
        assert_eq!(support::count_proc_self("fd"), fds, "fds leaked");
        assert_eq!(machine_mappings(ram), mapped, "mappings leaked");
    });
}
