//! The supermachine exec wire protocol, as [`tokio_util::codec`] frames.
//!
//! Every byte that crosses the host ↔ guest-agent connection is a [`Frame`]:
//!
//! ```text
//! +---------+--------------------+------------------+
//! | kind u8 | length u32 (BE)    | payload (length) |
//! +---------+--------------------+------------------+
//! ```
//!
//! [`ExecCodec`] turns bytes into frames and back. It does no I/O of its own; wrap a stream in
//! [`tokio_util::codec::Framed`] to use it. Decoding is zero-copy: byte payloads (stdout, stdin,
//! staged file contents, control attachments) are [`bytes::Bytes`] split off the read buffer.
//!
//! # Binary attachments
//! REQUEST and CONTROL payloads are JSON. Binary data (staged file contents, `write_file` and
//! `read_file` bodies, RNG seed material) is not base64-encoded into the JSON: the payload is the
//! JSON document, then one `0x00` byte, then the raw attachment. JSON text never contains a raw
//! NUL byte, so the split is unambiguous, a payload without attachment is plain JSON, and the
//! decoder stays a single `memchr`. Staged files carry their `len` in the JSON and their contents,
//! concatenated in order, in the attachment.
//!
//! # Additions to the original protocol table
//! * `STARTED` (kind `0x07`, agent → host, payload: pid u32 BE) is sent once the first program of
//!   an exec has been spawned, so the host can report "program not found" from `spawn()` itself.
//! * ERROR messages start with a stable code (`not-found: ...`), see [`AgentError`].
//! * EXIT says how the process ended, exactly: besides the original `code u32 [peak_rss u64]`
//!   (4 or 12 bytes) an agent appends `signal u32 BE` when the process was killed by a signal
//!   (8 or 16 bytes), so a host tells `kill -9` from `exit 137`. Old 4- and 12-byte frames
//!   still decode (with `signal: None`); see [`ExitInfo`] for the layouts. A host from before
//!   this addition refuses the 8- and 16-byte forms, so host and agent should be upgraded
//!   together (the host ships the agent it boots).
//! * REQUEST may carry `env_clear: true` (start from an empty environment) and `env_remove`
//!   (names dropped from the base environment), for `Command::env_clear`/`env_remove`-style
//!   execs. Agents that predate them ignore them like any unknown field.

// The codec parses untrusted bytes; it has no reason to be unsafe, and must not become so.
#![forbid(unsafe_code)]

mod codec;
mod control;
mod error;
mod frame;
mod request;

pub use codec::{ExecCodec, DEFAULT_MAX_FRAME_LENGTH, HEADER_LEN};
pub use control::{ControlAck, ControlAction, ControlMessage};
pub use error::CodecError;
pub use frame::{kind, AgentError, ErrorCode, ExitInfo, Frame, WindowSize};
pub use request::{ExecRequest, StagedFile, StdioMode, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// The agent protocol revision this crate describes, which a ping's ack reports
/// ([`ControlAck::protocol`]; agents that report none speak revision 1). 2: `restored` is a
/// preamble in front of a connection's first frame, never acked, where revision 1 answered it
/// as an exchange of its own.
pub const AGENT_PROTOCOL: u32 = 2;

/// The guest vsock port the agent listens on for exec and control connections.
pub const AGENT_VSOCK_PORT: u32 = 1024;
