//! Snapshot restore benchmarks.
//!
//! ```text
//! cargo run --release --example bench_restore -- [RUNS] [CONCURRENT]
//! ```
//!
//! Boots (or restores from the snapshot cache) one VM with the project's kernel, agent and a
//! static busybox, snapshots it into a temp dir, then over RUNS (default 30) sequential
//! restores reports, as p50/p99:
//! * (a) restore → vCPUs running: the VMM's work (vmstate read and checked, memory file
//!   mapped, devices and hypervisor state loaded, threads started);
//! * (b) restore → the first agent ping answered: the guest applies the reseed (RNG + clock)
//!   that goes in front of the first request, then answers, over vsock on the listener that
//!   survived the snapshot;
//! * (c) restore → the first `true` exec completed (the reseed, then a guest fork+exec), on a
//!   restore of its own;
//!
//! Where the hypervisor can pre-fault guest memory, `Vm::snapshot` recorded the snapshot's
//! working set: restores with it and without it (the file moved aside) alternate, and both
//! are reported, with the ratio of their medians. The warm baseline follows: RUNS agent pings
//! and `true` execs on the last restored VM, and the ratios (b)/ping and (c)/exec.
//!
//! It then restores CONCURRENT (default 20) VMs at once from the same snapshot and reports the
//! total wall time and the private memory (`Private_Dirty` from /proc/self/smaps) each idle VM
//! adds. The host is noisy: compare medians of repeated runs.
//!
//! CPU time (this process's user + system time, which includes the guests' own execution: a
//! vCPU thread runs its guest) is reported for the (b) restores and for the concurrent ones,
//! with the floor it puts under the concurrent wall time: no schedule answers CONCURRENT
//! restores sooner than their CPU time divided by the CPUs this process may use. An estimate
//! of that floor without contention (CONCURRENT times one restore's CPU time) follows.

use std::time::{Duration, Instant};

use supermachine::{Snapshot, Vm};

use supermachine_e2e::bench::{arg, median, p50_ratio, report};

/// Sum of `Private_Dirty` over this process's mappings, in KiB.
fn private_dirty_kib() -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    smaps
        .lines()
        .filter_map(|l| l.strip_prefix("Private_Dirty:"))
        .filter_map(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .sum()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Figures from different lanes must never share a ratio: say which this is.
    println!("lane: {}", supermachine_e2e::lane());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let runs = arg(1, 30).max(1);
    let concurrent = arg(2, 20).max(1);
    let config = supermachine_e2e::test_vm_config()?;

    let started = Instant::now();
    let vm = Vm::start(config).await?;
    let t = vm.start_timings();
    println!(
        "source VM: {} in {:.1} s",
        if t.restored {
            "restored from the snapshot cache"
        } else {
            "cold-booted (and cached)"
        },
        started.elapsed().as_secs_f64()
    );
    let dir = tempfile::tempdir()?;
    let snap_dir = dir.path().join("snap");
    let t0 = Instant::now();
    let snapshot = vm.snapshot(&snap_dir).await?;
    println!(
        "snapshot taken in {:.1} ms (with the working set's recording, where there is one)",
        t0.elapsed().as_secs_f64() * 1e3
    );
    drop(vm);

    // The working set `Vm::snapshot` recorded (where the hypervisor can pre-fault): restores
    // with and without it alternate, so both see the same host.
    let set_file = snapshot.dir().join("working-set");
    let set_off = snapshot.dir().join("working-set.off");
    let modes: &[&str] = if set_file.exists() {
        println!(
            "working set: {} runs of pages recorded",
            std::fs::metadata(&set_file)?.len().saturating_sub(24) / 16
        );
        &["working set", "no working set"]
    } else {
        println!("working set: none (the hypervisor cannot pre-fault guest memory)");
        &["no working set"]
    };
    let use_set = |on: bool| -> std::io::Result<()> {
        match (on, set_file.exists()) {
            (true, false) if set_off.exists() => std::fs::rename(&set_off, &set_file),
            (false, true) => std::fs::rename(&set_file, &set_off),
            _ => Ok(()),
        }
    };

    // Warm-up: the first restore faults the memory file into the page cache.
    drop(Vm::restore(&snapshot).await?);

    let mut marker = TraceMarker::from_env();
    let mut figures: Vec<Figures> = modes.iter().map(|_| Figures::default()).collect();
    let mut last: Option<Vm> = None;
    for run in 0..runs {
        for (m, mode) in modes.iter().enumerate() {
            use_set(*mode == "working set")?;
            // (b) and (c) each from a restore of their own: the first request after a restore
            // carries the reseed, and whichever came first would warm the guest for the other.
            for first in [Ask::Ping, Ask::Exec] {
                // One VM at a time: an idle one beside it would add its exits to the trace.
                if let Some(vm) = last.take() {
                    vm.stop().await;
                }
                // Each restore's marks carry its own number, and the first its kind.
                let run = (run * modes.len() + m) * 2 + first as usize;
                marker.mark(&format!("restore {run} start {}", mode.replace(' ', "-")));
                let t0 = Instant::now();
                let cpu0 = process_cpu_time()?;
                let vm = Vm::restore(&snapshot).await?;
                let vcpus = vm.start_timings().vcpus_running;
                marker.mark(&format!(
                    "restore {run} running vcpus_us={}",
                    vcpus.as_micros()
                ));
                figures[m].vmm.push(vcpus);
                match first {
                    Ask::Ping => {
                        vm.agent().ping().await?;
                        figures[m].agent.push(t0.elapsed());
                        figures[m].agent_cpu.push(process_cpu_time()? - cpu0);
                        marker.mark(&format!("restore {run} ping done"));
                    }
                    Ask::Exec => {
                        let status = vm.exec(["true"]).output().await?.status;
                        figures[m].exec.push(t0.elapsed());
                        marker.mark(&format!("restore {run} exec done"));
                        if !status.success() {
                            return Err(format!("`true` exited with {status:?}").into());
                        }
                    }
                }
                last = Some(vm);
            }
        }
    }
    use_set(true)?;
    // The baseline, same run: the last restored VM, now warm.
    let vm = last.ok_or("no restore ran")?;
    let (ping, warm_exec) = warm_round_trips(&vm, runs).await?;
    drop(vm);
    let ratio = p50_ratio;
    for (mode, f) in modes.iter().zip(&figures) {
        println!("-- restores with {mode}");
        report("(a) restore -> vCPUs running", f.vmm.clone());
        report(
            "(b) restore -> first ping answered (reseed+clock go with it)",
            f.agent.clone(),
        );
        report("(c) restore -> first `true` exec done", f.exec.clone());
    }
    report("warm: agent ping (new connection)", ping.clone());
    report("warm: `true` exec round trip", warm_exec.clone());
    for (mode, f) in modes.iter().zip(&figures) {
        println!(
            "ratios of p50s, {mode}: (b)/warm ping {:.2}, (c)/warm exec {:.2}",
            ratio(&f.agent, &ping),
            ratio(&f.exec, &warm_exec)
        );
    }
    if figures.len() == 2 {
        println!(
            "working set / none, p50s: (a) {:.2}, (b) {:.2}, (c) {:.2}",
            ratio(&figures[0].vmm, &figures[1].vmm),
            ratio(&figures[0].agent, &figures[1].agent),
            ratio(&figures[0].exec, &figures[1].exec)
        );
    }

    // The restores the concurrent ones are compared with: the working set's, where recorded.
    let one = &figures[0];
    report(
        &format!(
            "CPU time of one restore -> first ping answered ({})",
            modes[0]
        ),
        one.agent_cpu.clone(),
    );
    concurrent_restores(&snapshot, concurrent, &one.agent, &one.agent_cpu).await
}

/// This process's CPU time so far, user and system: a vCPU thread's time includes its guest's.
/// It never decreases, so later minus earlier cannot underflow.
fn process_cpu_time() -> std::io::Result<Duration> {
    // SAFETY: all-zero is a valid `rusage` (integers and timevals only).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a live, writable `rusage`, the out-parameter getrusage fills.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Ok(tv(usage.ru_utime) + tv(usage.ru_stime))
}

/// The first request after a restore.
#[derive(Clone, Copy)]
enum Ask {
    Ping = 0,
    Exec = 1,
}

/// One kind of restore's samples.
#[derive(Default)]
struct Figures {
    vmm: Vec<Duration>,
    agent: Vec<Duration>,
    /// Process CPU time of each (b) sample.
    agent_cpu: Vec<Duration>,
    exec: Vec<Duration>,
}

/// `n` agent pings and `n` `true` execs on a warm VM.
async fn warm_round_trips(
    vm: &Vm,
    n: usize,
) -> Result<(Vec<Duration>, Vec<Duration>), Box<dyn std::error::Error>> {
    let (mut ping, mut exec) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let t0 = Instant::now();
        vm.agent().ping().await?;
        ping.push(t0.elapsed());
        let t0 = Instant::now();
        vm.exec(["true"]).output().await?;
        exec.push(t0.elapsed());
    }
    Ok((ping, exec))
}

/// `BENCH_TRACE_MARKER=/sys/kernel/tracing/trace_marker`: each restore's steps written into the
/// kernel's trace, so `lane/trace-restore.sh` can count KVM exits and faults per step.
struct TraceMarker(Option<std::fs::File>);

impl TraceMarker {
    fn from_env() -> Self {
        let file = std::env::var_os("BENCH_TRACE_MARKER")
            .and_then(|path| std::fs::OpenOptions::new().write(true).open(path).ok());
        TraceMarker(file)
    }

    fn mark(&mut self, what: &str) {
        use std::io::Write;
        if let Some(file) = &mut self.0 {
            let _ = file.write_all(format!("sm: {what}").as_bytes());
        }
    }
}

/// `n` restores at once, each until its first ping is answered; `one` and `one_cpu` are the
/// wall and CPU times of single (b) restores, for the ratios.
async fn concurrent_restores(
    snapshot: &Snapshot,
    n: usize,
    one: &[Duration],
    one_cpu: &[Duration],
) -> Result<(), Box<dyn std::error::Error>> {
    let before = private_dirty_kib();
    let t0 = Instant::now();
    let cpu0 = process_cpu_time()?;
    let mut tasks = Vec::new();
    for _ in 0..n {
        let snapshot = snapshot.clone();
        tasks.push(tokio::spawn(async move {
            let vm = Vm::restore(&snapshot).await?;
            vm.agent().ping().await?;
            Ok::<_, supermachine::Error>(vm)
        }));
    }
    let mut vms = Vec::new();
    for task in tasks {
        vms.push(task.await??);
    }
    let wall = t0.elapsed();
    let cpu = process_cpu_time()? - cpu0;
    // Let the guests settle into idle before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = private_dirty_kib();
    println!(
        "{n} concurrent restores: all agents answered after {:.1} ms; private memory per idle \
         VM: {:.2} MiB (Private_Dirty {} KiB -> {} KiB)",
        wall.as_secs_f64() * 1e3,
        (after.saturating_sub(before)) as f64 / n as f64 / 1024.0,
        before,
        after
    );
    drop(vms);
    // What the scheduler offers this process (a fractional cgroup quota rounds down).
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let (Some(one), Some(one_cpu)) = (median(one), median(one_cpu)) else {
        return Ok(());
    };
    if one.is_zero() {
        return Ok(());
    }
    let times_one = |d: Duration| d.as_secs_f64() / one.as_secs_f64();
    println!(
        "{n} concurrent: wall {:.1}x one restore's (b) p50 ({:.1} ms); they used {:.1} ms of CPU \
         ({:.1} ms each, one alone: {:.1} ms p50) on {cpus} CPUs",
        times_one(wall),
        ms(one),
        ms(cpu),
        ms(cpu) / n as f64,
        ms(one_cpu),
    );
    // Wall time >= CPU time / CPUs, whatever the schedule: a floor for this run. The second
    // figure estimates the floor without contention, assuming each of the n restores needs
    // the CPU one restore alone used.
    let floor = cpu.div_f64(cpus as f64);
    let estimate = one_cpu.mul_f64(n as f64 / cpus as f64);
    println!(
        "{n} concurrent, CPU-bound floor: this run's CPU / {cpus} CPUs = {:.1} ms ({:.1}x one \
         (b)); estimated without contention, {n} x one alone's CPU / {cpus} CPUs = {:.1} ms \
         ({:.1}x one (b))",
        ms(floor),
        times_one(floor),
        ms(estimate),
        times_one(estimate),
    );
    Ok(())
}
