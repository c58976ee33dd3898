//! The NodePort decision, independent of XDP or TC: given a parsed packet, what translation (if
//! any) applies. Map state changes (conntrack, reverse NAT, affinity) happen here; rewriting and
//! forwarding are the attach point's business.
use nodeport_common::{
    BACKEND_LOCAL, CT_LOCAL, CT_SNAT, Config, Counter, CtEntry, FlowKey, Frontend, FrontendKey,
    IPPROTO_TCP, NodeAddrKey, RevNat,
};

use crate::{
    conntrack::{Dir, account, initial_tcp_state, now_ns},
    lb,
    maps::{CONFIG, CONNTRACK, FRONTENDS, NODE_ADDRS, REV_NAT},
    nat,
    parse::Packet,
};

/// New addressing for a packet, network byte order.
#[derive(Copy, Clone)]
pub struct Nat {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
}

#[derive(Copy, Clone)]
pub struct Translation {
    pub nat: Nat,
    /// What to count it as: NewFlow, Established, Reselected or Reply.
    pub counter: Counter,
    pub svc_id: u32,
    /// The packet is source-NATed (its new source is a node address): only we can forward it.
    pub snat: bool,
}

pub enum Decision {
    Pass(Counter),
    Drop(Counter),
    Translate(Translation),
}

#[inline(always)]
fn config() -> Option<&'static Config> {
    CONFIG.get(0).filter(|c| c.snat_port_min != 0)
}

#[inline(always)]
fn flow_key(p: &Packet) -> FlowKey {
    FlowKey {
        saddr: p.saddr,
        daddr: p.daddr,
        sport: p.sport,
        dport: p.dport,
        proto: p.proto,
        _pad: [0; 3],
    }
}

/// A packet arriving on a node interface: a new or tracked NodePort flow, or a reply to a
/// source-NATed one.
#[inline(always)]
pub fn ingress(p: &Packet) -> Decision {
    if unsafe { NODE_ADDRS.get(&NodeAddrKey { addr: p.daddr }) }.is_none() {
        return Decision::Pass(Counter::PassNotNodePort);
    }
    let Some(cfg) = config() else {
        return Decision::Pass(Counter::PassNotConfigured);
    };
    if p.fragment {
        return Decision::Pass(Counter::PassFragment);
    }
    if p.proto != IPPROTO_TCP && p.proto != nodeport_common::IPPROTO_UDP {
        return Decision::Pass(Counter::PassNotNodePort);
    }
    if p.ttl <= 1 {
        return Decision::Pass(Counter::PassTtlExceeded);
    }
    let fkey = FrontendKey {
        port: p.dport,
        proto: p.proto,
        _pad: 0,
    };
    if let Some(fe) = unsafe { FRONTENDS.get(&fkey) } {
        return service(p, *fe, cfg);
    }
    let port = u16::from_be(p.dport);
    if port >= cfg.snat_port_min && port <= cfg.snat_port_max {
        return reply(p, cfg);
    }
    Decision::Pass(Counter::PassNotNodePort)
}

#[inline(always)]
fn forward_nat(p: &Packet, ct: &CtEntry) -> Nat {
    if ct.flags & CT_SNAT != 0 {
        Nat {
            saddr: ct.nat_addr,
            sport: ct.nat_port,
            daddr: ct.backend_addr,
            dport: ct.backend_port,
        }
    } else {
        Nat {
            saddr: p.saddr,
            sport: p.sport,
            daddr: ct.backend_addr,
            dport: ct.backend_port,
        }
    }
}

#[inline(always)]
fn reply_key_of(p: &Packet, ct: &CtEntry) -> FlowKey {
    let (daddr, dport) = if ct.flags & CT_SNAT != 0 {
        (ct.nat_addr, ct.nat_port)
    } else {
        (p.saddr, p.sport)
    };
    FlowKey {
        saddr: ct.backend_addr,
        daddr,
        sport: ct.backend_port,
        dport,
        proto: p.proto,
        _pad: [0; 3],
    }
}

#[inline(always)]
fn service(p: &Packet, fe: Frontend, cfg: &Config) -> Decision {
    let key = flow_key(p);
    let now = now_ns();
    let mut counter = Counter::NewFlow;
    if let Some(ctp) = CONNTRACK.get_ptr_mut(&key) {
        // Copy out: the entry may be rewritten by another CPU; we write back whole fields.
        let mut ct = unsafe { *ctp };
        if ct.expires_ns > now {
            match lb::backend(ct.backend_id) {
                Some(b) if b.addr == ct.backend_addr && b.port == ct.backend_port => {
                    account(&mut ct, p.proto, p.tcp_flags, Dir::Client, cfg, now);
                    unsafe {
                        (*ctp).tcp_state = ct.tcp_state;
                        (*ctp).expires_ns = ct.expires_ns;
                    }
                    return Decision::Translate(Translation {
                        nat: forward_nat(p, &ct),
                        counter: Counter::Established,
                        svc_id: ct.svc_id,
                        snat: ct.flags & CT_SNAT != 0,
                    });
                }
                _ => counter = Counter::Reselected,
            }
        }
        // Expired or its backend is gone: forget the old reply mapping, balance anew.
        let _ = REV_NAT.remove(&reply_key_of(p, &ct));
    }
    let (backend_id, b) = match lb::select(&fe, p.saddr, now) {
        Ok(x) => x,
        Err(c) => return Decision::Drop(c),
    };
    let mut ct = CtEntry {
        expires_ns: 0,
        backend_id,
        backend_addr: b.addr,
        backend_port: b.port,
        nat_port: 0,
        nat_addr: 0,
        svc_id: fe.svc_id,
        flags: 0,
        tcp_state: initial_tcp_state(p.proto, p.tcp_flags),
        _pad: [0; 2],
    };
    account(&mut ct, p.proto, p.tcp_flags, Dir::Client, cfg, now);
    if b.flags & BACKEND_LOCAL != 0 {
        // Local pod: DNAT only, the pod sees the client. Its reply leaves through TC egress,
        // which finds the flow by the reply's tuple.
        ct.flags = CT_LOCAL;
        let rkey = nat::reply_key(&b, p.saddr, p.sport);
        if REV_NAT.insert(&rkey, &RevNat { flow: key }, 0).is_err() {
            return Decision::Drop(Counter::DropCtInsert);
        }
    } else {
        let Some(port) = nat::alloc_snat(&key, &b, p.daddr, cfg, now) else {
            return Decision::Drop(Counter::DropSnatExhausted);
        };
        ct.flags = CT_SNAT;
        ct.nat_addr = p.daddr;
        ct.nat_port = port;
    }
    if CONNTRACK.insert(&key, &ct, 0).is_err() {
        let _ = REV_NAT.remove(&reply_key_of(p, &ct));
        return Decision::Drop(Counter::DropCtInsert);
    }
    Decision::Translate(Translation {
        nat: forward_nat(p, &ct),
        counter,
        svc_id: fe.svc_id,
        snat: ct.flags & CT_SNAT != 0,
    })
}

/// Looks up the flow a reply belongs to; checks the entry still matches (an LRU eviction or a
/// reused port must never send a reply to the wrong client) and accounts the reply.
#[inline(always)]
fn tracked_reply(p: &Packet, cfg: &Config, want: u8) -> Option<(FlowKey, u32)> {
    let rkey = flow_key(p);
    let rn = unsafe { REV_NAT.get(&rkey) }?;
    let fwd = rn.flow;
    let ctp = CONNTRACK.get_ptr_mut(&fwd)?;
    let mut ct = unsafe { *ctp };
    let now = now_ns();
    if ct.flags & want == 0
        || ct.expires_ns <= now
        || ct.backend_addr != p.saddr
        || ct.backend_port != p.sport
    {
        return None;
    }
    if want == CT_SNAT && (ct.nat_port != p.dport || ct.nat_addr != p.daddr) {
        return None;
    }
    account(&mut ct, p.proto, p.tcp_flags, Dir::Backend, cfg, now);
    unsafe {
        (*ctp).tcp_state = ct.tcp_state;
        (*ctp).expires_ns = ct.expires_ns;
    }
    Some((fwd, ct.svc_id))
}

#[inline(always)]
fn reply_nat(fwd: &FlowKey) -> Nat {
    Nat {
        saddr: fwd.daddr,
        sport: fwd.dport,
        daddr: fwd.saddr,
        dport: fwd.sport,
    }
}

/// A reply from a remote backend to a source-NATed flow, arriving at this node.
#[inline(always)]
fn reply(p: &Packet, cfg: &Config) -> Decision {
    match tracked_reply(p, cfg, CT_SNAT) {
        Some((fwd, svc_id)) => Decision::Translate(Translation {
            nat: reply_nat(&fwd),
            counter: Counter::Reply,
            svc_id,
            snat: true,
        }),
        None => Decision::Pass(Counter::PassNotNodePort),
    }
}

/// A packet leaving a node interface: a reply from a local backend to a DNAT-only flow gets its
/// node address and nodePort back as source.
#[inline(always)]
pub fn egress(p: &Packet) -> Decision {
    if p.fragment || (p.proto != IPPROTO_TCP && p.proto != nodeport_common::IPPROTO_UDP) {
        return Decision::Pass(Counter::PassNotNodePort);
    }
    let Some(cfg) = config() else {
        return Decision::Pass(Counter::PassNotConfigured);
    };
    match tracked_reply(p, cfg, CT_LOCAL) {
        Some((fwd, svc_id)) => Decision::Translate(Translation {
            nat: reply_nat(&fwd),
            counter: Counter::Reply,
            svc_id,
            snat: false,
        }),
        None => Decision::Pass(Counter::PassNotNodePort),
    }
}
