//! A minimal i8042 PS/2 controller at ports 0x60..0x64, with Firecracker's behaviour: the reset
//! line (command 0xFE) stops the VM, and the VMM can inject Ctrl-Alt-Del so a guest shuts down
//! cleanly (`PUT /actions {"action_type": "SendCtrlAltDel"}`).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::bus::{BusDevice, VmExitRequest};

pub const I8042_PORT_BASE: u64 = 0x60;
pub const I8042_PORT_LEN: u64 = 5;
pub const I8042_IRQ: u32 = 1;

const OFS_DATA: u64 = 0;
const OFS_STATUS: u64 = 4;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_RESET_CPU: u8 = 0xfe;

const SB_OUT_DATA_AVAIL: u8 = 0x01;
const SB_I8042_CMD_DATA: u8 = 0x08;
const SB_KBD_ENABLED: u8 = 0x10;

const CB_KBD_INT: u8 = 0x01;
const CB_POST_OK: u8 = 0x04;

/// Keyboard ACK, sent in answer to any command byte the guest sends the keyboard.
const KBD_ACK: u8 = 0xfa;
/// Scancode set 2 make codes, as Linux's atkbd reads them.
pub const KEY_CTRL: u16 = 0x0014;
pub const KEY_ALT: u16 = 0x0011;
pub const KEY_DEL: u16 = 0xe071;

const BUF_SIZE: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum I8042Error {
    #[error("the i8042 keyboard buffer is full; the guest is not reading it")]
    BufferFull,
}

/// Raises the keyboard interrupt (IRQ 1), e.g. an irqfd.
pub trait KbdInterrupt: Send {
    fn trigger(&self);
}

impl KbdInterrupt for vmm_sys_util::eventfd::EventFd {
    fn trigger(&self) {
        // A failed write only loses an interrupt the guest also finds by polling the status.
        let _ = self.write(1);
    }
}

/// The controller's registers and queued bytes, for snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042Snapshot {
    pub status: u8,
    pub control: u8,
    pub outp: u8,
    pub pending_cmd: Option<u8>,
    pub buf: Vec<u8>,
}

pub struct I8042 {
    status: u8,
    control: u8,
    outp: u8,
    pending_cmd: Option<u8>,
    buf: VecDeque<u8>,
    irq: Box<dyn KbdInterrupt>,
}

impl I8042 {
    pub fn new(irq: Box<dyn KbdInterrupt>) -> Self {
        I8042 {
            status: SB_KBD_ENABLED,
            control: CB_POST_OK | CB_KBD_INT,
            outp: 0,
            pending_cmd: None,
            buf: VecDeque::with_capacity(BUF_SIZE),
            irq,
        }
    }

    pub fn snapshot(&self) -> I8042Snapshot {
        I8042Snapshot {
            status: self.status,
            control: self.control,
            outp: self.outp,
            pending_cmd: self.pending_cmd,
            buf: self.buf.iter().copied().collect(),
        }
    }

    /// Rebuilds the controller; a snapshot's oversized queue is cut to what the device holds.
    pub fn from_snapshot(irq: Box<dyn KbdInterrupt>, s: &I8042Snapshot) -> Self {
        I8042 {
            status: s.status,
            control: s.control,
            outp: s.outp,
            pending_cmd: s.pending_cmd,
            buf: s.buf.iter().copied().take(BUF_SIZE).collect(),
            irq,
        }
    }

    fn push_byte(&mut self, b: u8) -> Result<(), I8042Error> {
        if self.buf.len() >= BUF_SIZE {
            return Err(I8042Error::BufferFull);
        }
        self.buf.push_back(b);
        self.status |= SB_OUT_DATA_AVAIL;
        Ok(())
    }

    fn trigger_kbd_interrupt(&self) {
        if self.control & CB_KBD_INT != 0 {
            self.irq.trigger();
        }
    }

    /// Queues a key press (one or two scancode bytes) and raises the keyboard interrupt.
    pub fn trigger_key(&mut self, key: u16) -> Result<(), I8042Error> {
        let needed = if key & 0xff00 != 0 { 2 } else { 1 };
        if self.buf.len() + needed > BUF_SIZE {
            return Err(I8042Error::BufferFull);
        }
        if key & 0xff00 != 0 {
            self.push_byte((key >> 8) as u8)?;
        }
        self.push_byte(key as u8)?;
        self.trigger_kbd_interrupt();
        Ok(())
    }

    pub fn trigger_ctrl_alt_del(&mut self) -> Result<(), I8042Error> {
        if self.buf.len() + 4 > BUF_SIZE {
            return Err(I8042Error::BufferFull);
        }
        self.trigger_key(KEY_CTRL)?;
        self.trigger_key(KEY_ALT)?;
        self.trigger_key(KEY_DEL)
    }

    fn pop_byte(&mut self) -> u8 {
        let b = self.buf.pop_front().unwrap_or(0);
        if self.buf.is_empty() {
            self.status &= !SB_OUT_DATA_AVAIL;
        } else {
            self.trigger_kbd_interrupt();
        }
        b
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            OFS_STATUS => self.status,
            OFS_DATA => self.pop_byte(),
            _ => 0,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmExitRequest> {
        let &value = data.first()?;
        match offset {
            OFS_STATUS => {
                self.status |= SB_I8042_CMD_DATA;
                match value {
                    CMD_RESET_CPU => return Some(VmExitRequest::Reboot),
                    CMD_READ_CTR => {
                        self.buf.clear();
                        let _ = self.push_byte(self.control);
                    }
                    CMD_READ_OUTP => {
                        self.buf.clear();
                        let _ = self.push_byte(self.outp);
                    }
                    CMD_WRITE_CTR | CMD_WRITE_OUTP => self.pending_cmd = Some(value),
                    _ => {}
                }
            }
            OFS_DATA => {
                self.status &= !SB_I8042_CMD_DATA;
                match self.pending_cmd.take() {
                    Some(CMD_WRITE_CTR) => self.control = value,
                    Some(CMD_WRITE_OUTP) => self.outp = value,
                    // A command for the keyboard itself: acknowledge it, as a keyboard would.
                    _ => {
                        self.buf.clear();
                        let _ = self.push_byte(KBD_ACK);
                        self.trigger_kbd_interrupt();
                    }
                }
            }
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    struct Counter(Arc<AtomicUsize>);
    impl KbdInterrupt for Counter {
        fn trigger(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn device() -> (I8042, Arc<AtomicUsize>) {
        let n = Arc::new(AtomicUsize::new(0));
        (I8042::new(Box::new(Counter(n.clone()))), n)
    }

    fn read(d: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        d.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_requests_reboot() {
        let (mut d, _) = device();
        assert_eq!(
            d.write(OFS_STATUS, &[CMD_RESET_CPU]),
            Some(VmExitRequest::Reboot)
        );
        assert_eq!(d.write(OFS_DATA, &[CMD_RESET_CPU]), None);
        assert_eq!(d.write(OFS_STATUS, &[]), None);
    }

    #[test]
    fn ctrl_alt_del_scancodes_are_polled_in_order() {
        let (mut d, irqs) = device();
        assert_eq!(read(&mut d, OFS_STATUS) & SB_OUT_DATA_AVAIL, 0);
        d.trigger_ctrl_alt_del().unwrap();
        assert!(irqs.load(Ordering::SeqCst) >= 3);
        let mut got = Vec::new();
        while read(&mut d, OFS_STATUS) & SB_OUT_DATA_AVAIL != 0 {
            got.push(read(&mut d, OFS_DATA));
        }
        assert_eq!(got, vec![0x14, 0x11, 0xe0, 0x71]);
    }

    #[test]
    fn full_buffer_is_an_error_not_a_loss() {
        let (mut d, _) = device();
        for _ in 0..BUF_SIZE / 4 {
            d.trigger_ctrl_alt_del().unwrap();
        }
        assert_eq!(d.trigger_ctrl_alt_del(), Err(I8042Error::BufferFull));
        assert_eq!(d.trigger_key(KEY_DEL), Err(I8042Error::BufferFull));
        assert_eq!(d.buf.len(), BUF_SIZE);
    }

    #[test]
    fn control_register_round_trips() {
        let (mut d, irqs) = device();
        d.write(OFS_STATUS, &[CMD_WRITE_CTR]);
        d.write(OFS_DATA, &[0x44]);
        d.write(OFS_STATUS, &[CMD_READ_CTR]);
        assert_eq!(read(&mut d, OFS_DATA), 0x44);
        // Keyboard interrupts are now masked by the guest.
        d.trigger_key(KEY_CTRL).unwrap();
        assert_eq!(irqs.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn snapshot_round_trips_and_bounds_the_queue() {
        let (mut d, _) = device();
        d.trigger_ctrl_alt_del().unwrap();
        let snap = d.snapshot();
        let (n, _) = device();
        let restored = I8042::from_snapshot(n.irq, &snap);
        assert_eq!(restored.snapshot(), snap);
        let mut big = snap.clone();
        big.buf = vec![1; 1000];
        let (n, _) = device();
        assert_eq!(I8042::from_snapshot(n.irq, &big).buf.len(), BUF_SIZE);
    }

    #[test]
    fn keyboard_commands_are_acknowledged() {
        let (mut d, _) = device();
        d.write(OFS_DATA, &[0xf2]);
        assert_eq!(read(&mut d, OFS_DATA), KBD_ACK);
    }
}
