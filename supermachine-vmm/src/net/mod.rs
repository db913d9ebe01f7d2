//! Guest networking, host side: the egress [`policy`] (more to come: the user-mode stack that
//! terminates guest flows and re-originates them from host sockets).

pub mod policy;
