//! The TC attach points. Ingress does what the XDP program does where XDP cannot transmit (a veth
//! whose peer runs no XDP program, as on kind) or could not resolve the next hop; egress gives
//! replies of local backends their node address and nodePort back. Rewrites go through the
//! kernel's checksum helpers, which also keep CHECKSUM_PARTIAL skbs (locally generated or from a
//! veth) correct.
use aya_ebpf::{
    EbpfContext,
    bindings::{__sk_buff, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use nodeport_common::{Counter, IPPROTO_UDP};

use crate::{
    fib::{self, Route},
    flow::{self, Decision, Nat, Translation},
    parse::{
        self, ETH_LEN, IP_CHECK, IP_DADDR, IP_SADDR, IP_TTL, L4_DPORT, L4_SPORT, MAX_HEADERS,
        Packet,
    },
    stats::{count, count_service},
};

/// Makes the headers readable by direct access (a non-linear skb may hold them in fragments).
#[inline(always)]
fn parse(ctx: &TcContext) -> Result<Packet, Counter> {
    let linear = ctx.data_end() - ctx.data();
    if linear < MAX_HEADERS && (ctx.len() as usize) > linear {
        let want = core::cmp::min(ctx.len() as usize, MAX_HEADERS);
        let _ = ctx.skb.pull_data(want as u32);
    }
    parse::parse(ctx.data(), ctx.data_end(), ctx.len() as usize)
}

/// Whether the XDP program already judged this packet (see `xdp::JUDGED_MARK`).
#[inline(always)]
fn judged_by_xdp(ctx: &TcContext) -> bool {
    let skb = ctx.as_ptr() as *const __sk_buff;
    let (meta, data) = unsafe { ((*skb).data_meta as usize, (*skb).data as usize) };
    meta + 4 <= data
        && unsafe { core::ptr::read_unaligned(meta as *const u32) } == crate::xdp::JUDGED_MARK
}

pub fn ingress(ctx: &TcContext) -> i32 {
    if judged_by_xdp(ctx) {
        return TC_ACT_OK;
    }
    let len = ctx.len();
    let p = match parse(ctx) {
        Ok(p) => p,
        Err(c) => {
            count(c, len);
            return TC_ACT_OK;
        }
    };
    match flow::ingress(&p) {
        Decision::Pass(c) => {
            count(c, len);
            TC_ACT_OK
        }
        Decision::Drop(c) => {
            count(c, len);
            TC_ACT_SHOT
        }
        Decision::Translate(t) => forward(ctx, &p, &t, len),
    }
}

pub fn egress(ctx: &TcContext) -> i32 {
    let len = ctx.len();
    let Ok(p) = parse(ctx) else {
        // Egress traffic is not ours to judge: no counter for what we never translate.
        return TC_ACT_OK;
    };
    if let Decision::Translate(t) = flow::egress(&p) {
        if rewrite(ctx, &p, &t.nat, false).is_err() {
            count(Counter::DropRewrite, len);
            return TC_ACT_SHOT;
        }
        count(t.counter, len);
        count_service(t.svc_id, len);
    }
    TC_ACT_OK
}

fn forward(ctx: &TcContext, p: &Packet, t: &Translation, len: u32) -> i32 {
    let skb = ctx.as_ptr() as *mut __sk_buff;
    let ifindex = unsafe { (*skb).ifindex };
    let out = match fib::lookup(ctx.as_ptr(), ifindex, p.proto, &t.nat) {
        Route::Resolved { ifindex, .. } | Route::NoNeighbour { ifindex } => Some(ifindex),
        Route::None => None,
    };
    if out.is_none() && t.snat {
        count(Counter::DropNoRoute, len);
        return TC_ACT_SHOT;
    }
    if rewrite(ctx, p, &t.nat, out.is_some()).is_err() {
        count(Counter::DropRewrite, len);
        return TC_ACT_SHOT;
    }
    count(t.counter, len);
    count_service(t.svc_id, len);
    match out {
        // bpf_redirect_neigh fills in the L2 addresses from the neighbour table (resolving the
        // neighbour if needed) and transmits on `ifindex`.
        Some(ifindex) => unsafe {
            aya_ebpf::helpers::bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32
        },
        // No route for a DNAT-only packet: the stack answers as it would for any destination.
        None => TC_ACT_OK,
    }
}

/// Rewrites addresses and ports through the skb helpers; decrements the TTL when we forward.
#[inline(always)]
fn rewrite(ctx: &TcContext, p: &Packet, nat: &Nat, forwarding: bool) -> Result<(), i64> {
    let ip_check = ETH_LEN + IP_CHECK;
    let l4_check = p.l4_check_off();
    // BPF_F_MARK_MANGLED_0: a zero UDP checksum ("none") stays zero, a computed zero becomes
    // 0xffff. TCP checksums are never zero on the wire.
    let mangled = if p.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let pseudo = BPF_F_PSEUDO_HDR as u64 | mangled;
    if nat.saddr != p.saddr {
        ctx.l4_csum_replace(l4_check, p.saddr as u64, nat.saddr as u64, pseudo | 4)?;
        ctx.l3_csum_replace(ip_check, p.saddr as u64, nat.saddr as u64, 4)?;
        ctx.store(ETH_LEN + IP_SADDR, &nat.saddr, 0)?;
    }
    if nat.daddr != p.daddr {
        ctx.l4_csum_replace(l4_check, p.daddr as u64, nat.daddr as u64, pseudo | 4)?;
        ctx.l3_csum_replace(ip_check, p.daddr as u64, nat.daddr as u64, 4)?;
        ctx.store(ETH_LEN + IP_DADDR, &nat.daddr, 0)?;
    }
    if nat.sport != p.sport {
        ctx.l4_csum_replace(l4_check, p.sport as u64, nat.sport as u64, mangled | 2)?;
        ctx.store(p.l4_off + L4_SPORT, &nat.sport, 0)?;
    }
    if nat.dport != p.dport {
        ctx.l4_csum_replace(l4_check, p.dport as u64, nat.dport as u64, mangled | 2)?;
        ctx.store(p.l4_off + L4_DPORT, &nat.dport, 0)?;
    }
    if forwarding {
        let old: u16 = ctx.skb.load(ETH_LEN + IP_TTL)?;
        let mut b = old.to_ne_bytes();
        b[0] = b[0].wrapping_sub(1);
        let new = u16::from_ne_bytes(b);
        ctx.l3_csum_replace(ip_check, old as u64, new as u64, 2)?;
        ctx.store(ETH_LEN + IP_TTL, &new, 0)?;
    }
    Ok(())
}
