//! The memory test's pure parts: the pattern, filling and verifying words, and
//! choosing the ranges to test.

/// Odd, so `addr * MUL` is a bijection: every 8-byte word in the address space gets
/// a different value, and aliased or stuck address lines read back the wrong one.
const MUL: u64 = 0x9e37_79b9_7f4a_7c15;
const SEED: u64 = 0x4149_524c_4f43_4b21; // "AIRLOCK!"
/// Difference between the patterns of neighbouring words (many bits differ).
const STEP: u64 = MUL.wrapping_mul(8);

/// The 64-bit word stored at physical `addr`. It is linear in `addr` so the fill
/// and check loops need one add per word: guest instructions can be very slow
/// under software-assisted virtualisation.
pub fn pattern(addr: u64) -> u64 {
    addr.wrapping_mul(MUL).wrapping_add(SEED)
}

/// Fills `words`, which start at physical `addr`, with the pattern.
pub fn fill(words: &mut [u64], addr: u64) {
    let mut v = pattern(addr);
    let mut chunks = words.chunks_exact_mut(8);
    for chunk in &mut chunks {
        for w in chunk {
            *w = v;
            v = v.wrapping_add(STEP);
        }
    }
    for w in chunks.into_remainder() {
        *w = v;
        v = v.wrapping_add(STEP);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    pub addr: u64,
    pub want: u64,
    pub got: u64,
}

/// Reads back `words` (starting at physical `addr`); returns the wrapping sum of the
/// words, or the first word that does not hold the pattern.
pub fn verify(words: &[u64], addr: u64) -> Result<u64, Mismatch> {
    let mut want = pattern(addr);
    let mut sum = 0u64;
    for (i, w) in words.iter().enumerate() {
        // SAFETY: `w` is a valid reference. The read is volatile so the compiler
        // cannot reuse the values `fill` stored instead of reading memory.
        let got = unsafe { core::ptr::read_volatile(w) };
        if got != want {
            return Err(Mismatch {
                addr: addr + 8 * i as u64,
                want,
                got,
            });
        }
        sum = sum.wrapping_add(got);
        want = want.wrapping_add(STEP);
    }
    Ok(sum)
}

/// At most this many ranges are tested (the e820 map has at most 128 entries).
pub const MAX_RANGES: usize = 128;

/// The ranges to test: the first `bytes` bytes of `free` (8-byte aligned pieces).
pub struct Plan {
    ranges: [(u64, u64); MAX_RANGES],
    n: usize,
}

impl Plan {
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges[..self.n]
    }
}

/// Takes `bytes` bytes from `free` in order; on shortage returns the bytes available.
pub fn plan(free: impl Iterator<Item = (u64, u64)>, bytes: u64) -> Result<Plan, u64> {
    let mut p = Plan {
        ranges: [(0, 0); MAX_RANGES],
        n: 0,
    };
    let mut left = bytes;
    let mut available = 0u64;
    for (start, end) in free {
        let start = start.next_multiple_of(8);
        let end = end & !7;
        if start >= end {
            continue;
        }
        available += end - start;
        if left == 0 || p.n == MAX_RANGES {
            continue;
        }
        let take = left.min(end - start);
        p.ranges[p.n] = (start, start + take);
        p.n += 1;
        left -= take;
    }
    if left == 0 {
        Ok(p)
    } else {
        Err(available)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_differs_per_word() {
        let mut seen = std::collections::HashSet::new();
        for a in (0x20_0000u64..0x20_0000 + 8 * 4096).step_by(8) {
            assert!(seen.insert(pattern(a)));
        }
        // Neighbours differ in many bits, not just the low ones.
        let d = (pattern(0x100000) ^ pattern(0x100008)).count_ones();
        assert!(d > 16, "{d}");
        // Words a power of two apart differ too (address-line aliasing).
        for bit in 3..40 {
            assert_ne!(pattern(0x100000), pattern(0x100000 ^ 1 << bit));
        }
    }

    #[test]
    fn fill_then_verify() {
        let mut buf = vec![0u64; 8 * 37 + 5];
        let addr = 0x40_0008;
        fill(&mut buf, addr);
        for (i, &w) in buf.iter().enumerate() {
            assert_eq!(w, pattern(addr + 8 * i as u64));
        }
        let sum = buf.iter().fold(0u64, |s, &w| s.wrapping_add(w));
        assert_eq!(verify(&buf, addr), Ok(sum));
        // The same words are wrong for another address.
        assert!(verify(&buf, addr + 8).is_err());
    }

    #[test]
    fn verify_reports_first_bad_word() {
        let mut buf = vec![0u64; 100];
        fill(&mut buf, 0x1000);
        buf[42] ^= 1 << 17;
        buf[77] = 0;
        assert_eq!(
            verify(&buf, 0x1000),
            Err(Mismatch {
                addr: 0x1000 + 42 * 8,
                want: pattern(0x1000 + 42 * 8),
                got: pattern(0x1000 + 42 * 8) ^ 1 << 17,
            })
        );
        assert_eq!(verify(&[], 0x1000), Ok(0));
    }

    #[test]
    fn plans_across_ranges() {
        let free = [(0x30_0001, 0x40_0000), (0x100_0000, 0x200_0000)];
        let p = plan(free.iter().copied(), 2 << 20).unwrap();
        assert_eq!(
            p.ranges(),
            &[(0x30_0008, 0x40_0000), (0x100_0000, 0x110_0008)]
        );
        let total: u64 = p.ranges().iter().map(|(s, e)| e - s).sum();
        assert_eq!(total, 2 << 20);
    }

    #[test]
    fn reports_shortage() {
        let free = [(0x30_0000, 0x40_0000), (0x100_0000, 0x100_0004)];
        assert_eq!(plan(free.iter().copied(), 2 << 20).err(), Some(1 << 20));
        assert_eq!(plan(core::iter::empty(), 8).err(), Some(0));
        assert!(plan(core::iter::empty(), 0).is_ok());
    }
}
