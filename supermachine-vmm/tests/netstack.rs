//! The user-mode network (`supermachine_vmm::net`) against real servers, without a VM: the
//! "guest" is a second smoltcp interface wired to the stack's frame link, and the host side
//! runs in a network namespace of the test's own (only `lo`, test addresses, no route out), so
//! nothing can leak off the machine. Needs root; see `netns::can_run`.

#[path = "netstack/guest.rs"]
mod guest;
#[path = "netstack/netns.rs"]
mod netns;

use std::collections::BTreeSet;
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use guest::{Guest, GuestTcp};
use netns::{pattern, Server};
use supermachine_vmm::net::policy::{Action, Policy, Rule};
use supermachine_vmm::net::{Limits, NetStack, StackConfig};

fn config(policy: Policy) -> StackConfig {
    StackConfig {
        policy,
        host_loopback: BTreeSet::new(),
        limits: Limits::default(),
        dns_upstreams: Vec::new(),
    }
}

fn addr(text: &str) -> SocketAddrV4 {
    text.parse().unwrap()
}

fn start(config: StackConfig) -> (NetStack, Guest) {
    let (stack, link) = NetStack::spawn(config);
    (stack, Guest::attach(link))
}

async fn command(guest: &Guest, to: &str, command: u8, len: u64) -> GuestTcp {
    let tcp = guest.connect(addr(to)).await.expect("connect");
    tcp.command(command, len).await.unwrap();
    tcp
}

fn refused(result: std::io::Result<GuestTcp>) -> bool {
    matches!(result, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// A connect that must be refused quickly (an RST, never a hang).
async fn assert_refused(guest: &Guest, to: &str) {
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(5), guest.connect(addr(to)))
        .await
        .unwrap_or_else(|_| panic!("connect to {to} hung"));
    assert!(refused(result), "connect to {to} was not refused");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refusal took {:?}",
        started.elapsed()
    );
}

const BULK: u64 = 16 << 20;

#[test]
fn bulk_transfer_each_way_bytes_checked() {
    if !netns::can_run("bulk_transfer_each_way_bytes_checked") {
        return;
    }
    netns::run(&["203.0.113.10"], || async {
        let server = Server::start("203.0.113.10:80").await;
        let (_stack, guest) = start(config(Policy::public()));

        let started = Instant::now();
        let mut down = command(&guest, "203.0.113.10:80", b'D', BULK).await;
        let data = down.read_to_end().await.unwrap();
        let took = started.elapsed();
        assert_eq!(data.len() as u64, BULK);
        assert!(
            data.iter()
                .enumerate()
                .all(|(i, b)| *b == pattern(i as u64)),
            "download corrupted"
        );
        eprintln!("download {} MiB in {took:?}", BULK >> 20);

        let started = Instant::now();
        let mut up = command(&guest, "203.0.113.10:80", b'U', BULK).await;
        up.write_pattern(BULK).await.unwrap();
        assert_eq!(up.read_to_end().await.unwrap(), b"ok");
        eprintln!("upload {} MiB in {:?}", BULK >> 20, started.elapsed());
        assert_eq!(server.accepts(), 2);
    });
}

#[test]
fn fifty_concurrent_connections() {
    if !netns::can_run("fifty_concurrent_connections") {
        return;
    }
    netns::run(&["203.0.113.10"], || async {
        let server = Server::start("203.0.113.10:80").await;
        let (_stack, guest) = start(config(Policy::public()));
        let mut clients = Vec::new();
        for i in 0..50u64 {
            let guest = guest.clone();
            clients.push(tokio::spawn(async move {
                let len = 20_000 + i * 1000;
                let mut tcp = command(&guest, "203.0.113.10:80", b'D', len).await;
                let data = tcp.read_to_end().await.unwrap();
                assert_eq!(data.len() as u64, len);
                assert!(data
                    .iter()
                    .enumerate()
                    .all(|(i, b)| *b == pattern(i as u64)));
            }));
        }
        for client in clients {
            tokio::time::timeout(Duration::from_secs(60), client)
                .await
                .unwrap()
                .unwrap();
        }
        assert_eq!(server.accepts(), 50);
    });
}

#[test]
fn half_close_and_server_reset() {
    if !netns::can_run("half_close_and_server_reset") {
        return;
    }
    netns::run(&["203.0.113.10"], || async {
        let _server = Server::start("203.0.113.10:80").await;
        let (_stack, guest) = start(config(Policy::public()));
        // The guest sends and closes its side; the server still answers all of it, then closes.
        let mut echo = guest.connect(addr("203.0.113.10:80")).await.unwrap();
        let message: Vec<u8> = (0..300_000u64).map(pattern).collect();
        echo.write_all(b"E").await.unwrap();
        echo.write_all(&message).await.unwrap();
        echo.shutdown();
        assert_eq!(echo.read_to_end().await.unwrap(), message);

        // The server resets: the guest's read fails with a reset, at once.
        let mut reset = guest.connect(addr("203.0.113.10:80")).await.unwrap();
        reset.write_all(b"R").await.unwrap();
        let mut buf = [0; 16];
        let result = tokio::time::timeout(Duration::from_secs(5), reset.read(&mut buf))
            .await
            .unwrap();
        assert_eq!(
            result.unwrap_err().kind(),
            std::io::ErrorKind::ConnectionReset
        );
    });
}

#[test]
fn refusals_are_immediate_and_never_reach_the_server() {
    if !netns::can_run("refusals_are_immediate_and_never_reach_the_server") {
        return;
    }
    let private = [
        "10.1.2.3",
        "127.0.0.1",
        "169.254.169.254",
        "192.168.7.7",
        "172.16.0.9",
        "100.64.0.1",
    ];
    let mut addresses = vec!["203.0.113.10", "203.0.113.20", "198.51.100.7"];
    addresses.extend(private.iter().filter(|a| **a != "127.0.0.1"));
    netns::run(&addresses, move || async move {
        // The default policy: private, loopback, link-local (metadata), CGNAT refused.
        let mut servers = Vec::new();
        for host in private {
            servers.push(Server::start(&format!("{host}:80")).await);
        }
        let denied = Server::start("203.0.113.20:80").await;
        let policy = Policy::public().rule(Rule::parse(Action::Deny, "203.0.113.20").unwrap());
        let (_stack, guest) = start(config(policy));
        for host in private {
            assert_refused(&guest, &format!("{host}:80")).await;
        }
        // A deny rule.
        assert_refused(&guest, "203.0.113.20:80").await;
        // The gateway and the rest of the guest subnet.
        assert_refused(&guest, "10.0.2.2:80").await;
        // Allowed, but nobody listens: the host's refusal becomes the guest's.
        assert_refused(&guest, "203.0.113.10:9").await;
        for server in &servers {
            assert_eq!(server.accepts(), 0, "{} was reached", server.address);
        }
        assert_eq!(denied.accepts(), 0);

        // An allow-list: only its CIDR and port.
        let allowed = Server::start("198.51.100.7:8080").await;
        let other_port = Server::start("198.51.100.7:8081").await;
        let other_net = Server::start("203.0.113.10:8080").await;
        let policy = Policy::public()
            .rule(Rule::parse(Action::Deny, "any").unwrap())
            .rule(Rule::parse(Action::Allow, "198.51.100.0/24:8080").unwrap());
        let (_stack, guest) = start(config(policy));
        let mut tcp = command(&guest, "198.51.100.7:8080", b'D', 1000).await;
        assert_eq!(tcp.read_to_end().await.unwrap().len(), 1000);
        assert_refused(&guest, "198.51.100.7:8081").await;
        assert_refused(&guest, "203.0.113.10:8080").await;
        assert_eq!(
            (allowed.accepts(), other_port.accepts(), other_net.accepts()),
            (1, 0, 0)
        );
    });
}

#[test]
fn udp_flows_and_refusals() {
    if !netns::can_run("udp_flows_and_refusals") {
        return;
    }
    netns::run(&["203.0.113.10", "10.9.9.9"], || async {
        netns::udp_echo("203.0.113.10:7").await;
        netns::udp_echo("10.9.9.9:7").await;
        let (_stack, guest) = start(config(Policy::public()));
        let reply = guest
            .udp_exchange(addr("203.0.113.10:7"), b"hello", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(reply, b"hello");
        // Refused by policy: ICMP "communication administratively prohibited" (code 13).
        let result = guest
            .udp_exchange(addr("10.9.9.9:7"), b"hello", Duration::from_millis(500))
            .await;
        assert!(result.is_err());
        assert_eq!(guest.unreachable_codes(), vec![13]);
    });
}

#[test]
fn dns_names_and_domain_allow_list() {
    if !netns::can_run("dns_names_and_domain_allow_list") {
        return;
    }
    netns::run(&["192.0.2.53", "203.0.113.30", "203.0.113.31"], || async {
        let _dns = netns::Dnsmasq::start(
            "192.0.2.53",
            &[
                ("allowed.test", "203.0.113.30"),
                ("other.test", "203.0.113.31"),
            ],
        )
        .await;
        let allowed = Server::start("203.0.113.30:80").await;
        let other = Server::start("203.0.113.31:80").await;
        let policy = Policy::public()
            .rule(Rule::parse(Action::Deny, "any").unwrap())
            .rule(Rule::parse(Action::Allow, "allowed.test").unwrap());
        let mut config = config(policy);
        config.dns_upstreams = vec!["192.0.2.53:53".parse().unwrap()];
        let (_stack, guest) = start(config.clone());

        // Before the name is resolved, the address is just an address: refused.
        assert_refused(&guest, "203.0.113.30:80").await;
        assert_eq!(
            guest.resolve("allowed.test").await.unwrap(),
            ["203.0.113.30".parse::<std::net::Ipv4Addr>().unwrap()]
        );
        assert_eq!(
            guest.resolve("other.test").await.unwrap(),
            ["203.0.113.31".parse::<std::net::Ipv4Addr>().unwrap()]
        );
        let mut tcp = command(&guest, "203.0.113.30:80", b'D', 10).await;
        assert_eq!(tcp.read_to_end().await.unwrap().len(), 10);
        assert_refused(&guest, "203.0.113.31:80").await;
        assert_eq!((allowed.accepts(), other.accepts()), (1, 0));

        // A second stack (a restored VM) shares no DNS names with the first.
        let (_second, second_guest) = start(config);
        assert_refused(&second_guest, "203.0.113.30:80").await;
        assert_eq!(allowed.accepts(), 1);
    });
}

#[test]
fn host_loopback_reaches_only_listed_ports() {
    if !netns::can_run("host_loopback_reaches_only_listed_ports") {
        return;
    }
    netns::run(&[], || async {
        let open = Server::start("127.0.0.1:7001").await;
        let closed = Server::start("127.0.0.1:7002").await;
        let mut config = config(Policy::public());
        config.host_loopback = BTreeSet::from([7001]);
        let (_stack, guest) = start(config);
        let address = guest.resolve("host.supermachine.internal").await.unwrap();
        assert_eq!(address, [supermachine_vmm::net::addressing::HOST_LOOPBACK]);
        let mut tcp = command(&guest, "10.0.2.254:7001", b'D', 100).await;
        assert_eq!(tcp.read_to_end().await.unwrap().len(), 100);
        assert_refused(&guest, "10.0.2.254:7002").await;
        assert_eq!((open.accepts(), closed.accepts()), (1, 0));
    });
}

#[test]
fn flow_limit_refuses_new_flows_and_keeps_old_ones() {
    if !netns::can_run("flow_limit_refuses_new_flows_and_keeps_old_ones") {
        return;
    }
    netns::run(&["203.0.113.10"], || async {
        let server = Server::start("203.0.113.10:80").await;
        let mut config = config(Policy::public());
        config.limits.max_flows = 8;
        let fds_before = netns::tcp_sockets();
        let (stack, guest) = start(config);
        let mut held = Vec::new();
        for _ in 0..8 {
            let tcp = guest.connect(addr("203.0.113.10:80")).await.unwrap();
            tcp.write_all(b"H").await.unwrap();
            held.push(tcp);
        }
        // A guest opening flows without end: every one past the limit is refused.
        for _ in 0..40 {
            assert_refused(&guest, "203.0.113.10:80").await;
        }
        assert_eq!(server.accepts(), 8);
        // 8 flows: 8 host sockets (plus the server's 8 accepted ends), not 48.
        let fds = netns::tcp_sockets();
        assert_eq!(fds, fds_before + 16, "TCP sockets before: {fds_before}");
        // The old flows still work.
        for tcp in &mut held {
            tcp.write_all(b"ping").await.unwrap();
            let mut buf = [0; 4];
            let mut got = 0;
            while got < 4 {
                got += tcp.read(&mut buf[got..]).await.unwrap();
            }
            assert_eq!(&buf, b"ping");
        }
        // Closing one frees its place.
        let mut first = held.remove(0);
        first.shutdown();
        assert!(first.read_to_end().await.unwrap().is_empty());
        drop(first);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match guest.connect(addr("203.0.113.10:80")).await {
                Ok(_) => break,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("no place freed: {e}"),
            }
        }
        // Stopping the stack closes every host socket it opened.
        drop(held);
        stack.shutdown().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let fds_after = netns::tcp_sockets();
        assert_eq!(
            fds_after, fds_before,
            "TCP sockets after shutdown (before: {fds_before})"
        );
    });
}
