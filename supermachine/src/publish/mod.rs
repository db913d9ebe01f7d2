//! Published ports: TCP listeners on the host whose connections are carried over the VM's
//! vsock to the agent, which connects to `127.0.0.1:<guest port>` inside the guest.
//!
//! ```text
//! client ──TCP──▶ host listener ──vsock (connect_tcp)──▶ agent ──TCP──▶ 127.0.0.1:80 in the guest
//! ```
//!
//! The guest needs no network device: the loopback interface (which the agent brings up at
//! boot) is enough, so a published port exposes exactly one guest port and nothing else.

mod mapping;
mod server;
mod stream;

pub use mapping::{PortMapping, PortMappingError};
pub use server::PublishedPort;
pub(crate) use server::{Listeners, Publisher};
pub use stream::GuestTcpStream;
