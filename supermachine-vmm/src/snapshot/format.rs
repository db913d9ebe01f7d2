//! The `vmstate` file: a fixed header (magic, format version, payload length, SHA-256 of the
//! payload) followed by the payload, bincode-encoded [`MachineState`]. Anything that does not
//! check out is refused with the reason; nothing is guessed.
//!
//! Versions: 2 (written) records the guest architecture first in the payload; 1 (still read)
//! is the same without it, written only by x86-64 builds, so it decodes as an x86-64 snapshot.
//! A snapshot of another architecture than this build's is refused
//! ([`SnapshotError::Architecture`]).

use std::path::Path;

use sha2::{Digest, Sha256};

use serde::Deserialize;

use super::{MachineState, SavedConfig, SnapshotError};
use crate::arch::ARCH;
use crate::devices::serial::SerialSaved;
use crate::devices::virtio::mmio::TransportState;
use crate::hypervisor::HvState;

/// First bytes of every vmstate file.
pub const MAGIC: [u8; 8] = *b"SMVMSTAT";
/// Bumped whenever [`MachineState`] or anything inside it changes shape or meaning.
pub const FORMAT_VERSION: u32 = 2;
/// The version before the architecture was recorded, still read (see the module docs).
const FORMAT_VERSION_V1: u32 = 1;

/// A version-1 payload: [`MachineState`] without `arch`.
#[derive(Deserialize)]
struct MachineStateV1 {
    config: SavedConfig,
    vm: HvState,
    vcpus: Vec<HvState>,
    serial: SerialSaved,
    transports: Vec<TransportState>,
    vsock_connections: usize,
}

impl From<MachineStateV1> for MachineState {
    fn from(v1: MachineStateV1) -> Self {
        MachineState {
            // Only x86-64 builds wrote version 1.
            arch: "x86_64".to_owned(),
            config: v1.config,
            vm: v1.vm,
            vcpus: v1.vcpus,
            serial: v1.serial,
            transports: v1.transports,
            vsock_connections: v1.vsock_connections,
        }
    }
}
/// magic + version + length + sha256.
const HEADER_LEN: usize = 8 + 4 + 8 + 32;
/// Far above any real state (a few KiB per vCPU); bounds what a corrupt length can make us read.
const MAX_PAYLOAD: u64 = 64 << 20;

/// Encodes `state` as a complete vmstate file.
pub fn encode(state: &MachineState) -> Result<Vec<u8>, SnapshotError> {
    let payload = bincode::serde::encode_to_vec(state, bincode::config::standard())
        .map_err(|e| SnapshotError::Encode(Box::new(e)))?;
    Ok(frame(FORMAT_VERSION, &payload))
}

/// The header for `payload` of `version`, then the payload.
fn frame(version: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(payload));
    out.extend_from_slice(payload);
    out
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
    if version != FORMAT_VERSION && version != FORMAT_VERSION_V1 {
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
    let state = if version == FORMAT_VERSION_V1 {
        decode_payload::<MachineStateV1>(payload).map(MachineState::from)
    } else {
        decode_payload::<MachineState>(payload)
    }
    .map_err(corrupt)?;
    if state.arch != ARCH {
        return Err(SnapshotError::Architecture {
            snapshot: state.arch,
            host: ARCH,
        });
    }
    Ok(state)
}

/// Decodes a whole payload as `T`; the error says why not.
fn decode_payload<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, String> {
    let (state, used) = bincode::serde::decode_from_slice(payload, bincode::config::standard())
        .map_err(|e| format!("undecodable state: {e}"))?;
    if used != payload.len() {
        return Err(format!("{} trailing bytes", payload.len() - used));
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::Arc;

    use super::*;
    use crate::devices::serial::{ConsoleLog, Serial};

    fn state() -> MachineState {
        let irq = Arc::new(vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap());
        MachineState {
            arch: ARCH.to_owned(),
            config: SavedConfig {
                vcpus: 2,
                memory_mib: 256,
                vsock_cid: Some(3),
                disks: vec![(PathBuf::from("/disk"), true)],
                cmdline: "console=ttyS0".into(),
            },
            vm: HvState {
                backend: "kvm".into(),
                bytes: vec![1, 2, 3],
            },
            vcpus: vec![
                HvState {
                    backend: "kvm".into(),
                    bytes: vec![4],
                };
                2
            ],
            serial: Serial::new(ConsoleLog::new(16, false), irq).save(),
            transports: Vec::new(),
            vsock_connections: 1,
        }
    }

    fn path() -> PathBuf {
        PathBuf::from("vmstate")
    }

    #[test]
    fn round_trips_with_the_architecture() {
        let state = state();
        assert_eq!(decode(&encode(&state).unwrap(), &path()).unwrap(), state);
    }

    #[test]
    fn version_1_files_load_as_x86_64() {
        let s = state();
        // Version 1 is version 2 without the leading `arch` field.
        let payload = bincode::serde::encode_to_vec(
            (
                &s.config,
                &s.vm,
                &s.vcpus,
                &s.serial,
                &s.transports,
                s.vsock_connections,
            ),
            bincode::config::standard(),
        )
        .unwrap();
        let decoded = decode(&frame(FORMAT_VERSION_V1, &payload), &path());
        if ARCH == "x86_64" {
            assert_eq!(decoded.unwrap(), s);
        } else {
            assert!(matches!(
                decoded,
                Err(SnapshotError::Architecture { snapshot, .. }) if snapshot == "x86_64"
            ));
        }
    }

    #[test]
    fn another_architecture_is_refused_by_name() {
        let mut s = state();
        s.arch = "riscv64".into();
        let err = decode(&encode(&s).unwrap(), &path()).unwrap_err();
        assert!(
            matches!(&err, SnapshotError::Architecture { snapshot, host } if snapshot == "riscv64" && *host == ARCH),
            "{err}"
        );
        assert!(err.to_string().contains("riscv64"), "{err}");
    }

    #[test]
    fn unknown_versions_are_refused() {
        let mut bytes = encode(&state()).unwrap();
        bytes[8..12].copy_from_slice(&3u32.to_le_bytes());
        assert!(matches!(
            decode(&bytes, &path()),
            Err(SnapshotError::FormatVersion {
                found: 3,
                supported: FORMAT_VERSION
            })
        ));
    }
}
