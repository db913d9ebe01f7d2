//! The arm64 KVM pieces against real KVM (`/dev/kvm` on an arm64 host with a GICv3: the arm64
//! nested lane). A hand-assembled guest stores two bytes to the UART address and powers off
//! through PSCI; the tests check the exits, the boot registers and a snapshot taken between the
//! two stores that resumes in a fresh VM.

use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_userspace_memory_region, KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS, KVM_DEV_ARM_VGIC_GRP_DIST_REGS,
    KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_STOPPED,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::vgic::{self, Vgic};
use super::vgic_state::VgicState;
use super::{regs, vcpu, vcpu_state};
use crate::arch::aarch64::layout::{self, RAM_START};

/// The guest, as assembled by `aarch64-linux-gnu-as`:
const PROGRAM: [u32; 9] = [
    0xd2a1_2001, // 0x00  mov  x1, #0x9000000      (the UART)
    0x5280_0822, // 0x04  mov  w2, #0x41           ('A')
    0x3900_0022, // 0x08  strb w2, [x1]            -> MMIO write exit
    0x1100_0442, // 0x0c  add  w2, w2, #1          ('B')
    0x3900_0022, // 0x10  strb w2, [x1]            -> MMIO write exit
    0x5280_0100, // 0x14  mov  w0, #0x8
    0x72b0_8000, // 0x18  movk w0, #0x8400, lsl 16 (PSCI SYSTEM_OFF, 0x84000008)
    0xd400_0002, // 0x1c  hvc  #0                  -> system event exit
    0x1400_0000, // 0x20  b    .
];

/// Where X0 points at boot (a device tree in a real boot; any value here).
const DTB: u64 = RAM_START + 0x10_0000;

const RAM_SIZE: usize = 2 << 20;

/// KVM_REG_ARM_TIMER_CNT (CNTVCT_EL0): moves on its own between a save and a re-read.
const TIMER_CNT: u64 = regs::sys_reg(3, 3, 14, 3, 2);

struct TestVm {
    vm: VmFd,
    vcpus: Vec<VcpuFd>,
    vgic: Vgic,
    mem: GuestMemoryMmap,
}

/// A VM with `RAM_SIZE` of RAM at [`RAM_START`], `n` vCPUs initialised with `features(i)` and
/// the vGIC.
fn test_vm(kvm: &Kvm, n: u32, features: impl Fn(u32) -> [u32; 7]) -> TestVm {
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(RAM_START), RAM_SIZE)]).unwrap();
    let host = mem.get_host_address(GuestAddress(RAM_START)).unwrap();
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: RAM_START,
        memory_size: RAM_SIZE as u64,
        userspace_addr: host as u64,
    };
    // SAFETY: the region is `mem`'s mapping, which `TestVm` keeps alive as long as the VM.
    unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");
    let vcpus = (0..n)
        .map(|i| {
            let fd = vm.create_vcpu(i.into()).expect("KVM_CREATE_VCPU");
            vcpu::init(&vm, &fd, features(i)).expect("vCPU init");
            fd
        })
        .collect();
    let vgic = Vgic::create(&vm, n).expect("vGIC");
    TestVm {
        vm,
        vcpus,
        vgic,
        mem,
    }
}

/// A VM with `n` vCPUs whose vCPU 0 is set to run [`PROGRAM`]; the others are powered off.
fn boot_vm(kvm: &Kvm, n: u32) -> TestVm {
    let t = test_vm(kvm, n, |i| vcpu::features(i == 0));
    let code: Vec<u8> = PROGRAM.iter().flat_map(|w| w.to_le_bytes()).collect();
    t.mem.write_slice(&code, GuestAddress(RAM_START)).unwrap();
    vcpu::set_boot_regs(&t.vcpus[0], RAM_START, DTB).unwrap();
    t
}

fn kvm() -> Kvm {
    Kvm::new().expect("/dev/kvm: these tests need arm64 KVM (run them in the arm64 lane)")
}

/// Runs until an exit other than an interruption; returns a printable summary.
fn run(vcpu: &mut VcpuFd) -> Exit {
    loop {
        match vcpu.run() {
            Ok(VcpuExit::MmioWrite(addr, data)) => return Exit::Write(addr, data.to_vec()),
            Ok(VcpuExit::SystemEvent(kind, _)) => return Exit::System(kind),
            Ok(other) => return Exit::Other(format!("{other:?}")),
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => panic!("KVM_RUN: {e}"),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Exit {
    Write(u64, Vec<u8>),
    System(u32),
    Other(String),
}

/// Completes a pending MMIO exit without running guest code, as a snapshot must.
fn complete_mmio(vcpu: &mut VcpuFd) {
    vcpu.set_kvm_immediate_exit(1);
    let err = vcpu
        .run()
        .expect_err("immediate_exit makes KVM_RUN return EINTR");
    assert_eq!(err.errno(), libc::EINTR);
    vcpu.set_kvm_immediate_exit(0);
}

#[test]
fn uart_store_exits_as_mmio_and_psci_system_off_as_system_event() {
    let kvm = kvm();
    let mut t = boot_vm(&kvm, 1);
    let vcpu = &mut t.vcpus[0];

    assert_eq!(run(vcpu), Exit::Write(layout::SERIAL.base, vec![b'A']));
    // Boot registers as set, still untouched by the program at this point.
    assert_eq!(regs::get_u64(vcpu, regs::x(0)).unwrap(), DTB);
    assert_eq!(
        regs::get_u64(vcpu, regs::PSTATE).unwrap(),
        vcpu::BOOT_PSTATE
    );
    assert_eq!(run(vcpu), Exit::Write(layout::SERIAL.base, vec![b'B']));
    assert_eq!(run(vcpu), Exit::System(KVM_SYSTEM_EVENT_SHUTDOWN));
}

#[test]
fn secondaries_start_powered_off_with_kvm_mpidrs() {
    let kvm = kvm();
    let t = test_vm(&kvm, 3, |i| vcpu::features(i == 0));
    let mpidrs: Vec<u64> = t.vcpus.iter().map(|v| vcpu::mpidr(v).unwrap()).collect();
    // What the device tree's CPU nodes are built from (bit 31 is RES1).
    assert_eq!(mpidrs, [0x8000_0000, 0x8000_0001, 0x8000_0002]);
    let mp: Vec<u32> = t
        .vcpus
        .iter()
        .map(|v| v.get_mp_state().unwrap().mp_state)
        .collect();
    assert_eq!(
        mp,
        [
            KVM_MP_STATE_RUNNABLE,
            KVM_MP_STATE_STOPPED,
            KVM_MP_STATE_STOPPED
        ]
    );
}

/// ISPENDR word and bit of SPI `spi` in the distributor.
fn spi_pending_bit(spi: u32) -> (u64, u32) {
    let intid = layout::SPI_INTID_BASE + spi;
    (u64::from(0x200 + intid / 32 * 4), 1 << (intid % 32))
}

fn wait_pending(vgic: &Vgic, spi: u32) {
    let (offset, bit) = spi_pending_bit(spi);
    let deadline = Instant::now() + Duration::from_secs(5);
    // irqfd injection runs on a kernel worker, shortly after the eventfd write.
    while vgic
        .get::<u32>(KVM_DEV_ARM_VGIC_GRP_DIST_REGS, offset)
        .unwrap()
        & bit
        == 0
    {
        assert!(Instant::now() < deadline, "SPI {spi} never became pending");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn spis_raised_by_irqfd_and_irq_line_become_pending() {
    let kvm = kvm();
    let t = test_vm(&kvm, 1, |_| vcpu::features(true));
    let slot = layout::virtio_slot(0).unwrap();
    let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    t.vm.register_irqfd(&fd, vgic::irqfd_gsi(slot.spi))
        .expect("KVM_IRQFD");
    fd.write(1).unwrap();
    wait_pending(&t.vgic, slot.spi);

    let (offset, bit) = spi_pending_bit(layout::SERIAL_SPI);
    assert_eq!(
        t.vgic
            .get::<u32>(KVM_DEV_ARM_VGIC_GRP_DIST_REGS, offset)
            .unwrap()
            & bit,
        0
    );
    vgic::set_spi(&t.vm, layout::SERIAL_SPI, true).unwrap();
    vgic::set_spi(&t.vm, layout::SERIAL_SPI, false).unwrap();
    // The edge latched the pending state.
    assert_ne!(
        t.vgic
            .get::<u32>(KVM_DEV_ARM_VGIC_GRP_DIST_REGS, offset)
            .unwrap()
            & bit,
        0
    );
}

/// KVM_REG_ARM_TIMER_CTL (CNTV_CTL_EL0) and KVM_REG_ARM_TIMER_CVAL (CNTV_CVAL_EL0).
const TIMER_CTL: u64 = regs::sys_reg(3, 3, 14, 3, 1);
const TIMER_CVAL: u64 = regs::sys_reg(3, 3, 14, 0, 2);

/// ICC_PMR_EL1's encoding in the CPU-interface attribute group.
const ICC_PMR: u64 = (3 << 14) | (4 << 7) | (6 << 3);

#[test]
fn snapshot_resumes_in_a_fresh_vm_at_the_next_instruction() {
    let kvm = kvm();
    // The booting vCPU 0 runs the program; vCPU 1 stays powered off, as a secondary the guest
    // has not started yet.
    let features = |i: u32| vcpu::features(i == 0);
    let mut a = boot_vm(&kvm, 2);

    // vGIC state a guest would have set up: SPI 16 enabled with priority 0xa0 and pending
    // (raised through an irqfd), different priority masks on the two CPU interfaces and a PPI
    // priority in vCPU 1's redistributor. DAIF stays masked, so the guest never takes the SPI.
    let spi = layout::virtio_slot(0).unwrap().spi;
    let intid = layout::SPI_INTID_BASE + spi;
    let dist = KVM_DEV_ARM_VGIC_GRP_DIST_REGS;
    let enable = (u64::from(0x100 + intid / 32 * 4), 1u32 << (intid % 32));
    a.vgic.set::<u32>(dist, enable.0, enable.1).unwrap();
    a.vgic
        .set::<u32>(dist, u64::from(0x400 + intid), 0xa0)
        .unwrap();
    let mpidrs: Vec<u64> = a.vcpus.iter().map(|v| vcpu::mpidr(v).unwrap()).collect();
    let cpu_attr = |i: usize| (mpidrs[i] & 0xff_ffff) << 32;
    a.vgic
        .set::<u64>(
            KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS,
            cpu_attr(0) | ICC_PMR,
            0xf0,
        )
        .unwrap();
    a.vgic
        .set::<u64>(
            KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS,
            cpu_attr(1) | ICC_PMR,
            0x80,
        )
        .unwrap();
    // GICR_IPRIORITYR7 (SGI frame): INTIDs 28..31, here the byte of INTID 30 (physical timer).
    let ppi_priority = cpu_attr(1) | 0x1_041c;
    a.vgic
        .set::<u32>(KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, ppi_priority, 0x0050_0000)
        .unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    a.vm.register_irqfd(&irq, vgic::irqfd_gsi(spi)).unwrap();
    irq.write(1).unwrap();
    wait_pending(&a.vgic, spi);

    let vcpu = &mut a.vcpus[0];
    assert_eq!(run(vcpu), Exit::Write(layout::SERIAL.base, vec![b'A']));
    complete_mmio(vcpu);
    assert_eq!(regs::get_u64(vcpu, regs::PC).unwrap(), RAM_START + 0xc);

    let saved_vcpus: Vec<vcpu_state::VcpuState> = (0..2)
        .map(|i| vcpu_state::save(&a.vcpus[i], features(i as u32)).unwrap())
        .collect();
    let saved_gic = VgicState::save(&a.vgic, &mpidrs).unwrap();
    eprintln!(
        "saved {} vCPU registers, {} distributor and {} redistributor registers, {} ICC registers",
        saved_vcpus[0].regs.len(),
        saved_gic.dist.len(),
        saved_gic.cpus[0].redist.len(),
        saved_gic.cpus[0].icc.len()
    );
    // The generic timer's registers are among those KVM lists.
    let ids: Vec<u64> = saved_vcpus[0].regs.iter().map(|r| r.id).collect();
    for timer in [TIMER_CNT, TIMER_CTL, TIMER_CVAL] {
        assert!(
            ids.contains(&timer),
            "KVM did not list timer register {timer:#x}"
        );
    }
    let counter = |state: &vcpu_state::VcpuState| {
        let reg = state.regs.iter().find(|r| r.id == TIMER_CNT).unwrap();
        u64::from_le_bytes(reg.value.as_slice().try_into().unwrap())
    };
    let saved_counter = counter(&saved_vcpus[0]);
    // The snapshot file is bincode over serde: round-trip through it.
    let config = bincode::config::standard();
    let bytes = bincode::serde::encode_to_vec((&saved_vcpus, &saved_gic), config).unwrap();
    let ((saved_vcpus, saved_gic), _): ((Vec<vcpu_state::VcpuState>, VgicState), _) =
        bincode::serde::decode_from_slice(&bytes, config).unwrap();

    // A fresh VM with a copy of the guest's memory. Its virtual counter starts again near 0.
    let mut b = test_vm(&kvm, 2, |i| saved_vcpus[i as usize].features);
    let fresh_counter = regs::get_u64(&b.vcpus[0], TIMER_CNT).unwrap();
    assert!(
        fresh_counter < saved_counter,
        "{fresh_counter} >= {saved_counter}"
    );
    let mut ram = vec![0u8; RAM_SIZE];
    a.mem.read_slice(&mut ram, GuestAddress(RAM_START)).unwrap();
    b.mem.write_slice(&ram, GuestAddress(RAM_START)).unwrap();
    drop(a);
    for (fd, state) in b.vcpus.iter().zip(&saved_vcpus) {
        vcpu_state::restore(fd, state).unwrap();
    }
    saved_gic.restore(&b.vgic, &mpidrs).unwrap();

    // Everything reads back as saved; the virtual counter goes on from where it was.
    for (i, saved) in saved_vcpus.iter().enumerate() {
        let reread = vcpu_state::save(&b.vcpus[i], saved.features).unwrap();
        assert_eq!(reread.mp_state, saved.mp_state);
        assert_eq!(reread.regs.len(), saved.regs.len());
        let differing: Vec<u64> = saved
            .regs
            .iter()
            .zip(&reread.regs)
            .filter(|(s, r)| s.id != TIMER_CNT && s != r)
            .map(|(s, _)| s.id)
            .collect();
        assert!(
            differing.is_empty(),
            "vCPU {i}: registers differ after restore: {differing:#x?}"
        );
        assert!(counter(&reread) >= saved_counter);
    }
    assert_eq!(saved_vcpus[1].mp_state, KVM_MP_STATE_STOPPED);
    assert_eq!(VgicState::save(&b.vgic, &mpidrs).unwrap(), saved_gic);
    let pmr1 = b
        .vgic
        .get::<u64>(KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS, cpu_attr(1) | ICC_PMR)
        .unwrap();
    assert_eq!(pmr1, 0x80);
    wait_pending(&b.vgic, spi);

    // The guest goes on from the instruction after the first store, with its registers.
    let vcpu = &mut b.vcpus[0];
    assert_eq!(regs::get_u64(vcpu, regs::PC).unwrap(), RAM_START + 0xc);
    assert_eq!(run(vcpu), Exit::Write(layout::SERIAL.base, vec![b'B']));
    assert_eq!(run(vcpu), Exit::System(KVM_SYSTEM_EVENT_SHUTDOWN));
}
