//! An independent model of the dataplane's contract, written from docs/ARCHITECTURE.md ("Packet
//! path") and the seeded world (`world`), not from the eBPF code: for one input packet on one
//! hook it lists every outcome the design allows, and it remembers the flows the programs
//! created so that later packets of a flow, and replies to it, have exactly one right answer.
//!
//! Where the kernel's own random choices enter (the backend of a new flow, a SNAT port when the
//! client's port is taken, the remapped port of a DNAT-only flow whose tuple towards the pod is
//! taken), the model allows every choice the design allows and then learns the one taken from
//! the translated packet.
use std::{
    collections::{HashMap, hash_map::Entry},
    net::Ipv4Addr,
};

use crate::{
    harness::{
        SNAT_MAX, SNAT_MIN, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_DROP, XDP_PASS, XDP_TX,
    },
    packet::{Mac, TCP, UDP},
};

use super::world::{self, NODE_ADDRS, NODE_IF_MAC, Route, ServiceSpec};

pub const XDP_REDIRECT: u32 = 4;
pub const XDP_ABORTED: u32 = 0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    TcIngress,
    TcEgress,
}

/// An IPv4 5-tuple, host byte order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub saddr: Ipv4Addr,
    pub sport: u16,
    pub daddr: Ipv4Addr,
    pub dport: u16,
    pub proto: u8,
}

/// A flow the programs track, as the model learnt it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    /// The client's tuple: client -> node address : nodePort.
    pub client: Tuple,
    pub svc_id: u32,
    pub backend: u32,
    /// Source NAT (node address, port) for remote backends; None for local ones (DNAT only).
    pub snat: Option<(Ipv4Addr, u16)>,
    /// DNAT-only flows: the source port the pod sees instead of the client's, when another live
    /// flow already reached the pod with the client's own tuple (implicit source-port remap).
    pub remap: Option<u16>,
    /// TCP: whether the flow has ended, from the flags the programs saw (see [`tcp_account`]).
    pub closing: Closing,
}

/// The TCP flags of a flow that decide whether it has ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Closing {
    pub rst: bool,
    pub fin_client: bool,
    pub fin_backend: bool,
}

impl Closing {
    /// Reset, or FIN both ways.
    pub fn closed(self) -> bool {
        self.rst || (self.fin_client && self.fin_backend)
    }
}

const F_FIN: u8 = 0x01;
const F_SYN: u8 = 0x02;
const F_RST: u8 = 0x04;
const F_ACK: u8 = 0x10;

fn syn_only(flags: u8) -> bool {
    flags & (F_SYN | F_ACK | F_RST | F_FIN) == F_SYN
}

/// A packet's TCP flags folded into its flow: a RST or a FIN (by direction) marks it.
pub fn tcp_account(c: Closing, flags: u8, from_client: bool) -> Closing {
    let mut c = c;
    c.rst |= flags & F_RST != 0;
    if flags & F_FIN != 0 {
        if from_client {
            c.fin_client = true;
        } else {
            c.fin_backend = true;
        }
    }
    c
}

impl Flow {
    /// The tuple the backend's reply carries.
    pub fn reply(&self) -> Tuple {
        let b = world::backend_by_id(self.backend);
        let (daddr, dport) = self
            .snat
            .unwrap_or((self.client.saddr, self.remap.unwrap_or(self.client.sport)));
        Tuple {
            saddr: b.addr,
            sport: b.port,
            daddr,
            dport,
            proto: self.client.proto,
        }
    }
}

/// The fields of an IPv4 TCP/UDP packet the contract talks about, read independently of
/// `parse.rs`.
#[derive(Clone, Copy, Debug)]
pub struct View {
    pub frame_len: usize,
    pub ihl: usize,
    pub tot_len: usize,
    pub l4_off: usize,
    pub ttl: u8,
    pub tuple: Tuple,
    /// TCP header length or UDP length field disagree with the IP lengths.
    pub l4_lengths_odd: bool,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
}

impl View {
    pub fn l4_check_off(&self) -> usize {
        self.l4_off + if self.tuple.proto == TCP { 16 } else { 6 }
    }
}

/// Reads a frame as the design's parser must: anything but a complete, unfragmented IPv4
/// TCP/UDP datagram (header, options and L4 header within the IP total length, the total length
/// within what arrived; trailing bytes are Ethernet padding) is a reason to pass it untouched.
pub fn view(frame: &[u8]) -> Result<View, &'static str> {
    if frame.len() < 14 {
        return Err("shorter than an Ethernet header");
    }
    if frame[12..14] != [0x08, 0x00] {
        return Err("not IPv4 (ethertype)");
    }
    let ip = &frame[14..];
    if ip.len() < 20 {
        return Err("truncated IPv4 header");
    }
    if ip[0] >> 4 != 4 {
        return Err("IP version is not 4");
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ihl < 20 {
        return Err("IHL below 5");
    }
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    if frag & 0x2000 != 0 || frag & 0x1fff != 0 {
        return Err("a fragment");
    }
    let proto = ip[9];
    let l4_min = match proto {
        TCP => 20,
        UDP => 8,
        _ => return Err("not TCP or UDP"),
    };
    let tot_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if tot_len > ip.len() {
        return Err("total length beyond the frame (truncated)");
    }
    if tot_len < ihl + l4_min {
        return Err("total length leaves no room for the headers");
    }
    let l4_off = 14 + ihl;
    let l4 = &frame[l4_off..14 + tot_len];
    let l4_len = l4.len();
    let l4_lengths_odd = match proto {
        TCP => {
            let doff = usize::from(l4[12] >> 4) * 4;
            doff < 20 || doff > l4_len
        }
        _ => usize::from(u16::from_be_bytes([l4[4], l4[5]])) != l4_len,
    };
    let addr = |o: usize| Ipv4Addr::new(ip[o], ip[o + 1], ip[o + 2], ip[o + 3]);
    Ok(View {
        frame_len: frame.len(),
        ihl,
        tot_len,
        l4_off,
        ttl: ip[8],
        tuple: Tuple {
            saddr: addr(12),
            sport: u16::from_be_bytes([l4[0], l4[1]]),
            daddr: addr(16),
            dport: u16::from_be_bytes([l4[2], l4[3]]),
            proto,
        },
        l4_lengths_odd,
        tcp_flags: if proto == TCP { l4[13] } else { 0 },
    })
}

/// How the translated source port must look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortRule {
    Exactly(u16),
    /// A new source-NATed flow: the client's port when it is in the SNAT range and free for
    /// this (backend, node address), else any port of the range that no live flow to that
    /// backend from that node address holds.
    NewSnat {
        client_port_if_free: Option<u16>,
        backend: u32,
        nat_addr: Ipv4Addr,
        /// The new flow (a reopened flow may have its own old port back).
        flow: Tuple,
    },
    /// A new DNAT-only flow: the client's port when no live flow reaches the pod (backend)
    /// from this client address with it, else any port of the SNAT range for which none does.
    NewLocal {
        client_port_if_free: Option<u16>,
        backend: u32,
        client_addr: Ipv4Addr,
        flow: Tuple,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    None,
    /// The translation creates this flow (its SNAT port is read from the packet).
    NewFlow {
        client: Tuple,
        svc_id: u32,
        backend: u32,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rewrite {
    pub verdict: u32,
    /// XDP_PASS only: whether the XDP "judged" mark must (Some(true)) or must not be there.
    pub marked: Option<bool>,
    pub saddr: Ipv4Addr,
    pub sport: PortRule,
    pub daddr: Ipv4Addr,
    pub dport: u16,
    /// (source, destination) MACs when the program transmits the frame itself.
    pub macs: Option<(Mac, Mac)>,
    pub ttl_dec: bool,
    pub effect: Effect,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// BPF_PROG_TEST_RUN refuses the input (shorter than an Ethernet header).
    Refused,
    Unchanged {
        verdict: u32,
        marked: Option<bool>,
    },
    Dropped {
        verdict: u32,
    },
    Translated(Rewrite),
}

#[derive(Clone, Debug)]
pub struct Prediction {
    /// The class of the packet, for statistics and failure reports.
    pub class: &'static str,
    pub view: Option<View>,
    pub allowed: Vec<Outcome>,
}

#[derive(Default)]
pub struct Model {
    flows: HashMap<Tuple, Flow>,
    /// Insertion order of `flows`, so generators pick known flows deterministically.
    order: Vec<Tuple>,
    order_local: Vec<Tuple>,
    order_snat: Vec<Tuple>,
    /// Reply tuple of a source-NATed flow -> the flow's client tuple.
    snat_rev: HashMap<Tuple, Tuple>,
    /// Reply tuple of a DNAT-only flow -> the flow's client tuple. One flow per tuple: a client
    /// using one source port towards two nodePorts (or node addresses) served by the same local
    /// pod gets its port remapped on the second flow.
    local_rev: HashMap<Tuple, Tuple>,
    /// ClientIP affinity: (service, client address) -> backend.
    affinity: HashMap<(u32, Ipv4Addr), u32>,
    /// DNAT-only flows created with a remapped source port (see `local_rev`), over the run.
    pub local_port_remaps: u64,
}

fn unchanged(hook: Hook) -> Outcome {
    match hook {
        Hook::Xdp => Outcome::Unchanged {
            verdict: XDP_PASS,
            marked: Some(true),
        },
        _ => Outcome::Unchanged {
            verdict: TC_ACT_OK,
            marked: None,
        },
    }
}

fn dropped(hook: Hook) -> Outcome {
    Outcome::Dropped {
        verdict: if hook == Hook::Xdp {
            XDP_DROP
        } else {
            TC_ACT_SHOT
        },
    }
}

/// BPF_PROG_TEST_RUN for skb programs refuses (EINVAL) an IPv4 frame whose IP header, options
/// included, did not arrive whole (an IPv6 one likewise): the kernel reads it to set up the test socket before the
/// program runs, so such a frame never reaches the TC programs that way.
fn tc_test_run_refuses(frame: &[u8]) -> bool {
    match frame.get(12..14) {
        Some([0x08, 0x00]) => {
            frame.len() < 34 || frame.len() < 14 + usize::from(frame[14] & 0x0f) * 4
        }
        Some([0x86, 0xdd]) => frame.len() < 14 + 40,
        _ => false,
    }
}

fn in_snat_range(port: u16) -> bool {
    (SNAT_MIN..=SNAT_MAX).contains(&port)
}

/// Addressing after translation, before the hook decides how it leaves.
struct Nat {
    saddr: Ipv4Addr,
    sport: PortRule,
    daddr: Ipv4Addr,
    dport: u16,
    /// Source-NATed (only this node can forward it back): replies and remote backends.
    snat: bool,
    effect: Effect,
}

/// How a translated packet leaves, per hook, from the FIB of the fixture namespace:
/// - XDP: next hop resolved on the ingress interface -> XDP_TX with the FIB's MACs and TTL - 1;
///   resolved elsewhere -> XDP_REDIRECT if source-NATed, else XDP_PASS (the stack forwards a
///   DNAT-only packet); unresolved -> a source-NATed packet goes up untranslated for TC
///   (unmarked), a DNAT-only one up translated.
/// - TC ingress: any route -> TC_ACT_REDIRECT (bpf_redirect_neigh fills the MACs later),
///   TTL - 1; no route -> a source-NATed packet is dropped, a DNAT-only one goes to the stack.
/// - TC egress (replies of local pods): TC_ACT_OK, addresses only.
fn leave(hook: Hook, v: &View, nat: Nat) -> Outcome {
    let rw = |verdict, marked, macs, ttl_dec| {
        Outcome::Translated(Rewrite {
            verdict,
            marked,
            saddr: nat.saddr,
            sport: nat.sport,
            daddr: nat.daddr,
            dport: nat.dport,
            macs,
            ttl_dec,
            effect: nat.effect,
        })
    };
    // For an skb the kernel's FIB lookup also checks the egress MTU (without a tot_len from
    // the caller, the skb's length against MTU + Ethernet + VLAN header) and fails with
    // FRAG_NEEDED, which the design treats like no route. XDP's lookup has no such check.
    let route = if hook != Hook::Xdp && v.frame_len > world::MTU + 14 + 4 {
        Route::None
    } else {
        world::route(nat.daddr)
    };
    match hook {
        Hook::Xdp => match route {
            Route::NodeIf(mac) => rw(XDP_TX, None, Some((NODE_IF_MAC, mac)), true),
            Route::PodIf(mac) if nat.snat => rw(
                XDP_REDIRECT,
                None,
                Some((crate::fixture_net::POD_GW_MAC, mac)),
                true,
            ),
            Route::PodIf(_) => rw(XDP_PASS, Some(true), None, false),
            Route::NoNeighbour | Route::None if nat.snat => {
                assert_eq!(
                    nat.effect,
                    Effect::None,
                    "fuzz world: a new flow's next hop must resolve, or the model cannot learn \
                     its SNAT port"
                );
                Outcome::Unchanged {
                    verdict: XDP_PASS,
                    marked: Some(false),
                }
            }
            // DNAT-only to a pod whose neighbour is unresolved: up, translated and marked
            // (finding 1 of docs/RELIABILITY.md, fixed; tests/tests/fuzz_findings.rs).
            Route::NoNeighbour | Route::None => rw(XDP_PASS, Some(true), None, false),
        },
        Hook::TcIngress => match route {
            Route::None if nat.snat => {
                assert_eq!(nat.effect, Effect::None, "fuzz world: backends are routed");
                dropped(hook)
            }
            Route::None => rw(TC_ACT_OK, None, None, false),
            _ => rw(TC_ACT_REDIRECT, None, None, true),
        },
        Hook::TcEgress => rw(TC_ACT_OK, None, None, false),
    }
}

impl Model {
    pub fn flows(&self) -> usize {
        self.flows.len()
    }

    /// The `i`-th known flow (modulo their number) in creation order: of all flows, or only the
    /// DNAT-only (`Some(true)`) or source-NATed (`Some(false)`) ones.
    pub fn pick_flow(&self, i: usize, local: Option<bool>) -> Option<Flow> {
        let list = match local {
            None => &self.order,
            Some(true) => &self.order_local,
            Some(false) => &self.order_snat,
        };
        if list.is_empty() {
            return None;
        }
        Some(self.flows[&list[i % list.len()]])
    }

    pub fn all_flows(&self) -> impl Iterator<Item = &Flow> {
        self.order.iter().map(|t| &self.flows[t])
    }

    /// Forgets every flow and affinity (the runner clears the kernel's tables at the same time).
    pub fn clear(&mut self) {
        let remaps = self.local_port_remaps;
        *self = Self::default();
        self.local_port_remaps = remaps;
    }

    pub fn predict(&self, hook: Hook, frame: &[u8]) -> Prediction {
        if frame.len() < 14 {
            return Prediction {
                class: "shorter than an Ethernet header",
                view: None,
                allowed: vec![Outcome::Refused, unchanged(hook)],
            };
        }
        let v = match view(frame) {
            Ok(v) => v,
            Err(class) => {
                let mut allowed = vec![unchanged(hook)];
                if hook != Hook::Xdp && tc_test_run_refuses(frame) {
                    allowed.push(Outcome::Refused);
                }
                return Prediction {
                    class,
                    view: None,
                    allowed,
                };
            }
        };
        let (class, mut allowed) = match hook {
            Hook::Xdp | Hook::TcIngress => self.ingress(hook, &v),
            Hook::TcEgress => self.egress(&v),
        };
        // The ports and checksum sit at fixed offsets, so a TCP data offset or UDP length that
        // disagrees with the IP length does not stop a correct translation; the design may as
        // well leave such a packet to the stack, which drops it.
        if v.l4_lengths_odd && !allowed.contains(&unchanged(hook)) {
            allowed.push(unchanged(hook));
        }
        Prediction {
            class,
            view: Some(v),
            allowed,
        }
    }

    fn ingress(&self, hook: Hook, v: &View) -> (&'static str, Vec<Outcome>) {
        let t = v.tuple;
        if !NODE_ADDRS.contains(&t.daddr) {
            return ("not to a NodePort address", vec![unchanged(hook)]);
        }
        if v.ttl <= 1 {
            return ("TTL 0 or 1", vec![unchanged(hook)]);
        }
        if let Some(svc) = world::service_for(t.proto, t.dport) {
            return self.service(hook, v, svc);
        }
        if in_snat_range(t.dport) {
            return match self.snat_rev.get(&t) {
                Some(client) => {
                    let f = self.flows[client];
                    let nat = Nat {
                        saddr: f.client.daddr,
                        sport: PortRule::Exactly(f.client.dport),
                        daddr: f.client.saddr,
                        dport: f.client.sport,
                        snat: true,
                        effect: Effect::None,
                    };
                    ("reply to a tracked flow", vec![leave(hook, v, nat)])
                }
                None => ("reply-like, no tracked flow", vec![unchanged(hook)]),
            };
        }
        ("node address, not a nodePort", vec![unchanged(hook)])
    }

    fn forward_nat(&self, f: &Flow, effect: Effect, sport: Option<PortRule>) -> Nat {
        let b = world::backend_by_id(f.backend);
        let (saddr, sport) = match (b.local, f.snat) {
            (true, _) => (
                f.client.saddr,
                sport.unwrap_or(PortRule::Exactly(f.remap.unwrap_or(f.client.sport))),
            ),
            (false, Some((a, p))) => (a, PortRule::Exactly(p)),
            (false, None) => (f.client.daddr, sport.expect("SNAT rule of a new flow")),
        };
        Nat {
            saddr,
            sport,
            daddr: b.addr,
            dport: b.port,
            snat: !b.local,
            effect,
        }
    }

    fn service(&self, hook: Hook, v: &View, svc: &ServiceSpec) -> (&'static str, Vec<Outcome>) {
        let t = v.tuple;
        if let Some(f) = self.flows.get(&t)
            && !(f.closing.closed() && syn_only(v.tcp_flags))
        {
            return (
                "tracked flow",
                vec![leave(hook, v, self.forward_nat(f, Effect::None, None))],
            );
        }
        if svc.backends.is_empty() && svc.etp_local {
            // kube-proxy drops when externalTrafficPolicy=Local finds no local endpoint.
            return ("new flow, no local backend", vec![dropped(hook)]);
        }
        if svc.backends.is_empty() {
            // Handed to the node's stack untouched, which refuses it (kube-proxy's REJECT).
            return ("new flow, service without backends", vec![unchanged(hook)]);
        }
        let pinned = if svc.affinity {
            self.affinity.get(&(svc.svc_id, t.saddr)).copied()
        } else {
            None
        };
        let candidates: Vec<u32> = match pinned {
            Some(b) => vec![b],
            None => svc.backends.to_vec(),
        };
        let allowed = candidates
            .into_iter()
            .map(|backend| {
                let b = world::backend_by_id(backend);
                // The reply tuple if the client's port is kept: towards the node address with
                // SNAT, towards the client itself for a local pod (DNAT only).
                let reply_base = Tuple {
                    saddr: b.addr,
                    sport: b.port,
                    daddr: if b.local { t.saddr } else { t.daddr },
                    dport: t.sport,
                    proto: t.proto,
                };
                let flow = Flow {
                    client: t,
                    svc_id: svc.svc_id,
                    backend,
                    snat: None,
                    remap: None,
                    closing: Closing::default(),
                };
                // A reopened flow's own old reply tuple is free for it (the programs drop the old
                // mapping first).
                let free = |table: &HashMap<Tuple, Tuple>| {
                    table.get(&reply_base).is_none_or(|holder| *holder == t)
                };
                let rule = if b.local {
                    PortRule::NewLocal {
                        client_port_if_free: free(&self.local_rev).then_some(t.sport),
                        backend,
                        client_addr: t.saddr,
                        flow: t,
                    }
                } else {
                    // A reopened flow (an ended one made anew by a SYN) is only held to "a port
                    // no other live flow holds": the programs free its old mapping first, and
                    // the model does not follow every way an old mapping can end.
                    let reopened = self.flows.contains_key(&t);
                    let free = !reopened && in_snat_range(t.sport) && free(&self.snat_rev);
                    PortRule::NewSnat {
                        client_port_if_free: free.then_some(t.sport),
                        backend,
                        nat_addr: t.daddr,
                        flow: t,
                    }
                };
                let effect = Effect::NewFlow {
                    client: t,
                    svc_id: svc.svc_id,
                    backend,
                };
                leave(hook, v, self.forward_nat(&flow, effect, Some(rule)))
            })
            .collect();
        (
            if pinned.is_some() {
                "new flow, affinity-pinned"
            } else {
                "new flow"
            },
            allowed,
        )
    }

    fn egress(&self, v: &View) -> (&'static str, Vec<Outcome>) {
        let hook = Hook::TcEgress;
        match self.local_rev.get(&v.tuple) {
            Some(client) => {
                let f = self.flows[client];
                let nat = Nat {
                    saddr: f.client.daddr,
                    sport: PortRule::Exactly(f.client.dport),
                    daddr: f.client.saddr,
                    dport: f.client.sport,
                    snat: false,
                    effect: Effect::None,
                };
                (
                    if f.remap.is_some() {
                        "reply of a local pod to a tracked flow with a remapped port"
                    } else {
                        "reply of a local pod to a tracked flow"
                    },
                    vec![leave(hook, v, nat)],
                )
            }
            None => ("egress, no tracked local flow", vec![unchanged(hook)]),
        }
    }

    /// Whether `port` may be the (SNAT or remapped) source port of a new flow under `rule`.
    pub fn snat_port_ok(&self, rule: &PortRule, proto: u8, port: u16) -> Result<(), String> {
        let (client_port_if_free, backend, to, flow, held_by) = match *rule {
            PortRule::Exactly(p) if p == port => return Ok(()),
            PortRule::Exactly(p) => return Err(format!("source port {port}, expected {p}")),
            PortRule::NewSnat {
                client_port_if_free,
                backend,
                nat_addr,
                flow,
            } => (client_port_if_free, backend, nat_addr, flow, &self.snat_rev),
            PortRule::NewLocal {
                client_port_if_free,
                backend,
                client_addr,
                flow,
            } => (
                client_port_if_free,
                backend,
                client_addr,
                flow,
                &self.local_rev,
            ),
        };
        let what = match rule {
            PortRule::NewLocal { .. } => "remapped port",
            _ => "SNAT port",
        };
        if let Some(p) = client_port_if_free {
            return if p == port {
                Ok(())
            } else {
                Err(format!(
                    "{what} {port}: the client's port {p} is free (and in the SNAT range for \
                     SNAT), so it must be kept"
                ))
            };
        }
        let b = world::backend_by_id(backend);
        let reply = Tuple {
            saddr: b.addr,
            sport: b.port,
            daddr: to,
            dport: port,
            proto,
        };
        if !in_snat_range(port) {
            Err(format!("{what} {port} outside {SNAT_MIN}-{SNAT_MAX}"))
        } else if let Some(holder) = held_by.get(&reply).filter(|h| **h != flow) {
            Err(format!(
                "{what} {port} from {to} towards {}:{} is held by the live flow {holder:?}",
                b.addr, b.port
            ))
        } else {
            Ok(())
        }
    }

    /// Learns from the outcome the programs produced for the packet `v` (one the prediction
    /// allowed): a new flow, or the TCP flags of a tracked one. The programs fold a tracked
    /// flow's flags in as soon as they recognise the flow, before deciding how the packet leaves
    /// (a packet they then hand up untranslated still counts), so any outcome counts here.
    pub fn observe(&mut self, hook: Hook, v: &View, outcome: &Outcome, out_sport: Option<u16>) {
        let new_flow = match *outcome {
            Outcome::Translated(Rewrite {
                effect:
                    Effect::NewFlow {
                        client,
                        svc_id,
                        backend,
                    },
                saddr,
                ..
            }) => Some((client, svc_id, backend, saddr)),
            _ => None,
        };
        let Some((client, svc_id, backend, saddr)) = new_flow else {
            if v.tuple.proto == TCP {
                // Which flow the programs recognise the packet as, as `predict` does: on ingress
                // a client's packet to a frontend or a reply to a source-NATed flow, on egress a
                // local pod's reply.
                let t = v.tuple;
                let (key, from_client) = match hook {
                    Hook::TcEgress => (self.local_rev.get(&t).copied(), false),
                    _ if !NODE_ADDRS.contains(&t.daddr) || v.ttl <= 1 => (None, false),
                    _ if world::service_for(t.proto, t.dport).is_some() => {
                        (self.flows.contains_key(&t).then_some(t), true)
                    }
                    _ if in_snat_range(t.dport) => (self.snat_rev.get(&t).copied(), false),
                    _ => (None, false),
                };
                if let Some(f) = key.and_then(|k| self.flows.get_mut(&k)) {
                    f.closing = tcp_account(f.closing, v.tcp_flags, from_client);
                }
            }
            return;
        };
        // A SYN on an ended flow made it anew: its old reply mapping goes first, as in the
        // programs.
        if let Some(old) = self.flows.get(&client).copied() {
            let table = if old.snat.is_some() {
                &mut self.snat_rev
            } else {
                &mut self.local_rev
            };
            if table.get(&old.reply()) == Some(&client) {
                table.remove(&old.reply());
            }
        }
        let b = world::backend_by_id(backend);
        let sport = out_sport.expect("translated source port");
        let flow = Flow {
            client,
            svc_id,
            backend,
            snat: (!b.local).then_some((saddr, sport)),
            remap: (b.local && sport != client.sport).then_some(sport),
            closing: if client.proto == TCP {
                tcp_account(Closing::default(), v.tcp_flags, true)
            } else {
                Closing::default()
            },
        };
        let reply = flow.reply();
        if flow.snat.is_some() {
            let prev = self.snat_rev.insert(reply, client);
            assert!(prev.is_none(), "model: SNAT reply tuple reused");
        } else {
            let prev = self.local_rev.insert(reply, client);
            assert!(prev.is_none(), "model: local reply tuple reused");
            if flow.remap.is_some() {
                self.local_port_remaps += 1;
            }
        }
        let svc = world::SERVICES
            .iter()
            .find(|s| s.svc_id == svc_id)
            .expect("world service");
        if svc.affinity {
            self.affinity.insert((svc_id, client.saddr), backend);
        }
        match self.flows.entry(client) {
            // Only an ended flow is made anew under its key (a SYN reusing its tuple).
            Entry::Occupied(mut e) => {
                assert!(
                    e.get().closing.closed(),
                    "model: flow {client:?} created twice while live"
                );
                e.insert(flow);
                let list = if flow.snat.is_some() {
                    &mut self.order_snat
                } else {
                    &mut self.order_local
                };
                if !list.contains(&client) {
                    list.push(client);
                }
            }
            Entry::Vacant(e) => {
                e.insert(flow);
                self.order.push(client);
                if flow.snat.is_some() {
                    self.order_snat.push(client);
                } else {
                    self.order_local.push(client);
                }
            }
        }
    }
}

pub fn verdict_name(hook: Hook, v: u32) -> &'static str {
    match (hook, v) {
        (Hook::Xdp, XDP_ABORTED) => "XDP_ABORTED",
        (Hook::Xdp, XDP_DROP) => "XDP_DROP",
        (Hook::Xdp, XDP_PASS) => "XDP_PASS",
        (Hook::Xdp, XDP_TX) => "XDP_TX",
        (Hook::Xdp, XDP_REDIRECT) => "XDP_REDIRECT",
        (Hook::Xdp, _) => "unknown XDP verdict",
        (_, TC_ACT_OK) => "TC_ACT_OK",
        (_, TC_ACT_SHOT) => "TC_ACT_SHOT",
        (_, TC_ACT_REDIRECT) => "TC_ACT_REDIRECT",
        _ => "unknown TC verdict",
    }
}
