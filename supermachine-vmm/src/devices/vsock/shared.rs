//! State shared by the device, its worker task and the host handles: the connection table, the
//! list of connections with news for the worker, and the worker's wake-up.
//!
//! Lock order: [`Shared::inner`] before any [`Conn::lock`]. Host streams take only their
//! connection's lock, release it, and then call [`Shared::push_dirty`].

use std::collections::HashMap;
use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use super::conn::{Conn, ConnKey};
use super::VsockConfig;

/// Host ports we allocate are at or above this (far from the guest's well-known ports, to keep
/// logs readable; any value is valid).
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// Where a new device starts allocating host ports: a random point in `[2^30, 2^31)`.
///
/// A guest restored from a snapshot may still send packets (RST, SHUTDOWN) for connections of
/// the machine the snapshot was taken from; had the new device started at the same port as
/// that one, those stale packets would hit its first connections ("connection refused" on
/// the first connect after a restore, seen in practice).
fn first_port() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS per process and differs per instance: enough to make
    // a collision with a previous incarnation's ports unlikely, without a dependency.
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    FIRST_LOCAL_PORT + (random as u32 & (FIRST_LOCAL_PORT - 1))
}

/// See the module docs.
#[derive(Debug)]
pub struct Shared {
    /// Table and queues; see [`Inner`].
    pub inner: Mutex<Inner>,
    /// Wakes the worker: new dirty connections or a transport-reset event.
    pub wake: Notify,
    /// Device configuration (CID, buffer sizes).
    pub config: VsockConfig,
    /// The worker hit a broken ring and stopped; reported as DEVICE_NEEDS_RESET.
    pub needs_reset: AtomicBool,
}

/// Mutable shared state.
#[derive(Debug, Default)]
pub struct Inner {
    /// Live connections by (host port, guest port).
    pub conns: HashMap<ConnKey, Arc<Conn>>,
    /// Connections the host side changed since the worker last looked.
    pub dirty: Vec<Arc<Conn>>,
    /// Transport-reset events still to deliver on the event queue.
    pub events_due: u32,
    /// Generation of the running worker; `None` while the driver is not active.
    pub active_gen: Option<u64>,
    /// Next worker generation.
    pub next_gen: u64,
    /// Next host port to try.
    pub next_port: u32,
    /// The device was dropped: no more connections, ever.
    pub device_gone: bool,
}

impl Shared {
    /// Fresh state for a device with `config`.
    pub fn new(config: VsockConfig) -> Self {
        Shared {
            inner: Mutex::new(Inner {
                next_port: first_port(),
                ..Inner::default()
            }),
            wake: Notify::new(),
            config,
            needs_reset: AtomicBool::new(false),
        }
    }

    /// Locks the shared state (poisoning ignored: the state stays consistent per field).
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts `conn` on the dirty list and wakes the worker. Call only after
    /// [`super::conn::ConnState::mark_dirty`] returned true, without holding the conn lock.
    pub fn push_dirty(&self, conn: &Arc<Conn>) {
        self.lock().dirty.push(conn.clone());
        self.wake.notify_one();
    }

    /// Looks up a connection by key.
    pub fn lookup(&self, key: &ConnKey) -> Option<Arc<Conn>> {
        self.lock().conns.get(key).cloned()
    }

    /// Removes `conn` from the table if it is still the entry for its key.
    pub fn remove(&self, inner: &mut Inner, conn: &Arc<Conn>) {
        if inner
            .conns
            .get(&conn.key)
            .is_some_and(|c| Arc::ptr_eq(c, conn))
        {
            inner.conns.remove(&conn.key);
        }
    }
}

impl Inner {
    /// Fails every connection with `kind` and forgets them all.
    pub fn fail_all(&mut self, kind: io::ErrorKind) {
        for (_, conn) in self.conns.drain() {
            conn.lock().close(Some(kind));
        }
        self.dirty.clear();
    }

    /// A host port not used with `peer_port` by any live connection.
    pub fn allocate_port(&mut self, peer_port: u32) -> Option<u32> {
        // The table holds at most a few thousand entries, so a free port is found within a
        // few tries; the bound only guards against a full table.
        for _ in 0..=self.conns.len() {
            let port = self.next_port;
            self.next_port = match port.checked_add(1) {
                Some(p) if p != u32::MAX => p,
                _ => FIRST_LOCAL_PORT,
            };
            let key = ConnKey {
                local_port: port,
                peer_port,
            };
            if !self.conns.contains_key(&key) {
                return Some(port);
            }
        }
        None
    }
}
