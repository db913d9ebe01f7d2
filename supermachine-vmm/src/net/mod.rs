//! Guest networking, host side: the egress [`policy`], and the user-mode network ([`stack`])
//! that terminates the guest's flows in smoltcp and re-originates them from host sockets.

pub mod addressing;
pub mod admission;
pub mod config;
pub mod dns;
pub mod link;
pub mod names;
pub mod packet;
pub mod policy;
mod stack;
mod tcp_flow;
mod tcp_host;
mod udp;

pub use config::{Limits, StackConfig};
pub use link::{Frame, GuestLink};
pub use stack::NetStack;
