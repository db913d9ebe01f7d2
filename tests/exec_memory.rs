//! Streaming a lot of output must not grow host memory: backpressure reaches the guest process.
//!
//! Alone in its own test binary so the process's peak RSS (VmHWM) measures only this exec.

use supermachine_e2e::{rss_kib, HostAgent};
use tokio::io::AsyncReadExt;

const TOTAL: u64 = 512 * 1024 * 1024;

#[tokio::test]
async fn half_a_gibibyte_of_stdout_in_bounded_host_memory() {
    let agent = HostAgent::start().expect("start the agent");
    let mut child = agent
        .agent()
        .exec(["head", "-c", &TOTAL.to_string(), "/dev/zero"])
        .spawn()
        .await
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    let mut nonzero = false;
    loop {
        let n = stdout.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        nonzero |= buf[..n].iter().any(|&b| b != 0);
        total += n as u64;
    }
    assert!(child.wait().await.unwrap().success());
    assert_eq!(total, TOTAL);
    assert!(!nonzero);
    let (_, peak_kib) = rss_kib();
    assert!(peak_kib > 0);
    assert!(
        peak_kib < 64 * 1024,
        "host peak RSS {peak_kib} KiB while streaming 512 MiB"
    );
}
