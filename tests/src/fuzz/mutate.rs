//! Field-by-field mutations of a valid frame (Ethernet + IPv4 + TCP/UDP, IPv4 options allowed),
//! and checksum repair, so a mutated packet is usually "valid but odd" rather than dropped by a
//! checksum a program never looks at.
use rand::{Rng, seq::IndexedRandom};
use rand_chacha::ChaCha8Rng;

use crate::packet::{self, ICMP, TCP, UDP};

use super::world::{CLIENT_PORTS, NODE_ADDRS};

/// The longest frame a 1500-byte MTU link delivers (Ethernet header and a VLAN tag included):
/// generated NodePort packets stay within it, as real ones do.
pub const MAX_FRAME: usize = 1500 + 14 + 4;

/// Recomputes the IPv4 header checksum and, for a complete unfragmented TCP/UDP datagram, the
/// L4 checksum over the IP-length span (a zero UDP checksum stays "none"). Leaves anything it
/// cannot delimit alone.
pub fn fix_checksums(f: &mut [u8]) {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] {
        return;
    }
    let ihl = usize::from(f[14] & 0x0f) * 4;
    if ihl < 20 || 14 + ihl > f.len() {
        return;
    }
    f[24..26].fill(0);
    let c = packet::checksum(0, &f[14..14 + ihl]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    let tot = usize::from(u16::from_be_bytes([f[16], f[17]]));
    let frag = u16::from_be_bytes([f[20], f[21]]);
    let proto = f[23];
    let (min, off) = match proto {
        TCP => (20, 16),
        UDP => (8, 6),
        _ => return,
    };
    if frag & 0x3fff != 0 || tot < ihl + min || 14 + tot > f.len() {
        return;
    }
    let l4 = 14 + ihl;
    if proto == UDP && f[l4 + 6..l4 + 8] == [0, 0] {
        return;
    }
    f[l4 + off..l4 + off + 2].fill(0);
    let word = |o: usize| u32::from(u16::from_be_bytes([f[o], f[o + 1]]));
    let ph = word(26) + word(28) + word(30) + word(32) + u32::from(proto) + (tot - ihl) as u32;
    let mut c = packet::checksum(ph, &f[l4..14 + tot]);
    if proto == UDP && c == 0 {
        c = 0xffff;
    }
    f[l4 + off..l4 + off + 2].copy_from_slice(&c.to_be_bytes());
}

/// Applies one mutation; returns its name. Checksums are repaired afterwards by the caller
/// unless the mutation is about checksums.
pub fn mutate(rng: &mut ChaCha8Rng, f: &mut Vec<u8>) -> &'static str {
    let ihl = usize::from(f[14] & 0x0f) * 4;
    let l4 = 14 + ihl;
    let proto = f[23];
    let tot = usize::from(u16::from_be_bytes([f[16], f[17]]));
    // After an earlier mutation the IHL may point anywhere: L4 fields only where they exist.
    let l4_ok = ihl >= 20 && l4 + if proto == TCP { 20 } else { 8 } <= f.len();
    let set16 = |f: &mut Vec<u8>, o: usize, v: u16| f[o..o + 2].copy_from_slice(&v.to_be_bytes());
    match rng.random_range(0..18) {
        0 => {
            let t = *[0x86dd, 0x0806, 0x8100, 0x88a8, 0x0000, 0xffff, rng.random()]
                .choose(rng)
                .unwrap();
            set16(f, 12, t);
            "ethertype"
        }
        1 => {
            f[14] = (rng.random_range(0..16u8) << 4) | (f[14] & 0x0f);
            "IP version"
        }
        2 => {
            f[14] = 0x40 | rng.random_range(0..5u8);
            "IHL below 5"
        }
        3 => {
            // Claims options that are not there: the L4 header moves under the parser.
            f[14] = 0x40 | rng.random_range(6..16u8);
            "IHL above the real header"
        }
        4 => {
            let v = match rng.random_range(0..5) {
                0 => rng.random(),
                1 => tot.saturating_sub(rng.random_range(1..=tot.max(1))) as u16,
                2 => (tot + rng.random_range(1..64)) as u16,
                3 => (f.len() - 14 + rng.random_range(0..3)) as u16,
                _ => rng.random_range(0..(ihl as u16 + 20)),
            };
            set16(f, 16, v);
            "total length"
        }
        5 => {
            f[22] = *[0, 1, 2, 255].choose(rng).unwrap();
            "TTL"
        }
        6 => {
            let v = match rng.random_range(0..6) {
                0 => 0x4000,                               // DF: not a fragment
                1 => 0x2000,                               // MF: first fragment
                2 => rng.random_range(1..0x2000),          // a later fragment
                3 => 0x2000 | rng.random_range(1..0x2000), // a middle fragment
                4 => 0x8000,                               // the reserved ("evil") bit
                _ => rng.random(),
            };
            set16(f, 20, v);
            "flags and fragment offset"
        }
        7 => {
            f[23] = match rng.random_range(0..4) {
                0 => ICMP,
                1 => {
                    if proto == TCP {
                        UDP
                    } else {
                        TCP
                    }
                }
                2 => *[0, 47, 50, 132, 255].choose(rng).unwrap(),
                _ => rng.random(),
            };
            "protocol"
        }
        8 if l4_ok && proto == TCP => {
            f[l4 + 12] = (rng.random_range(0..16u8) << 4) | (f[l4 + 12] & 0x0f);
            "TCP data offset"
        }
        9 if l4_ok && proto == TCP => {
            f[l4 + 13] = rng.random();
            "TCP flags"
        }
        8 | 9 if l4_ok && proto == UDP => {
            let len = tot.saturating_sub(ihl);
            let v = *[
                0,
                7,
                8,
                len.saturating_sub(1),
                len + 1,
                rng.random_range(0..0x10000),
            ]
            .choose(rng)
            .unwrap();
            set16(f, l4 + 4, v as u16);
            "UDP length"
        }
        10 if l4_ok && proto == UDP => {
            set16(f, l4 + 6, 0);
            "UDP checksum none"
        }
        11 => {
            f[24] ^= rng.random_range(1..=255u8);
            "corrupt IPv4 checksum"
        }
        12 if l4_ok => {
            let o = if proto == TCP { l4 + 16 } else { l4 + 6 };
            f[o] ^= rng.random_range(1..=255u8);
            "corrupt L4 checksum"
        }
        13 => {
            let a: [u8; 4] = match rng.random_range(0..3) {
                0 => rng.random(),
                1 => NODE_ADDRS.choose(rng).unwrap().octets(),
                // Stay clear of the subnet's network and broadcast addresses, which the FIB never
                // forwards to and the model's FIB does not list.
                _ => [198, 18, 0, rng.random_range(100..200)],
            };
            let o = if rng.random() { 26 } else { 30 };
            f[o..o + 4].copy_from_slice(&a);
            "address"
        }
        14 if l4_ok => {
            if rng.random() {
                set16(f, l4 + 2, rng.random());
            } else {
                set16(f, l4, *CLIENT_PORTS.choose(rng).unwrap());
            }
            "port"
        }
        15 if f.len() < MAX_FRAME => {
            // Ethernet padding after the datagram.
            let n = rng.random_range(1..64).min(MAX_FRAME - f.len());
            f.extend((0..n).map(|_| rng.random::<u8>()));
            "trailing bytes"
        }
        16 => {
            let i = rng.random_range(14..f.len().min(14 + ihl + 20));
            f[i] ^= 1 << rng.random_range(0..8);
            "bit flip in the headers"
        }
        _ => {
            let i = rng.random_range(0..f.len());
            f[i] = rng.random();
            "random byte"
        }
    }
}

/// Whether a mutation's point is a wrong checksum (then it is not repaired).
pub fn breaks_checksum(name: &str) -> bool {
    name.starts_with("corrupt")
}
