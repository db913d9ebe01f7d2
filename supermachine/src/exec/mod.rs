//! Running one command in the guest: builder → driver task → child handles.
//!
//! Each exec is one connection to the agent, owned by one tokio task (the driver, `driver.rs`)
//! that reads frames into per-stream buffers (`state.rs`) and writes stdin and control frames.
//! The handles the caller holds (`child.rs`) only touch that shared state and channels, so an
//! exec costs one task and no thread, and tearing it down never depends on the caller polling.

mod builder;
mod child;
mod driver;
mod state;
mod status;

pub use builder::{ExecBuilder, Stdio};
pub use child::{ExecChild, ExecSignaler, ExecStderr, ExecStdin, ExecStdout};
pub use status::{ExecOutcome, ExitStatus};
