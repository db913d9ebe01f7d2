//! What the guest kernel's tick rate costs: the same guest-side workloads, to be run once per
//! kernel (e.g. the project's HZ=25 kernel and an HZ=100 build of it) in the same lane, side by
//! side. HZ=25 was chosen for PVM hosts, where every tick is emulated; this measures whether it
//! costs anything where ticks are cheap.
//!
//! ```sh
//! SUPERMACHINE_KERNEL=... cargo run --release --example bench_hz -- [SAMPLES]
//! lane/bench.sh bench_hz 20     # in the nested lane
//! ```
//!
//! One vCPU, 256 MiB. Figures: exec `true` round trips on an idle guest and while a CPU-bound
//! loop runs in it (wake-up latency behind a busy CPU is where a slower tick shows first);
//! 100 × `sleep 0.01` (timer precision: high-resolution timers should keep it at ~1.0 s
//! whatever the tick); two CPU-bound loops at once against one (fairness of the time slices).

use std::time::{Duration, Instant};

use supermachine::Vm;
use supermachine_e2e::bench::{arg, report};
use supermachine_e2e::exec_output;

/// A shell loop of about `iterations` steps; returns its wall time.
async fn spin(vm: &Vm, iterations: u32) -> Duration {
    let script = format!("i=0; while [ $i -lt {iterations} ]; do i=$((i+1)); done");
    let start = Instant::now();
    let (code, out) = exec_output(vm.exec(["sh", "-c", &script])).await;
    assert_eq!(code, 0, "{out}");
    start.elapsed()
}

async fn exec_true(vm: &Vm, samples: usize) -> Vec<Duration> {
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let start = Instant::now();
        let (code, _) = exec_output(vm.exec(["true"])).await;
        assert_eq!(code, 0);
        times.push(start.elapsed());
    }
    times
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let samples = arg(1, 20);
    println!("lane: {}", supermachine_e2e::lane());
    let config = supermachine_e2e::test_vm_config()?.vcpus(1).memory_mib(256);
    let vm = Vm::start(config).await?;
    println!(
        "guest kernel: {}",
        std::env::var(supermachine::KERNEL_ENV).unwrap_or_else(|_| "(from the test config)".into())
    );

    report("exec `true`, idle guest", exec_true(&vm, samples).await);

    let mut hog = vm.exec(["sh", "-c", "while :; do :; done"]).spawn().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    report(
        "exec `true` while a CPU-bound loop runs in the guest",
        exec_true(&vm, samples).await,
    );
    hog.kill().await?;

    let start = Instant::now();
    let (code, _) = exec_output(vm.exec([
        "sh",
        "-c",
        "i=0; while [ $i -lt 100 ]; do sleep 0.01; i=$((i+1)); done",
    ]))
    .await;
    assert_eq!(code, 0);
    println!(
        "100 x sleep 0.01 (1.0 s of sleeping, plus 100 forks): {:.3} s",
        start.elapsed().as_secs_f64()
    );

    // Size one loop to about a second alone.
    let mut iterations = 20_000;
    let mut one = spin(&vm, iterations).await;
    while one < Duration::from_millis(800) && iterations < 10_000_000 {
        iterations *= 4;
        one = spin(&vm, iterations).await;
    }
    let one = spin(&vm, iterations).await.min(one);
    let start = Instant::now();
    let (a, b) = tokio::join!(spin(&vm, iterations), spin(&vm, iterations));
    let both = start.elapsed();
    println!(
        "two CPU-bound loops on one vCPU: {:.2} s together vs {:.2} s alone: {:.2}x \
         (2.0 = no overhead); each finished after {:.2} s / {:.2} s",
        both.as_secs_f64(),
        one.as_secs_f64(),
        both.as_secs_f64() / one.as_secs_f64(),
        a.as_secs_f64(),
        b.as_secs_f64()
    );
    vm.stop().await;
    Ok(())
}
