//! Source-NAT port allocation and reverse-NAT entries.
//!
//! The port choice matters as much as the lookup: a reused (node, port) -> (pod, port) tuple can
//! land on the pod's TIME_WAIT socket for an earlier connection. We first try the client's own
//! source port (netfilter does the same): then the pod-side tuple repeats only when the client
//! reuses its own port, so the pod's TIME_WAIT sees the same peer's growing sequence numbers and
//! timestamps, as on the direct path. Only on a collision do we fall back to random ports.
//!
//! A DNAT-only flow (local pod) keeps the client's address and normally its port too, but two
//! flows of one client from one port to two nodePorts (or node addresses) served by the same
//! pod port would reach the pod as one tuple, and their replies could not be told apart. Like
//! netfilter's implicit source-port remap (nf_nat `get_unique_tuple`), the second flow then gets
//! another source port from the SNAT range: the same allocation, with the client's address in
//! the reply key, so it never collides with the node-address SNAT entries.
use aya_ebpf::bindings::BPF_NOEXIST;
use nodeport_common::{Backend, Config, FlowKey, RevNat};

use crate::maps::{CONNTRACK, REV_NAT};

/// Attempts per allocation; bounded for the verifier and for the worst-case cost of one packet.
const SNAT_TRIES: u32 = 16;

/// The key of the reply to a flow: what arrives back at this node from the backend.
#[inline(always)]
pub fn reply_key(b: &Backend, dst_addr: u32, dst_port: u16) -> FlowKey {
    FlowKey {
        saddr: b.addr,
        daddr: dst_addr,
        sport: b.port,
        dport: dst_port,
        proto: b.proto,
        _pad: [0; 3],
    }
}

/// Whether an existing reverse entry belongs to another live flow whose replies carry exactly
/// this tuple. An entry naming `flow` itself is stale (the flow is being created anew), and one
/// whose flow has expired, is gone or has moved on may be taken over.
#[inline(always)]
fn in_use(rkey: &FlowKey, flow: &FlowKey, now: u64) -> bool {
    let Some(rn) = (unsafe { REV_NAT.get(rkey) }) else {
        return false;
    };
    let holder = rn.flow;
    if holder == *flow {
        return false;
    }
    match unsafe { CONNTRACK.get(&holder) } {
        Some(ct) => ct.expires_ns > now && ct.reply_key(&holder) == *rkey,
        None => false,
    }
}

/// Allocates a source port (network byte order) for `flow` towards backend `b`, seen by the
/// backend as coming from `nat_addr`, and records the reverse entry. The first try is the
/// client's own port when `keep_client_port` is set (a DNAT-only flow: the port only changes
/// when another live flow already reaches the pod with this tuple) or when it lies in the SNAT
/// range; the others are random ports of the range. None when every try collided with a live
/// flow.
#[inline(always)]
pub fn alloc_port(
    flow: &FlowKey,
    b: &Backend,
    nat_addr: u32,
    keep_client_port: bool,
    cfg: &Config,
    now: u64,
) -> Option<u16> {
    let min = u32::from(cfg.snat_port_min);
    let max = u32::from(cfg.snat_port_max);
    if min == 0 || max < min {
        return None;
    }
    // NonZero division compiles without a panic path (the verifier would reject one).
    let range = core::num::NonZeroU32::new(max - min + 1)?;
    let client_port = u32::from(u16::from_be(flow.sport));
    let in_range = client_port >= min && client_port <= max;
    let mut off = if in_range {
        client_port - min
    } else {
        (unsafe { aya_ebpf::helpers::bpf_get_prandom_u32() }) % range
    };
    let mut port = if keep_client_port || in_range {
        flow.sport
    } else {
        ((min + off) as u16).to_be()
    };
    let value = RevNat { flow: *flow };
    for _ in 0..SNAT_TRIES {
        let rkey = reply_key(b, nat_addr, port);
        if REV_NAT
            .insert(&rkey, &value, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            return Some(port);
        }
        // Taken: reclaim it if the flow that held it has expired or moved on.
        if !in_use(&rkey, flow, now) && REV_NAT.insert(&rkey, &value, 0).is_ok() {
            return Some(port);
        }
        off = (off + unsafe { aya_ebpf::helpers::bpf_get_prandom_u32() }) % range;
        port = ((min + off) as u16).to_be();
    }
    None
}
