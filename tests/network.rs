//! Guest networking end to end: real VMs on the user-mode network, talking to test hosts.
//!
//! Every test runs in a network namespace of its own: the test re-runs itself under
//! `unshare -n` (root), and the child checks it is in a new namespace with no route before it
//! does anything. In there only `lo` exists; the test hosts are addresses put on `lo` —
//! documentation addresses (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24) for "public" hosts,
//! private/loopback/link-local ones for hosts the default policy must refuse. Nothing can leave
//! the machine, whatever the policy does.
//!
//! Needs `/dev/kvm`, root and `ip` (or busybox); the DNS test also `dnsmasq` (skipped without
//! it). Skips without
//! `/dev/kvm` only when `SUPERMACHINE_REQUIRE_KVM` is unset.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use supermachine::{Network, Vm, VmConfig};

/// Set in the re-run child that is inside the namespace.
const CHILD_ENV: &str = "SUPERMACHINE_NETNS_CHILD";

/// A "public" web host.
const WEB: &str = "203.0.113.10";
/// Another "public" host (outside an allow-list).
const OTHER: &str = "198.51.100.10";
/// The test DNS server.
const DNS: &str = "192.0.2.53";
/// Hosts the default policy refuses: private, private, link-local (metadata), CGNAT.
const REFUSED: [&str; 4] = ["10.1.2.3", "192.168.7.7", "169.254.169.254", "100.64.1.1"];

/// Runs `body` inside a fresh network namespace (by re-running this test under `unshare -n`).
fn in_netns(test: &str, body: impl FnOnce()) {
    if std::env::var_os(CHILD_ENV).is_some() {
        enter_checked_namespace();
        body();
        return;
    }
    if !supermachine_e2e::kvm_available_or_skip(test) {
        return;
    }
    let exe = std::env::current_exe().expect("test binary");
    let parent_ns = std::fs::read_link("/proc/self/ns/net").expect("own netns");
    let mut child = Command::new(exe);
    child
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, parent_ns);
    // SAFETY: between fork and exec the child only makes one async-signal-safe syscall.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut child, || {
            if libc::unshare(libc::CLONE_NEWNET) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let mut child = child
        .spawn()
        .expect("re-running the test in a new network namespace (root needed)");
    // A child that never ends would hang the suite without a word: give it CHILD_DEADLINE,
    // then say where each of its threads waits, and kill it.
    let deadline = Instant::now() + CHILD_DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the test's child") {
            break status;
        }
        if Instant::now() > deadline {
            eprintln!("{test}: its child is still running after {CHILD_DEADLINE:?}; its threads:");
            eprintln!("{}", thread_report(child.id()));
            let _ = child.kill();
            let _ = child.wait();
            panic!("{test} hung in its network namespace");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{test} failed in its network namespace");
}

/// The longest a test may run in its namespace (the PVM host's bulk test takes ~3 minutes).
const CHILD_DEADLINE: Duration = Duration::from_secs(600);

/// Each thread of process `pid`: name, state, kernel wait channel and kernel stack.
fn thread_report(pid: u32) -> String {
    let mut report = String::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return report;
    };
    for task in tasks.flatten() {
        let path = task.path();
        let read = |file: &str| std::fs::read_to_string(path.join(file)).unwrap_or_default();
        let stat = read("stat");
        let state = stat
            .rsplit(") ")
            .next()
            .and_then(|rest| rest.split(' ').next());
        report.push_str(&format!(
            "  {} {} {:?} wchan={}\n{}",
            task.file_name().to_string_lossy(),
            read("comm").trim(),
            state.unwrap_or("?"),
            read("wchan"),
            read("stack")
        ));
    }
    report
}

/// Refuses to go on unless this process is in another network namespace than the test that
/// started it (whose namespace is in [`CHILD_ENV`]) and it has no route at all; then brings
/// `lo` up with the test hosts on it.
fn enter_checked_namespace() {
    let ours = std::fs::read_link("/proc/self/ns/net").expect("own netns");
    let parent = std::env::var_os(CHILD_ENV).expect("the parent's netns");
    assert_ne!(
        ours.as_os_str(),
        parent,
        "not in a network namespace of our own"
    );
    let ip = |args: &[&str]| {
        // iproute2's `ip`, else busybox's (the nested lane's L1 has only busybox).
        let status = Command::new("ip")
            .args(args)
            .status()
            .or_else(|_| Command::new("busybox").arg("ip").args(args).status())
            .expect("ip");
        assert!(status.success(), "ip {args:?}");
    };
    ip(&["link", "set", "lo", "up"]);
    for host in [WEB, OTHER, DNS].iter().chain(REFUSED.iter()) {
        ip(&["addr", "add", &format!("{host}/32"), "dev", "lo"]);
    }
    let routes = std::fs::read_to_string("/proc/net/route").expect("/proc/net/route");
    assert_eq!(routes.lines().count(), 1, "a route out exists: {routes}");
    let links = std::fs::read_to_string("/proc/net/dev").expect("/proc/net/dev");
    assert_eq!(links.lines().count(), 3, "only lo: {links}");
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Byte `i` of every download.
fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(7) ^ (i >> 11)) as u8
}

fn pattern_sha256(len: u64) -> String {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        for (k, b) in buf[..n].iter_mut().enumerate() {
            *b = pattern(at + k as u64);
        }
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    hex(&hasher.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A test host: an HTTP server (`GET /bytes/N` answers N pattern bytes) counting accepted
/// connections.
struct Web {
    accepts: Arc<AtomicUsize>,
}

impl Web {
    fn start(address: &str, port: u16) -> Web {
        let listener = TcpListener::bind((address, port)).expect("bind test host");
        let accepts = Arc::new(AtomicUsize::new(0));
        let counter = accepts.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                counter.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || serve_http(stream));
            }
        });
        Web { accepts }
    }

    fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }
}

fn serve_http(stream: TcpStream) {
    let mut reader = BufReader::new(stream);
    let mut request = String::new();
    if reader.read_line(&mut request).is_err() {
        return;
    }
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" || line == "\n" => break,
            Ok(_) => {}
        }
    }
    let len: u64 = request
        .split_whitespace()
        .nth(1)
        .and_then(|path| path.strip_prefix("/bytes/"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let mut stream = reader.into_inner();
    let header = format!("HTTP/1.0 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n");
    if stream.write_all(header.as_bytes()).is_err() {
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        for (k, b) in buf[..n].iter_mut().enumerate() {
            *b = pattern(at + k as u64);
        }
        if stream.write_all(&buf[..n]).is_err() {
            return;
        }
        at += n as u64;
    }
}

/// An upload sink: reads exactly `len` bytes, answers their SHA-256 in hex and closes.
fn start_sink(address: &str, port: u16, len: u64) {
    let listener = TcpListener::bind((address, port)).expect("bind sink");
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut hasher = Sha256::new();
                let mut buf = vec![0u8; 64 * 1024];
                let mut left = len;
                while left > 0 {
                    let want = left.min(buf.len() as u64) as usize;
                    match stream.read(&mut buf[..want]) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            hasher.update(&buf[..n]);
                            left -= n as u64;
                        }
                    }
                }
                let _ = stream.write_all(format!("{}\n", hex(&hasher.finalize())).as_bytes());
            });
        }
    });
}

/// A host that reads until the guest's FIN (its half-close), then answers how many bytes came
/// and closes: a guest whose FIN is lost never gets the answer.
fn start_half_close_host(address: &str, port: u16) {
    let listener = TcpListener::bind((address, port)).expect("bind half-close host");
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut got = Vec::new();
                if stream.read_to_end(&mut got).is_ok() {
                    let _ = stream.write_all(format!("got {}\n", got.len()).as_bytes());
                }
            });
        }
    });
}

/// A host that sends `len` pattern bytes and then resets the connection (SO_LINGER 0).
fn start_resetting_host(address: &str, port: u16, len: usize) {
    let listener = TcpListener::bind((address, port)).expect("bind resetting host");
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let bytes: Vec<u8> = (0..len as u64).map(pattern).collect();
            let _ = stream.write_all(&bytes);
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            drop(stream);
        }
    });
}

fn config(network: Network) -> VmConfig {
    supermachine_e2e::test_vm_config()
        .expect("test VM config")
        .memory_mib(256)
        .network(network)
}

async fn sh(vm: &Vm, script: &str) -> (i32, String) {
    supermachine_e2e::exec_output(vm.exec(["busybox", "sh", "-c", script])).await
}

/// Bulk size: 256 MiB on hardware KVM; 1 MiB on the PVM host and 16 MiB in the nested lane,
/// where every guest exit costs 20-100x more (L1 itself runs under TCG), and the guest's own
/// `sha256sum` and busybox `wget | nc` pipes (not the network) set the pace.
/// `SUPERMACHINE_NET_BULK_MIB` overrides it (a one-off 256 MiB run in the lane).
fn bulk_bytes() -> u64 {
    if let Some(mib) = std::env::var("SUPERMACHINE_NET_BULK_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        return mib << 20;
    }
    match supermachine_e2e::lane() {
        "PVM host" => 1 << 20,
        "hardware KVM" => 256 << 20,
        _ => 16 << 20,
    }
}

#[test]
fn downloads_and_uploads_are_byte_exact_with_concurrent_connections() {
    in_netns(
        "downloads_and_uploads_are_byte_exact_with_concurrent_connections",
        || {
            init_tracing();
            let web = Web::start(WEB, 80);
            let len = bulk_bytes();
            start_sink(WEB, 9000, len);
            supermachine_e2e::shared_runtime().block_on(async {
                let vm = Vm::start(config(Network::public())).await.expect("start");
                let (code, out) = sh(&vm, "busybox ip -4 addr show eth0; cat /etc/resolv.conf").await;
                assert_eq!(code, 0, "{out}");
                assert!(out.contains("10.0.2.15/24"), "{out}");
                assert!(out.contains("nameserver 10.0.2.3"), "{out}");

                let started = Instant::now();
                let (code, out) = sh(
                    &vm,
                    &format!("busybox wget -q -O- http://{WEB}/bytes/{len} | busybox sha256sum"),
                )
                .await;
                let down = started.elapsed();
                assert_eq!(code, 0, "{out}");
                assert!(out.starts_with(&pattern_sha256(len)), "download: {out}");

                // The download streamed straight back up: both directions at once.
                let started = Instant::now();
                let (code, out) = sh(
                    &vm,
                    &format!(
                        "busybox wget -q -O- http://{WEB}/bytes/{len} | busybox nc {WEB} 9000"
                    ),
                )
                .await;
                let both = started.elapsed();
                assert_eq!(code, 0, "{out}");
                assert_eq!(out, pattern_sha256(len), "upload");
                eprintln!(
                    "network bulk on {}: {len} bytes down in {down:?} ({:.1} MiB/s); down+up in {both:?}",
                    supermachine_e2e::lane(),
                    len as f64 / (1 << 20) as f64 / down.as_secs_f64()
                );

                // Concurrent connections, each checked: 50, or 16 on the PVM host, where 50
                // guest processes each forking `wget` take minutes of guest kernel work.
                let n = if supermachine_e2e::lane() == "PVM host" { 16 } else { 50 };
                let script = format!(
                    "for i in $(busybox seq {n}); do \
                       (busybox wget -q -O- http://{WEB}/bytes/$((1000 + i)) | busybox wc -c > /tmp/c$i) & \
                     done; wait; cat /tmp/c*"
                );
                let (code, out) = sh(&vm, &script).await;
                assert_eq!(code, 0, "{out}");
                let mut sizes: Vec<u64> = out.lines().map(|l| l.trim().parse().unwrap()).collect();
                sizes.sort_unstable();
                assert_eq!(sizes, (1001..=1000 + n).collect::<Vec<u64>>(), "{out}");
                assert!(web.accepts() >= 2 + n as usize);
                vm.stop().await;
            });
        },
    );
}

#[test]
fn a_half_close_reaches_the_host_and_a_host_reset_reaches_the_guest() {
    in_netns(
        "a_half_close_reaches_the_host_and_a_host_reset_reaches_the_guest",
        || {
            init_tracing();
            start_half_close_host(WEB, 9100);
            start_resetting_host(WEB, 9101, 100_000);
            let web = Web::start(WEB, 80);
            supermachine_e2e::shared_runtime().block_on(async {
                let vm = Vm::start(config(Network::public())).await.expect("start");
                // busybox nc shuts its write side down at EOF on stdin and keeps reading.
                let (code, out) = sh(
                    &vm,
                    &format!("busybox printf 12345 | busybox timeout 60 busybox nc {WEB} 9100"),
                )
                .await;
                assert_eq!((code, out.as_str()), (0, "got 5"), "half-close");

                // A reset after 100 000 bytes: the guest's read fails at once (no hang, no
                // timeout), with at most those bytes.
                let started = Instant::now();
                let (code, out) = sh(
                    &vm,
                    &format!(
                        "busybox timeout 60 busybox nc {WEB} 9101 > /tmp/r; echo \"rc=$?\"; \
                         busybox wc -c < /tmp/r"
                    ),
                )
                .await;
                assert_eq!(code, 0, "{out}");
                let mut lines = out.lines();
                let rc = lines.next().unwrap_or_default();
                assert_ne!(rc, "rc=124", "the reset was not seen: {out}");
                let got: usize = lines
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .parse()
                    .expect("count");
                assert!(got <= 100_000, "{out}");
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "{:?}",
                    started.elapsed()
                );
                // The VM's network goes on.
                let (code, out) = sh(
                    &vm,
                    &format!("busybox wget -q -O- http://{WEB}/bytes/7 | busybox wc -c"),
                )
                .await;
                assert_eq!((code, out.as_str()), (0, "7"));
                vm.stop().await;
            });
            assert_eq!(web.accepts(), 1);
        },
    );
}

#[test]
fn the_default_policy_refuses_private_loopback_and_link_local_hosts() {
    in_netns(
        "the_default_policy_refuses_private_loopback_and_link_local_hosts",
        || {
            init_tracing();
            let refused: Vec<Web> = REFUSED.iter().map(|h| Web::start(h, 80)).collect();
            let loopback = Web::start("127.0.0.1", 80);
            supermachine_e2e::shared_runtime().block_on(async {
                let vm = Vm::start(config(Network::public())).await.expect("start");
                for host in REFUSED.iter().chain(["127.0.0.1", "10.0.2.2"].iter()) {
                    let started = Instant::now();
                    let (code, out) = sh(
                        &vm,
                        &format!("busybox wget -q -T 10 -O- http://{host}/bytes/10 2>&1"),
                    )
                    .await;
                    assert_ne!(code, 0, "{host} was reachable: {out}");
                    // Refused at once (RST), not a timeout.
                    assert!(started.elapsed() < Duration::from_secs(8), "{host}: {out}");
                }
                vm.stop().await;
            });
            for (host, web) in REFUSED.iter().zip(&refused) {
                assert_eq!(web.accepts(), 0, "{host} accepted a connection");
            }
            assert_eq!(loopback.accepts(), 0, "127.0.0.1 accepted a connection");
        },
    );
}

#[test]
fn network_none_has_no_nic_and_deny_all_refuses_everything() {
    in_netns(
        "network_none_has_no_nic_and_deny_all_refuses_everything",
        || {
            init_tracing();
            let web = Web::start(WEB, 80);
            supermachine_e2e::shared_runtime().block_on(async {
                let vm = Vm::start(config(Network::none())).await.expect("start");
                let (code, out) = sh(&vm, "busybox ls /sys/class/net").await;
                assert_eq!(code, 0, "{out}");
                assert_eq!(out, "lo", "{out}");
                vm.stop().await;

                let vm = Vm::start(config(Network::public().deny("any").unwrap()))
                    .await
                    .expect("start");
                let (code, out) = sh(
                    &vm,
                    &format!("busybox wget -q -T 10 -O- http://{WEB}/bytes/10 2>&1"),
                )
                .await;
                assert_ne!(code, 0, "{out}");
                vm.stop().await;
            });
            assert_eq!(web.accepts(), 0);
        },
    );
}

#[test]
fn an_allow_list_admits_only_its_cidr_and_port() {
    in_netns("an_allow_list_admits_only_its_cidr_and_port", || {
        init_tracing();
        let web = Web::start(WEB, 80);
        let web_81 = Web::start(WEB, 81);
        let other = Web::start(OTHER, 80);
        let network = Network::public()
            .deny("any")
            .unwrap()
            .allow("203.0.113.0/24:80")
            .unwrap();
        supermachine_e2e::shared_runtime().block_on(async {
            let vm = Vm::start(config(network)).await.expect("start");
            let (code, out) = sh(
                &vm,
                &format!("busybox wget -q -O- http://{WEB}/bytes/5 | busybox wc -c"),
            )
            .await;
            assert_eq!((code, out.as_str()), (0, "5"));
            for url in [
                format!("http://{WEB}:81/bytes/5"),
                format!("http://{OTHER}/bytes/5"),
            ] {
                let (code, out) = sh(&vm, &format!("busybox wget -q -T 10 -O- {url} 2>&1")).await;
                assert_ne!(code, 0, "{url}: {out}");
            }
            vm.stop().await;
        });
        assert_eq!(web.accepts(), 1);
        assert_eq!(web_81.accepts(), 0);
        assert_eq!(other.accepts(), 0);
    });
}

#[test]
fn host_loopback_reaches_only_the_listed_ports() {
    in_netns("host_loopback_reaches_only_the_listed_ports", || {
        init_tracing();
        let open = Web::start("127.0.0.1", 8080);
        let closed = Web::start("127.0.0.1", 8081);
        supermachine_e2e::shared_runtime().block_on(async {
            let vm = Vm::start(config(Network::public().host_loopback([8080])))
                .await
                .expect("start");
            let (code, out) = sh(
                &vm,
                "busybox wget -q -O- http://host.supermachine.internal:8080/bytes/7 | busybox wc -c",
            )
            .await;
            assert_eq!((code, out.as_str()), (0, "7"));
            let (code, out) = sh(
                &vm,
                "busybox wget -q -T 10 -O- http://host.supermachine.internal:8081/bytes/7 2>&1",
            )
            .await;
            assert_ne!(code, 0, "{out}");
            vm.stop().await;
        });
        assert_eq!(open.accepts(), 1);
        assert_eq!(closed.accepts(), 0);
    });
}

#[test]
fn dns_through_a_real_server_and_a_domain_allow_list() {
    in_netns("dns_through_a_real_server_and_a_domain_allow_list", || {
        init_tracing();
        let Ok(mut dnsmasq) = Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=192.0.2.53",
                "--port=53",
                "--user=root",
                "--pid-file=",
                "--address=/allowed.test/203.0.113.10",
                "--address=/other.test/198.51.100.10",
            ])
            .spawn()
        else {
            // The host has it (debian-packages.txt: dnsmasq-base); the nested lane's L1 not.
            eprintln!("dns test skipped: no dnsmasq");
            return;
        };
        let web = Web::start(WEB, 80);
        let other = Web::start(OTHER, 80);
        let dns: SocketAddr = format!("{DNS}:53").parse().unwrap();
        let network = Network::public()
            .deny("any")
            .unwrap()
            .allow("allowed.test")
            .unwrap()
            .dns_upstreams([dns]);
        std::thread::sleep(Duration::from_millis(300));
        supermachine_e2e::shared_runtime().block_on(async {
            let vm = Vm::start(config(network)).await.expect("start");
            // busybox nslookup also asks for AAAA, which dnsmasq refuses here (exit 1): only
            // the A answer matters.
            let (_, out) = sh(&vm, "busybox nslookup other.test 2>&1").await;
            assert!(out.contains(&format!("Address: {OTHER}")), "{out}");
            let (code, out) = sh(
                &vm,
                "busybox wget -q -O- http://allowed.test/bytes/9 | busybox wc -c",
            )
            .await;
            assert_eq!((code, out.as_str()), (0, "9"));
            let (code, out) = sh(
                &vm,
                "busybox wget -q -T 10 -O- http://other.test/bytes/9 2>&1",
            )
            .await;
            assert_ne!(code, 0, "{out}");
            vm.stop().await;
        });
        let _ = dnsmasq.kill();
        let _ = dnsmasq.wait();
        assert_eq!(web.accepts(), 1);
        assert_eq!(other.accepts(), 0);
    });
}

#[test]
fn restored_vms_have_their_own_network() {
    in_netns("restored_vms_have_their_own_network", || {
        init_tracing();
        let web = Web::start(WEB, 80);
        // A host that keeps a connection open across the snapshot.
        let held = TcpListener::bind((WEB, 7000)).expect("bind");
        supermachine_e2e::shared_runtime().block_on(async {
            let dir = tempfile::tempdir().expect("temp dir");
            let vm = Vm::start(config(Network::public())).await.expect("start");
            let (code, out) = sh(
                &vm,
                &format!(
                    "(busybox nc {WEB} 7000 < /dev/zero > /dev/null &) ; busybox sleep 1; echo ok"
                ),
            )
            .await;
            assert_eq!((code, out.as_str()), (0, "ok"));
            let snapshot = vm
                .snapshot(dir.path().join("snap"))
                .await
                .expect("snapshot");
            vm.stop().await;
            let a = Vm::restore(&snapshot).await.expect("restore a");
            let b = Vm::restore(&snapshot).await.expect("restore b");
            for (name, vm) in [("a", &a), ("b", &b)] {
                let (code, out) = sh(
                    vm,
                    &format!("busybox wget -q -O- http://{WEB}/bytes/4096 | busybox sha256sum"),
                )
                .await;
                assert_eq!(code, 0, "{name}: {out}");
                assert!(out.starts_with(&pattern_sha256(4096)), "{name}: {out}");
            }
            a.stop().await;
            b.stop().await;
        });
        drop(held);
        assert_eq!(web.accepts(), 2);
    });
}

/// Descriptors this process has open (the VMM's host sockets among them).
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count)
}

#[test]
fn the_flow_limit_refuses_more_and_host_fds_stay_bounded() {
    in_netns(
        "the_flow_limit_refuses_more_and_host_fds_stay_bounded",
        || {
            init_tracing();
            let web = Web::start(WEB, 80);
            // A host that holds every connection until the guest closes its end.
            let listener = TcpListener::bind((WEB, 7001)).expect("bind");
            let held = Arc::new(AtomicUsize::new(0));
            let counter = held.clone();
            std::thread::spawn(move || {
                for mut stream in listener.incoming().flatten() {
                    counter.fetch_add(1, Ordering::SeqCst);
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut stream, &mut std::io::sink());
                    });
                }
            });
            let max_flows = 8;
            let network = Network::public().limits(supermachine::Limits {
                max_flows,
                ..supermachine::Limits::default()
            });
            supermachine_e2e::shared_runtime().block_on(async {
                let vm = Vm::start(config(network)).await.expect("start");
                let before = open_fds();
                let (code, out) = sh(
                    &vm,
                    &format!(
                        "for i in $(busybox seq 24); do \
                           (busybox sleep 600 | busybox nc {WEB} 7001 > /dev/null 2>&1 &) ; \
                         done; busybox sleep 5; echo started"
                    ),
                )
                .await;
                assert_eq!((code, out.as_str()), (0, "started"));
                let during = open_fds();
                assert_eq!(held.load(Ordering::SeqCst), max_flows, "accepted flows");
                // Each flow holds one host socket and the refused ones none; the test host's
                // accepted ends are in this process too, so twice the limit at most.
                assert!(
                    during <= before + 2 * max_flows + 4,
                    "host fds grew from {before} to {during}"
                );
                // Once the guest's connections end, the VM connects again.
                let (code, out) = sh(&vm, "busybox pkill nc; busybox sleep 2; echo done").await;
                assert_eq!((code, out.as_str()), (0, "done"));
                let (code, out) = sh(
                    &vm,
                    &format!("busybox wget -q -O- http://{WEB}/bytes/3 | busybox wc -c"),
                )
                .await;
                assert_eq!((code, out.as_str()), (0, "3"));
                vm.stop().await;
            });
            assert_eq!(web.accepts(), 1);
        },
    );
}
