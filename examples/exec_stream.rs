//! Streams a command's output line by line as it is produced.
//!
//! ```text
//! cargo run --example exec_stream -- sh -c 'for i in 1 2 3; do echo tick $i; sleep 0.5; done'
//! ```
//!
//! The command runs under the guest agent in host mode (a Unix socket, no VM): the same API runs
//! over a microVM's vsock once the VM backend lands.

use std::time::Instant;

use supermachine_e2e::HostAgent;
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.is_empty() {
        argv = [
            "sh",
            "-c",
            "for i in 1 2 3 4 5; do echo tick $i; sleep 0.3; done",
        ]
        .map(String::from)
        .to_vec();
    }
    let host = HostAgent::start()?;
    let agent = host.agent();

    let started = Instant::now();
    let mut child = agent.exec(argv).spawn().await?;
    let mut lines = BufReader::new(child.stdout.take().ok_or("stdout is piped")?).lines();
    while let Some(line) = lines.next_line().await? {
        println!("[{:>6.3}s] {line}", started.elapsed().as_secs_f64());
    }
    let status = child.wait().await?;
    eprintln!(
        "exited with {status} after {:.3}s",
        started.elapsed().as_secs_f64()
    );
    // As a shell reports it: the exit code, or 128 + N for a signal.
    std::process::exit(
        status
            .code()
            .unwrap_or_else(|| 128i32.saturating_add(status.signal().unwrap_or(0)))
            .min(255),
    );
}
