//! What the host sees when a guest dies: a kernel panic reaches the caller as a typed error
//! carrying the panic line, promptly; every pending exec, read and control call fails instead
//! of hanging; and the VM's threads, descriptors and memory mappings are gone after the drop.
//! Losing the device loop (its runtime shut down) or a vCPU ends the VM the same way.
//!
//! Boots its own VM (the shared one in `exec_vm.rs` must survive). Needs `/dev/kvm`; skips
//! without it only when `SUPERMACHINE_REQUIRE_KVM` is unset.

use std::time::{Duration, Instant};

use supermachine::{Error, Vm, VmExitReason};
use tokio::io::AsyncReadExt;

fn count(what: &str) -> usize {
    std::fs::read_dir(format!("/proc/self/{what}"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// This process's threads' names (`comm`), to say which one leaked.
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
                .map(|n| n.trim().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Guest RAM is one mapping of exactly the VM's memory size.
const GUEST_MIB: u32 = 256;

/// Mappings at least as large as guest RAM. Counting every mapping would also count what the
/// C allocator keeps for threads that have come and gone (per-thread arenas stay mapped).
fn guest_sized_mappings() -> usize {
    let min = u64::from(GUEST_MIB) << 20;
    std::fs::read_to_string("/proc/self/maps")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let (start, end) = line.split_whitespace().next()?.split_once('-')?;
            let start = u64::from_str_radix(start, 16).ok()?;
            let end = u64::from_str_radix(end, 16).ok()?;
            Some(end - start)
        })
        .filter(|&size| size >= min)
        .count()
}

/// The leak check counts this process's threads and descriptors, so the tests here take turns.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// How long the host may take to notice a dead guest and fail everything pending. The panic
/// itself (the guest printing its banner through the trapped serial port) is guest time.
const PROMPTLY: Duration = Duration::from_secs(30);

#[test]
fn kernel_panic_fails_pending_execs_with_the_panic_line() {
    if !supermachine_e2e::kvm_available_or_skip("kernel_panic") {
        return;
    }
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // Idle blocking-pool threads (VM start and teardown run there) otherwise live on for
        // tokio's default 10 s and read as leaked when the whole test takes less (real KVM).
        .thread_keep_alive(Duration::from_millis(100))
        .enable_all()
        .build()
        .unwrap();
    let config = supermachine_e2e::test_vm_config()
        .unwrap()
        .memory_mib(GUEST_MIB)
        .test_hooks(true);
    // Baselines after the runtime exists and the lazily initialised helpers ran once.
    let (threads, fds, maps) = (count("task"), count("fd"), guest_sized_mappings());

    runtime.block_on(async {
        let vm = Vm::start(config).await.expect("VM starts");
        assert!(
            guest_sized_mappings() > maps,
            "guest RAM must show up as a mapping, or the leak check below proves nothing"
        );
        let mut pending = Vec::new();
        for _ in 0..3 {
            pending.push(vm.exec(["sleep", "1000"]).spawn().await.unwrap());
        }
        let mut reader = pending[0].stdout.take().unwrap();
        let read = tokio::spawn(async move {
            let mut sink = Vec::new();
            reader.read_to_end(&mut sink).await
        });
        let agent = vm.agent().clone();

        let crashed_at = Instant::now();
        vm.crash_guest().await.expect("the crash hook is accepted");
        for child in pending {
            let result = tokio::time::timeout(PROMPTLY, child)
                .await
                .expect("a pending exec must not hang when the guest panics");
            match result {
                Err(Error::VmExited(exit)) => {
                    assert!(
                        matches!(&exit.reason, VmExitReason::KernelPanic { message }
                            if message.contains("Attempted to kill init")),
                        "{exit:?}"
                    );
                    assert!(exit.console_tail.contains("Kernel panic"), "{exit}");
                }
                other => panic!("expected VmExited(KernelPanic), got {other:?}"),
            }
        }
        let read = tokio::time::timeout(PROMPTLY, read)
            .await
            .expect("a pending read must not hang")
            .unwrap();
        let read_error = read.expect_err("truncated output must read as an error");
        assert_eq!(read_error.kind(), std::io::ErrorKind::ConnectionAborted);
        eprintln!(
            "pending execs failed {:.2} s after the crash request",
            crashed_at.elapsed().as_secs_f64()
        );

        // The VM itself says the same, and later calls fail at once with the same error.
        let exit = vm.wait().await;
        assert!(
            matches!(exit.reason, VmExitReason::KernelPanic { .. }),
            "{exit:?}"
        );
        assert!(exit.is_crash());
        let t = Instant::now();
        let late = agent.exec(["true"]).output().await;
        assert!(matches!(late, Err(Error::VmExited(_))), "{late:?}");
        let ping = agent.ping().await;
        assert!(matches!(ping, Err(Error::VmExited(_))), "{ping:?}");
        assert!(t.elapsed() < Duration::from_secs(1));
        drop(vm);
        drop(agent);
    });
    // The monitor and exec tasks wind down on the runtime; give them a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline
        && (count("task") > threads || count("fd") > fds || guest_sized_mappings() > maps)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        count("task"),
        threads,
        "threads leaked; live now: {:?}",
        thread_names()
    );
    assert_eq!(count("fd"), fds, "descriptors leaked");
    assert!(
        guest_sized_mappings() <= maps,
        "guest memory mapping leaked: {} > {maps}",
        guest_sized_mappings()
    );
}

#[test]
fn a_guest_that_dies_while_booting_fails_start_with_the_panic() {
    if !supermachine_e2e::kvm_available_or_skip("dies_while_booting") {
        return;
    }
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // An "agent" that is not an executable, and no shell to fall back on: the kernel finds no
    // working init and panics.
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("not-an-agent");
    std::fs::write(&bogus, b"this is not an ELF file").unwrap();
    let config = supermachine::VmConfig::new()
        .kernel(supermachine_e2e::guest_kernel().unwrap())
        .agent(&bogus);
    let result = runtime.block_on(Vm::start(config));
    match result {
        Err(Error::VmExited(exit)) => {
            assert!(
                matches!(&exit.reason, VmExitReason::KernelPanic { .. }),
                "{exit:?}"
            );
            assert!(exit.to_string().contains("init"), "{exit}");
        }
        other => panic!("expected VmExited(KernelPanic), got {other:?}"),
    }
}

/// The device loop of a VM runs on the tokio runtime that started it. If that runtime shuts
/// down under a running VM, the VM ends with a failure instead of leaving callers on other
/// runtimes waiting forever.
#[test]
fn losing_the_device_runtime_ends_the_vm_and_fails_pending_execs() {
    if !supermachine_e2e::kvm_available_or_skip("device_runtime") {
        return;
    }
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let devices = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let callers = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Agent only: the long-running exec is a second agent instance serving another port.
    let config = supermachine::VmConfig::new()
        .kernel(supermachine_e2e::guest_kernel().unwrap())
        .agent(supermachine_e2e::agent_binary().unwrap());
    let vm = devices.block_on(Vm::start(config)).expect("VM starts");
    let child = callers
        .block_on(vm.exec(["/init", "--vsock", "2000"]).spawn())
        .expect("exec starts");

    let lost_at = Instant::now();
    drop(devices);
    callers.block_on(async {
        let result = tokio::time::timeout(PROMPTLY, child)
            .await
            .expect("a pending exec must not hang when the device loop is gone");
        assert!(
            matches!(
                result,
                Err(Error::VmExited(_)) | Err(Error::ConnectionLost { .. })
            ),
            "{result:?}"
        );
        let exit = tokio::time::timeout(PROMPTLY, vm.wait())
            .await
            .expect("the VM must end");
        match &exit.reason {
            VmExitReason::Failed { message } => assert!(message.contains("runtime"), "{message}"),
            other => panic!("expected Failed, got {other:?}"),
        }
        let late = vm.exec(["true"]).output().await;
        assert!(matches!(late, Err(Error::VmExited(_))), "{late:?}");
    });
    eprintln!(
        "VM ended {:.2} s after its device runtime was dropped",
        lost_at.elapsed().as_secs_f64()
    );
    drop(vm);
}

/// A minimal x86-64 ELF "kernel" whose entry jumps to guest-physical 0xf000_0000: mapped by
/// the boot page tables, but neither RAM nor a device, so the vCPU cannot fetch its next
/// instruction and the hypervisor gives up on it.
#[cfg(target_arch = "x86_64")]
fn runaway_kernel() -> Vec<u8> {
    const LOAD: u64 = 0x100_0000;
    const CODE_OFFSET: u64 = 0x1000;
    // mov eax, 0xf0000000 ; jmp rax
    let code = [0xb8, 0x00, 0x00, 0x00, 0xf0, 0xff, 0xe0];
    let mut elf = Vec::new();
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&LOAD.to_le_bytes()); // e_entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for half in [64u16, 56, 1, 64, 0, 0] {
        // ehsize, phentsize, phnum, shentsize, shnum, shstrndx
        elf.extend_from_slice(&half.to_le_bytes());
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R + X
    for word in [
        CODE_OFFSET,
        LOAD,
        LOAD,
        code.len() as u64,
        code.len() as u64,
        0x1000,
    ] {
        // offset, vaddr, paddr, filesz, memsz, align
        elf.extend_from_slice(&word.to_le_bytes());
    }
    elf.resize(CODE_OFFSET as usize, 0);
    elf.extend_from_slice(&code);
    elf
}

/// A minimal arm64 `Image` whose code loads a register pair from guest-physical 0x4000_0000:
/// neither RAM nor a device, and a load pair gives the hypervisor no syndrome to emulate it
/// with, so KVM refuses to go on (`KVM_RUN` fails; a jump there would only make the guest
/// take its own prefetch abort forever).
#[cfg(target_arch = "aarch64")]
fn runaway_kernel() -> Vec<u8> {
    let mut image = vec![0u8; 64];
    image[0..4].copy_from_slice(&0x1400_0010u32.to_le_bytes()); // b +0x40 (over the header)
    image[16..24].copy_from_slice(&0x1_0000u64.to_le_bytes()); // image_size
    image[24..32].copy_from_slice(&0b010u64.to_le_bytes()); // flags: LE, 4 KiB pages
    image[56..60].copy_from_slice(b"ARM\x64");
    for insn in [
        0xd2a8_0001u32, // movz x1, #0x4000, lsl #16
        0xa940_0c22,    // ldp  x2, x3, [x1]
        0x1400_0000,    // b    .
    ] {
        image.extend_from_slice(&insn.to_le_bytes());
    }
    image
}

/// A vCPU that cannot go on ends the VM with a typed error at once.
#[test]
fn a_failing_vcpu_fails_start_with_a_typed_error() {
    if !supermachine_e2e::kvm_available_or_skip("failing_vcpu") {
        return;
    }
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("runaway");
    std::fs::write(&kernel, runaway_kernel()).unwrap();
    let config = supermachine::VmConfig::new()
        .kernel(&kernel)
        .agent(supermachine_e2e::agent_binary().unwrap());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let t = Instant::now();
    let result = runtime.block_on(Vm::start(config));
    eprintln!(
        "start failed after {:.2} s: {result:?}",
        t.elapsed().as_secs_f64()
    );
    match result {
        Err(Error::VmExited(exit)) => {
            assert!(exit.is_crash(), "{exit:?}");
            assert!(
                matches!(exit.reason, VmExitReason::Failed { .. }),
                "{exit:?}"
            );
        }
        other => panic!("expected VmExited(Failed), got {other:?}"),
    }
    assert!(t.elapsed() < PROMPTLY);
}
