//! Guest-wide state a snapshot restore or fork makes stale: the wall clock and the kernel's
//! random pool.

use std::io::Write;
use std::os::fd::AsRawFd;

use crate::error::{AgentError, AgentResult};

/// `RNDADDENTROPY` = `_IOW('R', 0x03, int[2])`: add bytes to the pool and credit entropy.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG` = `_IO('R', 0x07)`: reseed the kernel CRNG from the pool now (Linux 4.17+).
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Sets CLOCK_REALTIME.
pub fn set_time(unix_ns: i128) -> AgentResult<()> {
    let ts = libc::timespec {
        tv_sec: (unix_ns / 1_000_000_000) as _,
        tv_nsec: (unix_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: clock_settime reads one timespec that lives for the duration of the call.
    let rc = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) };
    if rc < 0 {
        return Err(AgentError::io(
            "set the clock (clock_settime needs CAP_SYS_TIME)",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// How a seed went into the pool.
#[derive(Debug, serde::Serialize, PartialEq, Eq)]
pub struct EntropyResult {
    /// Bits of entropy credited (0 when the seed was only mixed in by a plain write).
    pub credited_bits: u32,
    /// Whether the kernel CRNG was reseeded immediately.
    pub reseeded: bool,
}

/// Mixes `seed` into the kernel pool: with `RNDADDENTROPY` (crediting 8 bits a byte) and a CRNG
/// reseed when permitted, else by writing it to /dev/urandom (mixed in, not credited).
pub fn add_entropy(seed: &[u8]) -> AgentResult<EntropyResult> {
    let mut urandom = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| AgentError::io("open /dev/urandom", e))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut request = Vec::with_capacity(8 + seed.len());
    let bits = (seed.len() * 8) as i32;
    request.extend_from_slice(&bits.to_ne_bytes());
    request.extend_from_slice(&(seed.len() as i32).to_ne_bytes());
    request.extend_from_slice(seed);
    // Keep the buffer u32-aligned in length, as the kernel reads whole words.
    while request.len() % 4 != 0 {
        request.push(0);
    }
    // SAFETY: the ioctl reads a rand_pool_info header followed by buf_size bytes, all inside
    // `request`, which outlives the call.
    let rc = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY as _, request.as_ptr()) };
    if rc == 0 {
        // SAFETY: RNDRESEEDCRNG takes no argument.
        let reseeded = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG as _) } == 0;
        return Ok(EntropyResult {
            credited_bits: bits as u32,
            reseeded,
        });
    }
    urandom
        .write_all(seed)
        .map_err(|e| AgentError::io("write the seed to /dev/urandom", e))?;
    Ok(EntropyResult {
        credited_bits: 0,
        reseeded: false,
    })
}
