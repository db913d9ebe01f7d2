//! VM benchmarks: cold boot to agent-ready, exec round trip of `true`, vsock round trip of a
//! small message on an open connection, stdout throughput over vsock, and the VMM's RSS.
//!
//! ```text
//! cargo run --release --example bench_vm -- [BOOTS] [ROUNDS] [MIB] [bare]
//! ```
//!
//! Defaults: 5 boots (median reported), 30 rounds for the round trips, 4 MiB of stdout. Prints
//! medians and p99s; this host is noisy, compare medians of repeated runs. The guest has a
//! static busybox in its initramfs for the exec figures; with `bare`, only boots are measured,
//! with the agent alone in the initramfs (what a VM with an image rootfs on virtio-blk boots).

use std::time::Instant;

use supermachine::Vm;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use supermachine_e2e::bench::{arg, percentile, report};

fn rss_kib() -> u64 {
    supermachine_e2e::rss_kib().0
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Figures from different lanes must never share a ratio: say which this is.
    println!("lane: {}", supermachine_e2e::lane());
    let boots = arg(1, 5).max(1);
    let rounds = arg(2, 30).max(1);
    let mib = arg(3, 4).max(1);
    let bare = std::env::args().nth(4).is_some_and(|a| a == "bare");
    let config = if bare {
        supermachine::VmConfig::new()
            .kernel(supermachine_e2e::guest_kernel()?)
            .agent(supermachine_e2e::agent_binary()?)
    } else {
        supermachine_e2e::test_vm_config()?
    }
    .memory_mib(256)
    // For the agent's `echo` hook (the transport-only figures).
    .test_hooks(true)
    // Real boots: with the cache, every start after the first would be a restore
    // (`bench_restore` measures those).
    .snapshot_cache(false);

    // Cold boots; the last VM stays up for the rest.
    let mut boot_times = Vec::new();
    let rss_before = rss_kib();
    let mut vm = None;
    for i in 0..boots {
        drop(vm.take());
        let t = Instant::now();
        let started = Vm::start(config.clone()).await?;
        let took = t.elapsed();
        println!("boot {}: {:.2} s to agent-ready", i + 1, took.as_secs_f64());
        boot_times.push(took);
        vm = Some(started);
    }
    let vm = vm.ok_or("no VM")?;
    boot_times.sort();
    println!(
        "cold boot to agent-ready: median {:.2} s, min {:.2} s, max {:.2} s (n={boots})",
        percentile(&boot_times, 0.5).as_secs_f64(),
        boot_times[0].as_secs_f64(),
        boot_times[boot_times.len() - 1].as_secs_f64()
    );
    if bare {
        return Ok(());
    }
    let rss_vm = rss_kib();
    println!(
        "VMM process RSS with one idle 256 MiB guest: {} KiB ({} KiB above the process before boot)",
        rss_vm,
        rss_vm.saturating_sub(rss_before)
    );

    // Agent ping: one vsock connection + a control exchange, no guest fork.
    let mut pings = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        vm.agent().ping().await?;
        pings.push(t.elapsed());
    }
    report("agent ping (connect + control round trip)", pings);

    // Exec round trip of `true`.
    let mut execs = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        let out = vm.exec(["true"]).output().await?;
        execs.push(t.elapsed());
        assert!(out.status.success());
    }
    report("exec `true` round trip", execs);

    // 64-byte round trips through one long-running `cat`.
    let mut child = vm.exec(["cat"]).spawn().await?;
    let mut stdin = child.stdin.take().ok_or("stdin")?;
    let mut stdout = child.stdout.take().ok_or("stdout")?;
    let rtts = round_trips(&mut stdin, &mut stdout, rounds).await?;
    report("vsock 64 B round trip through guest `cat`", rtts);
    drop(stdin);
    child.await?;

    // The transport alone: the agent echoes on the vsock connection itself (no guest process,
    // no pipes), as Firecracker's figure for this host was taken with a C echo program.
    let mut echo = vm.agent().echo().await?;
    let (mut rd, mut wr) = tokio::io::split(&mut echo);
    let rtts = round_trips(&mut wr, &mut rd, rounds).await?;
    report("vsock 64 B round trip, agent echo (transport only)", rtts);
    let total = mib << 20;
    let t = Instant::now();
    let (mut rd, mut wr) = tokio::io::split(echo);
    let send = async {
        let block = vec![0x5au8; 64 * 1024];
        for _ in 0..total / block.len() {
            wr.write_all(&block).await?;
        }
        wr.shutdown().await
    };
    let mut echoed = Vec::with_capacity(total);
    let (sent, received) = tokio::join!(send, rd.read_to_end(&mut echoed));
    sent?;
    received?;
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(echoed.len(), total);
    println!(
        "vsock bulk echo, agent echo: {mib} MiB each way in {secs:.2} s = {:.2} MiB/s",
        mib as f64 / secs
    );

    // stdout throughput: the guest writes MIB MiB, the host reads it all.
    let t = Instant::now();
    let out = vm
        .exec(["head", "-c", &(mib << 20).to_string(), "/dev/zero"])
        .output()
        .await?;
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(out.stdout.len(), mib << 20);
    println!(
        "stdout throughput: {mib} MiB in {secs:.2} s = {:.2} MiB/s (includes one exec)",
        mib as f64 / secs
    );
    vm.stop().await;
    Ok(())
}

/// `rounds` 64-byte messages written to `to` and read back from `from`, one at a time.
async fn round_trips(
    to: &mut (impl tokio::io::AsyncWrite + Unpin),
    from: &mut (impl tokio::io::AsyncRead + Unpin),
    rounds: usize,
) -> std::io::Result<Vec<std::time::Duration>> {
    let mut rtts = Vec::with_capacity(rounds);
    let mut buf = [0u8; 64];
    for i in 0..rounds {
        let msg = [i as u8; 64];
        let t = Instant::now();
        to.write_all(&msg).await?;
        from.read_exact(&mut buf).await?;
        rtts.push(t.elapsed());
        assert_eq!(buf, msg);
    }
    Ok(rtts)
}
