use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use supermachine_codec::{ControlAck, ControlAction, ControlMessage, ExecCodec, Frame};
use tokio_util::codec::Framed;

use crate::connector::{BoxedStream, Connector, UnixConnector};
use crate::error::Error;
use crate::exec::ExecBuilder;
use crate::publish::GuestTcpStream;

pub(crate) mod reseed;

use reseed::Reseed;

/// A handle to a guest agent: the place where execs and control actions run.
///
/// Cheap to clone; every call opens its own connection, so any number of execs can run at once.
#[derive(Debug, Clone)]
pub struct Agent {
    connector: Arc<dyn Connector>,
    /// Set for a VM restored from a snapshot: its reseed rides on the first requests.
    reseed: Option<Arc<Reseed>>,
}

/// What `ping` learned about the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    /// The agent's version string.
    pub version: String,
    /// The guest kernel's boot id (changes on every boot, not on snapshot restore).
    pub boot_id: String,
    /// The agent protocol revision it speaks ([`supermachine_codec::AGENT_PROTOCOL`] for the
    /// agent built with this library; 1 for agents that do not say).
    pub protocol: u32,
}

impl Agent {
    /// An agent reached over a Unix socket (an agent in host mode, or a VM worker's muxer).
    pub fn unix(path: impl Into<PathBuf>) -> Self {
        Agent::with_connector(UnixConnector::new(path))
    }

    /// An agent reached through any [`Connector`].
    pub fn with_connector(connector: impl Connector) -> Self {
        Agent {
            connector: Arc::new(connector),
            reseed: None,
        }
    }

    /// This agent, for a guest just restored from a snapshot: its connections carry the
    /// reseed preamble ([`reseed`]) until one of them has been answered. Fails only if the
    /// host's entropy cannot be read.
    pub(crate) fn reseeding_first_requests(mut self) -> std::io::Result<Self> {
        self.reseed = Some(Reseed::pending()?);
        Ok(self)
    }

    /// The restored guest's reseed, if this agent carries one.
    pub(crate) fn reseed(&self) -> Option<&Arc<Reseed>> {
        self.reseed.as_ref()
    }

    /// Whether this agent still owes a restored guest its reseed (no preambled connection has
    /// been answered yet).
    pub(crate) fn reseed_pending(&self) -> bool {
        self.reseed
            .as_ref()
            .is_some_and(|reseed| !reseed.answered())
    }

    /// Makes sure a restored guest has applied its reseed (one ping carrying the preamble if
    /// nothing has been answered yet), for paths that reach the guest around this agent.
    pub(crate) async fn ensure_reseeded(&self) -> Result<(), Error> {
        if self.reseed_pending() {
            self.ping().await?;
        }
        Ok(())
    }

    /// Starts building an exec of `argv` (program, then arguments; the program is looked up
    /// through `PATH` in the guest).
    pub fn exec<I, S>(&self, argv: I) -> ExecBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecBuilder::new(self.clone(), argv.into_iter().map(Into::into).collect())
    }

    /// Checks the agent answers, returning its version and boot id.
    pub async fn ping(&self) -> Result<AgentInfo, Error> {
        let (ack, _) = self
            .control("ping", ControlAction::Ping, Bytes::new())
            .await?;
        Ok(AgentInfo {
            version: ack.version.unwrap_or_default(),
            boot_id: ack.boot_id.unwrap_or_default(),
            protocol: ack.protocol.unwrap_or(1),
        })
    }

    /// Reads a whole file from the guest.
    pub async fn read_file(&self, path: impl Into<String>) -> Result<Bytes, Error> {
        let action = ControlAction::ReadFile { path: path.into() };
        let (_, data) = self.control("read_file", action, Bytes::new()).await?;
        Ok(data)
    }

    /// Writes a whole file in the guest, atomically (readers see the old or the new contents,
    /// never a mix). `mode` defaults to `0o644`.
    pub async fn write_file(
        &self,
        path: impl Into<String>,
        contents: impl Into<Bytes>,
        mode: Option<u32>,
    ) -> Result<(), Error> {
        let action = ControlAction::WriteFile {
            path: path.into(),
            mode,
        };
        self.control("write_file", action, contents.into()).await?;
        Ok(())
    }

    /// Sends `signal` to the process group of every exec running in the guest.
    pub async fn signal_workload(&self, signal: i32) -> Result<(), Error> {
        let action = ControlAction::SignalWorkload { signal };
        self.control("signal_workload", action, Bytes::new())
            .await?;
        Ok(())
    }

    /// Test hook: makes the guest's PID 1 exit so its kernel panics. Refused unless the VM was
    /// started with `VmConfig::test_hooks(true)`.
    #[doc(hidden)]
    pub async fn crash_guest(&self) -> Result<(), Error> {
        self.control("crash_guest", ControlAction::CrashGuest, Bytes::new())
            .await?;
        Ok(())
    }

    /// Opens a connection to the agent; for a restored guest whose reseed has not been
    /// answered yet, with the preamble written in front of what the caller sends.
    pub(crate) async fn connect(&self) -> Result<BoxedStream, Error> {
        let connected = async {
            // Counted from now: the watcher of a restored VM then leaves the reseed to this
            // request (`vm::first_answer`).
            let request = self.reseed.as_ref().map(|reseed| reseed.begin());
            let stream = self.connector.connect().await?;
            match (&self.reseed, request) {
                (Some(reseed), Some(request)) => reseed.prepare(stream, request),
                _ => Ok(stream),
            }
        };
        connected
            .await
            .map_err(|source| match crate::error::vm_gone(&source) {
                Some(exit) => Error::VmExited(exit),
                None => Error::AgentUnreachable {
                    target: self.connector.describe(),
                    source,
                },
            })
    }

    /// One control exchange: request (+ attachment) → ack (+ attachment), on a fresh connection.
    async fn control(
        &self,
        name: &'static str,
        action: ControlAction,
        data: Bytes,
    ) -> Result<(ControlAck, Bytes), Error> {
        let (ack, data, _) = self.control_exchange(name, data, || action).await?;
        Ok((ack, data))
    }

    /// Opens a TCP connection to `127.0.0.1:port` inside the guest, carried over this agent's
    /// transport (vsock for a VM). This is what published ports use; it works for any port
    /// a guest process listens on, published or not.
    ///
    /// Fails with [`Error::Control`] when nothing listens on the port (the message has the
    /// guest's `Connection refused`). The stream half-closes like TCP: shutting down its write
    /// side delivers EOF to the guest server, which can still answer.
    pub async fn connect_tcp(&self, port: u16) -> Result<GuestTcpStream, Error> {
        self.unframed("connect_tcp", ControlAction::ConnectTcp { port })
            .await
    }

    /// Test hook: a connection on which the agent echoes every byte (see
    /// [`VmConfig::test_hooks`](crate::VmConfig::test_hooks)); measures the transport alone.
    #[doc(hidden)]
    pub async fn echo(&self) -> Result<GuestTcpStream, Error> {
        self.unframed("echo", ControlAction::Echo).await
    }

    /// A control exchange after which the connection carries raw bytes.
    async fn unframed(
        &self,
        name: &'static str,
        action: ControlAction,
    ) -> Result<GuestTcpStream, Error> {
        let (_, _, framed) = self.control_exchange(name, Bytes::new(), || action).await?;
        // Bytes the guest sent right after the ack may already sit in the frame reader's
        // buffer; they are the start of the stream.
        let parts = framed.into_parts();
        Ok(GuestTcpStream::new(parts.read_buf.freeze(), parts.io))
    }

    /// Sends one control request and reads its ack; returns the connection too, for actions
    /// after which it carries something else.
    async fn control_exchange(
        &self,
        name: &'static str,
        data: Bytes,
        action: impl FnOnce() -> ControlAction,
    ) -> Result<(ControlAck, Bytes, Framed<BoxedStream, ExecCodec>), Error> {
        let stream = self.connect().await?;
        let mut framed = Framed::new(stream, ExecCodec::new());
        let request = Frame::Control {
            message: ControlMessage::Action(action()),
            data,
        };
        framed
            .send(request)
            .await
            .map_err(|e| Error::from_codec("sending a control request", e))?;
        loop {
            match framed.next().await {
                Some(Ok(Frame::Control {
                    message: ControlMessage::Ack(ack),
                    data,
                })) => {
                    return if ack.ok {
                        Ok((ack, data, framed))
                    } else {
                        Err(Error::Control {
                            action: name,
                            message: ack.error.unwrap_or_else(|| "no reason given".into()),
                        })
                    };
                }
                Some(Ok(Frame::Unknown { .. })) => continue,
                Some(Ok(Frame::Error(error))) => return Err(Error::ExecFailed(error)),
                Some(Ok(other)) => {
                    return Err(Error::Protocol(format!(
                        "expected a CONTROL ack, got frame kind {:#04x}",
                        other.kind()
                    )))
                }
                Some(Err(e)) => return Err(Error::from_codec("awaiting a control ack", e)),
                None => {
                    return Err(Error::ConnectionLost {
                        during: "awaiting a control ack",
                        reason: "the agent closed the connection".into(),
                    })
                }
            }
        }
    }
}
