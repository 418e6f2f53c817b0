//! Turns a validated [`VmConfig`] into a running VM (memory, kernel, boot tables, devices, vCPUs),
//! or a snapshot back into one. Memory slots are registered before the irqchip and vCPUs exist:
//! on the development hosts that order is 50x cheaper.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::arch::boot::{self, BootError};
use crate::arch::cpuid::{vcpu_cpuid, Topology};
use crate::arch::layout::{BOOT_TIMER_ADDR, BOOT_TIMER_SIZE};
use crate::arch::mptable::{setup_mptable, MpTableError};
use crate::arch::regs::{configure_vcpu, write_boot_tables, RegsError};
use crate::config::{ConfigError, VmConfig};
use crate::devices::boot_timer::BootTimer;
use crate::devices::bus::lock;
use crate::devices::i8042::{I8042Error, I8042, I8042_IRQ, I8042_PORT_BASE, I8042_PORT_LEN};
use crate::devices::serial::{SerialDevice, COM1_IRQ, COM1_PORT_BASE, COM1_PORT_LEN};
use crate::devices::virtio::attach::{self, VirtioKind, VirtioSlot, VirtioSnapshot};
use crate::devices::vm_generation::{VmGeneration, VM_GENERATION_ADDR, VM_GENERATION_LEN};
use crate::devices::{Bus, BusError};
use crate::persist::{
    self, CreateSnapshotRequest, DeviceStates, LoadSnapshotRequest, MemBackendType, SnapshotConfig,
    SnapshotFileError, SnapshotType, VmSnapshot,
};
use crate::vstate::memory::{self, GuestMemory, MemoryError};
use crate::vstate::uffd::{self, FaultRegion, Userfaultfd};
use crate::vstate::vcpu::{install_kick_handler, VcpuHandle, VcpuRunner, VmExit};
use crate::vstate::vcpu_state::VcpuStateError;
use crate::vstate::vm::{Vm, VmError};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Vm(#[from] VmError),
    #[error("{0}")]
    Memory(#[from] MemoryError),
    #[error("{0}")]
    Boot(#[from] BootError),
    #[error("cannot set up the boot vCPU state: {0}")]
    Regs(#[from] RegsError),
    #[error("{0}")]
    MpTable(#[from] MpTableError),
    #[error("cannot open the serial output {path}: {source}")]
    SerialOut {
        path: String,
        source: std::io::Error,
    },
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    #[error("{0}")]
    Thread(String),
    #[error("{0}")]
    SnapshotFile(#[from] SnapshotFileError),
    #[error("cannot restore the snapshot: {0}")]
    VcpuState(#[from] VcpuStateError),
    #[error("cannot restore the snapshot: {0}")]
    Snapshot(String),
    #[error("{0}")]
    Device(String),
}

pub struct StartOptions {
    /// When the process started, for the boot timer.
    pub start_time: Instant,
    /// Print the guest-ready line (`--boot-timer`).
    pub report_boot_time: bool,
    /// Put the emulated PCI test device on a PCI bus (`--pci-test-device`, for the test guest).
    pub pci_test_device: bool,
}

/// A running (or paused) VM. Dropping it does not stop the vCPU threads: the VMM process exits.
pub struct Vmm {
    vm: Vm,
    pub memory: GuestMemory,
    vcpus: Vec<VcpuHandle>,
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042>>,
    config: SnapshotConfig,
    virtio: Vec<VirtioSlot>,
    /// The PCI root complex, present only with passed-through or test PCI devices.
    pci: Option<crate::vfio::attach::PciSetup>,
    generation: u128,
    dirty_tracking: bool,
    paused: bool,
}

/// What a snapshot wrote, for the caller's log.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotReport {
    pub memory_bytes_written: u64,
    pub elapsed_us: u64,
}

fn console_writer(path: Option<&Path>) -> Result<Box<dyn Write + Send>, StartError> {
    match path {
        None => Ok(Box::new(std::io::stdout())),
        Some(p) => OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map(|f| Box::new(f) as Box<dyn Write + Send>)
            .map_err(|source| StartError::SerialOut {
                path: p.display().to_string(),
                source,
            }),
    }
}

// Both pseudo devices share the boot timer's page.
const _: () = assert!(VM_GENERATION_ADDR + VM_GENERATION_LEN <= BOOT_TIMER_ADDR + BOOT_TIMER_SIZE);

struct Devices {
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042>>,
    pio: Arc<Bus>,
    /// Shared once the virtio transports are on it.
    mmio: Bus,
    generation: u128,
}

/// The legacy devices and buses, fresh or from a snapshot's device states.
fn attach_devices(
    vm: &Vm,
    config: &VmConfig,
    saved: Option<&DeviceStates>,
    generation: VmGeneration,
    opts: &StartOptions,
) -> Result<Devices, StartError> {
    let console = console_writer(
        config
            .serial
            .as_ref()
            .and_then(|s| s.serial_out_path.as_deref()),
    )?;
    let serial_irq = vm.irq_line(COM1_IRQ)?;
    let kbd_irq = Box::new(vm.irq_line(I8042_IRQ)?);
    let (serial, i8042) = match saved {
        Some(states) => (
            SerialDevice::from_snapshot(serial_irq, console, &states.serial)
                .map_err(StartError::Snapshot)?,
            I8042::from_snapshot(kbd_irq, &states.i8042),
        ),
        None => (SerialDevice::new(serial_irq, console), I8042::new(kbd_irq)),
    };
    let serial = Arc::new(Mutex::new(serial));
    let i8042 = Arc::new(Mutex::new(i8042));
    let boot_timer = BootTimer::new(opts.start_time, opts.report_boot_time);
    let generation_id = generation.id();
    let mut pio = Bus::new();
    pio.insert(serial.clone(), COM1_PORT_BASE, COM1_PORT_LEN)?;
    pio.insert(i8042.clone(), I8042_PORT_BASE, I8042_PORT_LEN)?;
    let mut mmio = Bus::new();
    mmio.insert(
        Arc::new(Mutex::new(boot_timer)),
        BOOT_TIMER_ADDR,
        VM_GENERATION_ADDR - BOOT_TIMER_ADDR,
    )?;
    mmio.insert(
        Arc::new(Mutex::new(generation)),
        VM_GENERATION_ADDR,
        VM_GENERATION_LEN,
    )?;
    Ok(Devices {
        serial,
        i8042,
        pio: Arc::new(pio),
        mmio,
        generation: generation_id,
    })
}

fn spawn_vcpus(
    runners: Vec<VcpuRunner>,
    start_paused: bool,
) -> Result<Vec<VcpuHandle>, StartError> {
    install_kick_handler().map_err(StartError::Thread)?;
    runners
        .into_iter()
        .map(|r| r.spawn(start_paused))
        .collect::<Result<Vec<_>, _>>()
        .map_err(StartError::Thread)
}

pub fn build_and_boot(
    config: &VmConfig,
    opts: &StartOptions,
    exit_tx: Sender<VmExit>,
) -> Result<Vmm, StartError> {
    config.validate()?;
    let boot_source = config
        .boot_source
        .as_ref()
        .ok_or(ConfigError::MissingBootSource)?;
    let machine = &config.machine_config;
    let mem_size = machine.mem_size_bytes();
    let vcpu_count = machine.vcpu_count as u8;

    let vm = Vm::new()?;
    let memory = memory::create_guest_memory(mem_size)?;
    vm.register_memory(&memory.mem, machine.track_dirty_pages)?;

    let kernel = boot::load_kernel(&memory.mem, Path::new(&boot_source.kernel_image_path))?;
    let initrd = match &boot_source.initrd_path {
        Some(path) => Some(boot::load_initrd(
            &memory.mem,
            Path::new(path),
            mem_size,
            kernel.kernel_end,
        )?),
        None => None,
    };
    vm.setup_irqchip()?;
    let mut devices = attach_devices(&vm, config, None, VmGeneration::cold_boot(), opts)?;
    let mut cmdline = boot::build_cmdline(boot_source.boot_args.as_deref().unwrap_or(""))?;
    if let Some(root) = config.drives.iter().find(|d| d.is_root_device) {
        let device = match &root.partuuid {
            Some(uuid) => format!("root=PARTUUID={uuid}"),
            None => "root=/dev/vda".to_string(),
        };
        let mode = if root.is_read_only { "ro" } else { "rw" };
        cmdline
            .insert_str(format!("{device} {mode}"))
            .map_err(|e| BootError::Cmdline(e.to_string()))?;
    }
    let kinds = attach::kinds_from_config(config).map_err(StartError::Device)?;
    let virtio = attach::attach_devices(
        &vm,
        &memory.mem,
        &mut devices.mmio,
        &kinds,
        Some(&mut cmdline),
    )
    .map_err(StartError::Device)?;
    // No vCPU holds the port bus yet, so it can still take the PCI configuration ports.
    let pio = Arc::get_mut(&mut devices.pio)
        .ok_or_else(|| StartError::Device("the port bus is already shared".into()))?;
    let pci = crate::vfio::attach::attach_pci(
        &vm,
        &memory.mem,
        pio,
        &mut devices.mmio,
        &crate::vfio::attach::PciOptions {
            passthrough: &config.device_passthrough,
            test_device: opts.pci_test_device,
            virtio_count: kinds.len(),
        },
    )
    .map_err(StartError::Device)?;
    boot::write_boot_params(&memory.mem, mem_size, &cmdline, kernel.setup_header, initrd)?;
    write_boot_tables(&memory.mem)?;
    setup_mptable(&memory.mem, vcpu_count)?;
    if let Some(p) = &pci {
        crate::vfio::attach::write_pci_boot_tables(&memory.mem, p, vcpu_count)
            .map_err(StartError::Device)?;
    }
    let mmio = Arc::new(devices.mmio);
    let seccomp_role = if pci.as_ref().is_some_and(|p| p.has_passthrough()) {
        crate::seccomp::ThreadRole::VcpuPassthrough
    } else {
        crate::seccomp::ThreadRole::Vcpu
    };

    let supported = vm.supported_cpuid()?;
    let topology = Topology::new(vcpu_count, machine.smt);
    let msr_indices = Arc::new(vm.msr_indices());
    let mut runners = Vec::with_capacity(usize::from(vcpu_count));
    for index in 0..vcpu_count {
        let fd = vm.create_vcpu(index)?;
        fd.set_cpuid2(&vcpu_cpuid(&supported, index, topology))
            .map_err(|e| VmError::Kvm("set the vCPU's CPUID", e))?;
        configure_vcpu(&fd, kernel.entry.0)?;
        runners.push(VcpuRunner {
            index,
            fd,
            msr_indices: msr_indices.clone(),
            pio: devices.pio.clone(),
            mmio: mmio.clone(),
            exit_tx: exit_tx.clone(),
            seccomp_role,
        });
    }
    attach::start_event_loop(&virtio).map_err(StartError::Device)?;
    let vcpus = spawn_vcpus(runners, false)?;
    Ok(Vmm {
        vm,
        memory,
        vcpus,
        serial: devices.serial,
        i8042: devices.i8042,
        config: SnapshotConfig {
            vcpu_count,
            mem_size_mib: machine.mem_size_mib,
            smt: machine.smt,
            kernel_image_path: boot_source.kernel_image_path.clone(),
            initrd_path: boot_source.initrd_path.clone(),
            boot_args: boot_source.boot_args.clone(),
        },
        virtio,
        pci,
        generation: devices.generation,
        dirty_tracking: machine.track_dirty_pages,
        paused: false,
    })
}

/// Starts the userfaultfd handler (and, if asked, the prefetcher) for a `Uffd`-backed restore.
fn serve_memory_faults(
    memory: &GuestMemory,
    file: File,
    prefetch: bool,
    exit_tx: Sender<VmExit>,
) -> Result<(), StartError> {
    let uffd = Arc::new(
        Userfaultfd::new().map_err(|e| StartError::Snapshot(format!("userfaultfd: {e}")))?,
    );
    let regions: Vec<FaultRegion> = memory
        .host_regions()
        .into_iter()
        .map(|(host_addr, len, file_offset)| FaultRegion {
            host_addr,
            len,
            file_offset,
        })
        .collect();
    for r in &regions {
        uffd.register(r.host_addr, r.len).map_err(|e| {
            StartError::Snapshot(format!(
                "cannot register guest memory with userfaultfd: {e}"
            ))
        })?;
    }
    let file = Arc::new(file);
    let (handler_uffd, handler_file, handler_regions) =
        (uffd.clone(), file.clone(), regions.clone());
    std::thread::Builder::new()
        .name("fc_uffd".into())
        .spawn(move || {
            if let Err(e) = crate::seccomp::apply(crate::seccomp::ThreadRole::Uffd) {
                let _ = exit_tx.send(VmExit::Error(e.to_string()));
                return;
            }
            let mut page = vec![0u8; uffd::PAGE_SIZE as usize];
            loop {
                let served = handler_uffd.next_fault().and_then(|fault| match fault {
                    Some(addr) => uffd::serve_page(
                        &handler_uffd,
                        &handler_file,
                        &handler_regions,
                        addr,
                        &mut page,
                    ),
                    None => Ok(()),
                });
                if let Err(e) = served {
                    // A fault left unserved would hang the guest forever: stop the VM instead.
                    let _ = exit_tx.send(VmExit::Error(format!("userfaultfd handler: {e}")));
                    return;
                }
            }
        })
        .map_err(|e| StartError::Thread(format!("cannot start the userfaultfd handler: {e}")))?;
    if prefetch {
        std::thread::Builder::new()
            .name("fc_uffd_prefetch".into())
            .spawn(move || {
                if let Err(e) = crate::seccomp::apply(crate::seccomp::ThreadRole::Uffd) {
                    eprintln!("airlock-vmm: memory prefetch not started: {e}");
                    return;
                }
                for r in regions {
                    if let Err(e) = uffd::populate_region(&uffd, &file, r) {
                        // The fault handler still serves every page; only the head start is lost.
                        eprintln!("airlock-vmm: memory prefetch stopped: {e}");
                        return;
                    }
                }
            })
            .map_err(|e| StartError::Thread(format!("cannot start the memory prefetcher: {e}")))?;
    }
    Ok(())
}

/// Restores a VM from a snapshot (`PUT /snapshot/load`). The returned VM runs if `resume_vm`
/// was set, and is paused otherwise.
pub fn restore_from_snapshot(
    request: &LoadSnapshotRequest,
    config: &VmConfig,
    opts: &StartOptions,
    exit_tx: Sender<VmExit>,
) -> Result<Vmm, StartError> {
    let snap = persist::read_state_file(&request.snapshot_path)?;
    let mut kinds: Vec<VirtioKind> = snap.devices.virtio.iter().map(|v| v.kind.clone()).collect();
    for o in &request.network_overrides {
        let tap = kinds.iter_mut().find_map(|k| match k {
            VirtioKind::Net { iface_id, tap, .. } if *iface_id == o.iface_id => Some(tap),
            _ => None,
        });
        match tap {
            Some(tap) => *tap = o.host_dev_name.clone(),
            None => {
                return Err(StartError::Snapshot(format!(
                    "network_overrides: the snapshot has no network interface {:?}",
                    o.iface_id
                )))
            }
        }
    }
    if let Some(o) = &request.vsock_override {
        let path = kinds.iter_mut().find_map(|k| match k {
            VirtioKind::Vsock { uds_path, .. } => Some(uds_path),
            _ => None,
        });
        match path {
            Some(path) => *path = o.uds_path.clone(),
            None => {
                return Err(StartError::Snapshot(
                    "vsock_override: the snapshot has no vsock device".into(),
                ))
            }
        }
    }
    let backend = request.backend().map_err(StartError::Snapshot)?;
    let vcpu_count = snap.config.vcpu_count;
    if vcpu_count == 0
        || u64::from(vcpu_count) > crate::config::MAX_VCPUS
        || snap.vcpus.len() != usize::from(vcpu_count)
    {
        return Err(StartError::Snapshot(format!(
            "{} is inconsistent: {} vCPU states for {} vCPUs",
            request.snapshot_path,
            snap.vcpus.len(),
            vcpu_count
        )));
    }
    let size = snap.config.mem_size_mib << 20;
    let file = memory::open_memory_file(&backend.backend_path, size)?;
    let dirty_tracking = request.dirty_tracking();

    let vm = Vm::new()?;
    let memory = match backend.backend_type {
        MemBackendType::File => memory::map_private_file(file, size)?,
        MemBackendType::Uffd => memory::anonymous_for_uffd(size)?,
    };
    vm.register_memory(&memory.mem, dirty_tracking)?;
    if backend.backend_type == MemBackendType::Uffd {
        let file = memory::open_memory_file(&backend.backend_path, size)?;
        serve_memory_faults(&memory, file, backend.prefetch, exit_tx.clone())?;
    }
    vm.setup_irqchip()?;
    let mut devices = attach_devices(
        &vm,
        config,
        Some(&snap.devices),
        VmGeneration::fresh(),
        opts,
    )?;
    let virtio = attach::attach_devices(&vm, &memory.mem, &mut devices.mmio, &kinds, None)
        .map_err(StartError::Device)?;
    for (slot, saved) in virtio.iter().zip(&snap.devices.virtio) {
        lock(&slot.transport)
            .restore(&saved.transport)
            .map_err(|e| StartError::Snapshot(format!("virtio device {:?}: {e}", saved.kind)))?;
    }
    let mmio = Arc::new(devices.mmio);
    let msr_indices = Arc::new(vm.msr_indices());
    let mut runners = Vec::with_capacity(usize::from(vcpu_count));
    for (index, state) in snap.vcpus.iter().enumerate() {
        let index = index as u8;
        let fd = vm.create_vcpu(index)?;
        state.restore(index, &fd)?;
        runners.push(VcpuRunner {
            index,
            fd,
            msr_indices: msr_indices.clone(),
            pio: devices.pio.clone(),
            mmio: mmio.clone(),
            exit_tx: exit_tx.clone(),
            // Snapshots of VMs with passed-through devices are refused, so restores never have one.
            seccomp_role: crate::seccomp::ThreadRole::Vcpu,
        });
    }
    vm.restore_state(&snap.vm)?;
    attach::start_event_loop(&virtio).map_err(StartError::Device)?;
    let vcpus = spawn_vcpus(runners, !request.resume_vm)?;
    Ok(Vmm {
        vm,
        memory,
        vcpus,
        serial: devices.serial,
        i8042: devices.i8042,
        config: snap.config,
        virtio,
        pci: None,
        generation: devices.generation,
        dirty_tracking,
        paused: !request.resume_vm,
    })
}

impl Vmm {
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// The configuration this VM was booted (or restored) with.
    pub fn config(&self) -> &SnapshotConfig {
        &self.config
    }

    /// The VM generation id the guest reads (0 after a cold boot, random after a restore).
    pub fn generation(&self) -> u128 {
        self.generation
    }

    /// Stops every vCPU outside KVM_RUN. Idempotent.
    pub fn pause(&mut self) -> Result<(), String> {
        if self.paused {
            return Ok(());
        }
        for vcpu in &self.vcpus {
            vcpu.request_pause();
        }
        for vcpu in &self.vcpus {
            if let Err(e) = vcpu.wait_paused() {
                // Leave no vCPU half-paused: the VM keeps running as before.
                self.vcpus.iter().for_each(VcpuHandle::resume);
                return Err(e);
            }
        }
        self.paused = true;
        self.flush_console();
        Ok(())
    }

    pub fn resume(&mut self) {
        self.vcpus.iter().for_each(VcpuHandle::resume);
        self.paused = false;
    }

    pub fn send_ctrl_alt_del(&self) -> Result<(), I8042Error> {
        lock(&self.i8042).trigger_ctrl_alt_del()
    }

    pub fn flush_console(&self) {
        lock(&self.serial).flush();
    }

    /// Writes the state file and the memory file. The VM must be paused; it stays paused.
    pub fn snapshot(&mut self, request: &CreateSnapshotRequest) -> Result<SnapshotReport, String> {
        let started = Instant::now();
        if let Some(p) = self.pci.as_ref().filter(|p| p.has_passthrough()) {
            return Err(crate::vfio::passthrough_refusal(
                crate::vfio::RefusedOp::Snapshot,
                &p.passthrough,
            ));
        }
        if !self.paused {
            return Err(
                "snapshots are taken of a paused VM: send PATCH /vm {\"state\": \"Paused\"} first"
                    .into(),
            );
        }
        if request.snapshot_type == SnapshotType::Diff && !self.dirty_tracking {
            return Err("a Diff snapshot needs dirty page tracking: set track_dirty_pages in machine-config before boot, or enable_diff_snapshots when loading".into());
        }
        let vcpus = self
            .vcpus
            .iter()
            .map(VcpuHandle::save_state)
            .collect::<Result<Vec<_>, _>>()?;
        let vm = self.vm.save_state().map_err(|e| e.to_string())?;
        // The device loop keeps running while vCPUs are paused (host sockets, TAP frames): hold
        // every device until memory is written, so no device changes guest memory mid-copy.
        let transports: Vec<_> = self.virtio.iter().map(|s| lock(&s.transport)).collect();
        let held: Vec<_> = self.virtio.iter().map(|s| lock(&s.device)).collect();
        let virtio = self
            .virtio
            .iter()
            .zip(transports.iter().zip(&held))
            .map(|(slot, (transport, device))| VirtioSnapshot {
                kind: slot.kind.clone(),
                transport: transport.snapshot_with(&**device),
            })
            .collect();
        let devices = DeviceStates {
            serial: lock(&self.serial).snapshot(),
            i8042: lock(&self.i8042).snapshot(),
            virtio,
        };
        let memory_bytes_written = match request.snapshot_type {
            SnapshotType::Full => {
                if self.dirty_tracking {
                    // The next Diff holds what changes after this Full snapshot.
                    self.vm
                        .dirty_bitmaps(&self.memory.mem)
                        .map_err(|e| e.to_string())?;
                }
                memory::write_full(&self.memory, &request.mem_file_path)
            }
            SnapshotType::Diff => {
                let bitmaps = self
                    .vm
                    .dirty_bitmaps(&self.memory.mem)
                    .map_err(|e| e.to_string())?;
                memory::write_diff(&self.memory, &bitmaps, &request.mem_file_path)
            }
        }
        .map_err(|e| e.to_string())?;
        let snapshot = VmSnapshot {
            vmm_version: env!("CARGO_PKG_VERSION").to_string(),
            config: self.config.clone(),
            vm,
            vcpus,
            devices,
        };
        persist::write_state_file(&snapshot, &request.snapshot_path).map_err(|e| e.to_string())?;
        drop(held);
        drop(transports);
        Ok(SnapshotReport {
            memory_bytes_written,
            elapsed_us: started.elapsed().as_micros() as u64,
        })
    }
}
