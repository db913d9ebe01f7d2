//! Exec round trip and stdout throughput through the agent in host mode, next to a plain
//! `tokio::process` spawn on the same machine.
//!
//! ```text
//! cargo run --release --example bench_exec [ROUNDS] [MIB]
//! ```
//!
//! Round trips alternate between the two contenders so machine noise hits both alike; the table
//! reports p50/p99 and the p50 ratio. Throughput streams MIB MiB of `/dev/zero` through `head -c`.

use std::time::{Duration, Instant};

use supermachine_e2e::HostAgent;
use tokio::io::AsyncReadExt;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn read_all(mut reader: impl AsyncReadExt + Unpin) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Figures from different lanes must never share a ratio: say which this is.
    println!("lane: {}", supermachine_e2e::lane());
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(300);
    let mib: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(2048);

    let host = HostAgent::start()?;
    let agent = host.agent();

    for _ in 0..20 {
        agent.exec(["true"]).output().await?;
        tokio::process::Command::new("true").output().await?;
    }
    let mut ours = Vec::with_capacity(rounds);
    let mut plain = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        let out = agent.exec(["true"]).output().await?;
        ours.push(t.elapsed());
        assert!(out.status.success());

        let t = Instant::now();
        let out = tokio::process::Command::new("true").output().await?;
        plain.push(t.elapsed());
        assert!(out.status.success());
    }
    ours.sort();
    plain.sort();
    let (o50, o99) = (percentile(&ours, 0.5), percentile(&ours, 0.99));
    let (p50, p99) = (percentile(&plain, 0.5), percentile(&plain, 0.99));
    println!("exec round trip of `true`, {rounds} rounds each, interleaved");
    println!(
        "  supermachine (agent, host mode)   p50 {:>7.3} ms   p99 {:>7.3} ms",
        ms(o50),
        ms(o99)
    );
    println!(
        "  tokio::process::Command           p50 {:>7.3} ms   p99 {:>7.3} ms",
        ms(p50),
        ms(p99)
    );
    println!(
        "  ratio (p50)                       {:.2}x",
        o50.as_secs_f64() / p50.as_secs_f64()
    );

    let bytes = mib * 1024 * 1024;
    let count = bytes.to_string();
    let t = Instant::now();
    let mut child = agent
        .exec(["head", "-c", &count, "/dev/zero"])
        .spawn()
        .await?;
    let read = read_all(child.stdout.take().ok_or("stdout")?).await?;
    child.wait().await?;
    let ours = t.elapsed();
    assert_eq!(read, bytes);

    let t = Instant::now();
    let mut child = tokio::process::Command::new("head")
        .args(["-c", &count, "/dev/zero"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let read = read_all(child.stdout.take().ok_or("stdout")?).await?;
    child.wait().await?;
    let plain = t.elapsed();
    assert_eq!(read, bytes);

    let gib = bytes as f64 / (1u64 << 30) as f64;
    println!("stdout throughput, {mib} MiB of `head -c` /dev/zero");
    println!(
        "  supermachine (agent, host mode)   {:>6.2} GiB/s",
        gib / ours.as_secs_f64()
    );
    println!(
        "  tokio::process pipe               {:>6.2} GiB/s",
        gib / plain.as_secs_f64()
    );
    Ok(())
}
