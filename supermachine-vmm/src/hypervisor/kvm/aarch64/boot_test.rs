//! A real arm64 Linux boot with the platform pieces together: the `Image` loader, the boot
//! placement, the device tree, vCPU init with PSCI, the vGIC and the boot registers, on real KVM.
//! Two vCPUs, no devices but the console UART (emulated here just enough for the kernel's
//! polled console writes), a junk initrd and no root device: the kernel reports what it found
//! in the tree, brings up the second CPU through PSCI, fails to unpack the initrd, cannot mount a
//! root, panics and (with `panic=-1`) resets through PSCI `SYSTEM_RESET`.
//!
//! Ignored by default: it needs an arm64 guest kernel `Image` named by
//! `SUPERMACHINE_KERNEL_AARCH64` (and fails if that is unset): run with `--ignored` in the arm64
//! lane.

use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_userspace_memory_region, KVM_SYSTEM_EVENT_RESET};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::vcpu;
use super::vgic::Vgic;
use crate::arch::aarch64::layout::{self, RAM_START};
use crate::arch::aarch64::{fdt, image};

const RAM_SIZE: u64 = 256 << 20;
const VCPUS: u32 = 2;
const INITRD: &[u8] = b"this is not a cpio archive, and the kernel must say so";

/// The console as the 8250 driver sees it: transmit holding register at +0 (unless the divisor
/// latch is selected through LCR bit 7), line status at +5 always "transmitter empty".
#[derive(Default)]
struct Uart {
    out: Vec<u8>,
    dlab: bool,
}

impl Uart {
    fn write(&mut self, offset: u64, value: u8) {
        match offset {
            0 if !self.dlab => {
                self.out.push(value);
                // Streamed too, so a guest that hangs shows how far it got.
                if value == b'\n' {
                    let start = self.out[..self.out.len() - 1]
                        .iter()
                        .rposition(|&b| b == b'\n')
                        .map_or(0, |i| i + 1);
                    eprint!("guest: {}", String::from_utf8_lossy(&self.out[start..]));
                }
            }
            3 => self.dlab = value & 0x80 != 0,
            _ => {}
        }
    }

    fn read(&self, offset: u64) -> u8 {
        match offset {
            2 => 0x01, // IIR: no interrupt pending
            5 => 0x60, // LSR: THRE | TEMT
            _ => 0,
        }
    }
}

/// Runs one vCPU until the guest asks for a power event; returns its type, or what else
/// stopped it (any exit but the UART's MMIO).
fn run_vcpu(vcpu: &mut VcpuFd, uart: &Mutex<Uart>) -> Result<u32, String> {
    loop {
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(format!("KVM_RUN: {e}")),
        };
        match exit {
            VcpuExit::MmioWrite(addr, data) if layout::SERIAL.contains(addr) => {
                let mut uart = uart.lock().unwrap();
                uart.write(addr - layout::SERIAL.base, data[0]);
            }
            VcpuExit::MmioRead(addr, data) if layout::SERIAL.contains(addr) => {
                data.fill(0);
                data[0] = uart.lock().unwrap().read(addr - layout::SERIAL.base);
            }
            VcpuExit::SystemEvent(kind, _) => return Ok(kind),
            other => return Err(format!("unexpected exit {other:?}")),
        }
    }
}

#[test]
#[ignore = "needs an arm64 guest kernel in SUPERMACHINE_KERNEL_AARCH64; run in the arm64 lane"]
fn linux_boots_from_the_device_tree_and_resets_through_psci() {
    let path = std::env::var_os("SUPERMACHINE_KERNEL_AARCH64")
        .expect("SUPERMACHINE_KERNEL_AARCH64 must name an arm64 kernel Image");
    let kvm = Kvm::new().expect("/dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let mem =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(RAM_START), RAM_SIZE as usize)]).unwrap();
    let host = mem.get_host_address(GuestAddress(RAM_START)).unwrap();
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: RAM_START,
        memory_size: RAM_SIZE,
        userspace_addr: host as u64,
    };
    // SAFETY: the region is `mem`'s mapping, which outlives the VM (both live to the test's
    // end; vCPU threads still running then are ended with the process).
    unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");

    let vcpus: Vec<VcpuFd> = (0..VCPUS)
        .map(|i| {
            let fd = vm.create_vcpu(i.into()).unwrap();
            vcpu::init(&vm, &fd, vcpu::features(i == 0)).unwrap();
            fd
        })
        .collect();
    let _vgic = Vgic::create(&vm, VCPUS).unwrap();
    let mpidrs: Vec<u64> = vcpus.iter().map(|v| vcpu::mpidr(v).unwrap()).collect();

    let mut kernel = std::fs::File::open(&path).unwrap();
    let len = kernel.metadata().unwrap().len();
    let loaded = image::load(&mem, RAM_SIZE, &mut kernel, len).unwrap();
    let placement = layout::place_boot(
        RAM_SIZE,
        loaded.header.text_offset,
        loaded.header.footprint(len),
        Some(INITRD.len() as u64),
    )
    .unwrap();
    let initrd = placement.initrd.unwrap();
    mem.write_slice(INITRD, GuestAddress(initrd)).unwrap();
    let dtb = fdt::build(&fdt::FdtConfig {
        ram_size: RAM_SIZE,
        mpidrs: &mpidrs,
        bootargs: "console=ttyS0 earlycon panic=-1",
        initrd: Some(initrd..initrd + INITRD.len() as u64),
        virtio: &[],
    })
    .unwrap();
    mem.write_slice(&dtb, GuestAddress(placement.dtb)).unwrap();
    vcpu::set_boot_regs(&vcpus[0], loaded.entry, placement.dtb).unwrap();

    // Every vCPU on its own thread. KVM reports PSCI SYSTEM_OFF/RESET only to the vCPU that
    // called it (whichever CPU panicked) and parks the others inside KVM_RUN, so the first
    // report from any vCPU ends the machine; the parked threads are left behind.
    let uart = Arc::new(Mutex::new(Uart::default()));
    let (report, reports) = mpsc::channel();
    let started = Instant::now();
    for (index, mut fd) in vcpus.into_iter().enumerate() {
        let (uart, report) = (Arc::clone(&uart), report.clone());
        std::thread::spawn(move || {
            let _ = report.send((index, run_vcpu(&mut fd, &uart)));
        });
    }
    let (index, event) = reports
        .recv_timeout(Duration::from_secs(120))
        .expect("no vCPU reported a power event within 120 s (console above)");
    eprintln!(
        "vCPU {index} reported {event:?} after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let console = String::from_utf8_lossy(&uart.lock().unwrap().out).into_owned();
    eprintln!(
        "guest finished after {:.1} s",
        started.elapsed().as_secs_f64()
    );

    for expected in [
        "Booting Linux on physical CPU 0x0000000000",
        "Machine model: linux,dummy-virt",
        "psci: PSCIv",
        "GICv3: 96 SPIs implemented",
        "arch_timer: cp15 timer(s) running at",
        "smp: Brought up 1 node, 2 CPUs",
        "Initramfs unpacking failed",
        "Kernel panic - not syncing",
    ] {
        assert!(console.contains(expected), "console lacks {expected:?}");
    }
    assert_eq!(
        event,
        Ok(KVM_SYSTEM_EVENT_RESET),
        "panic=-1 resets through PSCI"
    );
}
