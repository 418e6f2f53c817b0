//! Snapshots: the state file (every vCPU, the VM's irqchip/PIT/clock, every device, the machine
//! configuration), versioned and checksummed; the API request bodies, in Firecracker's format.
//! Guest memory goes to a separate file (see `vstate::memory`).

use serde::{Deserialize, Serialize};

use crate::devices::i8042::I8042Snapshot;
use crate::devices::serial::SerialSnapshot;
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm::VmState;

/// "AIRLOCK" + NUL: not a Firecracker snapshot, and not something else by accident.
pub const MAGIC: [u8; 8] = *b"AIRLOCK\0";
/// Bumped on any change to [`VmSnapshot`]'s layout: an old file is refused, never misread.
pub const FORMAT_VERSION: u32 = 1;
/// magic (8) + version (4) + reserved (4) + payload length (8) + CRC-32 (4) + reserved (4)
pub const HEADER_SIZE: usize = 32;
/// A state file is kilobytes per vCPU; anything far larger is not one of ours.
pub const MAX_STATE_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotFileError {
    #[error("cannot read snapshot file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write snapshot file {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("snapshot file {path} is truncated ({len} bytes; the header alone is {HEADER_SIZE})")]
    TooShort { path: String, len: u64 },
    #[error("{path} is not an Airlock snapshot file (wrong magic number)")]
    BadMagic { path: String },
    #[error("snapshot file {path} has format version {found}; this airlock-vmm reads version {FORMAT_VERSION}")]
    Version { path: String, found: u32 },
    #[error("snapshot file {path} is truncated or has trailing data: header says {expected} bytes of state, file has {actual}")]
    Length {
        path: String,
        expected: u64,
        actual: u64,
    },
    #[error("snapshot file {path} is corrupted (checksum mismatch)")]
    Checksum { path: String },
    #[error("snapshot file {path} cannot be decoded: {reason}")]
    Decode { path: String, reason: String },
    #[error("snapshot file {path} is larger than any Airlock state file ({len} bytes)")]
    TooLarge { path: String, len: u64 },
}

/// The configuration a restored VM reports and needs: plain fields, so the binary encoding has
/// no optional layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotConfig {
    pub vcpu_count: u8,
    pub mem_size_mib: u64,
    pub smt: bool,
    pub kernel_image_path: String,
    pub initrd_path: Option<String>,
    pub boot_args: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DeviceStates {
    pub serial: SerialSnapshot,
    pub i8042: I8042Snapshot,
    /// virtio devices in MMIO-slot order.
    pub virtio: Vec<crate::devices::virtio::attach::VirtioSnapshot>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct VmSnapshot {
    pub vmm_version: String,
    pub config: SnapshotConfig,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DeviceStates,
}

pub fn encode(snapshot: &VmSnapshot) -> Result<Vec<u8>, String> {
    let payload = postcard::to_stdvec(snapshot).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(HEADER_SIZE + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

pub fn decode(bytes: &[u8], path: &str) -> Result<VmSnapshot, SnapshotFileError> {
    let path = path.to_string();
    if bytes.len() < HEADER_SIZE {
        return Err(SnapshotFileError::TooShort {
            path,
            len: bytes.len() as u64,
        });
    }
    if bytes[..8] != MAGIC {
        return Err(SnapshotFileError::BadMagic { path });
    }
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
    let version = u32_at(8);
    if version != FORMAT_VERSION {
        return Err(SnapshotFileError::Version {
            path,
            found: version,
        });
    }
    let expected = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    let payload = &bytes[HEADER_SIZE..];
    if payload.len() as u64 != expected {
        return Err(SnapshotFileError::Length {
            path,
            expected,
            actual: payload.len() as u64,
        });
    }
    if crc32fast::hash(payload) != u32_at(24) {
        return Err(SnapshotFileError::Checksum { path });
    }
    postcard::from_bytes(payload).map_err(|e| SnapshotFileError::Decode {
        path,
        reason: e.to_string(),
    })
}

pub fn write_state_file(snapshot: &VmSnapshot, path: &str) -> Result<(), SnapshotFileError> {
    let bytes = encode(snapshot).map_err(|reason| SnapshotFileError::Decode {
        path: path.to_string(),
        reason,
    })?;
    std::fs::write(path, bytes).map_err(|source| SnapshotFileError::Write {
        path: path.to_string(),
        source,
    })
}

pub fn read_state_file(path: &str) -> Result<VmSnapshot, SnapshotFileError> {
    let read_err = |source| SnapshotFileError::Read {
        path: path.to_string(),
        source,
    };
    let len = std::fs::metadata(path).map_err(read_err)?.len();
    if len > MAX_STATE_BYTES {
        return Err(SnapshotFileError::TooLarge {
            path: path.to_string(),
            len,
        });
    }
    decode(&std::fs::read(path).map_err(read_err)?, path)
}

/// `PUT /snapshot/create`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshotRequest {
    #[serde(default = "default_snapshot_type")]
    pub snapshot_type: SnapshotType,
    pub snapshot_path: String,
    pub mem_file_path: String,
    /// Accepted for Firecracker compatibility and ignored: the format has one version.
    #[serde(default)]
    pub version: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SnapshotType {
    Full,
    Diff,
}

fn default_snapshot_type() -> SnapshotType {
    SnapshotType::Full
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum MemBackendType {
    File,
    Uffd,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    pub backend_type: MemBackendType,
    /// The memory file (for `Uffd` too: the handler is a thread inside the VMM).
    pub backend_path: String,
    /// `Uffd` only (Airlock extension): populate all memory in the background after resuming.
    #[serde(default)]
    pub prefetch: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    pub uds_path: String,
}

/// `PUT /snapshot/load`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadSnapshotRequest {
    pub snapshot_path: String,
    #[serde(default)]
    pub mem_backend: Option<MemBackend>,
    /// Firecracker's older spelling of a `File` backend.
    #[serde(default)]
    pub mem_file_path: Option<String>,
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub resume_vm: bool,
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
    #[serde(default)]
    pub vsock_override: Option<VsockOverride>,
}

impl LoadSnapshotRequest {
    /// The memory backend, from either spelling; exactly one must be given.
    pub fn backend(&self) -> Result<MemBackend, String> {
        match (&self.mem_backend, &self.mem_file_path) {
            (Some(b), None) => Ok(b.clone()),
            (None, Some(path)) => Ok(MemBackend {
                backend_type: MemBackendType::File,
                backend_path: path.clone(),
                prefetch: false,
            }),
            (Some(_), Some(_)) => Err("give mem_backend or mem_file_path, not both".into()),
            (None, None) => Err("the snapshot's memory is missing: give mem_backend".into()),
        }
    }

    pub fn dirty_tracking(&self) -> bool {
        self.enable_diff_snapshots || self.track_dirty_pages
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmSnapshot {
        VmSnapshot {
            vmm_version: "test".into(),
            config: SnapshotConfig {
                vcpu_count: 1,
                mem_size_mib: 64,
                smt: false,
                kernel_image_path: "/k".into(),
                initrd_path: None,
                boot_args: Some("probe=spin".into()),
            },
            vm: VmState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                pit: Default::default(),
                clock: Default::default(),
            },
            vcpus: vec![],
            devices: DeviceStates {
                serial: Default::default(),
                i8042: Default::default(),
                virtio: vec![],
            },
        }
    }

    #[test]
    fn round_trips() {
        let bytes = encode(&sample()).unwrap();
        let back = decode(&bytes, "s").unwrap();
        assert_eq!(back.config, sample().config);
    }

    #[test]
    fn every_broken_file_is_refused_by_name() {
        let good = encode(&sample()).unwrap();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (good[..10].to_vec(), "is truncated (10 bytes"),
            (
                [b"FIRECRKR".as_slice(), &good[8..]].concat(),
                "not an Airlock snapshot file",
            ),
            (
                {
                    let mut v = good.clone();
                    v[8] = 9;
                    v
                },
                "format version 9; this airlock-vmm reads version 1",
            ),
            (
                good[..good.len() - 3].to_vec(),
                "is truncated or has trailing data",
            ),
            (
                [good.as_slice(), b"xx"].concat(),
                "is truncated or has trailing data",
            ),
            (
                {
                    let mut v = good.clone();
                    let last = v.len() - 1;
                    v[last] ^= 0xff;
                    v
                },
                "corrupted (checksum mismatch)",
            ),
        ];
        for (bytes, expected) in cases {
            let err = decode(&bytes, "snap.state").unwrap_err().to_string();
            assert!(err.contains(expected), "expected {expected:?}, got {err:?}");
            assert!(err.contains("snap.state"), "{err}");
        }
    }

    #[test]
    fn a_valid_checksum_over_garbage_still_fails_to_decode() {
        let payload = vec![0xffu8; 5];
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&payload);
        let err = decode(&bytes, "x").unwrap_err().to_string();
        assert!(err.contains("cannot be decoded"), "{err}");
    }

    #[test]
    fn load_request_accepts_both_spellings_and_firecracker_fields() {
        let r: LoadSnapshotRequest = serde_json::from_str(
            r#"{"snapshot_path": "s", "mem_backend": {"backend_type": "Uffd", "backend_path": "m"}, "enable_diff_snapshots": true, "resume_vm": true}"#,
        )
        .unwrap();
        assert_eq!(r.backend().unwrap().backend_type, MemBackendType::Uffd);
        assert!(r.dirty_tracking());
        let r: LoadSnapshotRequest =
            serde_json::from_str(r#"{"snapshot_path": "s", "mem_file_path": "m"}"#).unwrap();
        assert_eq!(r.backend().unwrap().backend_type, MemBackendType::File);
        let r: LoadSnapshotRequest = serde_json::from_str(r#"{"snapshot_path": "s"}"#).unwrap();
        assert!(r.backend().is_err());
        let c: CreateSnapshotRequest = serde_json::from_str(
            r#"{"snapshot_type": "Diff", "snapshot_path": "s", "mem_file_path": "m", "version": "1.0.0"}"#,
        )
        .unwrap();
        assert_eq!(c.snapshot_type, SnapshotType::Diff);
    }
}
