//! Backend state blobs of the KVM backend (any architecture): the shared encoding
//! ([`crate::hypervisor::blob`]) tagged "kvm", so another backend's blob is refused by name.

use serde::{Deserialize, Serialize};

use crate::hypervisor::{blob, HvError, HvState};

/// The backend name stored with every blob.
pub(super) const BACKEND: &str = "kvm";

/// Encodes `value` as this backend's state.
pub(super) fn encode<T: Serialize>(value: &T) -> Result<HvState, HvError> {
    blob::encode(BACKEND, value)
}

/// Decodes `what` state saved by [`encode`], refusing another backend's and trailing bytes.
pub(super) fn decode<T: for<'de> Deserialize<'de>>(
    state: &HvState,
    what: &str,
) -> Result<T, HvError> {
    blob::decode(BACKEND, state, what)
}
