//! What each API request does, independent of HTTP: configuration before boot, start, pause,
//! resume, Ctrl-Alt-Del. Requests Firecracker refuses after (or before) start are refused the same
//! way, with the same messages.

use std::sync::mpsc::Sender;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::builder::{build_and_boot, restore_from_snapshot, StartOptions, Vmm};
use crate::config::{
    parse_body, BootSourceConfig, DriveConfig, EntropyConfig, MachineConfig, MachineConfigUpdate,
    NetworkInterfaceConfig, SerialConfig, VmConfig, VsockConfig,
};
use crate::persist::{CreateSnapshotRequest, LoadSnapshotRequest};
use crate::vstate::vcpu::VmExit;

pub const NOT_SUPPORTED_AFTER_START: &str =
    "The requested operation is not supported after starting the microVM.";
pub const NOT_SUPPORTED_BEFORE_START: &str =
    "The requested operation is not supported before starting the microVM.";
pub const LOAD_AFTER_CONFIG: &str =
    "Loading a microVM snapshot not allowed after configuring boot-specific resources.";

#[derive(Debug, PartialEq, Eq)]
pub struct ApiError(pub String);

impl<E: std::fmt::Display> From<E> for ApiError {
    fn from(e: E) -> Self {
        ApiError(e.to_string())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    action_type: ActionType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum VmStateRequest {
    Paused,
    Resumed,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmStateBody {
    state: VmStateRequest,
}

#[derive(Debug)]
pub enum ApiRequest {
    GetInstanceInfo,
    GetMachineConfig,
    PutMachineConfig(MachineConfig),
    PatchMachineConfig(MachineConfigUpdate),
    PutBootSource(BootSourceConfig),
    PutSerial(SerialConfig),
    Action(ActionType),
    PatchVm(VmStateRequest),
    GetVmConfig,
    CreateSnapshot(CreateSnapshotRequest),
    LoadSnapshot(LoadSnapshotRequest),
    PutDrive(String, DriveConfig),
    PutNetworkInterface(String, NetworkInterfaceConfig),
    PutVsock(VsockConfig),
    PutEntropy(EntropyConfig),
    PutDevicePassthrough(String, crate::vfio::DevicePassthroughConfig),
    /// A Firecracker endpoint airlock-vmm does not offer (e.g. hot updates of devices).
    NotSupported(String),
}

#[derive(Debug, PartialEq)]
pub enum ApiResponse {
    NoContent,
    Json(Value),
}

/// Parses method, path and body into a request; unknown routes get Firecracker's message.
pub fn route(method: &str, path: &str, body: &str) -> Result<ApiRequest, ApiError> {
    let what = format!("{method} {path}");
    let path = path.trim_end_matches('/');
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    Ok(match (method, segments.as_slice()) {
        ("GET", [] | [""]) => ApiRequest::GetInstanceInfo,
        ("GET", ["machine-config"]) => ApiRequest::GetMachineConfig,
        ("PUT", ["machine-config"]) => ApiRequest::PutMachineConfig(parse_body(body, &what)?),
        ("PATCH", ["machine-config"]) => ApiRequest::PatchMachineConfig(parse_body(body, &what)?),
        ("PUT", ["boot-source"]) => ApiRequest::PutBootSource(parse_body(body, &what)?),
        ("PUT", ["serial"]) => ApiRequest::PutSerial(parse_body(body, &what)?),
        ("PUT", ["actions"]) => {
            ApiRequest::Action(parse_body::<ActionBody>(body, &what)?.action_type)
        }
        ("PATCH", ["vm"]) => ApiRequest::PatchVm(parse_body::<VmStateBody>(body, &what)?.state),
        ("GET", ["vm", "config"]) => ApiRequest::GetVmConfig,
        ("PUT", ["drives", id]) => ApiRequest::PutDrive(id.to_string(), parse_body(body, &what)?),
        ("PUT", ["network-interfaces", id]) => {
            ApiRequest::PutNetworkInterface(id.to_string(), parse_body(body, &what)?)
        }
        ("PUT", ["vsock"]) => ApiRequest::PutVsock(parse_body(body, &what)?),
        ("PUT", ["entropy"]) => ApiRequest::PutEntropy(parse_body(body, &what)?),
        ("PUT", ["device-passthrough", id]) => {
            ApiRequest::PutDevicePassthrough(id.to_string(), parse_body(body, &what)?)
        }
        ("PATCH", ["drives" | "network-interfaces", _]) => ApiRequest::NotSupported(format!(
            "{method} {path}: devices cannot be changed while the VM runs in airlock-vmm"
        )),
        ("PUT", ["snapshot", "create"]) => ApiRequest::CreateSnapshot(parse_body(body, &what)?),
        ("PUT", ["snapshot", "load"]) => ApiRequest::LoadSnapshot(parse_body(body, &what)?),
        _ => {
            return Err(ApiError(format!(
                "Invalid request method and/or path: {method} {path}."
            )))
        }
    })
}

pub struct Controller {
    id: String,
    config: VmConfig,
    vmm: Option<Vmm>,
    opts: StartOptions,
    exit_tx: Sender<VmExit>,
}

impl Controller {
    pub fn new(id: String, config: VmConfig, opts: StartOptions, exit_tx: Sender<VmExit>) -> Self {
        Controller {
            id,
            config,
            vmm: None,
            opts,
            exit_tx,
        }
    }

    pub fn vmm(&self) -> Option<&Vmm> {
        self.vmm.as_ref()
    }

    pub fn state_name(&self) -> &'static str {
        match &self.vmm {
            None => "Not started",
            Some(vmm) if vmm.is_paused() => "Paused",
            Some(_) => "Running",
        }
    }

    /// Boots the configured VM (`InstanceStart`, or `--config-file`).
    pub fn start(&mut self) -> Result<(), ApiError> {
        if self.vmm.is_some() {
            return Err(ApiError(NOT_SUPPORTED_AFTER_START.into()));
        }
        let vmm = build_and_boot(&self.config, &self.opts, self.exit_tx.clone())?;
        self.vmm = Some(vmm);
        Ok(())
    }

    fn before_start(&self) -> Result<(), ApiError> {
        match self.vmm {
            Some(_) => Err(ApiError(NOT_SUPPORTED_AFTER_START.into())),
            None => Ok(()),
        }
    }

    fn running_vmm(&mut self) -> Result<&mut Vmm, ApiError> {
        self.vmm
            .as_mut()
            .ok_or_else(|| ApiError(NOT_SUPPORTED_BEFORE_START.into()))
    }

    pub fn handle(&mut self, request: ApiRequest) -> Result<ApiResponse, ApiError> {
        use ApiResponse::*;
        match request {
            ApiRequest::GetInstanceInfo => Ok(Json(json!({
                "id": self.id,
                "state": self.state_name(),
                "vmm_version": env!("CARGO_PKG_VERSION"),
                "app_name": "airlock-vmm",
            }))),
            ApiRequest::GetMachineConfig => {
                Ok(Json(serde_json::to_value(&self.config.machine_config)?))
            }
            ApiRequest::GetVmConfig => Ok(Json(serde_json::to_value(&self.config)?)),
            ApiRequest::PutMachineConfig(m) => {
                self.before_start()?;
                m.validate()?;
                self.config.machine_config = m;
                Ok(NoContent)
            }
            ApiRequest::PatchMachineConfig(update) => {
                self.before_start()?;
                self.config.machine_config = self.config.machine_config.patched(&update)?;
                Ok(NoContent)
            }
            ApiRequest::PutBootSource(boot) => {
                self.before_start()?;
                boot.validate()?;
                self.config.boot_source = Some(boot);
                Ok(NoContent)
            }
            ApiRequest::PutSerial(serial) => {
                self.before_start()?;
                self.config.serial = Some(serial);
                Ok(NoContent)
            }
            ApiRequest::Action(ActionType::InstanceStart) => self.start().map(|_| NoContent),
            ApiRequest::Action(ActionType::SendCtrlAltDel) => {
                self.running_vmm()?.send_ctrl_alt_del()?;
                Ok(NoContent)
            }
            ApiRequest::Action(ActionType::FlushMetrics) => Err(ApiError(
                "FlushMetrics: airlock-vmm has no metrics sink configured".into(),
            )),
            ApiRequest::PatchVm(VmStateRequest::Paused) => {
                self.running_vmm()?.pause()?;
                Ok(NoContent)
            }
            ApiRequest::PatchVm(VmStateRequest::Resumed) => {
                self.running_vmm()?.resume();
                Ok(NoContent)
            }
            ApiRequest::CreateSnapshot(request) => {
                let report = self.running_vmm()?.snapshot(&request)?;
                eprintln!(
                    "airlock-vmm: snapshot written to {} and {} ({} bytes of memory) in {} us",
                    request.snapshot_path,
                    request.mem_file_path,
                    report.memory_bytes_written,
                    report.elapsed_us
                );
                Ok(NoContent)
            }
            ApiRequest::LoadSnapshot(request) => {
                self.before_start()?;
                if self.config.boot_source.is_some() {
                    return Err(ApiError(LOAD_AFTER_CONFIG.into()));
                }
                if !self.config.device_passthrough.is_empty() {
                    return Err(ApiError(crate::vfio::passthrough_refusal(
                        crate::vfio::RefusedOp::LoadSnapshotWithPassthrough,
                        &[],
                    )));
                }
                let vmm = restore_from_snapshot(
                    &request,
                    &self.config,
                    &self.opts,
                    self.exit_tx.clone(),
                )?;
                let restored = vmm.config();
                self.config.boot_source = Some(BootSourceConfig {
                    kernel_image_path: restored.kernel_image_path.clone(),
                    initrd_path: restored.initrd_path.clone(),
                    boot_args: restored.boot_args.clone(),
                });
                self.config.machine_config = MachineConfig {
                    vcpu_count: u64::from(restored.vcpu_count),
                    mem_size_mib: restored.mem_size_mib,
                    smt: restored.smt,
                    track_dirty_pages: request.dirty_tracking(),
                    ..MachineConfig::default()
                };
                self.vmm = Some(vmm);
                Ok(NoContent)
            }
            ApiRequest::PutDrive(id, drive) => {
                self.before_start()?;
                if id != drive.drive_id {
                    return Err(ApiError(format!(
                        "the drive_id {:?} in the body does not match {id:?} in the path",
                        drive.drive_id
                    )));
                }
                drive.validate()?;
                if drive.is_root_device
                    && self
                        .config
                        .drives
                        .iter()
                        .any(|d| d.is_root_device && d.drive_id != id)
                {
                    return Err(ApiError("another drive is already the root device".into()));
                }
                self.config.drives.retain(|d| d.drive_id != id);
                self.config.drives.push(drive);
                Ok(NoContent)
            }
            ApiRequest::PutNetworkInterface(id, iface) => {
                self.before_start()?;
                if id != iface.iface_id {
                    return Err(ApiError(format!(
                        "the iface_id {:?} in the body does not match {id:?} in the path",
                        iface.iface_id
                    )));
                }
                iface.validate()?;
                self.config.network_interfaces.retain(|n| n.iface_id != id);
                self.config.network_interfaces.push(iface);
                Ok(NoContent)
            }
            ApiRequest::PutVsock(vsock) => {
                self.before_start()?;
                vsock.validate()?;
                self.config.vsock = Some(vsock);
                Ok(NoContent)
            }
            ApiRequest::PutEntropy(entropy) => {
                self.before_start()?;
                if entropy.rate_limiter.as_ref().is_some_and(|v| !v.is_null()) {
                    return Err(ApiError(
                        "rate_limiter is not implemented yet in airlock-vmm".into(),
                    ));
                }
                self.config.entropy = Some(entropy);
                Ok(NoContent)
            }
            ApiRequest::PutDevicePassthrough(id, device) => {
                self.before_start()?;
                if id != device.id {
                    return Err(ApiError(format!(
                        "the id {:?} in the body does not match {id:?} in the path",
                        device.id
                    )));
                }
                device.validate()?;
                self.config.device_passthrough.retain(|d| d.id != id);
                self.config.device_passthrough.push(device);
                Ok(NoContent)
            }
            ApiRequest::NotSupported(message) => Err(ApiError(message)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn controller() -> Controller {
        let (tx, _rx) = std::sync::mpsc::channel();
        let opts = StartOptions {
            start_time: Instant::now(),
            report_boot_time: false,
            pci_test_device: false,
        };
        Controller::new("test".into(), VmConfig::default(), opts, tx)
    }

    fn call(
        c: &mut Controller,
        method: &str,
        path: &str,
        body: &str,
    ) -> Result<ApiResponse, ApiError> {
        route(method, path, body).and_then(|r| c.handle(r))
    }

    #[test]
    fn instance_info_before_start() {
        let mut c = controller();
        let ApiResponse::Json(v) = call(&mut c, "GET", "/", "").unwrap() else {
            panic!("expected JSON");
        };
        assert_eq!(v["state"], "Not started");
        assert_eq!(v["id"], "test");
    }

    #[test]
    fn machine_config_put_get_patch() {
        let mut c = controller();
        assert_eq!(
            call(
                &mut c,
                "PUT",
                "/machine-config",
                r#"{"vcpu_count": 2, "mem_size_mib": 256}"#
            ),
            Ok(ApiResponse::NoContent)
        );
        assert_eq!(
            call(&mut c, "PATCH", "/machine-config", r#"{"vcpu_count": 4}"#),
            Ok(ApiResponse::NoContent)
        );
        let ApiResponse::Json(v) = call(&mut c, "GET", "/machine-config", "").unwrap() else {
            panic!("expected JSON");
        };
        assert_eq!(
            (v["vcpu_count"].as_u64(), v["mem_size_mib"].as_u64()),
            (Some(4), Some(256))
        );
    }

    #[test]
    fn every_bad_request_names_its_problem() {
        let mut c = controller();
        let cases = [
            (
                "PUT",
                "/machine-config",
                r#"{"vcpu_count": 0, "mem_size_mib": 128}"#,
                "vcpu_count must be from 1 to 32, got 0",
            ),
            (
                "PUT",
                "/machine-config",
                r#"{"vcpu_count": 33, "mem_size_mib": 128}"#,
                "got 33",
            ),
            (
                "PUT",
                "/machine-config",
                r#"{"vcpu_count": 1, "mem_size_mib": 0}"#,
                "mem_size_mib must be at least 1",
            ),
            (
                "PUT",
                "/machine-config",
                r#"{"vcpu_count": 1, "mem_size_mib": 1000000}"#,
                "mem_size_mib 1000000",
            ),
            (
                "PUT",
                "/machine-config",
                r#"{"vcpu_count": 1, "mem_size_mib": 128, "bogus": 1}"#,
                "unknown field `bogus`",
            ),
            (
                "PUT",
                "/machine-config",
                "{",
                "malformed JSON in PUT /machine-config",
            ),
            (
                "PUT",
                "/boot-source",
                r#"{"kernel_image_path": "/nonexistent/vmlinux"}"#,
                "cannot open kernel image /nonexistent/vmlinux",
            ),
            (
                "PUT",
                "/boot-source",
                r#"{"kernel_image_path": "/proc/self/status"}"#,
                "neither an ELF vmlinux nor a bzImage",
            ),
            (
                "PUT",
                "/boot-source",
                r#"{"kernel": "x"}"#,
                "unknown field `kernel`",
            ),
            (
                "PUT",
                "/actions",
                r#"{"action_type": "Explode"}"#,
                "unknown variant `Explode`",
            ),
            (
                "PUT",
                "/actions",
                r#"{"action_type": "SendCtrlAltDel"}"#,
                NOT_SUPPORTED_BEFORE_START,
            ),
            (
                "PUT",
                "/actions",
                r#"{"action_type": "InstanceStart"}"#,
                "no boot source",
            ),
            (
                "PATCH",
                "/vm",
                r#"{"state": "Paused"}"#,
                NOT_SUPPORTED_BEFORE_START,
            ),
            (
                "PATCH",
                "/vm",
                r#"{"state": "Frozen"}"#,
                "unknown variant `Frozen`",
            ),
            ("PUT", "/drives/rootfs", r#"{}"#, "missing field `drive_id`"),
            (
                "PUT",
                "/drives/rootfs",
                r#"{"drive_id": "other", "path_on_host": "/etc/hostname", "is_root_device": false, "is_read_only": true}"#,
                "does not match \"rootfs\" in the path",
            ),
            (
                "PUT",
                "/drives/rootfs",
                r#"{"drive_id": "rootfs", "path_on_host": "/nonexistent", "is_root_device": true}"#,
                "cannot open /nonexistent",
            ),
            (
                "PUT",
                "/network-interfaces/eth0",
                r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "zz"}"#,
                "is not a MAC address",
            ),
            (
                "PUT",
                "/vsock",
                r#"{"guest_cid": 1, "uds_path": "/tmp/v"}"#,
                "guest_cid must be from 3",
            ),
            (
                "PATCH",
                "/drives/rootfs",
                r#"{}"#,
                "cannot be changed while the VM runs",
            ),
            (
                "GET",
                "/nothing/here",
                "",
                "Invalid request method and/or path: GET /nothing/here.",
            ),
            (
                "DELETE",
                "/machine-config",
                "",
                "Invalid request method and/or path",
            ),
        ];
        for (method, path, body, expected) in cases {
            let err = call(&mut c, method, path, body).unwrap_err();
            assert!(
                err.0.contains(expected),
                "{method} {path} {body}: got {:?}",
                err.0
            );
        }
        // Nothing a refused request carried was applied.
        assert_eq!(c.config.machine_config, MachineConfig::default());
        assert!(c.config.boot_source.is_none());
    }

    #[test]
    fn device_passthrough_is_checked_and_blocks_snapshot_load() {
        let mut c = controller();
        let err = call(
            &mut c,
            "PUT",
            "/device-passthrough/gpu0",
            r#"{"id": "gpu1", "host_address": "0000:41:00.0"}"#,
        )
        .unwrap_err();
        assert!(
            err.0.contains("does not match \"gpu0\" in the path"),
            "{}",
            err.0
        );
        let err = call(
            &mut c,
            "PUT",
            "/device-passthrough/gpu0",
            r#"{"id": "gpu0", "host_address": "not-an-address"}"#,
        )
        .unwrap_err();
        assert!(err.0.contains("not-an-address"), "{}", err.0);
        // A configured (but not yet checked against the host) device makes a snapshot load refuse.
        c.config
            .device_passthrough
            .push(crate::vfio::DevicePassthroughConfig {
                id: "gpu0".into(),
                host_address: "0000:41:00.0".into(),
            });
        let err = call(
            &mut c,
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path": "s", "mem_file_path": "m"}"#,
        )
        .unwrap_err();
        assert!(err.0.contains("passed-through PCI devices"), "{}", err.0);
    }

    #[test]
    fn vm_config_lists_sections_in_firecracker_names() {
        let mut c = controller();
        let ApiResponse::Json(v) = call(&mut c, "GET", "/vm/config", "").unwrap() else {
            panic!("expected JSON");
        };
        assert!(v.get("machine-config").is_some());
        assert!(v.get("drives").is_some());
    }
}
