//! Host-side throughput and latency of the user-mode network, without a VM: a smoltcp "guest"
//! (the one `tests/netstack.rs` uses) talks through `NetStack` to a server in a network
//! namespace of its own. Reports bulk MB/s each way and the median of connect + 1-byte round
//! trip. Needs root (the namespace).
//!
//! `cargo run --release -p supermachine-vmm --example netstack_bench [MIB] [ROUND_TRIPS]`
//! (defaults 256 and 200).

// The test helpers; the benchmark uses part of them.
#[allow(dead_code)]
#[path = "../tests/netstack/guest.rs"]
mod guest;
#[allow(dead_code)]
#[path = "../tests/netstack/netns.rs"]
mod netns;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use guest::Guest;
use netns::Server;
use supermachine_vmm::net::policy::Policy;
use supermachine_vmm::net::{Limits, NetStack, StackConfig};

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().map_or(256, |a| a.parse().expect("MIB"));
    let round_trips: usize = args.next().map_or(200, |a| a.parse().expect("ROUND_TRIPS"));
    if !netns::can_run("netstack_bench") {
        std::process::exit(1);
    }
    netns::run(&["203.0.113.10"], move || async move {
        let _server = Server::start("203.0.113.10:80").await;
        let config = StackConfig {
            policy: Policy::public(),
            host_loopback: BTreeSet::new(),
            limits: Limits::default(),
            dns_upstreams: Vec::new(),
        };
        let (_stack, link) = NetStack::spawn(config);
        let guest = Guest::attach(link);
        let to = "203.0.113.10:80".parse().unwrap();
        let len = mib << 20;

        let started = Instant::now();
        let mut down = guest.connect(to).await.unwrap();
        down.command(b'D', len).await.unwrap();
        let mut buf = vec![0; 256 * 1024];
        let mut got = 0u64;
        loop {
            let n = down.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        assert_eq!(got, len);
        report("download (host -> guest)", len, started.elapsed());

        let started = Instant::now();
        let mut up = guest.connect(to).await.unwrap();
        up.command(b'U', len).await.unwrap();
        up.write_pattern(len).await.unwrap();
        assert_eq!(up.read_to_end().await.unwrap(), b"ok");
        report("upload (guest -> host)", len, started.elapsed());

        let mut times = Vec::with_capacity(round_trips);
        for _ in 0..round_trips {
            let started = Instant::now();
            let mut tcp = guest.connect(to).await.unwrap();
            tcp.write_all(b"Ex").await.unwrap();
            let mut byte = [0; 1];
            assert_eq!(tcp.read(&mut byte).await.unwrap(), 1);
            times.push(started.elapsed());
        }
        times.sort();
        println!(
            "connect + 1-byte round trip: median {:?}, p90 {:?} ({round_trips} runs)",
            times[times.len() / 2],
            times[times.len() * 9 / 10]
        );
    });
}

fn report(what: &str, bytes: u64, took: Duration) {
    println!(
        "{what}: {} MiB in {took:.2?} = {:.0} MB/s",
        bytes >> 20,
        bytes as f64 / took.as_secs_f64() / 1e6
    );
}
