//! Nothing the library does blocks the runtime it is called on: on a `current_thread` runtime
//! (what `#[tokio::test]` gives, and what many services embed), a ticker task that wants to
//! run every 5 ms keeps running while a VM cold-boots, is snapshotted, restored and stopped,
//! and while an image is pulled from a real local registry and its rootfs built.
//!
//! Each phase reports the ticker's worst lateness; the bound (25 ms) is far above a timer's
//! jitter and far below any of the blocking steps (hashing a kernel, building an initramfs,
//! creating a VM, writing a snapshot, unpacking layers), which take 50 ms to seconds each.
//!
//! On a 2-core machine the runtime thread also waits for a CPU now and then (the guest's vCPU
//! thread, the blocking pool and anything else running compete for the cores); that is the
//! OS's doing, not the library's. The kernel counts it per thread (`run_delay` in
//! `/proc/thread-self/schedstat`: time spent runnable but not running), so each tick's lateness
//! is charged to the runtime only for the part the thread was not waiting for a CPU.
//!
//! Needs `/dev/kvm`, root (the rootfs build keeps the layers' owners), `docker-registry` and
//! `skopeo`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use supermachine::{Image, PullOptions, Snapshot, Vm};
use supermachine_e2e::images::{self, LayerBlob, TarBuilder};
use supermachine_e2e::registry::Registry;
use tokio::time::Instant;

/// How often the ticker wants to run.
const TICK: Duration = Duration::from_millis(5);
/// The most a tick may be late while the library works.
const MAX_LATE: Duration = Duration::from_millis(25);

/// The ticker's worst lateness since the last [`Ticker::take`].
#[derive(Clone, Default)]
struct Ticker(Arc<Mutex<Worst>>);

/// The worst lateness, when it happened, and how many ticks ran.
#[derive(Default)]
struct Worst {
    /// Lateness not explained by waiting for a CPU: the runtime thread was busy or blocked.
    late: Duration,
    /// The same tick's lateness as the clock saw it.
    raw: Duration,
    at: Option<Instant>,
    ticks: u64,
}

/// How long this thread has waited for a CPU while runnable, in total (`None` where the
/// kernel does not keep schedstats).
fn run_delay() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let nanos = stat.split_whitespace().nth(1)?.parse().ok()?;
    Some(Duration::from_nanos(nanos))
}

impl Ticker {
    /// Spawns the ticking task on the current runtime.
    fn spawn() -> Self {
        let ticker = Ticker::default();
        let worst = ticker.clone();
        tokio::spawn(async move {
            // The runtime is current_thread: this task always runs on the runtime's thread.
            let mut waited_before = run_delay();
            loop {
                let due = Instant::now() + TICK;
                tokio::time::sleep_until(due).await;
                let raw = Instant::now().saturating_duration_since(due);
                let waited_now = run_delay();
                let waited = match (waited_before, waited_now) {
                    (Some(before), Some(now)) => now.saturating_sub(before),
                    _ => Duration::ZERO,
                };
                waited_before = waited_now;
                let late = raw.saturating_sub(waited);
                let mut worst = worst.0.lock().expect("ticker lock");
                if late >= worst.late {
                    worst.late = late;
                    worst.raw = raw;
                    worst.at = Some(due);
                }
                worst.ticks += 1;
            }
        });
        ticker
    }

    /// What happened since the last call, and a fresh start.
    fn take(&self) -> Worst {
        std::mem::take(&mut *self.0.lock().expect("ticker lock"))
    }
}

/// Runs `phase`, then checks the ticker kept ticking on time meanwhile.
async fn timed<T>(ticker: &Ticker, name: &str, phase: impl std::future::Future<Output = T>) -> T {
    // Let the ticker catch up first: the test's own set-up (a registry, skopeo) blocks.
    tokio::time::sleep(TICK * 2).await;
    ticker.take();
    let started = Instant::now();
    let value = phase.await;
    // Let the ticker run once more, so a stall at the very end of the phase is counted.
    tokio::time::sleep(TICK * 2).await;
    let Worst {
        late,
        raw,
        at,
        ticks,
    } = ticker.take();
    let at = at.map_or(0.0, |at| {
        at.saturating_duration_since(started).as_secs_f64() * 1e3
    });
    eprintln!(
        "{name}: {:.0} ms, {ticks} ticks, worst tick {:.1} ms late ({:.1} ms by the clock, \
         the rest waiting for a CPU), due {at:.0} ms in",
        started.elapsed().as_secs_f64() * 1e3,
        late.as_secs_f64() * 1e3,
        raw.as_secs_f64() * 1e3
    );
    assert!(ticks > 0, "{name}: the ticker never ran");
    assert!(
        late <= MAX_LATE,
        "{name} stalled the runtime: a 5 ms ticker was {late:?} late (limit {MAX_LATE:?})"
    );
    value
}

/// A one-layer busybox image, different on every run (so its rootfs is built, not reused).
fn fresh_image(dir: &std::path::Path) -> images::WrittenImage {
    let busybox =
        std::fs::read(supermachine_e2e::static_busybox().expect("busybox")).expect("read");
    let mut tar = TarBuilder::new();
    tar.busybox(&busybox, ["sh", "echo", "cat"]).file(
        "etc/run-id",
        format!("{:?}\n", std::time::SystemTime::now()).as_bytes(),
        0o644,
        0,
        0,
    );
    images::write_oci_layout(
        dir,
        "v1",
        &[LayerBlob::gzip(tar.finish()).expect("gzip")],
        serde_json::json!({ "Env": ["PATH=/bin"], "Cmd": ["sh"] }),
    )
    .expect("layout")
}

#[tokio::test]
async fn vm_lifecycle_and_image_build_never_stall_a_current_thread_runtime() {
    if !supermachine_e2e::kvm_available_or_skip(
        "vm_lifecycle_and_image_build_never_stall_a_current_thread_runtime",
    ) {
        return;
    }
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    let ticker = Ticker::spawn();
    let work = tempfile::tempdir().expect("temp dir");

    // A cold boot: no snapshot cache, so kernel hashing, initramfs and VM creation all run.
    let config = supermachine_e2e::test_vm_config()
        .expect("config")
        .snapshot_cache(false);
    let vm = timed(&ticker, "cold Vm::start", Vm::start(config))
        .await
        .expect("start");
    let dir = work.path().join("snap");
    let snapshot: Snapshot = timed(&ticker, "Vm::snapshot", vm.snapshot(&dir))
        .await
        .expect("snapshot");
    timed(&ticker, "Vm::stop", vm.stop()).await;

    let restored = timed(&ticker, "Vm::restore", Vm::restore(&snapshot))
        .await
        .expect("restore");
    let out = restored
        .exec(["echo", "restored"])
        .output()
        .await
        .expect("exec");
    assert_eq!(&out.stdout[..], b"restored\n");
    timed(&ticker, "Vm::stop (restored)", restored.stop()).await;

    // An image pulled from a real registry into a fresh cache, and its rootfs built.
    let layout = fresh_image(&work.path().join("layout"));
    let registry = Registry::start().expect("registry");
    registry
        .push_layout(&layout.dir, "v1", "test/stall:v1", false)
        .expect("push");
    let options = PullOptions::new().cache_dir(work.path().join("cache"));
    let image = timed(
        &ticker,
        "Image::pull",
        Image::pull_with(&registry.reference("test/stall:v1"), options),
    )
    .await
    .expect("pull");
    let rootfs = timed(&ticker, "Image::rootfs (build)", image.rootfs())
        .await
        .expect("rootfs");
    assert!(!rootfs.reused, "the rootfs was built, not found in a cache");
}
