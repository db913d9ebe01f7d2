//! Backend state blobs: what a backend saves is bincode inside an [`HvState`] tagged with the
//! backend's name, so another backend's blob (a KVM snapshot on Hypervisor.framework, or the
//! reverse) is refused by name before a byte of it is read.

use serde::{Deserialize, Serialize};

use super::{HvError, HvState};

/// Encodes `value` as `backend`'s state.
pub(crate) fn encode<T: Serialize>(backend: &str, value: &T) -> Result<HvState, HvError> {
    let bytes = bincode::serde::encode_to_vec(value, bincode::config::standard())
        .map_err(|e| HvError::BadState(format!("encoding: {e}")))?;
    Ok(HvState {
        backend: backend.to_owned(),
        bytes,
    })
}

/// Decodes `what` state saved by [`encode`] for `backend`, refusing another backend's and
/// trailing bytes.
pub(crate) fn decode<T: for<'de> Deserialize<'de>>(
    backend: &str,
    state: &HvState,
    what: &str,
) -> Result<T, HvError> {
    if state.backend != backend {
        return Err(HvError::BadState(format!(
            "{what} state was saved by the {} backend, this is {backend}",
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
