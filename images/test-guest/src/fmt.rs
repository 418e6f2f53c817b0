//! Fixed-capacity text line. The guest has no allocator, and building a whole line
//! before taking the serial lock keeps lines printed by different CPUs intact.

use core::fmt;

/// Longest line the guest prints; longer output is cut (and marked with `...`).
pub const LINE_CAP: usize = 480;

pub struct LineBuf {
    buf: [u8; LINE_CAP],
    len: usize,
    truncated: bool,
}

impl LineBuf {
    pub const fn new() -> Self {
        LineBuf {
            buf: [0; LINE_CAP],
            len: 0,
            truncated: false,
        }
    }

    pub fn push_bytes(&mut self, bytes: &[u8]) {
        // Keep 3 bytes spare so a truncated line can still end with "...".
        let room = LINE_CAP - 3 - self.len.min(LINE_CAP - 3);
        let n = bytes.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        if n < bytes.len() && !self.truncated {
            self.truncated = true;
            self.buf[self.len..self.len + 3].copy_from_slice(b"...");
            self.len += 3;
        }
    }

    pub fn push_str(&mut self, s: &str) {
        self.push_bytes(s.as_bytes());
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Default for LineBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Write for LineBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Never report an error: a cut line is more useful than a formatting abort.
        self.push_str(s);
        Ok(())
    }
}

/// `format!` into a [`LineBuf`].
#[macro_export]
macro_rules! text {
    ($($arg:tt)*) => {{
        let mut l = $crate::fmt::LineBuf::new();
        let _ = core::fmt::Write::write_fmt(&mut l, format_args!($($arg)*));
        l
    }};
}

/// Displays raw bytes (command-line text) as ASCII, replacing anything else with `?`.
pub struct Ascii<'a>(pub &'a [u8]);

impl fmt::Display for Ascii<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.0 {
            let c = if (0x20..0x7f).contains(&b) {
                b as char
            } else {
                '?'
            };
            fmt::Write::write_char(f, c)?;
        }
        Ok(())
    }
}

/// Formats a byte count the way the guest reports sizes (`64 MiB`, `1536 KiB`, `17 B`).
pub struct Size(pub u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b != 0 && b.is_multiple_of(1 << 20) {
            write!(f, "{} MiB", b >> 20)
        } else if b != 0 && b.is_multiple_of(1 << 10) {
            write!(f, "{} KiB", b >> 10)
        } else {
            write!(f, "{b} B")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_numbers() {
        let l = text!(
            "exception {} at rip {:#x} (error code {:#x})",
            6,
            0x100abcu64,
            0
        );
        assert_eq!(
            l.as_bytes(),
            b"exception 6 at rip 0x100abc (error code 0x0)"
        );
        assert_eq!(text!("{}", u64::MAX).as_bytes(), b"18446744073709551615");
        assert_eq!(
            text!("{:#018x}", 0xd000_0000u64).as_bytes(),
            b"0x00000000d0000000"
        );
    }

    #[test]
    fn truncates_long_lines() {
        let mut l = LineBuf::new();
        for _ in 0..100 {
            l.push_str("0123456789");
        }
        assert!(l.truncated);
        assert_eq!(l.as_bytes().len(), LINE_CAP);
        assert!(l.as_bytes().ends_with(b"..."));
        assert_eq!(&l.as_bytes()[..10], b"0123456789");
        l.push_str("more");
        assert_eq!(l.as_bytes().len(), LINE_CAP);
    }

    #[test]
    fn exact_fit_is_not_truncated() {
        let mut l = LineBuf::new();
        l.push_bytes(&[b'x'; LINE_CAP - 3]);
        assert!(!l.truncated);
        assert_eq!(l.as_bytes().len(), LINE_CAP - 3);
    }

    #[test]
    fn ascii_and_sizes() {
        assert_eq!(text!("{}", Ascii(b"mem:64\x01")).as_bytes(), b"mem:64?");
        assert_eq!(text!("{}", Size(64 << 20)).as_bytes(), b"64 MiB");
        assert_eq!(text!("{}", Size(0x9fc00)).as_bytes(), b"639 KiB");
        assert_eq!(text!("{}", Size(17)).as_bytes(), b"17 B");
        assert_eq!(text!("{}", Size(0)).as_bytes(), b"0 B");
    }
}
