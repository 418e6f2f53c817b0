//! The 8250 UART on COM1 (ports 0x3f8..0x400), emulated by vm-superio, writing the guest's console
//! to stdout or a file.

use std::io::{self, Write};

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::{BusDevice, VmExitRequest};

pub const COM1_PORT_BASE: u64 = 0x3f8;
pub const COM1_PORT_LEN: u64 = 8;
pub const COM1_IRQ: u32 = 4;

/// An irqfd-backed interrupt line for vm-superio.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// vm-superio flushes after every byte; this writer turns that into one write per line (or per
/// full buffer), so console output costs a syscall per line, not per character.
pub struct LineFlushWriter<W: Write> {
    inner: W,
    buf: Vec<u8>,
}

const LINE_BUF_LIMIT: usize = 1024;

impl<W: Write> LineFlushWriter<W> {
    pub fn new(inner: W) -> Self {
        LineFlushWriter {
            inner,
            buf: Vec::with_capacity(256),
        }
    }

    /// Writes out whatever is buffered, complete line or not.
    pub fn force_flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.inner.write_all(&self.buf)?;
            self.buf.clear();
        }
        self.inner.flush()
    }
}

impl<W: Write> Write for LineFlushWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.last() == Some(&b'\n') || self.buf.len() >= LINE_BUF_LIMIT {
            self.force_flush()
        } else {
            Ok(())
        }
    }
}

pub type ConsoleWriter = LineFlushWriter<Box<dyn Write + Send>>;

pub struct SerialDevice {
    serial: Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleWriter>,
}

/// The UART's registers and unread input, for snapshots (vm-superio's state, serialisable).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialDevice {
            serial: Serial::new(IrqTrigger(irq), LineFlushWriter::new(out)),
        }
    }

    pub fn from_snapshot(
        irq: EventFd,
        out: Box<dyn Write + Send>,
        s: &SerialSnapshot,
    ) -> Result<Self, String> {
        let state = SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let serial = Serial::from_state(
            &state,
            IrqTrigger(irq),
            vm_superio::serial::NoEvents,
            LineFlushWriter::new(out),
        )
        .map_err(|e| format!("the serial device state in the snapshot is invalid: {e:?}"))?;
        Ok(SerialDevice { serial })
    }

    pub fn snapshot(&self) -> SerialSnapshot {
        let s = self.serial.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Flushes a partial last line, at VM exit or pause.
    pub fn flush(&mut self) {
        let _ = self.serial.writer_mut().force_flush();
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.serial.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmExitRequest> {
        if let (Some(&value), Ok(off)) = (data.first(), u8::try_from(offset)) {
            // A console that cannot be written (closed pipe, full disk) must not stop the guest.
            let _ = self.serial.write(off, value);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, d: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(d);
            Ok(d.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_is_written_a_line_at_a_time() {
        let out = Shared::default();
        let mut dev = SerialDevice::new(EventFd::new(0).unwrap(), Box::new(out.clone()));
        for b in b"PROBE" {
            dev.write(0, &[*b]);
        }
        assert!(out.0.lock().unwrap().is_empty());
        dev.write(0, b"\n");
        assert_eq!(&out.0.lock().unwrap()[..], b"PROBE\n");
        dev.write(0, b"x");
        dev.flush();
        assert_eq!(&out.0.lock().unwrap()[..], b"PROBE\nx");
    }

    #[test]
    fn state_survives_a_snapshot() {
        let mut dev = SerialDevice::new(EventFd::new(0).unwrap(), Box::new(io::sink()));
        dev.write(7, &[0x5a]); // scratch register
        dev.write(3, &[0x03]); // line control
        let snap = dev.snapshot();
        let mut restored =
            SerialDevice::from_snapshot(EventFd::new(0).unwrap(), Box::new(io::sink()), &snap)
                .unwrap();
        let mut b = [0u8];
        restored.read(7, &mut b);
        assert_eq!(b, [0x5a]);
        assert_eq!(restored.snapshot(), snap);
    }

    #[test]
    fn line_status_says_transmitter_empty() {
        let mut dev = SerialDevice::new(EventFd::new(0).unwrap(), Box::new(io::sink()));
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }
}
