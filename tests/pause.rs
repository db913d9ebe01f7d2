//! `Vm::pause` / `Vm::resume` on a real microVM: nothing the guest was doing is lost across a
//! pause. An exec streaming a counter keeps its stream and its exit status, a published port
//! answers a connection made while the VM was paused, a paused VM can be snapshotted (and stays
//! paused; the snapshot restores), and a paused VM stops cleanly.

use std::time::Duration;

use supermachine::{Snapshot, Vm, VmExitReason};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How long the VM stays paused.
const PAUSE: Duration = Duration::from_secs(2);
/// Generous bound for guest work on slow (PVM) hosts.
const GUEST: Duration = Duration::from_secs(120);

#[test]
fn a_paused_vm_loses_nothing_and_still_stops() {
    if !supermachine_e2e::kvm_available_or_skip("a_paused_vm_loses_nothing_and_still_stops") {
        return;
    }
    supermachine_e2e::shared_runtime().block_on(async {
        let config = supermachine_e2e::test_vm_config()
            .expect("config")
            .publish("0:7301".parse().expect("mapping"));
        let vm = Vm::start(config).await.expect("start");
        assert!(!vm.is_paused());

        // A counter, one line every 0.5 s, then exit 3.
        let mut child = vm
            .exec([
                "sh",
                "-c",
                "i=0; while [ $i -lt 8 ]; do echo $i; i=$((i+1)); sleep 0.5; done; exit 3",
            ])
            .spawn()
            .await
            .expect("spawn");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let first = tokio::time::timeout(GUEST, lines.next_line())
            .await
            .expect("first line in time")
            .expect("read");
        assert_eq!(first.as_deref(), Some("0"));

        vm.pause().await.expect("pause");
        assert!(vm.is_paused());
        vm.pause().await.expect("pausing twice is fine");
        // Paused: whatever the guest had not written yet stays unwritten. (A line already in
        // flight may still arrive: drain what comes within a moment, then expect silence.)
        let mut seen = vec![first.expect("line")];
        while let Ok(line) =
            tokio::time::timeout(Duration::from_millis(300), lines.next_line()).await
        {
            seen.push(line.expect("read").expect("not EOF while paused"));
        }
        let before = seen.len();
        tokio::time::sleep(PAUSE).await;
        assert!(
            tokio::time::timeout(Duration::from_millis(300), lines.next_line())
                .await
                .is_err(),
            "a paused guest produced output"
        );

        // A connection to a published port made while paused is served after the resume.
        let host = vm.published_ports()[0].host;
        let mut tcp = TcpStream::connect(host)
            .await
            .expect("host listener accepts");
        vm.resume().await.expect("resume");
        assert!(!vm.is_paused());

        // The counter carries on where it was, nothing lost, and its exit status arrives.
        while let Some(line) = tokio::time::timeout(GUEST, lines.next_line())
            .await
            .expect("counter resumes")
            .expect("read")
        {
            seen.push(line);
        }
        let expected: Vec<String> = (0..8).map(|i| i.to_string()).collect();
        assert_eq!(seen, expected, "{before} lines before the pause");
        let status = tokio::time::timeout(GUEST, child.wait())
            .await
            .expect("exit in time")
            .expect("status");
        assert_eq!(status.code(), Some(3));

        // The published port: nothing listened yet when the host connected, so that
        // connection was refused on resume; one made now reaches a guest server.
        let mut refused = [0u8; 8];
        let read = tokio::time::timeout(GUEST, tcp.read(&mut refused))
            .await
            .expect("the early connection is answered after the resume");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        let server = supermachine_e2e::start_nc_server(vm.agent(), 7301, "echo pong", GUEST).await;
        vm.pause().await.expect("pause again");
        let mut tcp = TcpStream::connect(host)
            .await
            .expect("connect while paused");
        tcp.write_all(b"ping\n").await.expect("write while paused");
        tokio::time::sleep(PAUSE).await;
        vm.resume().await.expect("resume");
        let mut reply = String::new();
        tokio::time::timeout(GUEST, tcp.read_to_string(&mut reply))
            .await
            .expect("answered after the resume")
            .expect("read");
        assert_eq!(reply.trim(), "pong");
        drop(server);

        // A paused VM snapshots and stays paused (a running ticker stays silent through the
        // snapshot); the snapshot restores into a working VM; the ticker goes on after resume.
        let mut ticker = vm
            .exec(["sh", "-c", "while true; do echo t; sleep 0.2; done"])
            .spawn()
            .await
            .expect("spawn ticker");
        let mut ticks = BufReader::new(ticker.stdout.take().expect("stdout")).lines();
        let tick = tokio::time::timeout(GUEST, ticks.next_line())
            .await
            .expect("ticker runs");
        assert_eq!(tick.expect("read").as_deref(), Some("t"));
        let work = tempfile::tempdir().expect("temp dir");
        vm.pause().await.expect("pause");
        while tokio::time::timeout(Duration::from_millis(300), ticks.next_line())
            .await
            .is_ok()
        {}
        let snapshot: Snapshot = vm
            .snapshot(work.path().join("snap"))
            .await
            .expect("snapshot while paused");
        assert!(vm.is_paused(), "a snapshot ended the owner's pause");
        assert!(
            tokio::time::timeout(Duration::from_secs(1), ticks.next_line())
                .await
                .is_err(),
            "the guest ran after the snapshot: the snapshot ended the owner's pause"
        );
        let restored = Vm::restore(&snapshot).await.expect("restore");
        let out = restored
            .exec(["echo", "restored"])
            .output()
            .await
            .expect("exec in the restored VM");
        assert_eq!(&out.stdout[..], b"restored\n");
        restored.stop().await;
        vm.resume().await.expect("resume");
        let tick = tokio::time::timeout(GUEST, ticks.next_line())
            .await
            .expect("the ticker goes on after the resume");
        assert_eq!(tick.expect("read").as_deref(), Some("t"));

        // A paused VM stops at once (with an exec still running in it).
        vm.pause().await.expect("pause");
        let exit = tokio::time::timeout(Duration::from_secs(10), vm.stop())
            .await
            .expect("a paused VM stops promptly");
        assert!(matches!(exit.reason, VmExitReason::Stopped), "{exit:?}");
        assert!(!vm.is_paused());
        assert!(vm.pause().await.is_err(), "a stopped VM cannot be paused");
        let ended = tokio::time::timeout(Duration::from_secs(10), ticker.wait())
            .await
            .expect("the ticker's exec ends with the VM");
        assert!(ended.is_err(), "{ended:?}");
    });
}
