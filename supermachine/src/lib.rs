//! Run commands inside hardware-isolated microVMs from async Rust, streaming.
//!
//! The pieces, in the order a caller meets them:
//!
//! * [`Agent`] — a handle to a guest agent. Every exec and control action is one fresh connection
//!   to it, made through a [`Connector`]. Today the agent is reached over a Unix socket (the agent
//!   in host mode, for development and tests); the same API runs over a VM's vsock.
//! * [`ExecBuilder`] — what to run and how (`arg`, `env`, `current_dir`, `user`, `tty`,
//!   `timeout`, staged files, `&&` chains, cancellation), from [`Agent::exec`] or
//!   [`Vm::exec`].
//! * [`ExecChild`] — a running exec: its `stdin`/`stdout`/`stderr` handles,
//!   [`AsyncRead`](tokio::io::AsyncRead) of its stdout, [`AsyncWrite`](tokio::io::AsyncWrite) to
//!   its stdin, and a [`Future`](std::future::Future) of its [`ExitStatus`]. Dropping it kills
//!   the process group in the guest (unless [`ExecBuilder::kill_on_drop`] says otherwise).
//! * [`ExecOutcome`] — everything about a finished exec, from [`ExecBuilder::output`].
//!
//! The exec API follows [`tokio::process`](https://docs.rs/tokio/latest/tokio/process/) where a
//! difference would only be an accident, so code moves between the two with few changes. What
//! differs on purpose: `spawn` is `async` (it resolves once the guest process runs, so a
//! missing program fails there, typed); `kill_on_drop` defaults to `true`; a timeout, a
//! [`CancellationToken`], staged files and `&&` chains are built in; [`ExecChild`] is itself a
//! future and a reader/writer; [`ExecSignaler`] signals from other tasks; the output read ahead
//! is bounded (below); guest paths and environment are strings (they travel as UTF-8).
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
//! # Migrating from the earlier exec API
//!
//! | before | now |
//! |---|---|
//! | builder methods `fn x(self, ..) -> Self` | `fn x(&mut self, ..) -> &mut Self`; `spawn(&mut self)` and `output(&mut self)` return futures that own their settings |
//! | `ExecBuilder::cwd(dir)` | [`ExecBuilder::current_dir`] (`cwd` is gone: one name, tokio's) |
//! | — | [`ExecBuilder::arg`], [`args`](ExecBuilder::args), [`env_remove`](ExecBuilder::env_remove), [`env_clear`](ExecBuilder::env_clear), [`kill_on_drop`](ExecBuilder::kill_on_drop) |
//! | `child.take_stdin()` / `take_stdout()` / `take_stderr()` | `child.stdin.take()` / `child.stdout.take()` / `child.stderr.take()` (public fields; `None` when not piped, and `stderr` in tty mode) |
//! | `child.pid() -> u32` | [`ExecChild::id`] `-> Option<u32>` (`None` once the exec has ended) |
//! | `child.kill()` (sync, sends SIGKILL) | [`ExecChild::start_kill`]; [`ExecChild::kill`] is now `async` and also waits for the exit |
//! | — | [`ExecChild::try_wait`], [`ExecChild::wait_with_output`] |
//! | `ExitStatus::code() -> u32` (`128 + N` after signal `N`) | [`ExitStatus::code`] `-> Option<i32>`, `None` when a signal ended the process |
//! | `ExitStatus::signal() -> Option<u32>` (guessed from `128 + N`) | [`ExitStatus::signal`] `-> Option<i32>`, as the agent reported it |
//! | `wait()` on a timed-out exec: `Err(Error::TimedOut)` | `Ok(status)` with [`ExitStatus::timed_out`] (and normally `signal() == Some(9)`), as `output()` already did with [`ExecOutcome::timed_out`] |
//! | `Display` for `ExitStatus`: `exit code 137 (signal 9)` | as std's: `exit status: 3`, `signal: 9 (SIGKILL)` |
//! | `vm.stop()` (sync, joined the vCPU threads on the caller's thread) | `vm.stop().await` (blocking pool); [`Vm::stop_blocking`] for `Drop` impls |
//! | `Snapshot::open`, `verify_memory`, `check_matches` (sync) | the same names, `async` (blocking pool) |
//! | `Image::local`, `list_local`, `remove_local` and their `_in` forms (sync) | the same names, `async` |
//! | `Error::TimedOut` | gone: see the `wait()` row |
//! | `{}` of an error showed its cause too (some causes twice with `{:#}`) | `{}` says what failed, [`std::error::Error::source`] says why; [`Report`] prints the whole chain on one line |
//! | two `SnapshotError` enums (VMM and library) | one, the VMM's, re-exported ([`SnapshotError`]); `Vmm(String)` is gone, `MemoryTruncated`, `Mismatch`, ... keep their names |
//!
//! A host with this API needs an agent that reports signals in its EXIT frames to tell a kill
//! from `exit 137`; with an older agent a kill shows as `code() == Some(128 + N)`.
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
//! | [`Vm::start`], [`Vm::restore`] | blocking pool: reading the agent, building the initramfs, hashing the kernel, opening the cached snapshot, creating the VM and its vCPUs (or mapping and loading a snapshot); then, after a boot, the runtime waits for the agent |
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
pub mod os;
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
#[doc(hidden)]
pub use vm::boot_files;
pub use vm::{
    Action, ConfigError, Limits, Network, Rule, RuleError, Snapshot, SnapshotError, StartTimings,
    Vm, VmConfig, VmExit, VmExitReason, AGENT_ENV, KERNEL_ENV, MAX_MEMORY_MIB, MIN_MEMORY_MIB,
};
