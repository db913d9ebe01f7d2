use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The exec protocol version this crate speaks; sent in every [`ExecRequest`].
///
/// * 1 — the original protocol.
/// * 2 — REQUEST may carry `env_clear` and `env_remove`; EXIT may carry the terminating signal
///   (8- and 16-byte payloads). An agent answers a version-1 request with version-1 EXIT
///   frames, so older hosts keep working; an older agent refuses a version-2 request (rather
///   than silently ignoring `env_clear`).
pub const PROTOCOL_VERSION: u32 = 2;

/// The oldest protocol version an agent of this crate still serves.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// What the agent connects a child's standard stream to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StdioMode {
    /// Carried over the connection (STDIN / STDOUT / STDERR frames).
    #[default]
    Piped,
    /// Connected to `/dev/null` in the guest; nothing crosses the connection.
    Null,
}

impl StdioMode {
    fn is_piped(&self) -> bool {
        *self == StdioMode::Piped
    }
}

/// A file the agent writes (atomically: temp name, then rename) before the first command starts.
///
/// The contents travel as raw bytes in the REQUEST attachment, not in the JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedFile {
    path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mode: Option<u32>,
    /// Length of `contents`; the only part of the contents that is in the JSON.
    len: u64,
    #[serde(skip)]
    contents: Bytes,
}

impl StagedFile {
    /// A file at `path` (absolute, in the guest) holding `contents`.
    pub fn new(path: impl Into<String>, contents: impl Into<Bytes>) -> Self {
        let contents = contents.into();
        StagedFile {
            path: path.into(),
            mode: None,
            len: contents.len() as u64,
            contents,
        }
    }

    /// Sets the permission bits (e.g. `0o755`); the agent's default is `0o644`.
    pub fn with_mode(mut self, mode: u32) -> Self {
        self.mode = Some(mode);
        self
    }

    /// Where the file goes in the guest.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Permission bits, if set.
    pub fn mode(&self) -> Option<u32> {
        self.mode
    }

    /// The file's contents.
    pub fn contents(&self) -> &Bytes {
        &self.contents
    }

    pub(crate) fn declared_len(&self) -> u64 {
        self.len
    }

    pub(crate) fn set_contents(&mut self, contents: Bytes) {
        self.contents = contents;
    }
}

/// The first frame of an exec connection: what to run and how.
///
/// Unknown JSON fields are ignored so that newer hosts can talk to older agents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Protocol version; [`PROTOCOL_VERSION`].
    pub version: u32,
    /// Program and arguments; `argv[0]` is resolved through `PATH` in the guest. Must not be empty.
    pub argv: Vec<String>,
    /// Environment variables set over the base environment (see `env_clear`, `env_remove`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Start from an empty environment instead of the agent's base environment (its own in host
    /// mode; `PATH`, `HOME` and a tty's `TERM` in a guest). Only `env` is then set (and, on PVM
    /// hosts, the `GLIBC_TUNABLES` workaround, unless `env_remove` names it).
    ///
    /// Agents older than this field ignore it, as they ignore every unknown field.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub env_clear: bool,
    /// Variables removed from the base environment before `env` is applied. A name that is
    /// also in `env` is set: `env` wins.
    ///
    /// Agents older than this field ignore it, as they ignore every unknown field.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_remove: Vec<String>,
    /// Working directory; defaults to the image's `WorkingDir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// User name or `uid[:gid]`; defaults to the image's `User`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Run on a pseudo-terminal (stdout and stderr merged into STDOUT frames).
    #[serde(default)]
    pub tty: bool,
    /// Initial terminal width in columns (tty mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cols: Option<u16>,
    /// Initial terminal height in rows (tty mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u16>,
    /// Where the child's stdin comes from.
    #[serde(default, skip_serializing_if = "StdioMode::is_piped")]
    pub stdin: StdioMode,
    /// Where the child's stdout goes.
    #[serde(default, skip_serializing_if = "StdioMode::is_piped")]
    pub stdout: StdioMode,
    /// Where the child's stderr goes (ignored in tty mode).
    #[serde(default, skip_serializing_if = "StdioMode::is_piped")]
    pub stderr: StdioMode,
    /// Files written before the first command starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stage_files: Vec<StagedFile>,
    /// Further commands run after `argv` exits 0, `&&`-style; EXIT carries the last exit code.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<Vec<String>>,
}

impl ExecRequest {
    /// A request to run `argv` with every other setting at its default.
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecRequest {
            version: PROTOCOL_VERSION,
            argv: argv.into_iter().map(Into::into).collect(),
            env: BTreeMap::new(),
            env_clear: false,
            env_remove: Vec::new(),
            cwd: None,
            user: None,
            tty: false,
            cols: None,
            rows: None,
            stdin: StdioMode::Piped,
            stdout: StdioMode::Piped,
            stderr: StdioMode::Piped,
            stage_files: Vec::new(),
            chain: Vec::new(),
        }
    }
}
