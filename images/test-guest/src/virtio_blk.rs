//! virtio-blk protocol pieces: request headers, status codes, the write pattern, the
//! device id string and the FNV-1a checksum the `virtio-blk` scenario prints.

pub const SECTOR: usize = 512;

/// Request types (5.2.6).
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;

/// Request status byte.
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// Feature bits the scenario looks at.
pub const F_RO: u64 = 1 << 5;
pub const F_FLUSH: u64 = 1 << 9;

/// Config space: `capacity` (le64, in 512-byte sectors) at offset 0.
pub const CONFIG_CAPACITY: u64 = 0;

pub const HEADER_LEN: usize = 16;
/// GET_ID answers with up to 20 bytes, NUL-padded when shorter.
pub const ID_LEN: usize = 20;

/// The device-readable request header: type, reserved, sector (all little endian).
pub fn header(kind: u32, sector: u64) -> [u8; HEADER_LEN] {
    let mut h = [0; HEADER_LEN];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

pub fn status_name(s: u8) -> &'static str {
    match s {
        S_OK => "OK",
        S_IOERR => "IOERR",
        S_UNSUPP => "UNSUPP",
        _ => "not a status",
    }
}

pub fn type_name(kind: u32) -> &'static str {
    match kind {
        T_IN => "IN",
        T_OUT => "OUT",
        T_FLUSH => "FLUSH",
        T_GET_ID => "GET_ID",
        _ => "?",
    }
}

/// The device id up to its first NUL (all 20 bytes when there is none).
pub fn id_string(id: &[u8; ID_LEN]) -> &[u8] {
    crate::cmdline::until_nul(id).unwrap_or(id)
}

/// Byte `i` of absolute sector `sector` in what the scenario writes:
/// `((sector * 512 + i) * 7 + 3) mod 251`.
pub fn pattern_byte(sector: u64, i: usize) -> u8 {
    let pos = u128::from(sector) * SECTOR as u128 + i as u128;
    ((pos * 7 + 3) % 251) as u8
}

/// The pattern byte after `v` (`+7 mod 251`, without overflowing a u8).
fn next_pattern(v: u8) -> u8 {
    if v >= 251 - 7 {
        v - (251 - 7)
    } else {
        v + 7
    }
}

/// Fills `buf` (whole sectors) with the pattern of the sectors starting at `first_sector`.
/// One add and compare per byte: guest instructions are slow on the nested hosts.
pub fn fill_pattern(buf: &mut [u8], first_sector: u64) {
    let mut v = pattern_byte(first_sector, 0);
    for b in buf {
        *b = v;
        v = next_pattern(v);
    }
}

/// The first offset where `buf` differs from the pattern of sectors from `first_sector`.
pub fn check_pattern(buf: &[u8], first_sector: u64) -> Option<usize> {
    let mut v = pattern_byte(first_sector, 0);
    for (i, &b) in buf.iter().enumerate() {
        if b != v {
            return Some(i);
        }
        v = next_pattern(v);
    }
    None
}

/// FNV-1a, 64-bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fnv1a64(u64);

impl Fnv1a64 {
    pub const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    pub const PRIME: u64 = 0x0000_0100_0000_01b3;

    pub const fn new() -> Self {
        Fnv1a64(Self::OFFSET_BASIS)
    }

    pub fn byte(&mut self, b: u8) {
        self.0 = (self.0 ^ u64::from(b)).wrapping_mul(Self::PRIME);
    }

    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.byte(b);
        }
    }

    pub fn value(&self) -> u64 {
        self.0
    }
}

impl Default for Fnv1a64 {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers() {
        assert_eq!(header(T_IN, 0), [0; 16]);
        assert_eq!(
            header(T_OUT, 0x0102_0304_0506_0708),
            [1, 0, 0, 0, 0, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1]
        );
        assert_eq!(header(T_GET_ID, 0)[0], 8);
        assert_eq!(header(T_FLUSH, 0)[0], 4);
    }

    #[test]
    fn names() {
        assert_eq!(status_name(S_IOERR), "IOERR");
        assert_eq!(status_name(0xff), "not a status");
        assert_eq!(type_name(T_GET_ID), "GET_ID");
    }

    #[test]
    fn ids() {
        let mut id = [0u8; ID_LEN];
        assert_eq!(id_string(&id), b"");
        id[..7].copy_from_slice(b"airlock");
        assert_eq!(id_string(&id), b"airlock");
        let full = *b"0123456789abcdefghij";
        assert_eq!(id_string(&full), &full[..]);
    }

    #[test]
    fn pattern_matches_the_formula() {
        assert_eq!(pattern_byte(0, 0), 3);
        assert_eq!(pattern_byte(0, 1), 10);
        assert_eq!(pattern_byte(8, 0), ((8 * 512 * 7 + 3) % 251) as u8);
        // No overflow for huge sectors.
        let s = u64::MAX / 512 + 5;
        let want = ((u128::from(s) * 512 * 7 + 3) % 251) as u8;
        assert_eq!(pattern_byte(s, 0), want);

        for first in [0u64, 1, 8, 250, 251, 12345, 1 << 40] {
            let mut buf = vec![0u8; 3 * SECTOR];
            fill_pattern(&mut buf, first);
            for (i, &b) in buf.iter().enumerate() {
                let sector = first + (i / SECTOR) as u64;
                assert_eq!(
                    b,
                    pattern_byte(sector, i % SECTOR),
                    "sector {first} byte {i}"
                );
                assert!(b < 251);
            }
            assert_eq!(check_pattern(&buf, first), None);
            buf[700] ^= 1;
            assert_eq!(check_pattern(&buf, first), Some(700));
        }
    }

    #[test]
    fn fnv1a64_known_values() {
        assert_eq!(Fnv1a64::new().value(), 0xcbf2_9ce4_8422_2325);
        let mut h = Fnv1a64::new();
        h.update(b"a");
        assert_eq!(h.value(), 0xaf63_dc4c_8601_ec8c);
        let mut h = Fnv1a64::new();
        h.update(b"foobar");
        assert_eq!(h.value(), 0x8594_4171_f739_67e8);
        // Streaming equals one shot.
        let mut a = Fnv1a64::new();
        a.update(b"foo");
        a.update(b"bar");
        assert_eq!(a, h);
        // 8 zero sectors, what a fresh sparse disk reads as.
        let mut z = Fnv1a64::new();
        z.update(&[0u8; 8 * SECTOR]);
        let mut want = 0xcbf2_9ce4_8422_2325u64;
        for _ in 0..8 * SECTOR {
            want = want.wrapping_mul(0x100_0000_01b3);
        }
        assert_eq!(z.value(), want);
    }
}
