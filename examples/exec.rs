//! Boots a microVM and runs one command in it, streaming its output.
//!
//! ```text
//! cargo run --release --example exec -- uname -a
//! ```
//!
//! The guest kernel comes from `$SUPERMACHINE_KERNEL` or is built (cached) by
//! `supermachine-vmm/guest/build-kernel.sh`; the agent from `$SUPERMACHINE_AGENT_BIN` or is built
//! on first use; the guest userland is the host's static busybox (`apt-get install
//! busybox-static`). Set `SUPERMACHINE_CONSOLE_STDERR=1` to watch the guest console.

use std::process::ExitCode;
use std::time::Instant;

use tokio::io::AsyncWriteExt;

#[tokio::main]
async fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let argv = if argv.is_empty() {
        vec!["uname".to_owned(), "-a".to_owned()]
    } else {
        argv
    };
    match run(argv).await {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(255)),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(125)
        }
    }
}

async fn run(argv: Vec<String>) -> Result<u32, Box<dyn std::error::Error>> {
    let config = supermachine_e2e::test_vm_config()?;
    let t0 = Instant::now();
    let vm = supermachine::Vm::start(config).await?;
    eprintln!("[VM ready in {:.2} s]", t0.elapsed().as_secs_f64());

    let t1 = Instant::now();
    let mut child = vm.exec(argv).spawn().await?;
    let mut stdout = child.stdout.take().ok_or("stdout already taken")?;
    let mut stderr = child.stderr.take().ok_or("stderr already taken")?;
    let (mut host_out, mut host_err) = (tokio::io::stdout(), tokio::io::stderr());
    let copy_out = tokio::io::copy(&mut stdout, &mut host_out);
    let copy_err = tokio::io::copy(&mut stderr, &mut host_err);
    let (out, err) = tokio::join!(copy_out, copy_err);
    out?;
    err?;
    let status = child.await?;
    host_out.flush().await?;
    eprintln!("[exec took {:.2} s, {status}]", t1.elapsed().as_secs_f64(),);
    vm.stop().await;
    // As a shell reports it: the exit code, or 128 + N for a signal.
    Ok(status
        .code()
        .unwrap_or_else(|| 128i32.saturating_add(status.signal().unwrap_or(0))) as u32)
}
