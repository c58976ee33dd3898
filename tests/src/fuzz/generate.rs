//! Seeded packet generators: random bytes; valid NodePort packets to every seeded frontend and
//! to ports and addresses that are not frontends; replies from backends and local pods for
//! tracked and untracked flows; field-by-field mutations; truncations at every byte; ICMP
//! errors quoting NodePort flows in both directions; VLAN-tagged frames.
//!
//! The stream of cases depends only on the seed and on which flows exist (never on the backend
//! or SNAT port the kernel chose at random), so a seed replays the same sequence of cases.
use std::{collections::VecDeque, net::Ipv4Addr};

use rand::{Rng, SeedableRng, seq::IndexedRandom};
use rand_chacha::ChaCha8Rng;

use crate::{
    fixture_net::{CLIENT_MAC, NODE_MAC, NODE2, NODE2_MAC},
    harness::{SNAT_MAX, SNAT_MIN},
    packet::{self, ACK, FIN, Frame, ICMP, RST, SYN, TCP, UDP},
};

use super::{
    model::{Flow, Hook, Model},
    mutate,
    world::{self, BACKENDS, CLIENT_PORTS, CLIENTS, NODE_ADDRS, SERVICES},
};

#[derive(Clone, Debug)]
pub struct Case {
    pub hook: Hook,
    pub kind: &'static str,
    pub frame: Vec<u8>,
}

pub struct Generator {
    rng: ChaCha8Rng,
    queue: VecDeque<Case>,
}

const TCP_FLAGS: [u8; 8] = [SYN, ACK, SYN | ACK, FIN | ACK, RST, RST | ACK, 0, 0xff];

impl Generator {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            queue: VecDeque::new(),
        }
    }

    fn ingress_hook(&mut self) -> Hook {
        // Most through XDP, a share through TC ingress (same contract, other rewrite code).
        if self.rng.random_ratio(1, 4) {
            Hook::TcIngress
        } else {
            Hook::Xdp
        }
    }

    pub fn next(&mut self, model: &Model) -> Case {
        if let Some(c) = self.queue.pop_front() {
            return c;
        }
        let roll = self.rng.random_range(0..1000);
        let hook = self.ingress_hook();
        let (kind, frame, hook) = match roll {
            0..100 => ("random bytes", self.random_bytes(), hook),
            100..450 => ("to a frontend", self.client_to_frontend(), hook),
            450..530 => ("not to a frontend", self.not_to_frontend(), hook),
            530..650 => ("reply from a backend", self.backend_reply(model), hook),
            650..700 => (
                "reply of a local pod",
                self.local_reply(model),
                Hook::TcEgress,
            ),
            700..900 => {
                let (kind, f) = self.mutated(model);
                (kind, f, hook)
            }
            900..940 => {
                let base = self.base(model);
                let cut = self.rng.random_range(0..=base.len());
                ("truncated", base[..cut].to_vec(), hook)
            }
            940..942 => {
                // Every cut of one valid packet, in order.
                let base = self.base(model);
                for cut in 0..base.len() {
                    self.queue.push_back(Case {
                        hook,
                        kind: "truncation sweep",
                        frame: base[..cut].to_vec(),
                    });
                }
                ("truncation sweep", base, hook)
            }
            942..970 => {
                let (f, egress) = self.icmp(model);
                let hook = if egress { Hook::TcEgress } else { hook };
                ("ICMP", f, hook)
            }
            _ => ("VLAN-tagged", self.vlan(), hook),
        };
        Case { hook, kind, frame }
    }

    /// `len` bytes of noise: a SplitMix64 stream seeded from the ChaCha stream, because
    /// ChaCha itself dominated the run time of the unoptimised test build.
    fn noise(&mut self, len: usize) -> Vec<u8> {
        let mut x: u64 = self.rng.random();
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
        out.truncate(len);
        out
    }

    fn random_bytes(&mut self) -> Vec<u8> {
        let len = self.rng.random_range(0..1600);
        let mut f = self.noise(len);
        if len >= 34 && self.rng.random() {
            // Looks like IPv4 to a NodePort address, so the parser goes further in.
            f[12..14].copy_from_slice(&[0x08, 0x00]);
            f[14] = 0x40 | (f[14] & 0x0f);
            f[30..34].copy_from_slice(&NODE_ADDRS.choose(&mut self.rng).unwrap().octets());
            if self.rng.random() {
                f[23] = *[TCP, UDP].choose(&mut self.rng).unwrap();
            }
        }
        f
    }

    fn client(&mut self) -> (Ipv4Addr, u16) {
        (
            CLIENTS.choose(&mut self.rng).unwrap().addr,
            *CLIENT_PORTS.choose(&mut self.rng).unwrap(),
        )
    }

    fn payload(&mut self) -> Vec<u8> {
        let len = match self.rng.random_range(0..10) {
            0..5 => 0,
            5..9 => self.rng.random_range(1..64),
            _ => self.rng.random_range(64..1400),
        };
        self.noise(len)
    }

    /// A frame from `src` to `dst` of `proto` with random flags, payload, sometimes IPv4
    /// options, a zero UDP checksum or Ethernet padding.
    fn frame(&mut self, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), proto: u8) -> Vec<u8> {
        let payload = self.payload();
        let mut f = if proto == UDP {
            let mut f = Frame::udp(src, dst, &payload);
            f.udp_zero_checksum = self.rng.random_ratio(1, 8);
            f
        } else {
            let mut f = Frame::tcp(src, dst, *TCP_FLAGS.choose(&mut self.rng).unwrap());
            f.payload = payload;
            f
        }
        .with_macs(CLIENT_MAC, NODE_MAC);
        f.ttl = *[64, 64, 64, 2, 255].choose(&mut self.rng).unwrap();
        if self.rng.random_ratio(1, 10) {
            let words = self.rng.random_range(1..=10);
            f.ip_options = vec![1; 4 * words]; // NOPs
            let last = f.ip_options.len() - 1;
            f.ip_options[last] = 0; // end of options
        }
        if self.rng.random_ratio(1, 8) {
            f.frag = 0x4000; // DF: not a fragment
        }
        let mut bytes = f.build();
        if self.rng.random_ratio(1, 10) && bytes.len() < mutate::MAX_FRAME {
            let n = self
                .rng
                .random_range(1..40)
                .min(mutate::MAX_FRAME - bytes.len());
            bytes.extend(std::iter::repeat_n(0, n));
        }
        bytes
    }

    fn client_to_frontend(&mut self) -> Vec<u8> {
        let svc = *SERVICES.choose(&mut self.rng).unwrap();
        let dst = *NODE_ADDRS.choose(&mut self.rng).unwrap();
        let src = self.client();
        self.frame(src, (dst, svc.node_port), svc.proto)
    }

    fn not_to_frontend(&mut self) -> Vec<u8> {
        let src = self.client();
        let proto = *[TCP, UDP].choose(&mut self.rng).unwrap();
        let dst = match self.rng.random_range(0..5) {
            // A node address, any port (the SNAT range included: a reply to no flow).
            0 | 1 => (
                *NODE_ADDRS.choose(&mut self.rng).unwrap(),
                self.rng.random(),
            ),
            // A frontend port of the other protocol.
            2 => {
                let svc = SERVICES.choose(&mut self.rng).unwrap();
                let proto = if svc.proto == TCP { UDP } else { TCP };
                return self.frame(src, (NODE_ADDRS[0], svc.node_port), proto);
            }
            // A nodePort on addresses that are not NodePort addresses.
            3 => (
                *[
                    NODE2,
                    world::BACKENDS[0].addr,
                    Ipv4Addr::new(198, 18, 0, 77),
                ]
                .choose(&mut self.rng)
                .unwrap(),
                SERVICES.choose(&mut self.rng).unwrap().node_port,
            ),
            _ => (Ipv4Addr::from(self.rng.random::<u32>()), self.rng.random()),
        };
        let dst = if world::service_for(proto, dst.1).is_some() && NODE_ADDRS.contains(&dst.0) {
            (dst.0, 1)
        } else {
            dst
        };
        self.frame(src, dst, proto)
    }

    /// A packet from a remote backend to a node address: the reply of a tracked source-NATed
    /// flow, or one that matches no flow by one field.
    fn backend_reply(&mut self, model: &Model) -> Vec<u8> {
        let i = self.rng.random::<u32>() as usize;
        let known = model.pick_flow(i, Some(false));
        let tweak = self.rng.random_range(0..10);
        let (mut src, mut dst, proto) = match known {
            Some(f) => {
                let r = f.reply();
                ((r.saddr, r.sport), (r.daddr, r.dport), r.proto)
            }
            None => {
                let b = BACKENDS.choose(&mut self.rng).unwrap();
                (
                    (b.addr, b.port),
                    (NODE_ADDRS[0], self.rng.random_range(SNAT_MIN..=SNAT_MAX)),
                    b.proto,
                )
            }
        };
        match tweak {
            0 => dst.1 = self.rng.random_range(SNAT_MIN..=SNAT_MAX),
            1 => src.1 = src.1.wrapping_add(1),
            2 => dst.0 = NODE_ADDRS[usize::from(dst.0 == NODE_ADDRS[0])],
            3 => src.0 = Ipv4Addr::new(10, 244, 2, 99),
            _ => {}
        }
        let mut f = self.frame(src, dst, proto);
        f[0..6].copy_from_slice(&NODE_MAC);
        f[6..12].copy_from_slice(&NODE2_MAC);
        f
    }

    /// A packet a local pod sends towards a client (seen on TC egress): the reply of a tracked
    /// DNAT-only flow, or one matching none.
    fn local_reply(&mut self, model: &Model) -> Vec<u8> {
        let i = self.rng.random::<u32>() as usize;
        let tweak = self.rng.random_range(0..8);
        let (src, mut dst, proto) = match model.pick_flow(i, Some(true)) {
            Some(f) => {
                let r = f.reply();
                ((r.saddr, r.sport), (r.daddr, r.dport), r.proto)
            }
            None => {
                let b = BACKENDS.iter().filter(|b| b.local).collect::<Vec<_>>();
                let b = b.choose(&mut self.rng).unwrap();
                ((b.addr, b.port), self.client(), b.proto)
            }
        };
        if tweak == 0 {
            dst.1 = dst.1.wrapping_add(1);
        }
        let mut f = self.frame(src, dst, proto);
        f[0..6].copy_from_slice(&CLIENT_MAC);
        f[6..12].copy_from_slice(&NODE_MAC);
        f
    }

    /// A valid packet to mutate or truncate.
    fn base(&mut self, model: &Model) -> Vec<u8> {
        match self.rng.random_range(0..4) {
            0 => self.backend_reply(model),
            _ => self.client_to_frontend(),
        }
    }

    fn mutated(&mut self, model: &Model) -> (&'static str, Vec<u8>) {
        let mut f = self.base(model);
        let mut kind = mutate::mutate(&mut self.rng, &mut f);
        if self.rng.random_ratio(1, 4) {
            let second = mutate::mutate(&mut self.rng, &mut f);
            if mutate::breaks_checksum(second) {
                kind = second;
            }
        }
        if !mutate::breaks_checksum(kind) && self.rng.random_ratio(7, 8) {
            mutate::fix_checksums(&mut f);
        }
        (kind, f)
    }

    fn vlan(&mut self) -> Vec<u8> {
        let mut f = self.client_to_frontend();
        let tpid: u16 = *[0x8100, 0x88a8].choose(&mut self.rng).unwrap();
        let tci: u16 = self.rng.random::<u16>() & 0x0fff;
        let mut tag = tpid.to_be_bytes().to_vec();
        tag.extend_from_slice(&tci.to_be_bytes());
        f.splice(12..12, tag);
        f
    }

    /// An ICMP error quoting a NodePort flow: from a client about a reply the node sent it,
    /// from a backend about a source-NATed packet, from a local pod (on egress) about a
    /// DNAT-only one; or an echo request. Returns the frame and whether it is egress traffic.
    fn icmp(&mut self, model: &Model) -> (Vec<u8>, bool) {
        let i = self.rng.random::<u32>() as usize;
        let (ty, code, rest): (u8, u8, [u8; 4]) = match self.rng.random_range(0..5) {
            0 => (3, 3, [0; 4]),             // port unreachable
            1 => (3, 4, [0, 0, 0x05, 0x78]), // fragmentation needed, next-hop MTU 1400
            2 => (11, 0, [0; 4]),            // time exceeded in transit
            3 => (3, 1, [0; 4]),             // host unreachable
            _ => {
                let mut f = Frame::tcp(self.client(), (NODE_ADDRS[0], 0), 0);
                f.proto = ICMP;
                return (f.with_macs(CLIENT_MAC, NODE_MAC).build(), false);
            }
        };
        let flow = model.pick_flow(i, None);
        let synthetic = || Flow {
            client: super::model::Tuple {
                saddr: CLIENTS[0].addr,
                sport: 40000,
                daddr: NODE_ADDRS[0],
                dport: SERVICES[0].node_port,
                proto: TCP,
            },
            svc_id: SERVICES[0].svc_id,
            backend: SERVICES[0].backends[0],
            snat: Some((NODE_ADDRS[0], 61000)),
            remap: None,
            closing: Default::default(),
        };
        let f = flow.unwrap_or_else(synthetic);
        let b = world::backend_by_id(f.backend);
        let c = f.client;
        // (outer source, outer destination, the quoted packet's (src, dst), egress?)
        let (outer_src, outer_dst, quoted, egress) = match (self.rng.random_range(0..3), f.snat) {
            // The client (or a router on its way) about node:nodePort -> client.
            (0, _) => (
                c.saddr,
                c.daddr,
                ((c.daddr, c.dport), (c.saddr, c.sport)),
                false,
            ),
            // The backend about node:snatPort -> backend.
            (1, Some(nat)) => (b.addr, nat.0, (nat, (b.addr, b.port)), false),
            // A local pod, leaving on egress, about client -> pod.
            _ => (
                b.addr,
                c.saddr,
                ((c.saddr, c.sport), (b.addr, b.port)),
                true,
            ),
        };
        let inner = Frame {
            ttl: 1,
            ..Frame::tcp(quoted.0, quoted.1, SYN)
        };
        let inner = Frame {
            proto: c.proto,
            ..inner
        }
        .build();
        // An ICMP error quotes the IP header and at least 8 bytes of its payload.
        let quote_len = (34 + 8 + self.rng.random_range(0..=20)).min(inner.len());
        let mut icmp = vec![ty, code, 0, 0];
        icmp.extend_from_slice(&rest);
        icmp.extend_from_slice(&inner[14..quote_len]);
        let c = packet::checksum(0, &icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let mut outer = Frame::tcp((outer_src, 0), (outer_dst, 0), 0);
        outer.proto = 255; // placeholder: no L4 header is built for it
        let mut bytes = outer.with_macs(CLIENT_MAC, NODE_MAC).build();
        bytes.extend_from_slice(&icmp);
        bytes[23] = ICMP;
        let tot = (bytes.len() - 14) as u16;
        bytes[16..18].copy_from_slice(&tot.to_be_bytes());
        mutate::fix_checksums(&mut bytes);
        (bytes, egress)
    }
}
