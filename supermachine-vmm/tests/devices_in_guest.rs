//! virtio-blk and virtio-vsock against the real guest kernel's drivers: a busybox initramfs
//! reads and writes a disk, and the supermachine agent serves execs over vsock.
//!
//! Needs /dev/kvm (skips only without it and without `SUPERMACHINE_REQUIRE_KVM`) and a static
//! agent build (`SUPERMACHINE_AGENT_BIN`, or
//! `target/x86_64-unknown-linux-musl/release/supermachine-agent` in the workspace); a missing
//! agent is a failure that says how to build it. Prints vsock round-trip and throughput figures for comparison with
//! GUEST-KERNEL.md (Firecracker: 15 ms round trip, 0.25 MiB/s bulk on this host).

mod support;

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use supermachine_codec::{ExecCodec, ExecRequest, Frame};
use supermachine_vmm::bus::BusDevice;
use supermachine_vmm::devices::block::BlockDevice;
use supermachine_vmm::devices::virtio::MmioTransport;
use supermachine_vmm::devices::vsock::{VsockConfig, VsockDevice, VsockStream};
use supermachine_vmm::{MachineBuilder, MachineConfig};
use tokio_util::codec::Framed;

const READY: &str = "SM-DEVICES-READY";
// Generous: a cold boot on a busy PVM host has taken 75–160 s here.
const TIMEOUT: Duration = Duration::from_secs(300);

/// `MachineBuilder::add_virtio_mmio` puts the device on the bus before it hands out the slot
/// the transport is built from; this stands in until the transport exists.
struct Late(Option<MmioTransport>);

impl BusDevice for Late {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match &mut self.0 {
            Some(t) => t.read(offset, data),
            None => data.fill(0),
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(t) = &mut self.0 {
            t.write(offset, data);
        }
    }
}

fn find_agent() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SUPERMACHINE_AGENT_BIN").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/x86_64-unknown-linux-musl/release/supermachine-agent");
    p.is_file().then_some(p)
}

/// Appends a second newc archive holding `/bin/supermachine-agent` (the kernel unpacks
/// concatenated archives in order).
fn append_agent(initramfs: &std::path::Path, agent: &std::path::Path) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("bin")).unwrap();
    std::fs::copy(agent, dir.path().join("bin/supermachine-agent")).unwrap();
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"cd "$1" && find . -print0 | cpio --null -o -H newc -R 0:0 --quiet >> "$2""#)
        .arg("sh")
        .arg(dir.path())
        .arg(initramfs)
        .status()
        .unwrap();
    assert!(status.success());
}

async fn connect_when_up(handle: &supermachine_vmm::devices::vsock::VsockHandle) -> VsockStream {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match handle.connect(1024).await {
            Ok(s) => return s,
            Err(e) if Instant::now() < deadline => {
                // Refused while the agent starts; NotConnected before the driver is up. Each
                // refused attempt costs the guest time, so do not poll fast.
                eprintln!("connect: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("agent never accepted: {e}"),
        }
    }
}

/// Runs `argv` with `stdin`, returns (stdout, exit code).
async fn exec(
    handle: &supermachine_vmm::devices::vsock::VsockHandle,
    argv: &[&str],
    stdin: &[u8],
) -> (Vec<u8>, u32) {
    let mut f = Framed::new(connect_when_up(handle).await, ExecCodec::new());
    f.send(Frame::Request(ExecRequest::new(argv.iter().copied())))
        .await
        .unwrap();
    for chunk in stdin.chunks(64 * 1024) {
        f.send(Frame::Stdin(Bytes::copy_from_slice(chunk)))
            .await
            .unwrap();
    }
    f.send(Frame::Stdin(Bytes::new())).await.unwrap();
    let mut out = Vec::new();
    while let Some(frame) = f.next().await {
        match frame.unwrap() {
            Frame::Stdout(b) => out.extend_from_slice(&b),
            Frame::Exit(e) => return (out, e.code),
            Frame::Error(e) => panic!("agent error: {e:?}"),
            _ => {}
        }
    }
    panic!("connection ended without EXIT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linux_drives_virtio_blk_and_vsock() {
    if !support::kvm_available_or_skip("linux_drives_virtio_blk_and_vsock") {
        return;
    }
    if std::env::var_os("SM_DEVICE_TRACE").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(std::io::stderr)
            .try_init();
    }
    let Some(agent) = find_agent() else {
        panic!(
            "no static supermachine-agent: build it with `cargo build -p supermachine-agent \
             --release --target x86_64-unknown-linux-musl` or set SUPERMACHINE_AGENT_BIN"
        );
    };

    // A 1 MiB disk: sector i is filled with byte i.
    let mut disk = tempfile::NamedTempFile::new().unwrap();
    let image: Vec<u8> = (0..2048u32).flat_map(|i| [(i % 256) as u8; 512]).collect();
    std::io::Write::write_all(&mut disk, &image).unwrap();

    let initramfs = support::build_initramfs(&format!(
        r#"#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
echo "SM: blk size $(cat /sys/block/vda/size) ro $(cat /sys/block/vda/ro)"
echo "SM: sector7 $(dd if=/dev/vda bs=512 skip=7 count=1 2>/dev/null | od -An -tx1 | head -1)"
printf GUESTWROTE | dd of=/dev/vda bs=512 seek=3 conv=notrunc,fsync 2>/dev/null
echo "SM: wrote $?"
supermachine-agent --vsock 1024 &
echo {READY}
while :; do sleep 3600; done
"#
    ));
    append_agent(&initramfs.path, &agent);

    let mut config = MachineConfig::new(support::kernel());
    config.memory_mib = 256;
    config.initramfs = Some(initramfs.path.clone());
    let mut builder = MachineBuilder::new(config).expect("builder");

    let vsock = VsockDevice::new(
        VsockConfig {
            guest_cid: 3,
            ..VsockConfig::default()
        },
        builder.runtime().clone(),
    )
    .unwrap();
    let handle = vsock.handle();
    let late = Arc::new(Mutex::new(Late(None)));
    let slot = builder.add_virtio_mmio(late.clone(), 3).unwrap();
    late.lock().unwrap().0 =
        Some(MmioTransport::new(Box::new(vsock), builder.memory().clone(), slot).unwrap());

    let blk = BlockDevice::open(disk.path(), false).unwrap();
    let late_blk = Arc::new(Mutex::new(Late(None)));
    let slot = builder.add_virtio_mmio(late_blk.clone(), 1).unwrap();
    late_blk.lock().unwrap().0 =
        Some(MmioTransport::new(Box::new(blk), builder.memory().clone(), slot).unwrap());

    let t0 = Instant::now();
    let machine = builder.start().expect("machine starts");
    let seen = support::wait_for_console(&machine, READY, TIMEOUT).await;
    let console = || String::from_utf8_lossy(&machine.console()).into_owned();
    assert!(
        seen.is_some(),
        "guest never got ready\n--- console ---\n{}",
        console()
    );
    eprintln!("guest ready after {:.1} s", t0.elapsed().as_secs_f64());

    // virtio-blk: capacity, contents, a write that reached the file.
    let c = console();
    assert!(c.contains("SM: blk size 2048 ro 0"), "{c}");
    assert!(c.contains("SM: sector7  07 07 07 07"), "{c}");
    assert!(c.contains("SM: wrote 0"), "{c}");
    let mut f = disk.reopen().unwrap();
    f.seek(SeekFrom::Start(3 * 512)).unwrap();
    let mut got = [0u8; 10];
    f.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"GUESTWROTE");

    // virtio-vsock: an exec through the agent.
    let (out, code) = exec(&handle, &["echo", "hello over vsock"], &[]).await;
    assert_eq!(
        (String::from_utf8_lossy(&out).as_ref(), code),
        ("hello over vsock\n", 0)
    );

    // Round trips through a long-running `cat`.
    let mut f = Framed::new(connect_when_up(&handle).await, ExecCodec::new());
    f.send(Frame::Request(ExecRequest::new(["cat"])))
        .await
        .unwrap();
    let mut rtts = Vec::new();
    for i in 0..20u8 {
        let t = Instant::now();
        f.send(Frame::Stdin(Bytes::from(vec![i; 64])))
            .await
            .unwrap();
        let mut got = 0;
        while got < 64 {
            match f.next().await.unwrap().unwrap() {
                Frame::Stdout(b) => got += b.len(),
                Frame::Started { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        rtts.push(t.elapsed());
    }
    rtts.sort();
    eprintln!(
        "vsock 64 B round trip through guest `cat`: p50 {:.2} ms, max {:.2} ms",
        rtts[rtts.len() / 2].as_secs_f64() * 1e3,
        rtts[rtts.len() - 1].as_secs_f64() * 1e3
    );
    // Bulk: 1 MiB through the same `cat`, both directions at once.
    const BULK_MIB: u32 = 1;
    let payload: Vec<u8> = (0..BULK_MIB << 20).map(|i| (i % 251) as u8).collect();
    let t = Instant::now();
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let received = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (mut sink, mut stream) = f.split();
    let send = {
        let payload = payload.clone();
        let sent = sent.clone();
        async move {
            for chunk in payload.chunks(16 * 1024) {
                sink.send(Frame::Stdin(Bytes::copy_from_slice(chunk)))
                    .await
                    .unwrap();
                sent.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
            }
            sink.send(Frame::Stdin(Bytes::new())).await.unwrap();
            sink
        }
    };
    let recv = {
        let received = received.clone();
        async move {
            let mut out = Vec::new();
            while let Some(frame) = stream.next().await {
                match frame.unwrap() {
                    Frame::Stdout(b) => {
                        out.extend_from_slice(&b);
                        received.store(out.len(), std::sync::atomic::Ordering::Relaxed);
                    }
                    Frame::Exit(e) => return (out, e.code),
                    _ => {}
                }
            }
            panic!("no EXIT");
        }
    };
    let progress = {
        let (sent, received) = (sent.clone(), received.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                eprintln!(
                    "bulk progress: sent {} received {}",
                    sent.load(std::sync::atomic::Ordering::Relaxed),
                    received.load(std::sync::atomic::Ordering::Relaxed)
                );
            }
        })
    };
    let joined = tokio::time::timeout(TIMEOUT, async { tokio::join!(send, recv) }).await;
    progress.abort();
    let Ok((_sink, (out, code))) = joined else {
        panic!("bulk echo stalled\n--- console ---\n{}", console());
    };
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(code, 0);
    assert!(
        out == payload,
        "echoed bytes differ ({} of {})",
        out.len(),
        payload.len()
    );
    eprintln!(
        "vsock bulk echo {BULK_MIB} MiB: {secs:.2} s = {:.2} MiB/s each way",
        f64::from(BULK_MIB) / secs
    );
}
