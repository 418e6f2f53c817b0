//! VM configuration in Firecracker's JSON format: `boot-source`, `machine-config` and the whole
//! `--config-file` document. Every value is validated here, before any KVM object exists.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::arch::boot::{check_kernel_file, BootError};
use crate::arch::layout::MAX_MEM_SIZE_MIB;

pub const MAX_VCPUS: u64 = 32;
pub const DEFAULT_VCPUS: u8 = 1;
pub const DEFAULT_MEM_SIZE_MIB: u64 = 128;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("vcpu_count must be from 1 to {MAX_VCPUS}, got {0}")]
    InvalidVcpuCount(u64),
    #[error("with smt enabled, vcpu_count must be 1 or an even number, got {0}")]
    SmtNeedsEvenVcpus(u64),
    #[error("mem_size_mib must be at least 1, got 0")]
    ZeroMemory,
    #[error("mem_size_mib {requested} is more than this host's memory ({host} MiB)")]
    MemoryBeyondHost { requested: u64, host: u64 },
    #[error("mem_size_mib {0} is beyond the largest guest airlock-vmm supports ({MAX_MEM_SIZE_MIB} MiB)")]
    MemoryBeyondLimit(u64),
    #[error("cpu_template {0:?} is not supported; leave it out or use \"None\"")]
    CpuTemplate(String),
    #[error("huge_pages {0:?} is not supported; leave it out or use \"None\"")]
    HugePages(String),
    #[error("{0}")]
    Kernel(#[from] BootError),
    #[error("no boot source: set one with PUT /boot-source (or \"boot-source\" in the config file) before starting")]
    MissingBootSource,
    #[error("malformed JSON in {what}: {source}")]
    Json {
        what: String,
        source: serde_json::Error,
    },
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        path: String,
        source: std::io::Error,
    },
    #[error("\"{0}\" is not implemented yet in airlock-vmm; remove it from the configuration")]
    NotImplemented(&'static str),
    #[error("{0}")]
    Unsupported(String),
}

/// `PUT /boot-source`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSourceConfig {
    pub kernel_image_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

impl BootSourceConfig {
    /// Checks that the kernel (and initrd) exist and the kernel is a format the loader takes, so
    /// the mistake is reported on the request that made it, not at start.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_kernel_file(Path::new(&self.kernel_image_path))?;
        if let Some(initrd) = &self.initrd_path {
            std::fs::File::open(initrd).map_err(|source| BootError::Open {
                what: "initrd",
                path: initrd.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

/// `PUT /machine-config` and `GET /machine-config`. Sizes are read as u64 so that an out-of-range
/// value is reported by name rather than as a JSON type error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u64,
    pub mem_size_mib: u64,
    #[serde(default)]
    pub smt: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    #[serde(default = "default_huge_pages")]
    pub huge_pages: String,
}

fn default_huge_pages() -> String {
    "None".to_string()
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpu_count: u64::from(DEFAULT_VCPUS),
            mem_size_mib: DEFAULT_MEM_SIZE_MIB,
            smt: false,
            track_dirty_pages: false,
            cpu_template: None,
            huge_pages: default_huge_pages(),
        }
    }
}

/// `PATCH /machine-config`: any subset of the fields.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    pub vcpu_count: Option<u64>,
    pub mem_size_mib: Option<u64>,
    pub smt: Option<bool>,
    pub track_dirty_pages: Option<bool>,
    pub cpu_template: Option<String>,
    pub huge_pages: Option<String>,
}

/// This host's memory in MiB, from /proc/meminfo.
pub fn host_memory_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib / 1024)
}

impl MachineConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_against(host_memory_mib())
    }

    pub fn validate_against(&self, host_mib: Option<u64>) -> Result<(), ConfigError> {
        if self.vcpu_count == 0 || self.vcpu_count > MAX_VCPUS {
            return Err(ConfigError::InvalidVcpuCount(self.vcpu_count));
        }
        if self.smt && self.vcpu_count > 1 && !self.vcpu_count.is_multiple_of(2) {
            return Err(ConfigError::SmtNeedsEvenVcpus(self.vcpu_count));
        }
        if self.mem_size_mib == 0 {
            return Err(ConfigError::ZeroMemory);
        }
        if self.mem_size_mib > MAX_MEM_SIZE_MIB {
            return Err(ConfigError::MemoryBeyondLimit(self.mem_size_mib));
        }
        if let Some(host) = host_mib {
            if self.mem_size_mib > host {
                return Err(ConfigError::MemoryBeyondHost {
                    requested: self.mem_size_mib,
                    host,
                });
            }
        }
        match self.cpu_template.as_deref() {
            None | Some("None") => {}
            Some(other) => return Err(ConfigError::CpuTemplate(other.to_string())),
        }
        if self.huge_pages != "None" {
            return Err(ConfigError::HugePages(self.huge_pages.clone()));
        }
        Ok(())
    }

    /// Applies a PATCH and validates the result; on error nothing changes.
    pub fn patched(&self, update: &MachineConfigUpdate) -> Result<MachineConfig, ConfigError> {
        let mut next = self.clone();
        if let Some(v) = update.vcpu_count {
            next.vcpu_count = v;
        }
        if let Some(v) = update.mem_size_mib {
            next.mem_size_mib = v;
        }
        if let Some(v) = update.smt {
            next.smt = v;
        }
        if let Some(v) = update.track_dirty_pages {
            next.track_dirty_pages = v;
        }
        if let Some(v) = &update.cpu_template {
            next.cpu_template = Some(v.clone());
        }
        if let Some(v) = &update.huge_pages {
            next.huge_pages = v.clone();
        }
        next.validate()?;
        Ok(next)
    }

    pub fn mem_size_bytes(&self) -> u64 {
        self.mem_size_mib << 20
    }
}

/// `PUT /serial`: where the guest console goes (stdout when unset).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_out_path: Option<PathBuf>,
}

/// `PUT /drives/{id}`: a virtio-blk device over a raw image file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    pub drive_id: String,
    pub path_on_host: String,
    pub is_root_device: bool,
    #[serde(default)]
    pub is_read_only: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// Accepted as Firecracker has it; writes go to the file either way, FLUSH syncs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<serde_json::Value>,
}

/// `PUT /network-interfaces/{id}`: a virtio-net device on an existing host TAP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceConfig {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<serde_json::Value>,
}

/// `PUT /vsock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// Firecracker's older field; accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
    pub guest_cid: u64,
    pub uds_path: String,
}

/// `PUT /entropy`: a virtio-rng device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<serde_json::Value>,
}

impl DriveConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_id("drive_id", &self.drive_id)?;
        if self.rate_limiter.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(ConfigError::NotImplemented("rate_limiter"));
        }
        match self.io_engine.as_deref() {
            None | Some("Sync") => {}
            Some(other) => {
                return Err(ConfigError::Unsupported(format!(
                    "io_engine {other:?} (only \"Sync\")"
                )))
            }
        }
        std::fs::OpenOptions::new()
            .read(true)
            .write(!self.is_read_only)
            .open(&self.path_on_host)
            .map(|_| ())
            .map_err(|e| {
                ConfigError::Unsupported(format!(
                    "drive {}: cannot open {}: {e}",
                    self.drive_id, self.path_on_host
                ))
            })
    }
}

impl NetworkInterfaceConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_id("iface_id", &self.iface_id)?;
        if self.rx_rate_limiter.as_ref().is_some_and(|v| !v.is_null())
            || self.tx_rate_limiter.as_ref().is_some_and(|v| !v.is_null())
        {
            return Err(ConfigError::NotImplemented("rate_limiter"));
        }
        if self.host_dev_name.is_empty() || self.host_dev_name.len() > 15 {
            return Err(ConfigError::Unsupported(format!(
                "host_dev_name {:?} must be 1 to 15 bytes",
                self.host_dev_name
            )));
        }
        if let Some(mac) = &self.guest_mac {
            crate::devices::virtio::net::parse_mac(mac)
                .map_err(|e| ConfigError::Unsupported(e.to_string()))?;
        }
        Ok(())
    }
}

impl VsockConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.guest_cid < 3 || self.guest_cid > u64::from(u32::MAX) {
            return Err(ConfigError::Unsupported(format!(
                "guest_cid must be from 3 to {} (0-2 are reserved), got {}",
                u32::MAX,
                self.guest_cid
            )));
        }
        if self.uds_path.is_empty() || self.uds_path.len() > 100 {
            return Err(ConfigError::Unsupported(format!(
                "uds_path {:?} must be 1 to 100 bytes (guest-initiated connections append _<port>)",
                self.uds_path
            )));
        }
        if Path::new(&self.uds_path).symlink_metadata().is_ok() {
            return Err(ConfigError::Unsupported(format!(
                "uds_path {} already exists; remove it first",
                self.uds_path
            )));
        }
        Ok(())
    }
}

fn check_id(what: &str, id: &str) -> Result<(), ConfigError> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(ConfigError::Unsupported(format!(
            "{what} {id:?} must be 1 to 64 letters, digits, '-' or '_'"
        )));
    }
    Ok(())
}

/// The `--config-file` document, and the body of `GET /vm/config`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    #[serde(
        rename = "boot-source",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub boot_source: Option<BootSourceConfig>,
    #[serde(rename = "machine-config", default)]
    pub machine_config: MachineConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<SerialConfig>,
    #[serde(default)]
    pub drives: Vec<DriveConfig>,
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterfaceConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<EntropyConfig>,
    /// Host PCI devices handed to the guest with VFIO (cold plug).
    #[serde(
        rename = "device-passthrough",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub device_passthrough: Vec<crate::vfio::DevicePassthroughConfig>,
}

impl VmConfig {
    pub fn from_json(text: &str, what: &str) -> Result<VmConfig, ConfigError> {
        let config: VmConfig = serde_json::from_str(text).map_err(|source| ConfigError::Json {
            what: what.to_string(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> Result<VmConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text, &format!("config file {}", path.display()))
    }

    /// Everything needed to start: a valid boot source, machine and devices.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for d in &self.drives {
            d.validate()?;
        }
        let mut ids: Vec<&str> = self.drives.iter().map(|d| d.drive_id.as_str()).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return Err(ConfigError::Unsupported(
                "two drives have the same drive_id".into(),
            ));
        }
        if self.drives.iter().filter(|d| d.is_root_device).count() > 1 {
            return Err(ConfigError::Unsupported(
                "only one drive can be the root device".into(),
            ));
        }
        for n in &self.network_interfaces {
            n.validate()?;
        }
        let mut names: Vec<&str> = self
            .network_interfaces
            .iter()
            .map(|n| n.iface_id.as_str())
            .collect();
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return Err(ConfigError::Unsupported(
                "two network interfaces have the same iface_id".into(),
            ));
        }
        if let Some(v) = &self.vsock {
            v.validate()?;
        }
        for d in &self.device_passthrough {
            d.validate()
                .map_err(|e| ConfigError::Unsupported(e.to_string()))?;
        }
        self.machine_config.validate()?;
        match &self.boot_source {
            Some(boot) => boot.validate(),
            None => Err(ConfigError::MissingBootSource),
        }
    }
}

/// Parses a request body, naming the request in the error.
pub fn parse_body<T: for<'de> Deserialize<'de>>(body: &str, what: &str) -> Result<T, ConfigError> {
    serde_json::from_str(body).map_err(|source| ConfigError::Json {
        what: what.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(vcpus: u64, mib: u64) -> MachineConfig {
        MachineConfig {
            vcpu_count: vcpus,
            mem_size_mib: mib,
            ..Default::default()
        }
    }

    #[test]
    fn vcpu_count_bounds() {
        assert!(machine(1, 128).validate_against(None).is_ok());
        assert!(machine(32, 128).validate_against(None).is_ok());
        for bad in [0, 33, 300] {
            let err = machine(bad, 128).validate_against(None).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("vcpu_count must be from 1 to 32, got {bad}")
            );
        }
    }

    #[test]
    fn memory_bounds() {
        assert!(matches!(
            machine(1, 0).validate_against(None),
            Err(ConfigError::ZeroMemory)
        ));
        let err = machine(1, 4096).validate_against(Some(1024)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "mem_size_mib 4096 is more than this host's memory (1024 MiB)"
        );
        assert!(machine(1, MAX_MEM_SIZE_MIB + 1)
            .validate_against(None)
            .is_err());
    }

    #[test]
    fn smt_needs_even_vcpus() {
        let mut m = machine(3, 128);
        m.smt = true;
        assert!(matches!(
            m.validate_against(None),
            Err(ConfigError::SmtNeedsEvenVcpus(3))
        ));
        m.vcpu_count = 4;
        assert!(m.validate_against(None).is_ok());
    }

    #[test]
    fn firecracker_machine_config_parses() {
        let m: MachineConfig = parse_body(
            r#"{"vcpu_count": 2, "mem_size_mib": 256, "smt": false, "track_dirty_pages": false, "huge_pages": "None"}"#,
            "PUT /machine-config",
        )
        .unwrap();
        assert_eq!(m, machine(2, 256));
        let out = serde_json::to_value(&m).unwrap();
        assert_eq!(out["vcpu_count"], 2);
        assert_eq!(out["huge_pages"], "None");
    }

    #[test]
    fn unknown_fields_and_bad_json_are_refused_by_name() {
        let err = parse_body::<MachineConfig>(
            r#"{"vcpu_count": 2, "mem_size_mib": 256, "gpus": 1}"#,
            "PUT /machine-config",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown field `gpus`"), "{err}");
        assert!(
            err.starts_with("malformed JSON in PUT /machine-config"),
            "{err}"
        );
        let err = parse_body::<BootSourceConfig>("{not json", "PUT /boot-source").unwrap_err();
        assert!(err.to_string().contains("PUT /boot-source"));
        let err = VmConfig::from_json(r#"{"boot-source": {}, "extra": 1}"#, "config file x")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("missing field `kernel_image_path`") || err.contains("unknown field"),
            "{err}"
        );
    }

    #[test]
    fn patch_validates_and_leaves_original_alone() {
        let m = machine(2, 128);
        let update = MachineConfigUpdate {
            vcpu_count: Some(0),
            ..Default::default()
        };
        assert!(m.patched(&update).is_err());
        assert_eq!(m.vcpu_count, 2);
        let update = MachineConfigUpdate {
            mem_size_mib: Some(64),
            ..Default::default()
        };
        assert_eq!(m.patched(&update).unwrap().mem_size_mib, 64);
    }

    #[test]
    fn config_file_needs_kernel_and_refuses_unbuilt_devices() {
        let err = VmConfig::from_json(
            r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64}}"#,
            "f",
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::MissingBootSource));
        let err = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/nonexistent"}, "drives": [{"drive_id": "root", "path_on_host": "/nonexistent/disk", "is_root_device": true}]}"#,
            "f",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("drive root: cannot open /nonexistent/disk"),
            "{err}"
        );
        let err = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/nonexistent"}, "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "rx_rate_limiter": {"bandwidth": {}}}]}"#,
            "f",
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::NotImplemented("rate_limiter")));
        let err = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/nonexistent"}, "vsock": {"guest_cid": 2, "uds_path": "/tmp/v.sock"}}"#,
            "f",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("guest_cid must be from 3"), "{err}");
        let err = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/nonexistent/k"}}"#,
            "f",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("cannot open kernel image /nonexistent/k"),
            "{err}"
        );
    }

    #[test]
    fn huge_pages_and_templates_other_than_none_are_refused() {
        let mut m = machine(1, 64);
        m.huge_pages = "2M".into();
        assert!(matches!(
            m.validate_against(None),
            Err(ConfigError::HugePages(_))
        ));
        let mut m = machine(1, 64);
        m.cpu_template = Some("T2".into());
        assert!(matches!(
            m.validate_against(None),
            Err(ConfigError::CpuTemplate(_))
        ));
    }
}
