//! Guest networking benchmark: our user-mode network next to Firecracker with a TAP device.
//!
//! ```text
//! cargo run --release --example bench_net -- [MIB] [ROUNDS] [VMMS] [RUNS]
//! lane/bench.sh --timeout 600 bench_net 8 20 ours,firecracker 5     (the nested lane)
//! ```
//!
//! Root only: the process first moves itself into a network namespace of its own (only `lo`, no
//! route out), so nothing it does can leave the machine. The test host is `203.0.113.10` on
//! `lo` there. For each VMM in VMMS (default `ours,firecracker`) it boots one guest with the
//! project's kernel and agent initramfs (a static busybox in `/bin`, 1 vCPU, 256 MiB):
//! * `ours`: [`Vm`] with [`Network::public`] (the guest reaches the test host through the
//!   in-process user-mode stack);
//! * `firecracker`: `$SUPERMACHINE_FIRECRACKER` (default `../shared/peers/firecracker`,
//!   `--no-seccomp --no-api`) with a TAP device `smbtap0` (`192.0.2.1/24`, the guest
//!   `192.0.2.2/24`, MTU 1500, the host routes to its own `lo` address), the same kernel, the same
//!   initramfs (the agent configures `eth0` from `supermachine.net=`), our agent reached through
//!   Firecracker's vsock muxer ([`UnixConnector::muxed`]).
//!
//! Then RUNS (default 5) times, VMMs interleaved, the guest (busybox `nc -e`) does against
//! servers in this process:
//! * download: `dd` reads MIB (default 8) MiB to EOF; timed by the server from accept to the
//!   guest's "done" line after its last byte;
//! * upload: `dd` writes MIB MiB; timed by the server from accept to the last byte read;
//! * `wget`: the download again, by `busybox wget -O /dev/null` from an HTTP server, timed by
//!   the host around the exec (so it includes an exec round trip to the agent);
//! * ROUNDS (default 20) connections, each `nc ... -e cat` echoing 1-byte pings: `rtt` is the
//!   server's 1-byte round trip on the open connection (third ping: the first may wait for
//!   `cat` to start), `conn` the time between consecutive accepts (a whole guest-side
//!   connect + 1-byte round trip + close, with the guest's fork/exec of `nc` and `cat`).
//!
//! `BENCH_NET_TCP_BUFFER_KIB` sets our stack's per-flow buffer ([`supermachine::Limits`]).
//!
//! It prints each run, the medians over runs, and ratios ours/firecracker.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use supermachine::{ExecBuilder, Network, Vm};
use supermachine_e2e::bench::{arg, list_arg};
use supermachine_e2e::firecracker::Firecracker as Peer;

type Result<T, E = Box<dyn std::error::Error>> = std::result::Result<T, E>;

/// The test host, on `lo` in the namespace.
const HOST: &str = "203.0.113.10";
/// Firecracker's TAP: the host's and the guest's ends.
const TAP: &str = "smbtap0";
const TAP_HOST: &str = "192.0.2.1";
const TAP_GUEST: &str = "192.0.2.2";
const DOWN_PORT: u16 = 9001;
const UP_PORT: u16 = 9002;
const RTT_PORT: u16 = 9003;
const HTTP_PORT: u16 = 9004;
/// How long one measurement may take before the bench gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);
/// How many bytes the next download/upload moves (the warm-up moves fewer).
static BYTES: AtomicU64 = AtomicU64::new(0);

fn main() -> Result<()> {
    // Figures from different lanes must never share a ratio: say which this is.
    println!("lane: {}", supermachine_e2e::lane());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let mib = arg(1, 8).max(1) as u64;
    let rounds = arg(2, 20).max(3);
    let vmms = list_arg(3, "ours,firecracker");
    let runs = arg(4, 5).max(1);
    // Before any thread exists: every thread made later is in the namespace too.
    enter_namespace()?;
    println!("load: {}", loadavg());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(bench(mib, rounds, &vmms, runs));
    println!("load: {}", loadavg());
    result
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// A new network namespace with only `lo` up, [`HOST`] on it, and no route at all.
fn enter_namespace() -> Result<()> {
    // SAFETY: unshare takes no pointers; called before this process starts any thread.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(format!(
            "unshare(CLONE_NEWNET): {} (run as root)",
            std::io::Error::last_os_error()
        )
        .into());
    }
    ip(&["link", "set", "lo", "up"])?;
    ip(&["addr", "add", &format!("{HOST}/32"), "dev", "lo"])?;
    let routes = std::fs::read_to_string("/proc/net/route")?;
    if routes.lines().count() != 1 {
        return Err(format!("a route out of the namespace exists: {routes}").into());
    }
    Ok(())
}

/// iproute2's `ip`, else busybox's.
fn ip(args: &[&str]) -> Result<()> {
    let status = Command::new("ip")
        .args(args)
        .status()
        .or_else(|_| Command::new("busybox").arg("ip").args(args).status())?;
    if !status.success() {
        return Err(format!("ip {args:?}: {status}").into());
    }
    Ok(())
}

/// What the servers measured.
enum Sample {
    Down(Duration),
    /// An HTTP download served (timed in the guest's exec instead).
    Http,
    Up(Duration),
    /// Accept time and the 1-byte round trip.
    Rtt(Instant, Duration),
}

/// The three servers on [`HOST`] (and, for the TAP guest, reached through the host's routing).
fn start_servers() -> Result<mpsc::Receiver<Result<Sample, String>>> {
    let (tx, rx) = mpsc::channel();
    let serve = |port: u16, handle: fn(TcpStream, u64) -> std::io::Result<Sample>| {
        let listener = TcpListener::bind(("0.0.0.0", port))?;
        let tx = tx.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let sample = stream
                    .and_then(|s| handle(s, BYTES.load(Ordering::SeqCst)))
                    .map_err(|e| format!("server on port {port}: {e}"));
                if tx.send(sample).is_err() {
                    return;
                }
            }
        });
        Ok::<_, std::io::Error>(())
    };
    serve(DOWN_PORT, serve_down)?;
    serve(UP_PORT, serve_up)?;
    serve(HTTP_PORT, serve_http)?;
    serve(RTT_PORT, serve_rtt)?;
    Ok(rx)
}

/// Writes `bytes` filler bytes to `stream`.
fn write_filler(stream: &mut TcpStream, bytes: u64) -> std::io::Result<()> {
    let buf = vec![0x5au8; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        stream.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

fn serve_down(mut stream: TcpStream, bytes: u64) -> std::io::Result<Sample> {
    let started = Instant::now();
    write_filler(&mut stream, bytes)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    if line.trim() != "done" {
        return Err(std::io::Error::other(format!(
            "the guest answered {line:?}, not done"
        )));
    }
    Ok(Sample::Down(started.elapsed()))
}

/// `GET` anything: `bytes` bytes, then close.
fn serve_http(mut stream: TcpStream, bytes: u64) -> std::io::Result<Sample> {
    let mut reader = BufReader::new(&stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
    }
    let header = format!("HTTP/1.0 200 OK\r\nContent-Length: {bytes}\r\nConnection: close\r\n\r\n");
    stream.write_all(header.as_bytes())?;
    write_filler(&mut stream, bytes)?;
    Ok(Sample::Http)
}

fn serve_up(mut stream: TcpStream, bytes: u64) -> std::io::Result<Sample> {
    let started = Instant::now();
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = stream.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::Error::other(format!("EOF with {left} bytes left")));
        }
        left -= n as u64;
    }
    let elapsed = started.elapsed();
    stream.write_all(b"k")?;
    Ok(Sample::Up(elapsed))
}

fn serve_rtt(mut stream: TcpStream, _: u64) -> std::io::Result<Sample> {
    let accepted = Instant::now();
    stream.set_nodelay(true)?;
    let mut rtt = Duration::ZERO;
    for _ in 0..3 {
        let sent = Instant::now();
        stream.write_all(b"x")?;
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte)?;
        rtt = sent.elapsed();
    }
    Ok(Sample::Rtt(accepted, rtt))
}

/// A booted guest under one VMM.
enum Guest {
    Ours(Box<Vm>),
    Firecracker(FcGuest),
}

impl Guest {
    fn sh(&self, script: &str) -> ExecBuilder {
        let argv = ["busybox", "sh", "-c", script];
        match self {
            Guest::Ours(vm) => vm.exec(argv),
            Guest::Firecracker(fc) => fc.peer.agent.exec(argv),
        }
    }
}

async fn start_guest(vmm: &str) -> Result<Guest> {
    let base = supermachine_e2e::test_vm_config()?
        .vcpus(1)
        .memory_mib(256)
        .snapshot_cache(false);
    match vmm {
        "ours" => {
            let mut network = Network::public().dns_upstreams([]);
            // An experiment knob: the per-flow buffer (and guest-facing window), in KiB.
            if let Some(kib) = std::env::var("BENCH_NET_TCP_BUFFER_KIB")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
            {
                network = network.limits(supermachine::Limits {
                    tcp_buffer: kib << 10,
                    ..Default::default()
                });
                println!("ours: tcp_buffer {kib} KiB");
            }
            let config = base.network(network);
            Ok(Guest::Ours(Box::new(Vm::start(config).await?)))
        }
        "firecracker" => Ok(Guest::Firecracker(start_firecracker(base).await?)),
        other => Err(format!("unknown VMM '{other}': ours or firecracker").into()),
    }
}

async fn start_firecracker(base: supermachine::VmConfig) -> Result<FcGuest> {
    // Same kernel and initramfs; no NIC of ours, but the agent configures Firecracker's eth0.
    let config = base.network(Network::none()).kernel_cmdline(format!(
        "supermachine.net={TAP_GUEST}/24,{TAP_HOST},{TAP_HOST},1500"
    ));
    let (kernel, initramfs, cmdline) = supermachine::boot_files(&config)?;
    ip(&["tuntap", "add", "dev", TAP, "mode", "tap"])?;
    ip(&["addr", "add", &format!("{TAP_HOST}/24"), "dev", TAP])?;
    ip(&["link", "set", TAP, "mtu", "1500", "up"])?;
    let dir = tempfile::tempdir()?;
    let mut spec = Peer::boot_config(dir.path(), (&kernel, &initramfs, &cmdline), 1, 256);
    spec["network-interfaces"] = serde_json::json!([{
        "iface_id": "eth0",
        "host_dev_name": TAP,
        "guest_mac": "06:00:c0:00:02:02",
    }]);
    let mut fc = Peer::spawn(dir.path(), Some(&spec)).await?;
    let answered = fc.wait_for_agent().await?;
    println!(
        "firecracker: agent answered after {:.1} s",
        answered.as_secs_f64()
    );
    Ok(FcGuest {
        peer: fc,
        _dir: dir,
    })
}

/// Firecracker (killed first on drop) and the directory of its sockets and log.
struct FcGuest {
    peer: Peer,
    _dir: tempfile::TempDir,
}

/// One run's figures.
#[derive(Clone, Copy, Default)]
struct Figures {
    down: f64,
    up: f64,
    wget: f64,
    rtt_ms: f64,
    conn_ms: f64,
}

async fn bench(mib: u64, rounds: usize, vmms: &[String], runs: usize) -> Result<()> {
    let bytes = mib << 20;
    let samples = start_servers()?;
    let mut guests = Vec::new();
    for vmm in vmms {
        let started = Instant::now();
        let guest = start_guest(vmm).await?;
        println!(
            "{vmm}: guest up in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        // Warm-up: page in nc and cat, open the path once.
        measure(&guest, &samples, 1, 3).await?;
        guests.push((vmm.clone(), guest, Vec::new()));
    }
    println!("{mib} MiB each way, {rounds} connections, {runs} runs; MiB/s and ms");
    for run in 0..runs {
        for (vmm, guest, figures) in guests.iter_mut() {
            let f = measure(guest, &samples, bytes, rounds).await?;
            println!(
                "run {run} {vmm:<12} down {:7.1}  up {:7.1}  rtt {:7.2}  conn {:7.2}  wget {:7.1}",
                f.down, f.up, f.rtt_ms, f.conn_ms, f.wget
            );
            figures.push(f);
        }
    }
    println!("medians of {runs} runs ({mib} MiB, {rounds} connections a run):");
    println!(
        "{:<18} {:>10} {:>10} {:>12} {:>12} {:>11}",
        "vmm", "down MiB/s", "up MiB/s", "rtt p50 ms", "conn p50 ms", "wget MiB/s"
    );
    let mut medians = Vec::new();
    for (vmm, _, figures) in &guests {
        let m = Figures {
            down: median(figures.iter().map(|f| f.down)),
            up: median(figures.iter().map(|f| f.up)),
            wget: median(figures.iter().map(|f| f.wget)),
            rtt_ms: median(figures.iter().map(|f| f.rtt_ms)),
            conn_ms: median(figures.iter().map(|f| f.conn_ms)),
        };
        println!(
            "{vmm:<18} {:>10.1} {:>10.1} {:>12.2} {:>12.2} {:>11.1}",
            m.down, m.up, m.rtt_ms, m.conn_ms, m.wget
        );
        medians.push((vmm.as_str(), m));
    }
    let find = |name: &str| medians.iter().find(|(v, _)| *v == name).map(|(_, m)| *m);
    if let (Some(o), Some(f)) = (find("ours"), find("firecracker")) {
        println!(
            "{:<18} {:>10.2} {:>10.2} {:>12.2} {:>12.2} {:>11.2}",
            "ours/firecracker",
            o.down / f.down,
            o.up / f.up,
            o.rtt_ms / f.rtt_ms,
            o.conn_ms / f.conn_ms,
            o.wget / f.wget
        );
    }
    for (_, guest, _) in guests {
        if let Guest::Ours(vm) = guest {
            vm.stop().await;
        }
    }
    Ok(())
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// One download, one upload and `rounds` connections.
async fn measure(
    guest: &Guest,
    samples: &mpsc::Receiver<Result<Sample, String>>,
    bytes: u64,
    rounds: usize,
) -> Result<Figures> {
    BYTES.store(bytes, Ordering::SeqCst);
    let host = HOST;
    let mib = bytes as f64 / (1u64 << 20) as f64;
    let down = format!(
        "busybox nc {host} {DOWN_PORT} -e sh -c 'busybox dd of=/dev/null bs=65536 2>/dev/null; echo done'"
    );
    let Sample::Down(d) = run_step(guest, samples, &down, 1).await?.remove(0) else {
        return Err("download: wrong sample".into());
    };
    // dd blocks of 64 KiB, then whatever is left.
    let (blocks, rest) = (bytes / 65536, bytes % 65536);
    let up = format!(
        "busybox nc {host} {UP_PORT} -e sh -c 'busybox dd if=/dev/zero bs=65536 count={blocks} \
         2>/dev/null; busybox head -c {rest} /dev/zero; busybox head -c 1 >/dev/null'"
    );
    let Sample::Up(u) = run_step(guest, samples, &up, 1).await?.remove(0) else {
        return Err("upload: wrong sample".into());
    };
    // The same download by `wget` (no reply line): timed by the exec, so it includes the
    // exec's own round trip to the agent.
    let wget = format!("busybox wget -q -O /dev/null http://{host}:{HTTP_PORT}/");
    let started = Instant::now();
    run_step(guest, samples, &wget, 1).await?;
    let w = started.elapsed();
    let rtt = format!(
        "for i in $(busybox seq {rounds}); do busybox nc {host} {RTT_PORT} -e busybox cat || exit 1; done"
    );
    let mut accepts = Vec::new();
    let mut rtts = Vec::new();
    for sample in run_step(guest, samples, &rtt, rounds).await? {
        if let Sample::Rtt(at, rtt) = sample {
            accepts.push(at);
            rtts.push(rtt.as_secs_f64() * 1e3);
        }
    }
    let conns = accepts
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64() * 1e3);
    Ok(Figures {
        down: mib / d.as_secs_f64(),
        up: mib / u.as_secs_f64(),
        wget: mib / w.as_secs_f64(),
        rtt_ms: median(rtts.into_iter()),
        conn_ms: median(conns),
    })
}

/// Runs `script` in the guest and collects `expect` server samples.
async fn run_step(
    guest: &Guest,
    samples: &mpsc::Receiver<Result<Sample, String>>,
    script: &str,
    expect: usize,
) -> Result<Vec<Sample>> {
    let Ok(output) = tokio::time::timeout(STEP_TIMEOUT, guest.sh(script).output()).await else {
        // What the guest was doing: its processes and TCP sockets.
        let diag = guest
            .sh("busybox ps; cat /proc/net/tcp")
            .output()
            .await
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let pending: Vec<String> = samples
            .try_iter()
            .map(|s| match s {
                Ok(Sample::Down(d)) => format!("down {d:?}"),
                Ok(Sample::Up(d)) => format!("up {d:?}"),
                Ok(Sample::Http) => "http".into(),
                Ok(Sample::Rtt(_, d)) => format!("rtt {d:?}"),
                Err(e) => e,
            })
            .collect();
        return Err(
            format!("`{script}` timed out; server samples {pending:?}; guest:\n{diag}").into(),
        );
    };
    let output = output?;
    if !output.status.success() {
        return Err(format!(
            "`{script}` failed ({:?}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    let mut got = Vec::new();
    while got.len() < expect {
        match samples.recv_timeout(Duration::from_secs(10)) {
            Ok(sample) => got.push(sample?),
            Err(_) => return Err(format!("`{script}`: {} of {expect} samples", got.len()).into()),
        }
    }
    Ok(got)
}
