//! The run loop against the fake framework: MMIO completion, PSCI, WFI and kicks, powered-off
//! secondaries, the virtual timer and system-register traps.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::hypervisor::hvf::fake::{FakeFramework, FakeVcpu};

/// ESR_EL2 of class `ec` with `iss` (IL set).
fn esr(ec: u64, iss: u64) -> u64 {
    (ec << 26) | (1 << 25) | iss
}

fn exception(ec: u64, iss: u64, ipa: u64) -> Exit {
    Exit::Exception {
        syndrome: esr(ec, iss),
        ipa,
    }
}

/// A data abort: `size_log2`, register, sign-extend, 64-bit, write.
fn abort(size_log2: u64, reg: u64, sse: bool, sf: bool, write: bool, ipa: u64) -> Exit {
    let iss = (1 << 24)
        | (size_log2 << 22)
        | (u64::from(sse) << 21)
        | (reg << 16)
        | (u64::from(sf) << 15)
        | (u64::from(write) << 6);
    exception(0x24, iss, ipa)
}

const WFI: (u64, u64) = (0x01, 0);
const HVC: (u64, u64) = (0x16, 0);

/// vCPU `id` (of `n`, vCPU 0 powered on) with `script`.
fn engines(n: u32) -> (Arc<FakeFramework>, Vec<Engine<FakeFramework>>) {
    let fw = Arc::new(FakeFramework::default());
    let shared = Arc::new(VmShared::default());
    let engines = (0..n)
        .map(|id| {
            let waker = Arc::new(Waker::default());
            shared.add_waker(Arc::clone(&waker));
            let power = if id == 0 { Power::On } else { Power::Off };
            shared
                .board
                .register(id, u64::from(id), power, Arc::clone(&waker));
            let vcpu = fw.create_vcpu().unwrap();
            Engine::new(Arc::clone(&fw), vcpu, id, Arc::clone(&shared), waker)
        })
        .collect();
    (fw, engines)
}

fn one(script: Vec<Exit>) -> Engine<FakeFramework> {
    let (_, mut e) = engines(1);
    let mut e = e.remove(0);
    e.vcpu.script = script.into();
    e.vcpu.regs.insert(Reg::Pc, 0x8000_0000);
    e
}

fn pc(e: &Engine<FakeFramework>) -> u64 {
    e.vcpu.regs[&Reg::Pc]
}

#[test]
fn an_mmio_load_is_written_back_and_stepped_over_on_the_next_run() {
    // ldrsh x5, [..] at the UART.
    let mut e = one(vec![abort(1, 5, true, true, false, 0x0900_0000)]);
    assert_eq!(
        e.run().unwrap(),
        Step::MmioRead {
            addr: 0x0900_0000,
            len: 2
        }
    );
    assert_eq!(pc(&e), 0x8000_0000, "not stepped until completed");
    e.io_buf()[..2].copy_from_slice(&[0x00, 0x80]);
    // The next run completes the load, then the script ends (Unknown).
    assert!(matches!(e.run().unwrap(), Step::Unsupported(_)));
    assert_eq!(e.vcpu.regs[&Reg::X(5)], 0xffff_ffff_ffff_8000);
    assert_eq!(pc(&e), 0x8000_0004);
}

#[test]
fn an_mmio_load_into_the_zero_register_only_steps() {
    let mut e = one(vec![abort(2, 31, false, false, false, 0x0a00_0000)]);
    assert!(matches!(e.run().unwrap(), Step::MmioRead { len: 4, .. }));
    e.io_buf()[..4].copy_from_slice(&[1, 2, 3, 4]);
    let _ = e.run().unwrap();
    assert!(!e.vcpu.regs.contains_key(&Reg::X(31)));
    assert_eq!(pc(&e), 0x8000_0004);
}

#[test]
fn an_mmio_store_carries_the_register_or_zeros() {
    let mut e = one(vec![
        abort(2, 7, false, false, true, 0x0a00_0050),
        abort(0, 31, false, false, true, 0x0900_0000),
    ]);
    e.vcpu.regs.insert(Reg::X(7), 0x1122_3344_5566_7788);
    assert_eq!(
        e.run().unwrap(),
        Step::MmioWrite {
            addr: 0x0a00_0050,
            len: 4
        }
    );
    assert_eq!(&e.io_buf()[..4], &[0x88, 0x77, 0x66, 0x55]);
    assert_eq!(pc(&e), 0x8000_0004, "a store steps at once");
    assert_eq!(
        e.run().unwrap(),
        Step::MmioWrite {
            addr: 0x0900_0000,
            len: 1
        }
    );
    assert_eq!(e.io_buf()[0], 0, "wzr stores zero");
}

#[test]
fn an_undecodable_abort_ends_the_vcpu_with_its_address() {
    let mut e = one(vec![exception(0x24, 1 << 6, 0x0a00_0000)]);
    let Step::Unsupported(msg) = e.run().unwrap() else {
        panic!("expected a failure")
    };
    assert!(msg.contains("0xa000000") && msg.contains("ISV"), "{msg}");
}

#[test]
fn psci_calls_answer_in_x0_and_power_events_end_the_run() {
    let mut e = one(vec![exception(HVC.0, HVC.1, 0), exception(HVC.0, HVC.1, 0)]);
    // First call: VERSION (answered in X0, not returned); second: SYSTEM_RESET.
    let hook: Arc<dyn Fn(&mut FakeVcpu) + Send + Sync> = Arc::new(|v: &mut FakeVcpu| {
        let f = if v.runs == 1 {
            0x8400_0000
        } else {
            0x8400_0009
        };
        v.regs.insert(Reg::X(0), f);
    });
    e.vcpu.on_run = Some(hook);
    assert_eq!(e.run().unwrap(), Step::System(SystemEvent::Reset));
    assert_eq!(e.vcpu.runs, 2);
    // SYSTEM_RESET left X0 alone; VERSION's answer was overwritten by the second call's id.
    assert_eq!(e.vcpu.regs[&Reg::X(0)], 0x8400_0009);

    let mut e = one(vec![exception(0x17, 0, 0)]);
    e.vcpu.regs.insert(Reg::X(0), 0x8400_0008);
    assert_eq!(e.run().unwrap(), Step::System(SystemEvent::Shutdown));
    assert_eq!(pc(&e), 0x8000_0004, "a trapped SMC is stepped over");
}

#[test]
fn cpu_on_starts_a_powered_off_secondary_at_its_entry() {
    let (_, mut es) = engines(2);
    let mut secondary = es.pop().unwrap();
    let mut boot = es.pop().unwrap();
    boot.vcpu.script = vec![exception(HVC.0, HVC.1, 0)].into();
    boot.vcpu.regs.insert(Reg::X(0), 0xc400_0003);
    boot.vcpu.regs.insert(Reg::X(1), 1);
    boot.vcpu.regs.insert(Reg::X(2), 0x8040_0000);
    boot.vcpu.regs.insert(Reg::X(3), 0xfeed);

    let started = Instant::now();
    let t = std::thread::spawn(move || {
        // Powered off: this blocks until vCPU 0's CPU_ON, then enters the guest once.
        let step = secondary.run().unwrap();
        (step, secondary)
    });
    std::thread::sleep(Duration::from_millis(30));
    let _ = boot.run().unwrap();
    assert_eq!(boot.vcpu.regs[&Reg::X(0)], 0, "CPU_ON succeeded");
    let (step, secondary) = t.join().unwrap();
    assert!(
        matches!(step, Step::Unsupported(_)),
        "ran to the script's end"
    );
    assert!(started.elapsed() >= Duration::from_millis(30));
    assert_eq!(secondary.vcpu.runs, 1);
    assert_eq!(secondary.vcpu.regs[&Reg::Pc], 0x8040_0000);
    assert_eq!(secondary.vcpu.regs[&Reg::X(0)], 0xfeed);
    assert_eq!(secondary.vcpu.regs[&Reg::Cpsr], BOOT_PSTATE);
    assert_eq!(secondary.shared.board.power(1), Power::On);
}

#[test]
fn a_kick_before_run_returns_without_entering_the_guest() {
    let mut e = one(vec![]);
    e.waker.kick();
    assert_eq!(e.run().unwrap(), Step::Interrupted);
    assert_eq!(e.vcpu.runs, 0);
}

#[test]
fn a_kick_wakes_a_vcpu_sleeping_in_wfi() {
    let mut e = one(vec![exception(WFI.0, WFI.1, 0)]);
    let waker = Arc::clone(&e.waker);
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(30));
        waker.kick();
    });
    let started = Instant::now();
    assert_eq!(e.run().unwrap(), Step::Interrupted);
    t.join().unwrap();
    assert!(started.elapsed() >= Duration::from_millis(25), "it slept");
    assert_eq!(pc(&e), 0x8000_0004, "WFI is stepped over");
    assert!(!e.waker.take_kick(), "the kick was consumed");
}

#[test]
fn an_interrupt_line_wakes_a_vcpu_sleeping_in_wfi() {
    let mut e = one(vec![exception(WFI.0, WFI.1, 0)]);
    let shared = Arc::clone(&e.shared);
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(30));
        shared.wake_all();
    });
    // Woken, back into the guest, which ends the script.
    assert!(matches!(e.run().unwrap(), Step::Unsupported(_)));
    t.join().unwrap();
    assert_eq!(e.vcpu.runs, 2);
}

#[test]
fn wfi_returns_at_once_with_an_sgi_pending_or_the_timer_expired() {
    let mut e = one(vec![exception(WFI.0, WFI.1, 0)]);
    e.vcpu.sgi_pending = true;
    let started = Instant::now();
    assert!(matches!(e.run().unwrap(), Step::Unsupported(_)));
    assert!(started.elapsed() < Duration::from_secs(1));

    // Timer enabled, compare value already passed.
    let mut e = one(vec![exception(WFI.0, WFI.1, 0)]);
    e.fw.ticks.store(1_000, Ordering::SeqCst);
    e.vcpu.sys.insert(SysReg::CNTV_CTL_EL0, 1);
    e.vcpu.sys.insert(SysReg::CNTV_CVAL_EL0, 500);
    assert!(matches!(e.run().unwrap(), Step::Unsupported(_)));
    assert_eq!(e.vcpu.runs, 2);
}

#[test]
fn wfi_sleeps_until_the_guest_timer_deadline() {
    let mut e = one(vec![exception(WFI.0, WFI.1, 0)]);
    // The fake counter does not move by itself: advance it from another thread after 20 ms,
    // past the compare value, as the host counter would.
    e.vcpu.sys.insert(SysReg::CNTV_CTL_EL0, 1);
    e.vcpu.sys.insert(SysReg::CNTV_CVAL_EL0, 24_000);
    let fw = Arc::clone(&e.fw);
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        fw.ticks.store(24_000, Ordering::SeqCst);
    });
    let started = Instant::now();
    assert!(matches!(e.run().unwrap(), Step::Unsupported(_)));
    t.join().unwrap();
    assert!(started.elapsed() >= Duration::from_millis(20));
}

#[test]
fn a_vtimer_exit_raises_the_ppi_and_the_timer_is_unmasked_once_handled() {
    let mut e = one(vec![Exit::VtimerActivated, Exit::Canceled]);
    e.vcpu.vtimer_masked = true;
    // Still asserted (enabled, condition met) at the second entry.
    e.vcpu.sys.insert(SysReg::CNTV_CTL_EL0, 0b101);
    let hook: Arc<dyn Fn(&mut FakeVcpu) + Send + Sync> = Arc::new(|v: &mut FakeVcpu| {
        if v.runs == 2 {
            assert!(v.vtimer_masked, "kept masked while asserted");
            // The guest's handler masks the timer.
            v.sys.insert(SysReg::CNTV_CTL_EL0, 0b111);
        }
    });
    e.vcpu.on_run = Some(hook);
    assert!(matches!(e.run().unwrap(), Step::Unsupported(_)));
    assert_eq!(e.vcpu.ppis, [VTIMER_INTID]);
    assert!(!e.vcpu.vtimer_masked, "unmasked once no longer asserted");
    assert!(!e.timer_masked);
}

#[test]
fn trapped_system_registers_read_as_zero_and_ignore_writes() {
    // mrs x3, <reg>; msr <reg>, x4; mrs xzr, <reg>.
    let read = |rt: u64| (2 << 20) | (4 << 17) | (1 << 10) | (rt << 5) | (1 << 1) | 1;
    let mut e = one(vec![
        exception(0x18, read(3), 0),
        exception(0x18, read(4) & !1, 0),
        exception(0x18, read(31), 0),
    ]);
    e.vcpu.regs.insert(Reg::X(3), 0xffff);
    e.vcpu.regs.insert(Reg::X(4), 0xeeee);
    assert!(matches!(e.run().unwrap(), Step::Unsupported(_)));
    assert_eq!(e.vcpu.regs[&Reg::X(3)], 0);
    assert_eq!(e.vcpu.regs[&Reg::X(4)], 0xeeee);
    assert!(!e.vcpu.regs.contains_key(&Reg::X(31)));
    assert_eq!(pc(&e), 0x8000_000c);
}
