//! CONTROL connections against a real agent process in host mode.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures::{SinkExt, StreamExt};
use supermachine_codec::{ControlAck, ControlAction, ControlMessage, ExecRequest, Frame};

/// Sends one control frame and returns the ack and its attachment, checking the agent closes.
async fn control_raw(agent: &Agent, message: ControlMessage, data: Bytes) -> (ControlAck, Bytes) {
    let mut conn = agent.connect().await;
    conn.send(Frame::Control { message, data }).await.unwrap();
    let reply = tokio::time::timeout(PROMPTLY, conn.next())
        .await
        .expect("ack in time")
        .expect("an ack, not a closed connection")
        .expect("valid frame");
    let after = tokio::time::timeout(PROMPTLY, conn.next())
        .await
        .expect("closed in time");
    assert!(after.is_none(), "frame after the ack: {after:?}");
    match reply {
        Frame::Control {
            message: ControlMessage::Ack(ack),
            data,
        } => (ack, data),
        other => panic!("expected an ack, got {other:?}"),
    }
}

async fn control(agent: &Agent, action: ControlAction, data: &[u8]) -> (ControlAck, Bytes) {
    control_raw(
        agent,
        ControlMessage::Action(action),
        Bytes::copy_from_slice(data),
    )
    .await
}

#[tokio::test]
async fn ping_reports_version_and_boot_id() {
    let agent = Agent::start();
    let (ack, data) = control(&agent, ControlAction::Ping, b"").await;
    assert!(ack.ok, "{ack:?}");
    assert_eq!(ack.version.as_deref(), Some(env!("CARGO_PKG_VERSION")));
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(ack.boot_id.as_deref(), Some(boot_id.trim()));
    assert!(data.is_empty());
}

#[tokio::test]
async fn read_file_returns_the_bytes() {
    let agent = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blob");
    let contents: Vec<u8> = (0..300_000u32).map(|i| (i % 256) as u8).collect();
    std::fs::write(&path, &contents).unwrap();
    let (ack, data) = control(
        &agent,
        ControlAction::ReadFile {
            path: path.to_str().unwrap().into(),
        },
        b"",
    )
    .await;
    assert!(ack.ok, "{ack:?}");
    assert!(data == contents);

    let (ack, _) = control(
        &agent,
        ControlAction::ReadFile {
            path: "/no/such/file/4711".into(),
        },
        b"",
    )
    .await;
    assert!(!ack.ok);
    assert!(
        ack.error.as_deref().unwrap().contains("/no/such/file/4711"),
        "{ack:?}"
    );
}

#[tokio::test]
async fn write_file_is_atomic_with_mode_and_parents() {
    let agent = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new/dirs/file.bin");
    let (ack, _) = control(
        &agent,
        ControlAction::WriteFile {
            path: path.to_str().unwrap().into(),
            mode: Some(0o600),
        },
        b"\x00binary\x00payload",
    )
    .await;
    assert!(ack.ok, "{ack:?}");
    assert_eq!(std::fs::read(&path).unwrap(), b"\x00binary\x00payload");
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
        0o600
    );

    // Replacing goes through a new inode (rename), and the default mode is 0644.
    let old_inode = std::fs::metadata(&path).unwrap().ino();
    let (ack, _) = control(
        &agent,
        ControlAction::WriteFile {
            path: path.to_str().unwrap().into(),
            mode: None,
        },
        b"v2",
    )
    .await;
    assert!(ack.ok, "{ack:?}");
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"v2");
    assert_ne!(meta.ino(), old_inode, "rewritten in place, not atomically");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o644);
    let entries = std::fs::read_dir(path.parent().unwrap()).unwrap().count();
    assert_eq!(entries, 1, "temporary files left behind");

    let (ack, _) = control(
        &agent,
        ControlAction::WriteFile {
            path: "relative/path".into(),
            mode: None,
        },
        b"x",
    )
    .await;
    assert!(!ack.ok);
}

#[tokio::test]
async fn unknown_action_gets_an_error_ack() {
    let agent = Agent::start();
    let (ack, _) = control_raw(
        &agent,
        ControlMessage::UnknownAction("frobnicate".into()),
        Bytes::new(),
    )
    .await;
    assert!(!ack.ok);
    assert_eq!(ack.error.as_deref(), Some("unknown action frobnicate"));
}

#[tokio::test]
async fn clock_and_rng_are_refused_in_host_mode() {
    let agent = Agent::start();
    let (ack, _) = control(
        &agent,
        ControlAction::SetClock {
            unix_nanos: 1_000_000_000,
        },
        b"",
    )
    .await;
    assert!(!ack.ok);
    assert_eq!(
        ack.error.as_deref(),
        Some("unsupported in host mode: set_clock")
    );
    let (ack, _) = control(&agent, ControlAction::ReseedRng, &[7u8; 32]).await;
    assert!(!ack.ok);
    assert_eq!(
        ack.error.as_deref(),
        Some("unsupported in host mode: reseed_rng")
    );
    // The crash test hook must never take a host down.
    let (ack, _) = control(&agent, ControlAction::CrashGuest, b"").await;
    assert!(!ack.ok);
    assert_eq!(
        ack.error.as_deref(),
        Some("unsupported in host mode: crash_guest")
    );
    assert!(
        control(&agent, ControlAction::Ping, b"").await.0.ok,
        "the agent is still up"
    );
}

/// A `restored` preamble is refused in host mode, and the request behind it is not served.
#[tokio::test]
async fn a_restored_preamble_is_refused_in_host_mode_with_what_follows() {
    let agent = Agent::start();
    let mut conn = agent.connect().await;
    let preamble = Frame::Control {
        message: ControlMessage::Action(ControlAction::Restored {
            unix_nanos: 1_000_000_000,
            restore_id: 1,
        }),
        data: Bytes::from_static(&[7u8; 64]),
    };
    conn.send(preamble).await.unwrap();
    conn.send(Frame::control(ControlMessage::Action(ControlAction::Ping)))
        .await
        .unwrap();
    let reply = tokio::time::timeout(PROMPTLY, conn.next())
        .await
        .expect("an answer in time")
        .expect("an answer, not a closed connection")
        .expect("valid frame");
    match reply {
        Frame::Control {
            message: ControlMessage::Ack(ack),
            ..
        } => {
            assert!(!ack.ok, "{ack:?}");
            assert_eq!(
                ack.error.as_deref(),
                Some("unsupported in host mode: restored")
            );
        }
        other => panic!("expected the refusal, got {other:?}"),
    }
    let after = tokio::time::timeout(PROMPTLY, conn.next())
        .await
        .expect("closed in time");
    assert!(
        after.is_none(),
        "the ping behind it was answered: {after:?}"
    );
}

#[tokio::test]
async fn signal_workload_reaches_every_running_exec() {
    let agent = Agent::start();
    let first = agent.exec(ExecRequest::new(["sleep", "1000.71"])).await;
    let second = agent
        .exec(ExecRequest::new(["sh", "-c", "sleep 1000.72; exit 0"]))
        .await;
    assert!(running_within("1000.71", Duration::from_secs(2)).await);
    assert!(running_within("1000.72", Duration::from_secs(2)).await);
    let (ack, _) = control(&agent, ControlAction::SignalWorkload { signal: 9 }, b"").await;
    assert!(ack.ok, "{ack:?}");
    let first = collect(first).await;
    let second = collect(second).await;
    kill_matching("1000.71");
    kill_matching("1000.72");
    assert_eq!(first.code(), 137);
    assert_eq!(second.code(), 137);
}
