//! CONTROL actions (SEMANTICS.md "Control actions"): one request, one ack, then close.

use std::io::{self, Read};
use std::path::PathBuf;

use bytes::Bytes;
use supermachine_codec::{ControlAck, ControlAction, ControlMessage, DEFAULT_MAX_FRAME_LENGTH};

use crate::boot_flags::BootFlags;
use crate::staging;
use crate::state::{Agent, Mode};
use crate::sys;

/// The largest file `read_file` returns: one frame, less room for the JSON ack and separator.
pub const MAX_READ: usize = DEFAULT_MAX_FRAME_LENGTH - 1024;
/// The most seed material `reseed_rng` accepts (far more than any pool needs).
const MAX_SEED: usize = 64 * 1024;

/// Answers one control message; returns the ack and its attachment.
pub async fn respond(agent: &Agent, message: ControlMessage, data: Bytes) -> (ControlAck, Bytes) {
    let action = match message {
        ControlMessage::Action(action) => action,
        ControlMessage::UnknownAction(name) => {
            return (
                ControlAck::error(format!("unknown action {name}")),
                Bytes::new(),
            )
        }
        ControlMessage::Ack(_) => {
            return (
                ControlAck::error("expected a control action, got an ack"),
                Bytes::new(),
            )
        }
    };
    let result = match action {
        ControlAction::Ping => Ok((ping(), Bytes::new())),
        ControlAction::ReadFile { path } => {
            read_file(path).await.map(|data| (ControlAck::ok(), data))
        }
        ControlAction::WriteFile { path, mode } => write_file(path, mode, data).await,
        ControlAction::SignalWorkload { signal } => signal_workload(agent, signal),
        ControlAction::SetClock { unix_nanos } => set_clock(agent.mode, unix_nanos),
        ControlAction::ReseedRng => reseed_rng(agent.mode, &data),
        ControlAction::CrashGuest => crash_guest(agent.mode, agent.boot_flags),
        // The server applies these before a connection's first frame (`restored`, below).
        ControlAction::Restored { .. } => {
            Err("restored: must come before a connection's first frame".into())
        }
        // The server hands these to `forward` before they get here.
        ControlAction::ConnectTcp { port } => Err(format!(
            "connect_tcp {port}: must be the first frame of its own connection"
        )),
        ControlAction::Echo => Err("echo: must be the first frame of its own connection".into()),
    };
    match result {
        Ok(reply) => reply,
        Err(message) => {
            tracing::info!("control action failed: {message}");
            (ControlAck::error(message), Bytes::new())
        }
    }
}

type Reply = Result<(ControlAck, Bytes), String>;

fn ok() -> Reply {
    Ok((ControlAck::ok(), Bytes::new()))
}

fn ping() -> ControlAck {
    let boot_id = match std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        Ok(id) => Some(id.trim().to_owned()),
        Err(e) => {
            tracing::warn!("cannot read the boot id: {e}");
            None
        }
    };
    ControlAck {
        version: Some(env!("CARGO_PKG_VERSION").to_owned()),
        boot_id,
        protocol: Some(supermachine_codec::AGENT_PROTOCOL),
        ..ControlAck::ok()
    }
}

async fn read_file(path: String) -> Result<Bytes, String> {
    let context = |e: io::Error| format!("read_file {path}: {e}");
    let file = PathBuf::from(&path);
    let read = tokio::task::spawn_blocking(move || -> io::Result<Vec<u8>> {
        let mut contents = Vec::new();
        // One byte over the limit tells "too large" apart from "exactly at the limit", also
        // for files whose size stat does not know (/proc).
        std::fs::File::open(file)?
            .take(MAX_READ as u64 + 1)
            .read_to_end(&mut contents)?;
        Ok(contents)
    })
    .await
    .map_err(|e| format!("read_file {path}: reader task failed: {e}"))?
    .map_err(context)?;
    if read.len() > MAX_READ {
        return Err(format!(
            "read_file {path}: file too large (more than {MAX_READ} bytes fit in one frame)"
        ));
    }
    Ok(Bytes::from(read))
}

async fn write_file(path: String, mode: Option<u32>, data: Bytes) -> Reply {
    let target = staging::file_path(&path).map_err(|why| format!("write_file {path}: {why}"))?;
    staging::write_atomic_async(target, data, mode.unwrap_or(staging::DEFAULT_MODE), None)
        .await
        .map_err(|e| format!("write_file {path}: {e}"))?;
    ok()
}

fn signal_workload(agent: &Agent, signal: i32) -> Reply {
    let signalled = agent
        .workload
        .signal_all(signal)
        .map_err(|e| format!("signal_workload {signal}: {e}"))?;
    tracing::debug!(signal, signalled, "signalled the workload");
    ok()
}

fn unsupported_in_host_mode(mode: Mode, action: &str) -> Result<(), String> {
    match mode {
        Mode::Host => Err(format!("unsupported in host mode: {action}")),
        Mode::Guest => Ok(()),
    }
}

fn set_clock(mode: Mode, unix_nanos: u64) -> Reply {
    unsupported_in_host_mode(mode, "set_clock")?;
    let time = nix::sys::time::TimeSpec::from_duration(std::time::Duration::from_nanos(unix_nanos));
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, time)
        .map_err(|e| format!("set_clock: {e}"))?;
    ok()
}

/// Test hook: PID 1 exits shortly after the ack is sent, and the kernel panics.
fn crash_guest(mode: Mode, flags: BootFlags) -> Reply {
    unsupported_in_host_mode(mode, "crash_guest")?;
    if !flags.test_hooks {
        return Err(
            "crash_guest is a test hook: refused without supermachine.test_hooks=1 on the \
             guest kernel command line"
                .into(),
        );
    }
    if std::process::id() != 1 {
        return Err("crash_guest: the agent is not PID 1, so its exit would not panic".into());
    }
    tracing::warn!("crash_guest: PID 1 exits in 50 ms (test hook)");
    tokio::spawn(async {
        // Time for the ack to leave; the connection task writes it right after this returns.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        std::process::exit(1);
    });
    ok()
}

/// A restored guest's preamble (SEMANTICS.md "restored"): fresh host entropy in, the CRNG
/// reseeded from it, and the clock set, unless a preamble of the same restore with a later host
/// time already set it (the first connections to a restored VM each carry one, and their tasks
/// may run in any order). Runs before the connection's request is read, so that request, and
/// every request the host sends once it has an answer on any connection, sees the new RNG
/// state and time.
pub fn restored(
    agent: &Agent,
    restore_id: u64,
    unix_nanos: u64,
    seed: &[u8],
) -> Result<(), String> {
    unsupported_in_host_mode(agent.mode, "restored")?;
    let random = add_seed(seed).map_err(|e| format!("restored: {e}"))?;
    sys::reseed_crng(&random).map_err(|e| format!("restored: RNDRESEEDCRNG: {e}"))?;
    // Held while the clock is set, so that two preambles cannot interleave between the check
    // and the setting.
    let mut newest = agent
        .restored_clock
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if newest.0 != restore_id || unix_nanos > newest.1 {
        set_clock(agent.mode, unix_nanos).map_err(|e| format!("restored: {e}"))?;
        *newest = (restore_id, unix_nanos);
    }
    tracing::debug!("restored: RNG reseeded, clock set");
    Ok(())
}

fn reseed_rng(mode: Mode, seed: &[u8]) -> Reply {
    unsupported_in_host_mode(mode, "reseed_rng")?;
    add_seed(seed).map_err(|e| format!("reseed_rng: {e}"))?;
    ok()
}

/// Mixes `seed` into the kernel's entropy pool and credits it; returns `/dev/urandom`, opened
/// for writing, for what comes next.
fn add_seed(seed: &[u8]) -> Result<std::fs::File, String> {
    if seed.is_empty() {
        return Err("no seed bytes attached".into());
    }
    if seed.len() > MAX_SEED {
        return Err(format!(
            "seed of {} bytes is larger than {MAX_SEED}",
            seed.len()
        ));
    }
    let random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("opening /dev/urandom: {e}"))?;
    sys::add_entropy(&random, seed).map_err(|e| e.to_string())?;
    Ok(random)
}
