//! Run commands inside hardware-isolated microVMs from async Rust, streaming.
//!
//! The pieces, in the order a caller meets them:
//!
//! * [`Agent`] — a handle to a guest agent. Every exec and control action is one fresh connection
//!   to it, made through a [`Connector`]. Today the agent is reached over a Unix socket (the agent
//!   in host mode, for development and tests); the same API runs over a VM's vsock.
//! * [`ExecBuilder`] — what to run and how (`env`, `cwd`, `user`, `tty`, `timeout`, staged files,
//!   `&&` chains, cancellation), from [`Agent::exec`].
//! * [`ExecChild`] — a running exec: [`AsyncRead`](tokio::io::AsyncRead) of its stdout,
//!   [`AsyncWrite`](tokio::io::AsyncWrite) to its stdin, and a [`Future`](std::future::Future) of
//!   its [`ExitStatus`]. Dropping it kills the process group in the guest.
//! * [`ExecOutcome`] — everything about a finished exec, from [`ExecBuilder::output`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), supermachine::Error> {
//! use supermachine::Agent;
//!
//! let agent = Agent::unix("/tmp/agent.sock");
//! let out = agent.exec(["sh", "-c", "echo hello"]).output().await?;
//! assert_eq!(&out.stdout[..], b"hello\n");
//! # Ok(()) }
//! ```
//!
//! # Output that nobody reads
//! An exec's stdout and stderr are buffered on the host in a small window (1 MiB per stream by
//! default); when a window is full the host stops reading, and backpressure reaches the guest
//! process, which blocks on its write — like a pipe. While the exit status is being awaited,
//! though, the host keeps reading regardless, so awaiting the exit never deadlocks on output that
//! is not being read, and no output is dropped: it stays buffered and readable after the exit. That
//! read-ahead is bounded by [`ExecBuilder::max_buffered_output`] (64 MiB by default); past it the
//! wait fails with [`Error::OutputLimitExceeded`] and the process is left running (blocked), so the
//! caller can read and wait again, or kill it.
//!
//! # What runs where: nothing blocks your runtime
//! Every `async fn` here may be awaited on any tokio runtime, `current_thread` included, without
//! stalling its other tasks: work that blocks (file I/O, hashing, hypervisor calls, joining
//! threads, `flock`) is handed to tokio's blocking pool (`spawn_blocking`), and the rest is
//! non-blocking I/O. `tests/runtime_stall.rs` holds that to a 5 ms ticker staying under 25 ms
//! late through a cold start, a snapshot, a restore, a stop, an image pull and a rootfs build.
//!
//! | call | where its work runs |
//! |---|---|
//! | [`Vm::start`], [`Vm::restore`] | blocking pool: reading the agent, building the initramfs, hashing the kernel, opening the cached snapshot, creating the VM and its vCPUs (or mapping and loading a snapshot); then the runtime waits for the agent |
//! | [`Vm::snapshot`], [`Snapshot::open`], [`Snapshot::verify_memory`], [`Snapshot::check_matches`] | blocking pool (writing or reading and hashing files) |
//! | [`Vm::pause`], [`Vm::resume`], [`Vm::stop`] | blocking pool (parking or joining vCPU threads) |
//! | [`Image::pull`], [`Image::rootfs`], imports, [`Image::local`], [`Image::list_local`], [`Image::remove_local`] | network I/O on the runtime; store, index, locks, unpacking and `mkfs` on the blocking pool |
//! | [`Vm::exec`] and everything on [`ExecChild`], [`Agent`] calls, published ports | the runtime, non-blocking (one task per exec, no thread) |
//! | getters ([`Vm::console`], [`Vm::is_paused`], [`Vm::exit_status`], ...) | the caller, cheap (no lock a blocking call holds) |
//!
//! Two exceptions, by design: dropping a [`Vm`] stops it on the dropping thread (it joins the vCPU
//! threads, normally well under a millisecond; await [`Vm::stop`] first to keep even that off the
//! runtime), and [`Vm::stop_blocking`] exists for `Drop` impls and other synchronous code.

mod agent;
pub mod cache;
mod connector;
mod error;
mod exec;
pub mod image;
mod publish;
mod vm;

pub use agent::{Agent, AgentInfo};
pub use connector::{BoxedStream, Connector, UnixConnector};
pub use error::{Error, Report};
pub use exec::{
    ExecBuilder, ExecChild, ExecOutcome, ExecSignaler, ExecStderr, ExecStdin, ExecStdout,
    ExitStatus, Stdio,
};
pub use image::{
    Credentials, Image, ImageConfig, ImageError, ImageReference, ImportOptions, LayerInfo,
    LocalImage, Platform, PullEvent, PullOptions, RemovedImage, Rootfs,
};
pub use publish::{GuestTcpStream, PortMapping, PortMappingError, PublishedPort};
pub use supermachine_codec::{StagedFile, WindowSize};
/// Why a VM could not be paused (the source of [`Error::Pause`]).
pub use supermachine_vmm::PauseError;
pub use tokio_util::sync::CancellationToken;
pub use vm::{
    ConfigError, Snapshot, SnapshotError, StartTimings, Vm, VmConfig, VmExit, VmExitReason,
    AGENT_ENV, KERNEL_ENV, MAX_MEMORY_MIB, MIN_MEMORY_MIB,
};
