//! The NodePort decision, independent of XDP or TC: given a parsed packet, what translation (if
//! any) applies. Map state changes (conntrack, reverse NAT, affinity) happen here; rewriting and
//! forwarding are the attach point's business.
use nodeport_common::{
    BACKEND_LOCAL, CT_LOCAL, CT_SNAT, Config, Counter, CtEntry, FlowKey, Frontend, FrontendKey,
    IPPROTO_TCP, NodeAddrKey,
};

use crate::{
    conntrack::{Dir, account, ended, initial_tcp_state, is_syn_only, now_ns},
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

/// A SYN alone from the client on a flow that has ended (RST, or FIN both ways): a new connection
/// reusing the tuple, balanced afresh like a new flow, as netfilter does (a SYN on a TIME_WAIT
/// conntrack entry kills it and the packet goes through the NAT rules again). Keeping the old
/// backend would send it to a pod that may have left the service, or died, since. Only a bit test
/// on the fast path.
#[inline(always)]
fn reopens(ct: &CtEntry, tcp_flags: u8) -> bool {
    is_syn_only(tcp_flags) && ended(ct.tcp_state)
}

/// The forward packet's new addressing: to the backend, from the source the backend must see
/// (the node address and SNAT port, the client with a remapped port, or the client as it is).
#[inline(always)]
fn forward_nat(p: &Packet, ct: &CtEntry) -> Nat {
    let (saddr, sport) = if ct.nat_port != 0 {
        (ct.nat_addr, ct.nat_port)
    } else {
        (p.saddr, p.sport)
    };
    Nat {
        saddr,
        sport,
        daddr: ct.backend_addr,
        dport: ct.backend_port,
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
        if ct.expires_ns > now && !reopens(&ct, p.tcp_flags) {
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
        // Expired or its backend is gone: forget the old reply mapping (unless another flow
        // has taken its tuple over since), balance anew.
        let rkey = ct.reply_key(&key);
        if unsafe { REV_NAT.get(&rkey) }.is_some_and(|rn| rn.flow == key) {
            let _ = REV_NAT.remove(&rkey);
        }
    }
    let (backend_id, b) = match lb::select(&fe, p.saddr, now, false) {
        Ok(x) => x,
        // No endpoint at all: the node's stack, where nothing listens on the nodePort, refuses
        // the client at once (RST, ICMP port unreachable), as kube-proxy's REJECT rule does.
        // Without a local endpoint under externalTrafficPolicy=Local kube-proxy drops, so that
        // load balancers' health checks, not clients, find out.
        Err(Counter::DropNoBackend) => return Decision::Pass(Counter::PassNoBackend),
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
        // Local pod: DNAT only, the pod sees the client's address. Its reply leaves through TC
        // egress, which finds the flow by the reply's tuple. The client's port is kept unless
        // another live flow already reaches the pod with this tuple (same client and port to
        // another nodePort or node address): then it is remapped, or the pod could not tell the
        // two connections apart and their replies would share one translation.
        ct.flags = CT_LOCAL;
        let Some(port) = nat::alloc_port(&key, &b, p.saddr, true, cfg, now) else {
            return Decision::Drop(Counter::DropSnatExhausted);
        };
        if port != p.sport {
            ct.nat_addr = p.saddr;
            ct.nat_port = port;
        }
    } else {
        let Some(port) = nat::alloc_port(&key, &b, p.daddr, false, cfg, now) else {
            return Decision::Drop(Counter::DropSnatExhausted);
        };
        ct.flags = CT_SNAT;
        ct.nat_addr = p.daddr;
        ct.nat_port = port;
    }
    if CONNTRACK.insert(&key, &ct, 0).is_err() {
        let _ = REV_NAT.remove(&ct.reply_key(&key));
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
    // The reply must be exactly the tuple the flow's replies carry (backend, and the source the
    // backend saw: SNAT address and port, remapped port, or the client's own).
    if ct.flags & want == 0 || ct.expires_ns <= now || ct.reply_key(&fwd) != rkey {
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
