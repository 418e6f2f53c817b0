//! Recognising Ctrl-Alt-Del in the i8042 byte stream (scancode set 2).

/// Feeds bytes one at a time; reports Delete make (`0xe0 0x71`). The VMM sends
/// Ctrl-Alt-Del as `0x14 0x11 0xe0 0x71`, and Delete is the part that matters.
#[derive(Clone, Copy, Debug, Default)]
pub struct CtrlAltDel {
    after_e0: bool,
}

impl CtrlAltDel {
    /// Returns true when `byte` completes `0xe0 0x71`.
    pub fn feed(&mut self, byte: u8) -> bool {
        let hit = self.after_e0 && byte == 0x71;
        self.after_e0 = byte == 0xe0;
        hit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8]) -> Option<usize> {
        let mut d = CtrlAltDel::default();
        bytes.iter().position(|&b| d.feed(b))
    }

    #[test]
    fn detects_delete_make() {
        assert_eq!(run(&[0x14, 0x11, 0xe0, 0x71]), Some(3));
        assert_eq!(run(&[0xe0, 0xe0, 0x71]), Some(2));
    }

    #[test]
    fn ignores_other_sequences() {
        assert_eq!(run(&[0x71, 0xe0]), None);
        // Delete break code: e0 f0 71.
        assert_eq!(run(&[0xe0, 0xf0, 0x71]), None);
        assert_eq!(run(&[0xe0, 0x14, 0x71]), None);
    }
}
