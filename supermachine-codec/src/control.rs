use serde::{Deserialize, Serialize};

/// A host → agent CONTROL request. One request and one [`ControlAck`] per connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum ControlAction {
    /// Liveness check; the ack carries the agent version and boot id.
    Ping,
    /// Read a whole file; the ack's attachment is its contents.
    ReadFile {
        /// Absolute path in the guest.
        path: String,
    },
    /// Write a whole file atomically (temp name, then rename); the frame's attachment is its
    /// contents.
    WriteFile {
        /// Absolute path in the guest.
        path: String,
        /// Permission bits; default `0o644`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<u32>,
    },
    /// Send a signal to the process group of every running exec.
    SignalWorkload {
        /// Signal number.
        signal: i32,
    },
    /// Set the guest wall clock (CLOCK_REALTIME).
    SetClock {
        /// Nanoseconds since the Unix epoch.
        unix_nanos: u64,
    },
    /// Mix the frame's attachment into the guest kernel's entropy pool and credit it.
    ReseedRng,
    /// Test hook: make PID 1 exit so the guest kernel panics ("Attempted to kill init!"), to
    /// test how hosts handle a dying guest. Refused unless the guest kernel command line has
    /// `supermachine.test_hooks=1`, and always refused in host mode. Acked before the exit.
    CrashGuest,
    /// A restored VM's preamble: the first frame of each connection the host opens to a VM
    /// restored from a snapshot, until one of them has been answered. The agent mixes the
    /// frame's attachment (fresh host entropy) into the kernel's pool, forces the kernel RNG
    /// to reseed from it and sets the wall clock (unless a preamble with a later time set it
    /// already), then reads the connection's real first frame. Never acked: the request
    /// after it costs no extra round trip. A guest that cannot reseed powers off. Two VMs
    /// restored from one snapshot otherwise share their RNG state and a stale clock.
    Restored {
        /// The host's time, in nanoseconds since the Unix epoch.
        unix_nanos: u64,
        /// Names one restore (random, the same on all its preambles): among preambles of one
        /// restore an older time never steps the clock back, while the first preamble of a new
        /// restore always sets it, even to a time before one a snapshot's earlier restore saw.
        #[serde(default)]
        restore_id: u64,
    },
    /// Connect to TCP `127.0.0.1:port` inside the guest and, after an ok ack, turn this
    /// connection into that TCP stream: from the byte after the ack frame on, both directions
    /// carry raw bytes (no frames), and a half-close on either side is passed on. The host
    /// must not send stream bytes before it has read the ack. This is how ports are published.
    ConnectTcp {
        /// The guest TCP port on the loopback address.
        port: u16,
    },
    /// Test hook: after an ok ack, the agent writes back every byte it reads on this
    /// connection until EOF, then closes. Measures the transport alone (no guest process, no
    /// pipes), for comparison with other VMMs' vsock echo figures. Refused unless the guest
    /// kernel command line has `supermachine.test_hooks=1`.
    Echo,
}

/// The agent's answer to a [`ControlAction`]: `{"ok":true,...}` or `{"ok":false,"error":"..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ControlAck {
    /// Whether the action succeeded.
    pub ok: bool,
    /// Why it failed, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Agent version (ping).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Kernel boot id of the guest (ping).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// The agent protocol revision the agent speaks (ping; see [`AGENT_PROTOCOL`]): absent
    /// from agents before revision 2.
    ///
    /// [`AGENT_PROTOCOL`]: crate::AGENT_PROTOCOL
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<u32>,
}

impl ControlAck {
    /// A successful ack with no fields.
    pub fn ok() -> Self {
        ControlAck {
            ok: true,
            ..ControlAck::default()
        }
    }

    /// A failed ack with a message a user can act on.
    pub fn error(message: impl Into<String>) -> Self {
        ControlAck {
            ok: false,
            error: Some(message.into()),
            ..ControlAck::default()
        }
    }
}

/// The JSON part of a CONTROL frame, in either direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlMessage {
    /// A request the agent understands.
    Action(ControlAction),
    /// A request naming an action this version does not know; the agent answers with an error
    /// ack instead of dropping the connection, so the protocol can grow.
    UnknownAction(String),
    /// An answer.
    Ack(ControlAck),
}

/// Just enough of a CONTROL document to tell requests from acks and to name unknown actions.
#[derive(Deserialize)]
struct Peek {
    action: Option<String>,
}

impl ControlMessage {
    pub(crate) fn from_json(json: &[u8]) -> Result<Self, serde_json::Error> {
        let peek: Peek = serde_json::from_slice(json)?;
        match peek.action {
            None => serde_json::from_slice(json).map(ControlMessage::Ack),
            Some(name) => match serde_json::from_slice(json) {
                Ok(action) => Ok(ControlMessage::Action(action)),
                // A known action with bad fields is an error; an unknown name is not.
                Err(err) if is_known_action(&name) => Err(err),
                Err(_) => Ok(ControlMessage::UnknownAction(name)),
            },
        }
    }

    pub(crate) fn write_json(&self, out: impl std::io::Write) -> Result<(), serde_json::Error> {
        match self {
            ControlMessage::Action(action) => serde_json::to_writer(out, action),
            ControlMessage::UnknownAction(name) => {
                serde_json::to_writer(out, &serde_json::json!({ "action": name }))
            }
            ControlMessage::Ack(ack) => serde_json::to_writer(out, ack),
        }
    }
}

const KNOWN_ACTIONS: &[&str] = &[
    "ping",
    "read_file",
    "write_file",
    "signal_workload",
    "set_clock",
    "reseed_rng",
    "crash_guest",
    "restored",
    "connect_tcp",
    "echo",
];

pub(crate) fn is_known_action(name: &str) -> bool {
    KNOWN_ACTIONS.contains(&name)
}
