//! vCPU threads: each runs KVM_RUN in a loop, dispatches port and MMIO exits to the device buses,
//! and parks itself when the VMM asks it to pause.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable};

use super::vcpu_state::{VcpuState, VcpuStateError};
use crate::devices::bus::lock;
use crate::devices::{Bus, VmExitRequest};

/// Why the VM stopped, as reported by the vCPU thread that saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest asked for a reboot through the i8042; the VMM exits 0.
    Reboot,
    /// The guest shut itself down (triple fault, or a KVM system event); the VMM exits 0.
    Shutdown(String),
    /// Something went wrong running the guest; the VMM exits 1 with this message.
    Error(String),
}

impl VmExit {
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::Reboot | VmExit::Shutdown(_) => 0,
            VmExit::Error(_) => 1,
        }
    }
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn vcpu_kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_signal_handler(_: i32, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the kick signal's handler (without SA_RESTART, so KVM_RUN returns EINTR). Once per
/// process, before any vCPU thread starts.
pub fn install_kick_handler() -> Result<(), String> {
    register_signal_handler(vcpu_kick_signal(), noop_signal_handler)
        .map_err(|e| format!("cannot install the vCPU kick signal handler: {e}"))
}

/// What a parked vCPU thread can be asked to do with its own vCPU fd.
pub enum VcpuCommand {
    SaveState(Sender<Result<VcpuState, VcpuStateError>>),
}

/// Pause state shared between the VMM and one vCPU thread.
#[derive(Default)]
pub struct VcpuControl {
    pause_requested: AtomicBool,
    paused: Mutex<bool>,
    commands: Mutex<Vec<VcpuCommand>>,
    cv: Condvar,
}

impl VcpuControl {
    /// Called on the vCPU thread: report paused, serve commands, wait for resume.
    fn park(&self, serve: &mut dyn FnMut(VcpuCommand)) {
        let mut paused = lock(&self.paused);
        *paused = true;
        self.cv.notify_all();
        loop {
            // Commands are pushed with `paused` held, so none is missed between here and wait.
            for command in std::mem::take(&mut *lock(&self.commands)) {
                serve(command);
            }
            if !self.pause_requested.load(Ordering::Acquire) {
                break;
            }
            paused = self.cv.wait(paused).unwrap_or_else(|p| p.into_inner());
        }
        *paused = false;
        self.cv.notify_all();
    }

    fn wait_paused(&self, timeout: Duration) -> bool {
        let paused = lock(&self.paused);
        let (paused, _) = self
            .cv
            .wait_timeout_while(paused, timeout, |p| !*p)
            .unwrap_or_else(|p| p.into_inner());
        *paused
    }

    fn send(&self, command: VcpuCommand) {
        let _paused = lock(&self.paused);
        lock(&self.commands).push(command);
        self.cv.notify_all();
    }

    fn resume(&self) {
        self.pause_requested.store(false, Ordering::Release);
        let _guard = lock(&self.paused);
        self.cv.notify_all();
    }
}

/// The VMM's handle on a running vCPU thread.
pub struct VcpuHandle {
    pub index: u8,
    control: Arc<VcpuControl>,
    thread: JoinHandle<()>,
}

/// How long a pause may take before it is reported as failed.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// A signal can land just before KVM_RUN and be missed: kick again at this interval.
const KICK_INTERVAL: Duration = Duration::from_millis(2);

impl VcpuHandle {
    pub fn request_pause(&self) {
        self.control.pause_requested.store(true, Ordering::Release);
    }

    /// Kicks the thread out of KVM_RUN until it reports paused.
    pub fn wait_paused(&self) -> Result<(), String> {
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        loop {
            // SAFETY of the handle is upheld by std's JoinHandle, which Killable relies on.
            let _ = self.thread.kill(vcpu_kick_signal());
            if self.control.wait_paused(KICK_INTERVAL) {
                return Ok(());
            }
            if self.thread.is_finished() {
                return Err(format!("vCPU {} has stopped", self.index));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "vCPU {} did not pause within {} s",
                    self.index,
                    PAUSE_TIMEOUT.as_secs()
                ));
            }
        }
    }

    pub fn resume(&self) {
        self.control.resume();
    }

    /// The vCPU's state, read by its own thread. The vCPU must be paused.
    pub fn save_state(&self) -> Result<VcpuState, String> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.control.send(VcpuCommand::SaveState(tx));
        match rx.recv_timeout(PAUSE_TIMEOUT) {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err(format!(
                "vCPU {} did not report its state (is it paused?)",
                self.index
            )),
        }
    }
}

/// Everything a vCPU thread owns.
pub struct VcpuRunner {
    pub index: u8,
    pub fd: VcpuFd,
    /// MSRs a snapshot saves (KVM's list for this host).
    pub msr_indices: Arc<Vec<u32>>,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit_tx: Sender<VmExit>,
    /// `Vcpu`, or `VcpuPassthrough` for a VM with a passed-through PCI device.
    pub seccomp_role: crate::seccomp::ThreadRole,
}

/// Backoff for an application processor that KVM has not started yet (on some hosts KVM_RUN then
/// returns EAGAIN at once instead of blocking until INIT/SIPI).
const WAIT_FOR_SIPI_MAX: Duration = Duration::from_millis(1);

impl VcpuRunner {
    /// Starts the vCPU thread; with `start_paused` it parks before its first KVM_RUN.
    pub fn spawn(self, start_paused: bool) -> Result<VcpuHandle, String> {
        let control = Arc::new(VcpuControl::default());
        control
            .pause_requested
            .store(start_paused, Ordering::Release);
        let index = self.index;
        let thread_control = control.clone();
        let thread = std::thread::Builder::new()
            .name(format!("fc_vcpu {index}"))
            .stack_size(256 << 10)
            .spawn(move || {
                if let Err(e) = crate::seccomp::apply(self.seccomp_role) {
                    let _ = self.exit_tx.send(VmExit::Error(e.to_string()));
                    return;
                }
                self.run(&thread_control)
            })
            .map_err(|e| format!("cannot start the thread for vCPU {index}: {e}"))?;
        Ok(VcpuHandle {
            index,
            control,
            thread,
        })
    }

    fn run(mut self, control: &VcpuControl) {
        let mut backoff = Duration::from_micros(20);
        let exit = loop {
            if control.pause_requested.load(Ordering::Acquire) {
                let (index, fd, msrs) = (self.index, &self.fd, &self.msr_indices);
                control.park(&mut |command| match command {
                    VcpuCommand::SaveState(reply) => {
                        let _ = reply.send(VcpuState::save(index, fd, msrs));
                    }
                });
                continue;
            }
            match self.fd.run() {
                Ok(exit) => {
                    backoff = Duration::from_micros(20);
                    if let Some(stop) = handle_exit(self.index, exit, &self.pio, &self.mmio) {
                        break stop;
                    }
                }
                Err(e) if e.errno() == libc::EINTR => self.fd.set_kvm_immediate_exit(0),
                Err(e) if e.errno() == libc::EAGAIN => {
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(WAIT_FOR_SIPI_MAX);
                }
                Err(e) => {
                    break VmExit::Error(format!("KVM_RUN failed on vCPU {}: {e}", self.index))
                }
            }
        };
        let exit = match exit {
            VmExit::Error(msg) if msg.contains("emulation failure") => {
                let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                VmExit::Error(format!("{msg} at guest rip {rip:#x}"))
            }
            other => other,
        };
        // The receiver outlives every vCPU unless the VMM is already exiting.
        let _ = self.exit_tx.send(exit);
    }
}

/// Handles one exit; returns why the VM must stop, if it must.
fn handle_exit(index: u8, exit: VcpuExit<'_>, pio: &Bus, mmio: &Bus) -> Option<VmExit> {
    let request = match exit {
        VcpuExit::IoOut(port, data) => pio.write(u64::from(port), data),
        VcpuExit::IoIn(port, data) => {
            pio.read(u64::from(port), data);
            None
        }
        VcpuExit::MmioRead(addr, data) => {
            mmio.read(addr, data);
            None
        }
        VcpuExit::MmioWrite(addr, data) => mmio.write(addr, data),
        VcpuExit::Shutdown => {
            return Some(VmExit::Shutdown(format!(
                "vCPU {index} shut down (triple fault or shutdown request)"
            )))
        }
        VcpuExit::Hlt => return Some(VmExit::Shutdown(format!("vCPU {index} halted"))),
        VcpuExit::SystemEvent(kind, _) => {
            return Some(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmExit::Reboot,
                _ => VmExit::Shutdown(format!("vCPU {index} raised system event {kind}")),
            })
        }
        VcpuExit::InternalError => {
            return Some(VmExit::Error(format!(
                "KVM internal error (emulation failure) on vCPU {index}"
            )))
        }
        VcpuExit::FailEntry(reason, cpu) => {
            return Some(VmExit::Error(format!(
                "KVM failed to enter vCPU {index} (hardware reason {reason:#x}, cpu {cpu})"
            )))
        }
        other => {
            return Some(VmExit::Error(format!(
                "unexpected KVM exit on vCPU {index}: {other:?}"
            )))
        }
    };
    request.map(|VmExitRequest::Reboot| VmExit::Reboot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::BusDevice;

    struct ResetPort;
    impl BusDevice for ResetPort {
        fn read(&mut self, _: u64, data: &mut [u8]) {
            data.fill(0x42);
        }
        fn write(&mut self, _: u64, data: &[u8]) -> Option<VmExitRequest> {
            (data == [0xfe]).then_some(VmExitRequest::Reboot)
        }
    }

    #[test]
    fn exits_map_to_stop_reasons() {
        let mut pio = Bus::new();
        pio.insert(Arc::new(Mutex::new(ResetPort)), 0x64, 1)
            .unwrap();
        let mmio = Bus::new();
        assert_eq!(
            handle_exit(0, VcpuExit::IoOut(0x64, &[1]), &pio, &mmio),
            None
        );
        assert_eq!(
            handle_exit(0, VcpuExit::IoOut(0x64, &[0xfe]), &pio, &mmio),
            Some(VmExit::Reboot)
        );
        let mut data = [0u8; 1];
        assert_eq!(
            handle_exit(0, VcpuExit::IoIn(0x64, &mut data), &pio, &mmio),
            None
        );
        assert_eq!(data, [0x42]);
        let mut wide = [0u8; 4];
        handle_exit(0, VcpuExit::MmioRead(0x1000, &mut wide), &pio, &mmio);
        assert_eq!(wide, [0xff; 4]);
        assert!(matches!(
            handle_exit(1, VcpuExit::Shutdown, &pio, &mmio),
            Some(VmExit::Shutdown(_))
        ));
        let err = handle_exit(2, VcpuExit::InternalError, &pio, &mmio).unwrap();
        assert_eq!(err.exit_code(), 1);
    }

    #[test]
    fn park_and_resume_round_trip() {
        let control = Arc::new(VcpuControl::default());
        control.pause_requested.store(true, Ordering::Release);
        let c = control.clone();
        let t = std::thread::spawn(move || c.park(&mut |_| {}));
        assert!(control.wait_paused(Duration::from_secs(5)));
        control.resume();
        t.join().unwrap();
        assert!(!*control.paused.lock().unwrap());
    }
}
