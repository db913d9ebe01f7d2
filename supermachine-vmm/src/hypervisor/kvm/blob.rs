//! Backend state blobs: what the KVM backend saves (any architecture) is bincode inside an
//! [`HvState`] tagged with the backend's name, so another backend's blob is refused by name.

use serde::{Deserialize, Serialize};

use crate::hypervisor::{HvError, HvState};

/// The backend name stored with every blob.
pub(super) const BACKEND: &str = "kvm";

/// Encodes `value` as this backend's state.
pub(super) fn encode<T: Serialize>(value: &T) -> Result<HvState, HvError> {
    let bytes = bincode::serde::encode_to_vec(value, bincode::config::standard())
        .map_err(|e| HvError::BadState(format!("encoding: {e}")))?;
    Ok(HvState {
        backend: BACKEND.to_owned(),
        bytes,
    })
}

/// Decodes `what` state saved by [`encode`], refusing another backend's and trailing bytes.
pub(super) fn decode<T: for<'de> Deserialize<'de>>(
    state: &HvState,
    what: &str,
) -> Result<T, HvError> {
    if state.backend != BACKEND {
        return Err(HvError::BadState(format!(
            "{what} state was saved by the {} backend, this is {BACKEND}",
            state.backend
        )));
    }
    let (value, used) =
        bincode::serde::decode_from_slice(&state.bytes, bincode::config::standard())
            .map_err(|e| HvError::BadState(format!("{what} state: {e}")))?;
    if used != state.bytes.len() {
        return Err(HvError::BadState(format!(
            "{what} state has {} trailing bytes",
            state.bytes.len() - used
        )));
    }
    Ok(value)
}
