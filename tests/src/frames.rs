//! Hand-built frames for BPF_PROG_TEST_RUN, byte by byte, with correct checksums: the programs
//! must see exactly what a wire would carry.

use std::net::Ipv4Addr;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const IPPROTO_UDP: u8 = 17;

fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// A broadcast ARP request: who has `target`? tell `sender_ip` (42 bytes).
pub fn arp_request(sender_mac: [u8; 6], sender_ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = ethernet([0xff; 6], sender_mac, ETH_P_ARP);
    f.extend_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
    f.extend_from_slice(&ETH_P_IP.to_be_bytes()); // protocol type: IPv4
    f.push(6); // hardware address length
    f.push(4); // protocol address length
    f.extend_from_slice(&1u16.to_be_bytes()); // operation: request
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&sender_ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

/// Internet checksum (RFC 1071) of `data`, folded, not yet complemented.
fn sum16(data: &[u8], mut acc: u32) -> u32 {
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        acc += u32::from(word);
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc
}

pub fn checksum(data: &[u8]) -> u16 {
    !(sum16(data, 0) as u16)
}

/// UDP over IPv4 over Ethernet, with valid IPv4 header and UDP checksums.
pub struct Udp4 {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub ttl: u8,
}

impl Udp4 {
    pub fn build(&self, payload: &[u8]) -> Vec<u8> {
        let udp_len = 8 + payload.len();
        let total_len = u16::try_from(20 + udp_len).expect("packet too long");

        let mut ip = Vec::with_capacity(20);
        ip.push(0x45); // version 4, IHL 5
        ip.push(0); // DSCP/ECN
        ip.extend_from_slice(&total_len.to_be_bytes());
        ip.extend_from_slice(&0x1234u16.to_be_bytes()); // identification
        ip.extend_from_slice(&0x4000u16.to_be_bytes()); // DF, offset 0
        ip.push(self.ttl);
        ip.push(IPPROTO_UDP);
        ip.extend_from_slice(&[0, 0]); // checksum, filled below
        ip.extend_from_slice(&self.src.octets());
        ip.extend_from_slice(&self.dst.octets());
        let ip_check = checksum(&ip);
        ip[10..12].copy_from_slice(&ip_check.to_be_bytes());

        let mut udp = Vec::with_capacity(udp_len);
        udp.extend_from_slice(&self.sport.to_be_bytes());
        udp.extend_from_slice(&self.dport.to_be_bytes());
        udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(payload);
        let mut pseudo = Vec::with_capacity(12);
        pseudo.extend_from_slice(&self.src.octets());
        pseudo.extend_from_slice(&self.dst.octets());
        pseudo.push(0);
        pseudo.push(IPPROTO_UDP);
        pseudo.extend_from_slice(&(udp_len as u16).to_be_bytes());
        let mut udp_check = !(sum16(&udp, sum16(&pseudo, 0)) as u16);
        if udp_check == 0 {
            udp_check = 0xffff; // 0 means "no checksum" in UDP over IPv4
        }
        udp[6..8].copy_from_slice(&udp_check.to_be_bytes());

        let mut f = ethernet(self.dst_mac, self.src_mac, ETH_P_IP);
        f.extend_from_slice(&ip);
        f.extend_from_slice(&udp);
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (complement 220d).
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            0x220d
        );
    }

    #[test]
    fn udp_frame_has_valid_checksums_and_lengths() {
        let f = Udp4 {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src: Ipv4Addr::new(198, 51, 100, 2),
            dst: Ipv4Addr::new(198, 51, 100, 1),
            sport: 40000,
            dport: 9,
            ttl: 64,
        }
        .build(b"hello");
        assert_eq!(f.len(), 14 + 20 + 8 + 5);
        assert_eq!(u16::from_be_bytes([f[12], f[13]]), ETH_P_IP);
        // A header with its checksum in place sums to 0xffff.
        assert_eq!(checksum(&f[14..34]), 0);
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&f[26..34]);
        pseudo.extend_from_slice(&[0, IPPROTO_UDP, 0, 13]);
        assert_eq!(!(sum16(&f[34..], sum16(&pseudo, 0)) as u16), 0);
    }

    #[test]
    fn arp_request_layout() {
        let f = arp_request(
            [2, 0, 0, 0, 0, 1],
            Ipv4Addr::new(198, 51, 100, 2),
            Ipv4Addr::new(198, 51, 100, 1),
        );
        assert_eq!(f.len(), 42);
        assert_eq!(&f[..6], &[0xff; 6]);
        assert_eq!(u16::from_be_bytes([f[12], f[13]]), ETH_P_ARP);
        assert_eq!(&f[38..42], &[198, 51, 100, 1]);
    }
}
