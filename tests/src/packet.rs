//! Packets for tests and benchmarks, built and checked byte by byte, independently of the eBPF
//! code: the checksums here are computed over whole headers (RFC 1071), never incrementally, so
//! a bug in the programs' incremental updates cannot hide behind the same bug here.
use std::net::Ipv4Addr;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const FIN: u8 = 0x01;
pub const RST: u8 = 0x04;

pub type Mac = [u8; 6];

/// RFC 1071 Internet checksum of `data` with an initial 32-bit sum.
pub fn checksum(initial: u32, data: &[u8]) -> u16 {
    let mut sum = initial;
    let (words, rest) = data.as_chunks::<2>();
    for w in words {
        sum += u32::from(u16::from_be_bytes(*w));
    }
    if let [last] = rest {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let s = src.octets();
    let d = dst.octets();
    u32::from(u16::from_be_bytes([s[0], s[1]]))
        + u32::from(u16::from_be_bytes([s[2], s[3]]))
        + u32::from(u16::from_be_bytes([d[0], d[1]]))
        + u32::from(u16::from_be_bytes([d[2], d[3]]))
        + u32::from(proto)
        + len as u32
}

/// A frame to build: Ethernet + IPv4 (+ options) + TCP/UDP/ICMP + payload.
#[derive(Clone, Debug)]
pub struct Frame {
    pub dst_mac: Mac,
    pub src_mac: Mac,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub ttl: u8,
    pub tcp_flags: u8,
    /// IPv4 options, a multiple of 4 bytes.
    pub ip_options: Vec<u8>,
    /// IPv4 flags+fragment offset field (host order), e.g. 0x2000 for MF.
    pub frag: u16,
    pub payload: Vec<u8>,
    /// UDP only: send a zero checksum ("none").
    pub udp_zero_checksum: bool,
}

impl Frame {
    pub fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Self {
        Self {
            dst_mac: [0x02, 0, 0, 0, 0, 0xee],
            src_mac: [0x02, 0, 0, 0, 0, 0xcc],
            src: src.0,
            dst: dst.0,
            proto: TCP,
            sport: src.1,
            dport: dst.1,
            ttl: 64,
            tcp_flags: flags,
            ip_options: Vec::new(),
            frag: 0,
            payload: Vec::new(),
            udp_zero_checksum: false,
        }
    }

    pub fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Self {
        Self {
            proto: UDP,
            tcp_flags: 0,
            payload: payload.to_vec(),
            ..Self::tcp(src, dst, 0)
        }
    }

    pub fn with_macs(mut self, src: Mac, dst: Mac) -> Self {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }

    pub fn build(&self) -> Vec<u8> {
        assert_eq!(
            self.ip_options.len() % 4,
            0,
            "IP options must pad to 4 bytes"
        );
        let l4 = self.l4();
        let ihl = 20 + self.ip_options.len();
        let tot_len = ihl + l4.len();
        let mut out = Vec::with_capacity(14 + tot_len);
        out.extend_from_slice(&self.dst_mac);
        out.extend_from_slice(&self.src_mac);
        out.extend_from_slice(&0x0800u16.to_be_bytes());
        let mut ip = vec![0u8; 20];
        ip[0] = 0x40 | (ihl / 4) as u8;
        ip[2..4].copy_from_slice(&(tot_len as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        ip[6..8].copy_from_slice(&self.frag.to_be_bytes());
        ip[8] = self.ttl;
        ip[9] = self.proto;
        ip[12..16].copy_from_slice(&self.src.octets());
        ip[16..20].copy_from_slice(&self.dst.octets());
        ip.extend_from_slice(&self.ip_options);
        let c = checksum(0, &ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        out.extend_from_slice(&ip);
        out.extend_from_slice(&l4);
        out
    }

    fn l4(&self) -> Vec<u8> {
        let mut l4 = match self.proto {
            TCP => {
                let mut h = vec![0u8; 20];
                h[0..2].copy_from_slice(&self.sport.to_be_bytes());
                h[2..4].copy_from_slice(&self.dport.to_be_bytes());
                h[4..8].copy_from_slice(&1000u32.to_be_bytes());
                let ack = if self.tcp_flags & ACK != 0 {
                    2000u32
                } else {
                    0
                };
                h[8..12].copy_from_slice(&ack.to_be_bytes());
                h[12] = 5 << 4;
                h[13] = self.tcp_flags;
                h[14..16].copy_from_slice(&64240u16.to_be_bytes());
                h
            }
            UDP => {
                let mut h = vec![0u8; 8];
                h[0..2].copy_from_slice(&self.sport.to_be_bytes());
                h[2..4].copy_from_slice(&self.dport.to_be_bytes());
                h[4..6].copy_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                h
            }
            ICMP => vec![8, 0, 0, 0, 0, 1, 0, 1],
            _ => Vec::new(),
        };
        l4.extend_from_slice(&self.payload);
        let (off, pseudo) = match self.proto {
            TCP => (16, true),
            UDP if self.udp_zero_checksum => return l4,
            UDP => (6, true),
            ICMP => (2, false),
            _ => return l4,
        };
        let init = if pseudo {
            pseudo_header_sum(self.src, self.dst, self.proto, l4.len())
        } else {
            0
        };
        let mut c = checksum(init, &l4);
        if self.proto == UDP && c == 0 {
            c = 0xffff;
        }
        l4[off..off + 2].copy_from_slice(&c.to_be_bytes());
        l4
    }
}

/// A broadcast ARP request: who has `target`? tell `sender_ip` (42 bytes).
pub fn arp_request(sender_mac: Mac, sender_ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol type: IPv4
    f.extend_from_slice(&[6, 4]); // address lengths
    f.extend_from_slice(&1u16.to_be_bytes()); // operation: request
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&sender_ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

/// A parsed view of a frame, for assertions on what a program wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub dst_mac: Mac,
    pub src_mac: Mac,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub l4_checksum: u16,
}

/// Parses an Ethernet/IPv4/TCP-or-UDP frame and verifies every checksum from scratch.
/// Returns an error naming the first thing that is wrong.
pub fn parse_and_verify(frame: &[u8]) -> Result<Parsed, String> {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return Err("not an IPv4 frame".into());
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let tot_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ip.len() < tot_len || tot_len < ihl {
        return Err(format!(
            "bad lengths: ihl {ihl}, tot_len {tot_len}, have {}",
            ip.len()
        ));
    }
    if checksum(0, &ip[..ihl]) != 0 {
        return Err("IPv4 header checksum is wrong".into());
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let proto = ip[9];
    let l4 = &ip[ihl..tot_len];
    let (sport, dport, check_off) = match proto {
        TCP | UDP => (
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
            if proto == TCP { 16 } else { 6 },
        ),
        _ => return Err(format!("unexpected protocol {proto}")),
    };
    let l4_checksum = u16::from_be_bytes([l4[check_off], l4[check_off + 1]]);
    if !(proto == UDP && l4_checksum == 0)
        && checksum(pseudo_header_sum(src, dst, proto, l4.len()), l4) != 0
    {
        return Err(format!(
            "{} checksum is wrong",
            if proto == TCP { "TCP" } else { "UDP" }
        ));
    }
    let mac = |o: usize| -> Mac { frame[o..o + 6].try_into().unwrap() };
    Ok(Parsed {
        dst_mac: mac(0),
        src_mac: mac(6),
        src,
        dst,
        ttl: ip[8],
        proto,
        sport,
        dport,
        l4_checksum,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_verify_and_known_checksum_matches() {
        // RFC 1071's worked example: the words 0x0001 0xf203 0xf4f5 0xf6f7 sum to 0xddf2.
        assert_eq!(
            checksum(0, &[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
        let a = (Ipv4Addr::new(198, 18, 0, 100), 40000);
        let b = (Ipv4Addr::new(198, 18, 0, 2), 30080);
        for f in [Frame::tcp(a, b, SYN), Frame::udp(a, b, b"hello")] {
            let p = parse_and_verify(&f.build()).unwrap();
            assert_eq!((p.src, p.sport, p.dst, p.dport), (a.0, a.1, b.0, b.1));
        }
        assert_eq!(arp_request([2; 6], a.0, b.0).len(), 42);
        let mut bad = Frame::tcp(a, b, SYN).build();
        bad[14 + 20 + 16] ^= 1;
        assert!(parse_and_verify(&bad).unwrap_err().contains("TCP checksum"));
    }
}
