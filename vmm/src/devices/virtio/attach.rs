//! Creates the configured virtio devices, places each on the MMIO bus with its interrupt line and
//! queue ioeventfds, names them on the kernel command line, and runs their event loop.

use std::sync::{Arc, Mutex};

use crate::vstate::memory::GuestMemoryMmap;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::IoEventAddress;
use linux_loader::cmdline::Cmdline;
use serde::{Deserialize, Serialize};
use vm_memory::GuestAddress;

use super::block::Block;
use super::mmio::{
    MmioTransport, SharedTransport, TransportSnapshot, MMIO_DEVICE_SIZE, QUEUE_NOTIFY_OFFSET,
};
use super::net::{parse_mac, Net};
use super::rng::Rng;
use super::vsock::Vsock;
use super::{IrqLine, SharedDevice};
use crate::arch::layout::MMIO_DEVICES_START;
use crate::config::VmConfig;
use crate::devices::bus::lock;
use crate::devices::Bus;
use crate::vstate::vm::Vm;

/// GSIs for virtio devices: above the legacy ones (timer 0, keyboard 1, COM1 4), below the
/// IOAPIC's last pin.
pub const FIRST_VIRTIO_IRQ: u32 = 5;
pub const LAST_VIRTIO_IRQ: u32 = 23;

/// What a device is, enough to create it again on restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VirtioKind {
    Block {
        drive_id: String,
        path: String,
        read_only: bool,
    },
    Net {
        iface_id: String,
        tap: String,
        mac: Option<[u8; 6]>,
    },
    Vsock {
        guest_cid: u64,
        uds_path: String,
    },
    Rng,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioSnapshot {
    pub kind: VirtioKind,
    pub transport: TransportSnapshot,
}

pub struct VirtioSlot {
    pub kind: VirtioKind,
    pub transport: SharedTransport,
    pub device: SharedDevice,
}

/// The devices a configuration asks for, the root drive first (so it is /dev/vda).
pub fn kinds_from_config(config: &VmConfig) -> Result<Vec<VirtioKind>, String> {
    let mut kinds = Vec::new();
    let mut drives: Vec<_> = config.drives.iter().collect();
    drives.sort_by_key(|d| !d.is_root_device);
    for d in drives {
        kinds.push(VirtioKind::Block {
            drive_id: d.drive_id.clone(),
            path: d.path_on_host.clone(),
            read_only: d.is_read_only,
        });
    }
    for n in &config.network_interfaces {
        let mac = n
            .guest_mac
            .as_deref()
            .map(parse_mac)
            .transpose()
            .map_err(|e| e.to_string())?;
        kinds.push(VirtioKind::Net {
            iface_id: n.iface_id.clone(),
            tap: n.host_dev_name.clone(),
            mac,
        });
    }
    if let Some(v) = &config.vsock {
        kinds.push(VirtioKind::Vsock {
            guest_cid: v.guest_cid,
            uds_path: v.uds_path.clone(),
        });
    }
    if config.entropy.is_some() {
        kinds.push(VirtioKind::Rng);
    }
    Ok(kinds)
}

fn create(kind: &VirtioKind) -> Result<SharedDevice, String> {
    Ok(match kind {
        VirtioKind::Block {
            drive_id,
            path,
            read_only,
        } => Arc::new(Mutex::new(
            Block::new(drive_id, path, *read_only).map_err(|e| e.to_string())?,
        )),
        VirtioKind::Net { iface_id, tap, mac } => Arc::new(Mutex::new(
            Net::new(iface_id, tap, *mac).map_err(|e| e.to_string())?,
        )),
        VirtioKind::Vsock {
            guest_cid,
            uds_path,
        } => Arc::new(Mutex::new(
            Vsock::new(*guest_cid, uds_path).map_err(|e| e.to_string())?,
        )),
        VirtioKind::Rng => Arc::new(Mutex::new(Rng::new().map_err(|e| e.to_string())?)),
    })
}

/// Creates and attaches every device; adds each to `cmdline` when booting (not on restore).
pub fn attach_devices(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    kinds: &[VirtioKind],
    mut cmdline: Option<&mut Cmdline>,
) -> Result<Vec<VirtioSlot>, String> {
    let capacity = (LAST_VIRTIO_IRQ - FIRST_VIRTIO_IRQ + 1) as usize;
    if kinds.len() > capacity {
        return Err(format!(
            "{} virtio devices configured; airlock-vmm has interrupt lines for {capacity}",
            kinds.len()
        ));
    }
    let mut slots = Vec::with_capacity(kinds.len());
    for (i, kind) in kinds.iter().enumerate() {
        let base = MMIO_DEVICES_START + i as u64 * MMIO_DEVICE_SIZE;
        let irq = FIRST_VIRTIO_IRQ + i as u32;
        let device = create(kind)?;
        let irq_line = Arc::new(IrqLine::new(vm.irq_line(irq).map_err(|e| e.to_string())?));
        for (queue, evt) in lock(&device).queue_events().iter().enumerate() {
            vm.fd
                .register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                    queue as u32,
                )
                .map_err(|e| format!("cannot register a queue notification with KVM: {e}"))?;
        }
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            device.clone(),
            mem.clone(),
            irq_line,
        )));
        mmio.insert(transport.clone(), base, MMIO_DEVICE_SIZE)
            .map_err(|e| e.to_string())?;
        if let Some(cmdline) = cmdline.as_deref_mut() {
            cmdline
                .add_virtio_mmio_device(MMIO_DEVICE_SIZE, GuestAddress(base), irq, None)
                .map_err(|e| format!("kernel command line: {e}"))?;
        }
        slots.push(VirtioSlot {
            kind: kind.clone(),
            transport,
            device,
        });
    }
    Ok(slots)
}

/// The event loop's view of a device: its lock, taken per event.
struct DeviceSubscriber(SharedDevice);

impl MutEventSubscriber for DeviceSubscriber {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        lock(&self.0).process(events, ops);
    }
    fn init(&mut self, ops: &mut EventOps) {
        lock(&self.0).init(ops);
    }
}

/// Runs every device's events on one thread, off the vCPU threads.
pub fn start_event_loop(slots: &[VirtioSlot]) -> Result<(), String> {
    if slots.is_empty() {
        return Ok(());
    }
    let mut manager: EventManager<DeviceSubscriber> =
        EventManager::new().map_err(|e| format!("cannot create the device event loop: {e:?}"))?;
    for slot in slots {
        manager.add_subscriber(DeviceSubscriber(slot.device.clone()));
    }
    std::thread::Builder::new()
        .name("fc_devices".into())
        .spawn(move || {
            if let Err(e) = crate::seccomp::apply(crate::seccomp::ThreadRole::Devices) {
                eprintln!("airlock-vmm: error: {e}");
                std::process::exit(1);
            }
            loop {
                if let Err(e) = manager.run() {
                    eprintln!("airlock-vmm: device event loop: {e:?}");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start the device event loop: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DriveConfig, VsockConfig};

    fn drive(id: &str, root: bool) -> DriveConfig {
        DriveConfig {
            drive_id: id.into(),
            path_on_host: format!("/img/{id}"),
            is_root_device: root,
            is_read_only: false,
            partuuid: None,
            cache_type: None,
            io_engine: None,
            rate_limiter: None,
        }
    }

    #[test]
    fn root_drive_comes_first_then_net_vsock_rng() {
        let config = VmConfig {
            drives: vec![drive("data", false), drive("rootfs", true)],
            vsock: Some(VsockConfig {
                vsock_id: None,
                guest_cid: 3,
                uds_path: "/tmp/v".into(),
            }),
            entropy: Some(Default::default()),
            ..Default::default()
        };
        let kinds = kinds_from_config(&config).unwrap();
        assert!(matches!(&kinds[0], VirtioKind::Block { drive_id, .. } if drive_id == "rootfs"));
        assert!(matches!(&kinds[1], VirtioKind::Block { drive_id, .. } if drive_id == "data"));
        assert!(matches!(kinds[2], VirtioKind::Vsock { guest_cid: 3, .. }));
        assert_eq!(kinds[3], VirtioKind::Rng);
    }
}
