//! The e820 memory map: validation, the layout Airlock's VMM promises, and the
//! free-RAM ranges the memory test may use.

use core::fmt;

pub const RAM: u32 = 1;
/// The zero page has room for this many entries.
pub const MAX_ENTRIES: usize = 128;

/// End of the RAM below the EBDA/MP table.
pub const LOW_RAM_END: u64 = 0x9fc00;
/// Start of the RAM the kernel is loaded into.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap; RAM resumes at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
pub const FOUR_GIB: u64 = 1 << 32;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

impl Entry {
    pub const fn ram(addr: u64, end: u64) -> Self {
        Entry {
            addr,
            size: end - addr,
            kind: RAM,
        }
    }

    /// Exclusive end; saturates so a bogus entry cannot wrap around.
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }

    pub fn is_ram(&self) -> bool {
        self.kind == RAM
    }
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{:#x}, {:#x}) type {}",
            self.addr,
            self.end(),
            self.kind
        )
    }
}

pub struct Map {
    entries: [Entry; MAX_ENTRIES],
    len: usize,
    reported: u8,
}

impl Map {
    /// An empty map whose zero page claimed `reported` entries.
    pub const fn new(reported: u8) -> Self {
        Map {
            entries: [Entry {
                addr: 0,
                size: 0,
                kind: 0,
            }; MAX_ENTRIES],
            len: 0,
            reported,
        }
    }

    /// Appends an entry; entries beyond [`MAX_ENTRIES`] are dropped.
    pub fn push(&mut self, e: Entry) {
        if self.len < MAX_ENTRIES {
            self.entries[self.len] = e;
            self.len += 1;
        }
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries[..self.len]
    }

    /// The count the zero page reported (may exceed the usable entries).
    pub fn reported(&self) -> u8 {
        self.reported
    }

    pub fn ram(&self) -> impl Iterator<Item = &Entry> {
        self.entries().iter().filter(|e| e.is_ram())
    }

    /// The RAM entry that ends highest.
    pub fn highest_ram(&self) -> Option<Entry> {
        self.ram().copied().max_by_key(Entry::end)
    }

    /// Exclusive end of the highest RAM (0 when there is none).
    pub fn top_of_ram(&self) -> u64 {
        self.highest_ram().map_or(0, |e| e.end())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E820Error {
    Empty,
    TooMany(u8),
    ZeroSize {
        index: usize,
    },
    Wraps {
        index: usize,
    },
    Unsorted {
        index: usize,
    },
    Overlap {
        index: usize,
    },
    NoLowRam,
    NoHighRam,
    LayoutCount {
        mib: u64,
        got: usize,
        expected: usize,
    },
    LayoutEntry {
        mib: u64,
        index: usize,
        got: Entry,
        expected: Entry,
    },
}

impl fmt::Display for E820Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            E820Error::Empty => write!(f, "e820: the map is empty"),
            E820Error::TooMany(n) => {
                write!(
                    f,
                    "e820: {n} entries reported, the zero page holds {MAX_ENTRIES}"
                )
            }
            E820Error::ZeroSize { index } => write!(f, "e820: entry {index} has size 0"),
            E820Error::Wraps { index } => {
                write!(
                    f,
                    "e820: entry {index} runs past the end of the address space"
                )
            }
            E820Error::Unsorted { index } => {
                write!(
                    f,
                    "e820: entry {index} starts below entry {} (not sorted)",
                    index - 1
                )
            }
            E820Error::Overlap { index } => {
                write!(f, "e820: entry {index} overlaps entry {}", index - 1)
            }
            E820Error::NoLowRam => write!(f, "e820: no RAM entry starting at address 0"),
            E820Error::NoHighRam => {
                write!(
                    f,
                    "e820: no RAM entry covering {HIGH_RAM_START:#x} (the kernel load address)"
                )
            }
            E820Error::LayoutCount { mib, got, expected } => write!(
                f,
                "e820: {got} RAM entries, expected {expected} for {mib} MiB"
            ),
            E820Error::LayoutEntry {
                mib,
                index,
                got,
                expected,
            } => write!(
                f,
                "e820: RAM entry {index} is [{:#x}, {:#x}), expected [{:#x}, {:#x}) for {mib} MiB",
                got.addr,
                got.end(),
                expected.addr,
                expected.end()
            ),
        }
    }
}

/// Structural checks: sorted, non-overlapping, non-empty entries, RAM at 0 and at 1 MiB.
pub fn validate(map: &Map) -> Result<(), E820Error> {
    if usize::from(map.reported()) > MAX_ENTRIES {
        return Err(E820Error::TooMany(map.reported()));
    }
    let entries = map.entries();
    if entries.is_empty() {
        return Err(E820Error::Empty);
    }
    for (index, e) in entries.iter().enumerate() {
        if e.size == 0 {
            return Err(E820Error::ZeroSize { index });
        }
        if e.addr.checked_add(e.size).is_none() {
            return Err(E820Error::Wraps { index });
        }
        if index > 0 {
            let prev = &entries[index - 1];
            if e.addr < prev.addr {
                return Err(E820Error::Unsorted { index });
            }
            if e.addr < prev.end() {
                return Err(E820Error::Overlap { index });
            }
        }
    }
    if !map.ram().any(|e| e.addr == 0) {
        return Err(E820Error::NoLowRam);
    }
    if !map
        .ram()
        .any(|e| e.addr <= HIGH_RAM_START && HIGH_RAM_START < e.end())
    {
        return Err(E820Error::NoHighRam);
    }
    Ok(())
}

/// The RAM entries Airlock's VMM reports for a guest with `mem_bytes` of memory:
/// `[0, 0x9fc00)`, `[1 MiB, min(mem, 0xd000_0000))`, and the remainder from 4 GiB.
pub fn expected_ram(mem_bytes: u64) -> ([Entry; 3], usize) {
    let mut out = [Entry::default(); 3];
    let mut n = 0;
    let mut add = |addr: u64, end: u64| {
        if end > addr {
            out[n] = Entry::ram(addr, end);
            n += 1;
        }
    };
    add(0, mem_bytes.min(LOW_RAM_END));
    add(HIGH_RAM_START, mem_bytes.min(MMIO_GAP_START));
    add(
        FOUR_GIB,
        FOUR_GIB.saturating_add(mem_bytes.saturating_sub(MMIO_GAP_START)),
    );
    (out, n)
}

/// Checks that the RAM entries are exactly [`expected_ram`] for `mib` MiB.
pub fn check_layout(map: &Map, mib: u64) -> Result<(), E820Error> {
    let (expected, n) = expected_ram(mib.saturating_mul(1 << 20));
    let got = map.ram().count();
    for (index, (g, e)) in map.ram().zip(&expected[..n]).enumerate() {
        if g != e {
            return Err(E820Error::LayoutEntry {
                mib,
                index,
                got: *g,
                expected: *e,
            });
        }
    }
    if got != n {
        return Err(E820Error::LayoutCount {
            mib,
            got,
            expected: n,
        });
    }
    Ok(())
}

/// RAM ranges clipped to `[lo, hi)`, in map order, as `(start, end)`.
pub fn free_ranges(map: &Map, lo: u64, hi: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
    map.ram().filter_map(move |e| {
        let start = e.addr.max(lo);
        let end = e.end().min(hi);
        (start < end).then_some((start, end))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(u64, u64, u32)]) -> Map {
        let mut m = Map::new(entries.len() as u8);
        for &(addr, end, kind) in entries {
            m.push(Entry {
                addr,
                size: end - addr,
                kind,
            });
        }
        m
    }

    fn airlock(mem: u64) -> Map {
        let (e, n) = expected_ram(mem);
        let mut m = Map::new(n as u8 + 1);
        m.push(e[0]);
        m.push(Entry {
            addr: LOW_RAM_END,
            size: 0x400,
            kind: 2,
        });
        for &x in &e[1..n] {
            m.push(x);
        }
        m
    }

    #[test]
    fn expected_layouts() {
        let (e, n) = expected_ram(128 << 20);
        assert_eq!(
            &e[..n],
            &[Entry::ram(0, 0x9fc00), Entry::ram(0x100000, 128 << 20)]
        );
        let (e, n) = expected_ram(4 << 30);
        assert_eq!(
            &e[..n],
            &[
                Entry::ram(0, 0x9fc00),
                Entry::ram(0x100000, 0xd000_0000),
                Entry::ram(1 << 32, (1 << 32) + 0x3000_0000),
            ]
        );
        let (e, n) = expected_ram(0xd000_0000);
        assert_eq!(n, 2);
        assert_eq!(e[1].end(), 0xd000_0000);
        let (_, n) = expected_ram(0x100000);
        assert_eq!(n, 1);
    }

    #[test]
    fn validates_good_maps() {
        for mib in [2, 64, 128, 3328, 4096, 8192] {
            let m = airlock(mib << 20);
            assert_eq!(validate(&m), Ok(()), "{mib} MiB");
            assert_eq!(check_layout(&m, mib), Ok(()), "{mib} MiB");
        }
    }

    #[test]
    fn rejects_bad_maps() {
        assert_eq!(validate(&map(&[])), Err(E820Error::Empty));
        let mut m = map(&[(0, 0x9fc00, 1)]);
        m.reported = 129;
        assert_eq!(validate(&m), Err(E820Error::TooMany(129)));
        assert_eq!(
            validate(&map(&[(0x100000, 0x200000, 1), (0, 0x9fc00, 1)])),
            Err(E820Error::Unsorted { index: 1 })
        );
        assert_eq!(
            validate(&map(&[(0, 0x9fc00, 1), (0x9f000, 0x200000, 1)])),
            Err(E820Error::Overlap { index: 1 })
        );
        assert_eq!(
            validate(&map(&[(0, 0, 1)])),
            Err(E820Error::ZeroSize { index: 0 })
        );
        assert_eq!(
            validate(&map(&[(0x1000, 0x9fc00, 1), (0x100000, 0x200000, 1)])),
            Err(E820Error::NoLowRam)
        );
        assert_eq!(
            validate(&map(&[(0, 0x9fc00, 1), (0x100000, 0x200000, 2)])),
            Err(E820Error::NoHighRam)
        );
        let mut m = map(&[(0, 0x9fc00, 1)]);
        m.push(Entry {
            addr: u64::MAX - 5,
            size: 10,
            kind: 1,
        });
        assert_eq!(validate(&m), Err(E820Error::Wraps { index: 1 }));
    }

    #[test]
    fn layout_mismatch() {
        let m = airlock(128 << 20);
        assert_eq!(
            check_layout(&m, 64),
            Err(E820Error::LayoutEntry {
                mib: 64,
                index: 1,
                got: Entry::ram(0x100000, 128 << 20),
                expected: Entry::ram(0x100000, 64 << 20),
            })
        );
        assert_eq!(
            check_layout(&m, 4096),
            Err(E820Error::LayoutEntry {
                mib: 4096,
                index: 1,
                got: Entry::ram(0x100000, 128 << 20),
                expected: Entry::ram(0x100000, 0xd000_0000),
            })
        );
        let m = airlock(4 << 30);
        assert_eq!(
            check_layout(&m, 3328),
            Err(E820Error::LayoutCount {
                mib: 3328,
                got: 3,
                expected: 2
            })
        );
        let text = crate::text!("{}", check_layout(&m, 3328).unwrap_err());
        assert_eq!(
            text.as_bytes(),
            b"e820: 3 RAM entries, expected 2 for 3328 MiB"
        );
    }

    #[test]
    fn top_and_free_ranges() {
        let m = airlock(6 << 30);
        assert_eq!(m.top_of_ram(), (1 << 32) + (6 << 30) - 0xd000_0000);
        assert_eq!(
            m.highest_ram(),
            Some(Entry::ram(1 << 32, (1 << 32) + (6 << 30) - 0xd000_0000))
        );
        let mut r = free_ranges(&m, 0x300000, u64::MAX);
        assert_eq!(r.next(), Some((0x300000, 0xd000_0000)));
        assert_eq!(r.next(), Some((1 << 32, m.top_of_ram())));
        assert_eq!(r.next(), None);
        let mut r = free_ranges(&m, 0x300000, 1 << 32);
        assert_eq!(r.next(), Some((0x300000, 0xd000_0000)));
        assert_eq!(r.next(), None);
        assert_eq!(map(&[]).top_of_ram(), 0);
    }
}
