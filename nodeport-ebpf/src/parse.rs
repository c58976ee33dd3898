//! Header parsing by direct packet access, shared by the XDP and TC programs. Nothing here trusts
//! the packet: every read is bounds-checked against `data_end`, lengths are checked against what
//! arrived, and anything odd is reported so the caller passes it untouched.
use nodeport_common::{Counter, IPPROTO_TCP, IPPROTO_UDP};

pub const ETH_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IP_MIN_LEN: usize = 20;
const TCP_MIN_LEN: usize = 20;
const UDP_LEN: usize = 8;
/// The most the headers we parse can span: Ethernet, IPv4 with 40 bytes of options, TCP.
pub const MAX_HEADERS: usize = ETH_LEN + 60 + TCP_MIN_LEN;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Byte offsets of the fields the programs rewrite.
pub const IP_TTL: usize = 8;
pub const IP_CHECK: usize = 10;
pub const IP_SADDR: usize = 12;
pub const IP_DADDR: usize = 16;
pub const L4_SPORT: usize = 0;
pub const L4_DPORT: usize = 2;
pub const TCP_CHECK: usize = 16;
pub const UDP_CHECK: usize = 6;

/// An IPv4 TCP or UDP packet's addressing, in network byte order as on the wire.
#[derive(Copy, Clone)]
pub struct Packet {
    /// Offset of the L4 header from the start of the frame (14 + IHL * 4).
    pub l4_off: usize,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub ttl: u8,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// Whether the IP header says this is a fragment (MF set or a non-zero offset).
    pub fragment: bool,
}

impl Packet {
    #[inline(always)]
    pub fn l4_check_off(&self) -> usize {
        self.l4_off
            + if self.proto == IPPROTO_TCP {
                TCP_CHECK
            } else {
                UDP_CHECK
            }
    }
}

/// Pointer to `len` readable bytes at `off`, or None when the packet is shorter.
#[inline(always)]
pub fn ptr_at(data: usize, data_end: usize, off: usize, len: usize) -> Option<usize> {
    let start = data + off;
    if start + len > data_end {
        return None;
    }
    Some(start)
}

#[inline(always)]
fn read_u16(p: usize) -> u16 {
    unsafe { core::ptr::read_unaligned(p as *const u16) }
}

#[inline(always)]
fn read_u32(p: usize) -> u32 {
    unsafe { core::ptr::read_unaligned(p as *const u32) }
}

/// Parses Ethernet + IPv4 + TCP/UDP. `pkt_len` is the whole packet's length: in XDP it is
/// `data_end - data`; in TC only the headers need be linear (directly readable up to
/// `data_end`), the payload may sit in page fragments, so the IP total length is checked
/// against `skb->len`. Errors say which pass counter applies.
#[inline(always)]
pub fn parse(data: usize, data_end: usize, pkt_len: usize) -> Result<Packet, Counter> {
    let eth = ptr_at(data, data_end, 0, ETH_LEN).ok_or(Counter::PassMalformed)?;
    // VLAN-tagged frames are not parsed: they pass like any other non-IPv4 frame.
    if u16::from_be(read_u16(eth + 12)) != ETH_P_IP {
        return Err(Counter::PassNotIpv4);
    }
    let ip = ptr_at(data, data_end, ETH_LEN, IP_MIN_LEN).ok_or(Counter::PassMalformed)?;
    let ver_ihl = unsafe { *(ip as *const u8) };
    if ver_ihl >> 4 != 4 {
        return Err(Counter::PassMalformed);
    }
    // The mask keeps the offset provably bounded for the verifier (IHL is 4 bits).
    let ip_len = ((ver_ihl & 0x0f) as usize) << 2;
    if ip_len < IP_MIN_LEN {
        return Err(Counter::PassMalformed);
    }
    let frag = u16::from_be(read_u16(ip + 6));
    let proto = unsafe { *((ip + 9) as *const u8) };
    let l4_off = ETH_LEN + ip_len;
    let mut pkt = Packet {
        l4_off,
        saddr: read_u32(ip + IP_SADDR),
        daddr: read_u32(ip + IP_DADDR),
        sport: 0,
        dport: 0,
        proto,
        ttl: unsafe { *((ip + IP_TTL) as *const u8) },
        tcp_flags: 0,
        fragment: frag & 0x3fff != 0,
    };
    let l4_len = match proto {
        IPPROTO_TCP => TCP_MIN_LEN,
        IPPROTO_UDP => UDP_LEN,
        _ => return Err(Counter::PassNotNodePort),
    };
    if !pkt.fragment {
        // Bounds-check the L4 header before the length checks below: LLVM would otherwise
        // derive this check from them and drop it, and the verifier cannot follow that proof.
        let l4 = ptr_at(data, data_end, l4_off & 0x7f, l4_len).ok_or(Counter::PassMalformed)?;
        pkt.sport = read_u16(l4 + L4_SPORT);
        pkt.dport = read_u16(l4 + L4_DPORT);
        if proto == IPPROTO_TCP {
            pkt.tcp_flags = unsafe { *((l4 + 13) as *const u8) };
        }
    }
    let tot_len = u16::from_be(read_u16(ip + 2)) as usize;
    if tot_len < ip_len || ETH_LEN + tot_len > pkt_len {
        return Err(Counter::PassMalformed);
    }
    // Ports are only in the first fragment; callers never translate any fragment.
    if !pkt.fragment && tot_len < ip_len + l4_len {
        return Err(Counter::PassMalformed);
    }
    Ok(pkt)
}
