//! virtio-net protocol pieces: the per-frame header, the MAC address, and building and
//! parsing the Ethernet frames of the `virtio-net` scenario.

use core::fmt;

/// `VIRTIO_NET_F_MAC`: the config space holds a valid MAC address.
pub const F_MAC: u64 = 1 << 5;
/// Config space: `mac` (6 bytes) at offset 0.
pub const CONFIG_MAC: u64 = 0;

/// `struct virtio_net_hdr` with `num_buffers` (always present in virtio 1.x): flags,
/// gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers. Sent all-zero.
pub const HDR_LEN: usize = 12;
/// Longest frame without FCS or VLAN tag, and the minimum Ethernet frame.
pub const MAX_FRAME: usize = 1514;
pub const MIN_FRAME: usize = 60;
pub const ETH_HLEN: usize = 14;
pub const MAX_PAYLOAD: usize = MAX_FRAME - ETH_HLEN;
/// Receive buffer size without mergeable buffers or GSO (5.1.6.3.1).
pub const RX_BUF_LEN: usize = HDR_LEN + MAX_FRAME;

/// IEEE 802 "local experimental" ethertype the scenario uses.
pub const ETHERTYPE: u16 = 0x88b5;
pub const BROADCAST: Mac = Mac([0xff; 6]);

pub const GREETING: &[u8] = b"airlock-net-test from guest";
pub const PONG_PREFIX: &[u8] = b"pong: ";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Writes an Ethernet frame (no FCS) into `out`: the payload is cut to fit
/// [`MAX_FRAME`] and zero-padded to [`MIN_FRAME`]. Returns the frame length.
pub fn build_frame(
    out: &mut [u8; MAX_FRAME],
    dst: Mac,
    src: Mac,
    ethertype: u16,
    payload: &[u8],
) -> usize {
    out[0..6].copy_from_slice(&dst.0);
    out[6..12].copy_from_slice(&src.0);
    out[12..14].copy_from_slice(&ethertype.to_be_bytes());
    let n = payload.len().min(MAX_PAYLOAD);
    out[ETH_HLEN..ETH_HLEN + n].copy_from_slice(&payload[..n]);
    let len = (ETH_HLEN + n).max(MIN_FRAME);
    out[ETH_HLEN + n..len].fill(0);
    len
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub dst: Mac,
    pub src: Mac,
    pub ethertype: u16,
    pub payload: &'a [u8],
}

/// Splits an Ethernet frame (no FCS); `None` if shorter than the header.
pub fn parse_frame(frame: &[u8]) -> Option<Frame<'_>> {
    if frame.len() < ETH_HLEN {
        return None;
    }
    let mac = |at: usize| {
        let mut m = [0; 6];
        m.copy_from_slice(&frame[at..at + 6]);
        Mac(m)
    };
    Some(Frame {
        dst: mac(0),
        src: mac(6),
        ethertype: u16::from_be_bytes([frame[12], frame[13]]),
        payload: &frame[ETH_HLEN..],
    })
}

/// The payload as text: up to its first NUL (padding).
pub fn payload_text(payload: &[u8]) -> &[u8] {
    crate::cmdline::until_nul(payload).unwrap_or(payload)
}

/// `pong: ` followed by the received text, cut to fit one frame. Returns its length.
pub fn pong_payload(received: &[u8], out: &mut [u8; MAX_PAYLOAD]) -> usize {
    let text = payload_text(received);
    out[..PONG_PREFIX.len()].copy_from_slice(PONG_PREFIX);
    let n = text.len().min(MAX_PAYLOAD - PONG_PREFIX.len());
    out[PONG_PREFIX.len()..PONG_PREFIX.len() + n].copy_from_slice(&text[..n]);
    PONG_PREFIX.len() + n
}

/// Whether a received frame is the test's: our ethertype, not sent by ourselves (a
/// bridge or tap may reflect our own broadcast).
pub fn is_test_frame(f: &Frame<'_>, ours: Mac) -> bool {
    f.ethertype == ETHERTYPE && f.src != ours
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: Mac = Mac([0x06, 0x00, 0xac, 0x10, 0x00, 0x02]);
    const PEER: Mac = Mac([0x02, 0x42, 0x0a, 0x0b, 0x0c, 0x0d]);

    #[test]
    fn mac_text() {
        assert_eq!(crate::text!("{OURS}").as_bytes(), b"06:00:ac:10:00:02");
        assert_eq!(crate::text!("{BROADCAST}").as_bytes(), b"ff:ff:ff:ff:ff:ff");
    }

    #[test]
    fn greeting_frame() {
        let mut f = [0xaau8; MAX_FRAME];
        let len = build_frame(&mut f, BROADCAST, OURS, ETHERTYPE, GREETING);
        assert_eq!(len, 60);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &OURS.0);
        assert_eq!(&f[12..14], &[0x88, 0xb5]);
        assert_eq!(&f[14..14 + GREETING.len()], GREETING);
        assert!(f[14 + GREETING.len()..60].iter().all(|&b| b == 0));
        let p = parse_frame(&f[..len]).unwrap();
        assert_eq!((p.dst, p.src, p.ethertype), (BROADCAST, OURS, ETHERTYPE));
        assert_eq!(payload_text(p.payload), GREETING);
    }

    #[test]
    fn long_payloads_are_cut() {
        let mut f = [0u8; MAX_FRAME];
        let big = [b'x'; 2000];
        assert_eq!(build_frame(&mut f, PEER, OURS, ETHERTYPE, &big), MAX_FRAME);
        assert_eq!(build_frame(&mut f, PEER, OURS, ETHERTYPE, &big[..46]), 60);
        assert_eq!(build_frame(&mut f, PEER, OURS, ETHERTYPE, &big[..47]), 61);
        let mut p = [0u8; MAX_PAYLOAD];
        assert_eq!(pong_payload(&big, &mut p), MAX_PAYLOAD);
        assert_eq!(&p[..6], b"pong: ");
        assert_eq!(p[MAX_PAYLOAD - 1], b'x');
    }

    #[test]
    fn pong() {
        let mut p = [0u8; MAX_PAYLOAD];
        let n = pong_payload(b"hello from host\0\0\0\0", &mut p);
        assert_eq!(&p[..n], b"pong: hello from host");
        let n = pong_payload(b"", &mut p);
        assert_eq!(&p[..n], b"pong: ");
    }

    #[test]
    fn parses_and_filters() {
        assert_eq!(parse_frame(&[0; 13]), None);
        let mut f = [0u8; MAX_FRAME];
        let len = build_frame(&mut f, OURS, PEER, ETHERTYPE, b"hi");
        let p = parse_frame(&f[..len]).unwrap();
        assert!(is_test_frame(&p, OURS));
        assert_eq!(p.src, PEER);
        // IPv6 neighbour discovery noise, and our own reflected broadcast.
        let len = build_frame(&mut f, BROADCAST, PEER, 0x86dd, b"nd");
        assert!(!is_test_frame(&parse_frame(&f[..len]).unwrap(), OURS));
        let len = build_frame(&mut f, BROADCAST, OURS, ETHERTYPE, GREETING);
        assert!(!is_test_frame(&parse_frame(&f[..len]).unwrap(), OURS));
        // A bare header is a frame with an empty payload.
        assert_eq!(parse_frame(&f[..14]).unwrap().payload, b"");
    }
}
