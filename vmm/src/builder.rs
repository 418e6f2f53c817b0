//! Turns a validated [`VmConfig`] into a running VM: memory, kernel, boot tables, devices, vCPUs.
//! The order matters for speed: memory slots are registered before the irqchip and vCPUs exist.

use std::fs::OpenOptions;
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
use crate::devices::{Bus, BusError};
use crate::vstate::memory::{create_guest_memory, GuestMemory, MemoryError};
use crate::vstate::vcpu::{install_kick_handler, VcpuHandle, VcpuRunner, VmExit};
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
}

pub struct StartOptions {
    /// When the process started, for the boot timer.
    pub start_time: Instant,
    /// Print the guest-ready line (`--boot-timer`).
    pub report_boot_time: bool,
}

/// A running (or paused) VM. Dropping it does not stop the vCPU threads: the VMM process exits.
pub struct Vmm {
    // Kept alive for as long as the vCPUs run: the VM fd owns the memory slots that point here.
    _vm: Vm,
    pub memory: GuestMemory,
    vcpus: Vec<VcpuHandle>,
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042>>,
    paused: bool,
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
    let console = console_writer(
        config
            .serial
            .as_ref()
            .and_then(|s| s.serial_out_path.as_deref()),
    )?;

    let vm = Vm::new()?;
    let memory = create_guest_memory(mem_size)?;
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
    let cmdline = boot::build_cmdline(boot_source.boot_args.as_deref().unwrap_or(""))?;
    boot::write_boot_params(&memory.mem, mem_size, &cmdline, kernel.setup_header, initrd)?;
    write_boot_tables(&memory.mem)?;
    setup_mptable(&memory.mem, vcpu_count)?;

    vm.setup_irqchip()?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        vm.irq_line(COM1_IRQ)?,
        console,
    )));
    let i8042 = Arc::new(Mutex::new(I8042::new(Box::new(vm.irq_line(I8042_IRQ)?))));
    let boot_timer = Arc::new(Mutex::new(BootTimer::new(
        opts.start_time,
        opts.report_boot_time,
    )));
    let mut pio = Bus::new();
    pio.insert(serial.clone(), COM1_PORT_BASE, COM1_PORT_LEN)?;
    pio.insert(i8042.clone(), I8042_PORT_BASE, I8042_PORT_LEN)?;
    let mut mmio = Bus::new();
    mmio.insert(boot_timer, BOOT_TIMER_ADDR, BOOT_TIMER_SIZE)?;
    let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));

    let supported = vm.supported_cpuid()?;
    let topology = Topology::new(vcpu_count, machine.smt);
    let mut runners = Vec::with_capacity(usize::from(vcpu_count));
    for index in 0..vcpu_count {
        let fd = vm.create_vcpu(index)?;
        fd.set_cpuid2(&vcpu_cpuid(&supported, index, topology))
            .map_err(|e| VmError::Kvm("set the vCPU's CPUID", e))?;
        configure_vcpu(&fd, kernel.entry.0)?;
        runners.push(VcpuRunner {
            index,
            fd,
            pio: pio.clone(),
            mmio: mmio.clone(),
            exit_tx: exit_tx.clone(),
        });
    }
    install_kick_handler().map_err(StartError::Thread)?;
    let vcpus = runners
        .into_iter()
        .map(VcpuRunner::spawn)
        .collect::<Result<Vec<_>, _>>()
        .map_err(StartError::Thread)?;

    Ok(Vmm {
        _vm: vm,
        memory,
        vcpus,
        serial,
        i8042,
        paused: false,
    })
}

impl Vmm {
    pub fn is_paused(&self) -> bool {
        self.paused
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
}
