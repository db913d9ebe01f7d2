//! A network namespace per test, with test hosts on documentation and private addresses, and
//! the servers the tests talk to. Nothing here can reach off the machine: the namespace has
//! only `lo` (holding every test address) and no route out.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// Whether these tests can run: root (for namespaces). Without root they are skipped with a
/// message, unless `SUPERMACHINE_REQUIRE_KVM` is set (CI), where that is a failure.
pub fn can_run(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("SUPERMACHINE_REQUIRE_KVM").is_some() {
        panic!("{test}: needs root for a network namespace (SUPERMACHINE_REQUIRE_KVM is set)");
    }
    eprintln!("SKIP {test}: needs root for a network namespace");
    false
}

/// Runs `body` on a multi-threaded runtime whose threads live in a new network namespace
/// holding `addresses` (on `lo`).
pub fn run<F, Fut>(addresses: &[&str], body: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let addresses: Vec<String> = addresses.iter().map(|a| a.to_string()).collect();
    std::thread::spawn(move || {
        // SAFETY: unshare(CLONE_NEWNET) only changes this thread's network namespace; every
        // thread and process started from here on inherits it.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare: {}", io::Error::last_os_error());
        ip(&["link", "set", "lo", "up"]);
        for address in &addresses {
            let prefix = if address.contains(':') { "/128" } else { "/32" };
            ip(&["addr", "add", &format!("{address}{prefix}"), "dev", "lo"]);
        }
        let routes = Command::new("ip")
            .args(["route", "show", "default"])
            .output()
            .unwrap();
        assert!(
            routes.stdout.is_empty(),
            "the test namespace must have no default route"
        );
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(body());
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?} failed");
}

/// The byte at `offset` of every test stream.
pub fn pattern(offset: u64) -> u8 {
    (offset % 251) as u8
}

/// A test host's TCP server. Each connection sends one command byte:
/// `D` + u64: sends that many pattern bytes, then FIN; `U` + u64: reads that many bytes,
/// checks them, answers `ok`/`bad`, then FIN; `E`: echoes until the guest's FIN, then FIN;
/// `R`: resets the connection; `H`: holds it open, echoing.
pub struct Server {
    /// Where it listens.
    pub address: SocketAddr,
    accepts: Arc<AtomicUsize>,
}

impl Server {
    /// Starts a server on `address`.
    pub async fn start(address: &str) -> Server {
        let listener = TcpListener::bind(address).await.unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepts);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream));
            }
        });
        Server {
            address: listener_address(address),
            accepts,
        }
    }

    /// Connections accepted so far.
    pub fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }
}

fn listener_address(address: &str) -> SocketAddr {
    address.parse().unwrap()
}

async fn serve(mut stream: TcpStream) {
    let mut command = [0; 1];
    if stream.read_exact(&mut command).await.is_err() {
        return;
    }
    match command[0] {
        b'D' => {
            let Ok(len) = stream.read_u64().await else {
                return;
            };
            let mut sent = 0u64;
            let mut buf = vec![0; 64 * 1024];
            while sent < len {
                let n = (len - sent).min(buf.len() as u64) as usize;
                for (i, b) in buf[..n].iter_mut().enumerate() {
                    *b = pattern(sent + i as u64);
                }
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
                sent += n as u64;
            }
            let _ = stream.shutdown().await;
        }
        b'U' => {
            let Ok(len) = stream.read_u64().await else {
                return;
            };
            let mut seen = 0u64;
            let mut good = true;
            let mut buf = vec![0; 64 * 1024];
            while seen < len {
                let n = match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                good &= buf[..n]
                    .iter()
                    .enumerate()
                    .all(|(i, b)| *b == pattern(seen + i as u64));
                seen += n as u64;
            }
            let answer: &[u8] = if good && seen == len { b"ok" } else { b"bad" };
            let _ = stream.write_all(answer).await;
            let _ = stream.shutdown().await;
        }
        b'E' | b'H' => {
            let (mut read, mut write) = stream.split();
            let _ = tokio::io::copy(&mut read, &mut write).await;
            let _ = write.shutdown().await;
        }
        b'R' => {
            let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
            drop(stream);
        }
        _ => {}
    }
}

/// A UDP echo server on `address`.
pub async fn udp_echo(address: &str) {
    let socket = UdpSocket::bind(address).await.unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0; 65536];
        while let Ok((len, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..len], from).await;
        }
    });
}

/// dnsmasq answering `records` (name, address) on `listen`:53; killed on drop.
pub struct Dnsmasq(std::process::Child);

impl Dnsmasq {
    /// Starts it (it must be installed: `debian-packages.txt`).
    pub async fn start(listen: &str, records: &[(&str, &str)]) -> Dnsmasq {
        let mut command = Command::new("dnsmasq");
        command.args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            "--pid-file=",
            "--user=root",
            "--bind-interfaces",
            &format!("--listen-address={listen}"),
        ]);
        for (name, address) in records {
            command.arg(format!("--host-record={name},{address}"));
        }
        let child = command
            .spawn()
            .expect("dnsmasq (apt-get install dnsmasq-base)");
        // Ready when it answers on its port.
        let target: SocketAddr = (listen.parse::<IpAddr>().unwrap(), 53).into();
        for _ in 0..100 {
            if UdpSocket::bind("0.0.0.0:0")
                .await
                .unwrap()
                .connect(target)
                .await
                .is_ok()
                && std::net::TcpStream::connect(target).is_ok()
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Dnsmasq(child)
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// TCP sockets that descriptors hold open in the calling thread's network namespace,
/// listeners excepted: the stack's host sockets and the test servers' accepted ends. Not the
/// process's descriptors: the other tests run on threads of this process at the same time,
/// each in a namespace of its own.
pub fn tcp_sockets() -> usize {
    let table = std::fs::read_to_string("/proc/thread-self/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // The state (0A: LISTEN) and the inode (0: no descriptor, as in TIME_WAIT).
            fields.get(3) != Some(&"0A") && fields.get(9).is_some_and(|inode| *inode != "0")
        })
        .count()
}
