//! The `vmstate` file: a fixed header (magic, format version, payload length, SHA-256 of the
//! payload) followed by the payload, bincode-encoded [`MachineState`]. Anything that does not
//! check out is refused with the reason; nothing is guessed.

use std::path::Path;

use sha2::{Digest, Sha256};

use super::{MachineState, SnapshotError};

/// First bytes of every vmstate file.
pub const MAGIC: [u8; 8] = *b"SMVMSTAT";
/// Bumped whenever [`MachineState`] or anything inside it changes shape or meaning.
pub const FORMAT_VERSION: u32 = 1;
/// magic + version + length + sha256.
const HEADER_LEN: usize = 8 + 4 + 8 + 32;
/// Far above any real state (a few KiB per vCPU); bounds what a corrupt length can make us read.
const MAX_PAYLOAD: u64 = 64 << 20;

/// Encodes `state` as a complete vmstate file.
pub fn encode(state: &MachineState) -> Result<Vec<u8>, SnapshotError> {
    let payload = bincode::serde::encode_to_vec(state, bincode::config::standard())
        .map_err(|e| SnapshotError::Encode(Box::new(e)))?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&payload));
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Checks and decodes a vmstate file read from `path` (named in errors).
pub fn decode(bytes: &[u8], path: &Path) -> Result<MachineState, SnapshotError> {
    let corrupt = |why: String| SnapshotError::Corrupt {
        path: path.to_owned(),
        why,
    };
    if bytes.len() < HEADER_LEN {
        return Err(corrupt(format!(
            "{} bytes is shorter than the {HEADER_LEN}-byte header",
            bytes.len()
        )));
    }
    let (header, payload) = bytes.split_at(HEADER_LEN);
    if header[..8] != MAGIC {
        return Err(corrupt(
            "not a supermachine vmstate file (bad magic)".into(),
        ));
    }
    let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if version != FORMAT_VERSION {
        return Err(SnapshotError::FormatVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&header[12..20]);
    let len = u64::from_le_bytes(len);
    if len > MAX_PAYLOAD || len != payload.len() as u64 {
        return Err(corrupt(format!(
            "header says {len} payload bytes, the file has {}",
            payload.len()
        )));
    }
    if Sha256::digest(payload)[..] != header[20..52] {
        return Err(corrupt("checksum mismatch".into()));
    }
    let (state, used) = bincode::serde::decode_from_slice(payload, bincode::config::standard())
        .map_err(|e| corrupt(format!("undecodable state: {e}")))?;
    if used != payload.len() {
        return Err(corrupt(format!("{} trailing bytes", payload.len() - used)));
    }
    Ok(state)
}
