//! COM1 output. Lines are built first and then written under a spinlock so that
//! lines from different CPUs never interleave.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::arch;
use crate::fmt::LineBuf;

/// COM1 transmit holding register. The VMM's UART accepts bytes at any time, so
/// the line status register is not polled.
const COM1_THR: u16 = 0x3f8;

static LOCK: AtomicBool = AtomicBool::new(false);

/// How long the failure paths wait for the lock before writing anyway.
const FORCE_AFTER_CYCLES: u64 = 1 << 31;

fn emit(line: &LineBuf) {
    for &b in line.as_bytes() {
        arch::outb(COM1_THR, b);
    }
    arch::outb(COM1_THR, b'\n');
}

fn try_lock() -> bool {
    LOCK.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_ok()
}

/// Writes `line` and a newline.
pub fn print(line: &LineBuf) {
    while !try_lock() {
        arch::pause();
    }
    emit(line);
    LOCK.store(false, Ordering::Release);
}

/// Like [`print`], for exception and panic reports: the lock holder may be this very
/// CPU (a fault while printing), so after a bounded wait the line is written anyway.
pub fn print_forced(line: &LineBuf) {
    let start = arch::rdtsc();
    let mut locked = false;
    while arch::rdtsc().wrapping_sub(start) < FORCE_AFTER_CYCLES {
        if try_lock() {
            locked = true;
            break;
        }
        arch::pause();
    }
    emit(line);
    if locked {
        LOCK.store(false, Ordering::Release);
    }
}

/// Prints one formatted line on COM1.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::console::print(&$crate::text!($($arg)*))
    };
}
