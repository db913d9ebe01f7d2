//! Snapshot restore side by side: our VMM next to Firecracker, same guest, same client.
//!
//! ```text
//! cargo run --release --example bench_peers -- [RUNS] [VMMS]
//! lane/bench.sh bench_peers 10            (the nested lane; the figures that matter)
//! ```
//!
//! For each VMM in VMMS (default `ours,firecracker`), one guest with the project's kernel and
//! agent initramfs (a static busybox in `/bin`, 1 vCPU, 256 MiB), our library as the client:
//! * `ours`: [`Vm::start`] (snapshot cache off, so a cold boot), [`Vm::snapshot`] (which also
//!   records the working set where KVM can pre-fault), [`Vm::restore`];
//! * `firecracker`: `$SUPERMACHINE_FIRECRACKER` (default `../shared/peers/firecracker`) through
//!   its API socket: boot from a config file, `PATCH /vm` Paused + `PUT /snapshot/create` (Full),
//!   then a fresh process per restore and `PUT /snapshot/load` (file memory, `resume_vm`); our
//!   agent answers through its vsock muxer.
//!
//! It measures, per VMM: cold boot → agent ping (once); RUNS warm agent pings and `true` execs;
//! then RUNS restores (after one unmeasured restore that warms the page cache), each timed from
//! the restore call (ours: [`Vm::restore`]; Firecracker: the load request, its process already
//! started): the call itself (ours: to vCPUs running; Firecracker: the load request answered),
//! → the agent answered a ping (ours: the ping carries the restored guest's reseed), → the
//! first `true` exec done, after that ping. Medians and p99, then
//! the ratios ours / Firecracker.

use std::time::{Duration, Instant};

use supermachine::{Agent, Vm};
use supermachine_e2e::bench::{arg, list_arg, p50_ratio, report};
use supermachine_e2e::firecracker::Firecracker;

type Result<T, E = Box<dyn std::error::Error>> = std::result::Result<T, E>;

/// One VMM's samples.
#[derive(Default)]
struct Figures {
    cold: Vec<Duration>,
    warm_ping: Vec<Duration>,
    warm_exec: Vec<Duration>,
    call: Vec<Duration>,
    answered: Vec<Duration>,
    first_exec: Vec<Duration>,
}

#[tokio::main]
async fn main() -> Result<()> {
    // Figures from different lanes must never share a ratio: say which this is.
    println!("lane: {}", supermachine_e2e::lane());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let runs = arg(1, 10).max(1);
    let vmms = list_arg(2, "ours,firecracker");
    let mut all = Vec::new();
    for vmm in &vmms {
        let figures = match vmm.as_str() {
            "ours" => ours(runs).await?,
            "firecracker" => firecracker(runs).await?,
            other => return Err(format!("unknown VMM '{other}': ours or firecracker").into()),
        };
        println!("-- {vmm}");
        report("cold boot -> agent ping", figures.cold.clone());
        report(
            "warm: agent ping (new connection)",
            figures.warm_ping.clone(),
        );
        report("warm: `true` exec round trip", figures.warm_exec.clone());
        report(
            "restore: the call (ours: to vCPUs running; firecracker: PUT /snapshot/load)",
            figures.call.clone(),
        );
        report("restore -> agent answered", figures.answered.clone());
        report(
            "restore -> first `true` exec done",
            figures.first_exec.clone(),
        );
        all.push((vmm.clone(), figures));
    }
    let find = |name: &str| all.iter().find(|(v, _)| v == name).map(|(_, f)| f);
    if let (Some(o), Some(f)) = (find("ours"), find("firecracker")) {
        let ratio = p50_ratio;
        println!(
            "ours / firecracker, p50s: cold boot {:.2}, warm ping {:.2}, warm exec {:.2}, \
             restore call {:.2}, restore -> agent {:.2}, restore -> first exec {:.2}",
            ratio(&o.cold, &f.cold),
            ratio(&o.warm_ping, &f.warm_ping),
            ratio(&o.warm_exec, &f.warm_exec),
            ratio(&o.call, &f.call),
            ratio(&o.answered, &f.answered),
            ratio(&o.first_exec, &f.first_exec),
        );
    }
    Ok(())
}

fn config() -> Result<supermachine::VmConfig> {
    Ok(supermachine_e2e::test_vm_config()?
        .vcpus(1)
        .memory_mib(256)
        .snapshot_cache(false))
}

/// `n` pings and `n` `true` execs through `agent`.
async fn warm(agent: &Agent, n: usize, figures: &mut Figures) -> Result<()> {
    for _ in 0..n {
        let t0 = Instant::now();
        agent.ping().await?;
        figures.warm_ping.push(t0.elapsed());
        let t0 = Instant::now();
        let status = agent.exec(["true"]).output().await?.status;
        figures.warm_exec.push(t0.elapsed());
        if !status.success() {
            return Err(format!("`true` exited with {status:?}").into());
        }
    }
    Ok(())
}

async fn ours(runs: usize) -> Result<Figures> {
    let mut figures = Figures::default();
    let t0 = Instant::now();
    let vm = Vm::start(config()?).await?;
    figures.cold.push(t0.elapsed());
    warm(vm.agent(), runs, &mut figures).await?;
    let dir = tempfile::tempdir()?;
    let snapshot = vm.snapshot(dir.path().join("snap")).await?;
    drop(vm);
    drop(Vm::restore(&snapshot).await?);
    for _ in 0..runs {
        let t0 = Instant::now();
        let vm = Vm::restore(&snapshot).await?;
        figures.call.push(vm.start_timings().vcpus_running);
        vm.agent().ping().await?;
        figures.answered.push(t0.elapsed());
        let status = vm.exec(["true"]).output().await?.status;
        figures.first_exec.push(t0.elapsed());
        if !status.success() {
            return Err(format!("`true` exited with {status:?}").into());
        }
    }
    Ok(figures)
}

async fn firecracker(runs: usize) -> Result<Figures> {
    let mut figures = Figures::default();
    let (kernel, initramfs, cmdline) = supermachine::boot_files(&config()?)?;
    let dir = tempfile::tempdir()?;
    let spec = Firecracker::boot_config(dir.path(), (&kernel, &initramfs, &cmdline), 1, 256);
    let t0 = Instant::now();
    let mut fc = Firecracker::spawn(dir.path(), Some(&spec)).await?;
    fc.wait_for_agent().await?;
    figures.cold.push(t0.elapsed());
    warm(&fc.agent, runs, &mut figures).await?;
    let snap = dir.path().join("snap");
    std::fs::create_dir(&snap)?;
    fc.snapshot(&snap).await?;
    drop(fc);
    // One unmeasured load: the memory file into the page cache, as ours gets.
    let warmup = Firecracker::spawn(dir.path(), None).await?;
    warmup.load(&snap).await?;
    drop(warmup);
    for _ in 0..runs {
        let mut fc = Firecracker::spawn(dir.path(), None).await?;
        let t0 = Instant::now();
        fc.load(&snap)
            .await
            .map_err(|e| format!("{e}\n{}", fc.log_tail()))?;
        figures.call.push(t0.elapsed());
        fc.wait_for_agent().await?;
        figures.answered.push(t0.elapsed());
        let status = fc.agent.exec(["true"]).output().await?.status;
        figures.first_exec.push(t0.elapsed());
        if !status.success() {
            return Err(format!("`true` exited with {status:?}").into());
        }
    }
    Ok(figures)
}
