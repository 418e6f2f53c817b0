//! Kernel command-line parsing: `probe=<scenario>`, `expect_mem_mib=<N>`,
//! `expect_cpus=<N>`, `fill_mib=<N>` and the virtio scenarios' options. Unknown tokens
//! are ignored, like Linux does (`virtio_mmio.device=` tokens are read by `virtio.rs`).

use core::fmt;

/// What the VMM asked for on the command line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Args<'a> {
    /// The scenario text exactly as given (the last `probe=` wins, as in Linux).
    pub probe: Option<&'a [u8]>,
    pub expect_mem_mib: Option<u64>,
    pub expect_cpus: Option<u64>,
    /// `spin` only: fill this many MiB with the memory pattern first, verify it at the end.
    pub fill_mib: Option<u64>,
    /// `virtio-blk`: sectors to read from sector 0, sectors to write after them, and
    /// whether the disk is attached read-only (nonzero).
    pub blk_read: Option<u64>,
    pub blk_write: Option<u64>,
    pub blk_ro: Option<u64>,
    /// `virtio-vsock`: host port to connect to, guest port to accept a connection on.
    pub vsock_port: Option<u64>,
    pub vsock_listen: Option<u64>,
    /// `virtio-vsock`: after the echo, send this many KiB of a pattern on the connection to
    /// `vsock_port` (more than the host buffers while its reader pauses).
    pub vsock_bulk_kib: Option<u64>,
    /// The first malformed value. Parsing goes on so `probe` is known for the report.
    pub error: Option<ArgError<'a>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgError<'a> {
    BadNumber { key: &'static str, value: &'a [u8] },
}

impl fmt::Display for ArgError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgError::BadNumber { key, value } => write!(
                f,
                "command line: {key}={} is not a decimal number",
                crate::fmt::Ascii(value)
            ),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    Boot,
    Smp,
    /// `mem:<MiB>`; the value is in MiB and is at least 1.
    Mem(u64),
    Spin,
    TripleFault,
    Exception,
    /// Ask for a reboot as soon as the guest runs: the benchmark's trivial guest.
    Reboot,
    VirtioBlk,
    VirtioRng,
    VirtioVsock,
    VirtioNet,
    /// PCI through ACPI MCFG, ECAM and ports 0xcf8/0xcfc, with the VMM's PCI test device.
    Pci,
}

/// The command line up to its terminating NUL; `None` when `raw` holds no NUL.
pub fn until_nul(raw: &[u8]) -> Option<&[u8]> {
    raw.iter().position(|&b| b == 0).map(|i| &raw[..i])
}

/// Whitespace-separated tokens.
pub fn tokens(line: &[u8]) -> impl Iterator<Item = &[u8]> {
    line.split(|b| b.is_ascii_whitespace())
        .filter(|t| !t.is_empty())
}

/// Strict unsigned decimal: digits only, no sign, no overflow.
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &b| {
        if b.is_ascii_digit() {
            acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

pub fn parse(line: &[u8]) -> Args<'_> {
    let mut args = Args::default();
    for tok in tokens(line) {
        let Some(eq) = tok.iter().position(|&b| b == b'=') else {
            continue;
        };
        let (key, value) = (&tok[..eq], &tok[eq + 1..]);
        let slot = match key {
            b"probe" => {
                args.probe = Some(value);
                continue;
            }
            b"expect_mem_mib" => (&mut args.expect_mem_mib, "expect_mem_mib"),
            b"expect_cpus" => (&mut args.expect_cpus, "expect_cpus"),
            b"fill_mib" => (&mut args.fill_mib, "fill_mib"),
            b"blk_read" => (&mut args.blk_read, "blk_read"),
            b"blk_write" => (&mut args.blk_write, "blk_write"),
            b"blk_ro" => (&mut args.blk_ro, "blk_ro"),
            b"vsock_port" => (&mut args.vsock_port, "vsock_port"),
            b"vsock_listen" => (&mut args.vsock_listen, "vsock_listen"),
            b"vsock_bulk_kib" => (&mut args.vsock_bulk_kib, "vsock_bulk_kib"),
            _ => continue,
        };
        match parse_u64(value) {
            Some(n) => *slot.0 = Some(n),
            None => {
                args.error
                    .get_or_insert(ArgError::BadNumber { key: slot.1, value });
            }
        }
    }
    args
}

/// Maps scenario text to a scenario; `None` for anything unknown or malformed.
pub fn parse_scenario(s: &[u8]) -> Option<Scenario> {
    Some(match s {
        b"boot" => Scenario::Boot,
        b"smp" => Scenario::Smp,
        b"spin" => Scenario::Spin,
        b"triple-fault" => Scenario::TripleFault,
        b"exception" => Scenario::Exception,
        b"reboot" => Scenario::Reboot,
        b"virtio-blk" => Scenario::VirtioBlk,
        b"virtio-rng" => Scenario::VirtioRng,
        b"virtio-vsock" => Scenario::VirtioVsock,
        b"virtio-net" => Scenario::VirtioNet,
        b"pci" => Scenario::Pci,
        _ => {
            let mib = parse_u64(s.strip_prefix(b"mem:")?)?;
            // Reject 0 and sizes whose byte count would not fit in a u64.
            if mib == 0 || mib.checked_mul(1 << 20).is_none() {
                return None;
            }
            Scenario::Mem(mib)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_keys() {
        let a = parse(b"console=ttyS0 probe=mem:64  expect_mem_mib=256\texpect_cpus=2 quiet");
        assert_eq!(a.error, None);
        assert_eq!(a.probe, Some(&b"mem:64"[..]));
        assert_eq!(a.expect_mem_mib, Some(256));
        assert_eq!(a.expect_cpus, Some(2));
        assert_eq!(parse(b"probe=spin fill_mib=3").fill_mib, Some(3));
        let a = parse(
            b"probe=virtio-blk blk_read=16 blk_write=4 blk_ro=1 \
              vsock_port=5000 vsock_listen=6000 vsock_bulk_kib=1024 virtio_mmio.device=4K@0xd0001000:5",
        );
        assert_eq!(a.error, None);
        assert_eq!(
            (a.blk_read, a.blk_write, a.blk_ro),
            (Some(16), Some(4), Some(1))
        );
        assert_eq!((a.vsock_port, a.vsock_listen), (Some(5000), Some(6000)));
        assert_eq!(a.vsock_bulk_kib, Some(1024));
        assert!(parse(b"vsock_port=0x10").error.is_some());
        assert!(parse(b"blk_ro=yes").error.is_some());
    }

    #[test]
    fn missing_and_repeated() {
        assert_eq!(parse(b""), Args::default());
        assert_eq!(parse(b"   probe").probe, None);
        assert_eq!(parse(b"probe=boot probe=smp").probe, Some(&b"smp"[..]));
        assert_eq!(parse(b"probe=").probe, Some(&b""[..]));
    }

    #[test]
    fn rejects_bad_numbers() {
        let a = parse(b"expect_cpus=2x probe=smp expect_mem_mib=x");
        assert_eq!(
            a.error,
            Some(ArgError::BadNumber {
                key: "expect_cpus",
                value: b"2x"
            })
        );
        assert_eq!((a.probe, a.expect_cpus), (Some(&b"smp"[..]), None));
        assert!(parse(b"expect_mem_mib=").error.is_some());
        assert!(parse(b"expect_mem_mib=-1").error.is_some());
        assert!(parse(b"expect_mem_mib=99999999999999999999")
            .error
            .is_some());
    }

    #[test]
    fn parse_u64_edges() {
        assert_eq!(parse_u64(b"0"), Some(0));
        assert_eq!(parse_u64(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64(b"18446744073709551616"), None);
        assert_eq!(parse_u64(b"+1"), None);
        assert_eq!(parse_u64(b""), None);
    }

    #[test]
    fn scenarios() {
        assert_eq!(parse_scenario(b"boot"), Some(Scenario::Boot));
        assert_eq!(parse_scenario(b"smp"), Some(Scenario::Smp));
        assert_eq!(parse_scenario(b"spin"), Some(Scenario::Spin));
        assert_eq!(parse_scenario(b"triple-fault"), Some(Scenario::TripleFault));
        assert_eq!(parse_scenario(b"exception"), Some(Scenario::Exception));
        assert_eq!(parse_scenario(b"reboot"), Some(Scenario::Reboot));
        assert_eq!(parse_scenario(b"virtio-blk"), Some(Scenario::VirtioBlk));
        assert_eq!(parse_scenario(b"virtio-rng"), Some(Scenario::VirtioRng));
        assert_eq!(parse_scenario(b"virtio-vsock"), Some(Scenario::VirtioVsock));
        assert_eq!(parse_scenario(b"virtio-net"), Some(Scenario::VirtioNet));
        assert_eq!(parse_scenario(b"virtio-console"), None);
        assert_eq!(parse_scenario(b"pci"), Some(Scenario::Pci));
        assert_eq!(parse_scenario(b"PCI"), None);
        assert_eq!(parse_scenario(b"mem:64"), Some(Scenario::Mem(64)));
        assert_eq!(parse_scenario(b"mem:0"), None);
        assert_eq!(parse_scenario(b"mem:"), None);
        assert_eq!(parse_scenario(b"mem:1x"), None);
        assert_eq!(parse_scenario(b"mem:17592186044416"), None);
        assert_eq!(parse_scenario(b"Boot"), None);
        assert_eq!(parse_scenario(b""), None);
    }

    #[test]
    fn nul_termination() {
        assert_eq!(until_nul(b"probe=boot\0junk"), Some(&b"probe=boot"[..]));
        assert_eq!(until_nul(b"\0"), Some(&b""[..]));
        assert_eq!(until_nul(b"probe=boot"), None);
    }

    #[test]
    fn error_message() {
        let e = parse(b"expect_cpus=two").error.unwrap();
        assert_eq!(
            crate::text!("{e}").as_bytes(),
            b"command line: expect_cpus=two is not a decimal number"
        );
    }
}
