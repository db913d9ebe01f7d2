//! Takes a snapshot of a booted microVM, or restores one in this (fresh) process and runs a
//! command in it.
//!
//! ```text
//! cargo run --release --example snapshot -- take /tmp/snap
//! cargo run --release --example snapshot -- run /tmp/snap uname -a
//! ```
//!
//! `take` starts a VM like the `exec` example does (the project's kernel, agent and the host's
//! static busybox; restored from the snapshot cache when warm) and saves it into the new
//! directory. `run` opens the snapshot (checking its metadata, state checksum and memory size),
//! restores it — RNG reseeded and clock set before the command runs — and streams the
//! command's output; its exit code becomes this program's.

use std::process::ExitCode;
use std::time::Instant;

use supermachine::{Snapshot, Vm};
use tokio::io::AsyncWriteExt;

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [cmd, dir] if cmd == "take" => take(dir).await.map(|()| 0),
        [cmd, dir, argv @ ..] if cmd == "run" && !argv.is_empty() => run(dir, argv).await,
        _ => {
            eprintln!("usage: snapshot take DIR | snapshot run DIR CMD [ARGS...]");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(255)),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(125)
        }
    }
}

async fn take(dir: &str) -> Result<(), Box<dyn std::error::Error>> {
    let t0 = Instant::now();
    let vm = Vm::start(supermachine_e2e::test_vm_config()?).await?;
    eprintln!("[VM ready in {:.2} s]", t0.elapsed().as_secs_f64());
    let t1 = Instant::now();
    vm.snapshot(dir).await?;
    eprintln!(
        "[snapshot written to {dir} in {:.0} ms]",
        t1.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

async fn run(dir: &str, argv: &[String]) -> Result<u32, Box<dyn std::error::Error>> {
    let t0 = Instant::now();
    let snapshot = Snapshot::open(dir).await?;
    let vm = Vm::restore(&snapshot).await?;
    let t = vm.start_timings();
    // The guest reseeds its RNG and sets its clock from this exec's request, before running it.
    eprintln!(
        "[restored in {:.1} ms: vCPUs running after {:.1} ms]",
        t0.elapsed().as_secs_f64() * 1e3,
        t.vcpus_running.as_secs_f64() * 1e3,
    );
    let mut child = vm.exec(argv.iter().cloned()).spawn().await?;
    let mut stdout = child.stdout.take().ok_or("stdout already taken")?;
    let mut stderr = child.stderr.take().ok_or("stderr already taken")?;
    let (mut host_out, mut host_err) = (tokio::io::stdout(), tokio::io::stderr());
    let (out, err) = tokio::join!(
        tokio::io::copy(&mut stdout, &mut host_out),
        tokio::io::copy(&mut stderr, &mut host_err)
    );
    out?;
    err?;
    let status = child.await?;
    host_out.flush().await?;
    // As a shell reports it: the exit code, or 128 + N for a signal.
    Ok(status
        .code()
        .unwrap_or_else(|| 128i32.saturating_add(status.signal().unwrap_or(0))) as u32)
}
