//! Which names this VM's DNS resolved to which addresses, for the policy's domain rules.
//!
//! Bounded: at most [`MAX_ADDRESSES`] addresses (the one recorded longest ago is forgotten
//! first) and [`MAX_NAMES_PER_ADDRESS`] names each (most recent first). Entries do not expire
//! with the record's TTL: a guest that cached an answer longer than the TTL still gets its
//! flows judged by the name it asked for. One table per stack, so two VMs never share it.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;

/// Addresses the table remembers.
pub const MAX_ADDRESSES: usize = 4096;
/// Names remembered per address.
pub const MAX_NAMES_PER_ADDRESS: usize = 8;

/// Address → the names that resolved to it.
#[derive(Debug, Default)]
pub struct NameTable {
    names: HashMap<IpAddr, VecDeque<String>>,
    /// Addresses in the order they were first recorded, for eviction.
    order: VecDeque<IpAddr>,
}

impl NameTable {
    /// Records that `name` resolved to `address` (`name` lower case, no trailing dot).
    pub fn record(&mut self, name: &str, address: IpAddr) {
        let name = normalise(name);
        if let Some(names) = self.names.get_mut(&address) {
            names.retain(|known| *known != name);
            names.push_front(name);
            names.truncate(MAX_NAMES_PER_ADDRESS);
            return;
        }
        if self.order.len() == MAX_ADDRESSES {
            if let Some(oldest) = self.order.pop_front() {
                self.names.remove(&oldest);
            }
        }
        self.order.push_back(address);
        self.names.insert(address, VecDeque::from([name]));
    }

    /// The names that resolved to `address`, most recent first.
    pub fn names(&self, address: IpAddr) -> Vec<String> {
        self.names
            .get(&address)
            .map(|names| names.iter().cloned().collect())
            .unwrap_or_default()
    }
}

fn normalise(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_recent_first_bounded_and_evicting() {
        let mut table = NameTable::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        table.record("One.Test.", a);
        table.record("two.test", a);
        table.record("one.test", a);
        assert_eq!(table.names(a), ["one.test", "two.test"]);
        for i in 0..20 {
            table.record(&format!("n{i}.test"), a);
        }
        assert_eq!(table.names(a).len(), MAX_NAMES_PER_ADDRESS);
        for i in 0..MAX_ADDRESSES as u32 {
            table.record("many.test", IpAddr::from((0x0a00_0000 + i).to_be_bytes()));
        }
        assert!(table.names(a).is_empty(), "the oldest address is evicted");
        assert_eq!(table.order.len(), MAX_ADDRESSES);
        assert_eq!(table.names.len(), MAX_ADDRESSES);
    }
}
