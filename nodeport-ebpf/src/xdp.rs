//! The XDP attach point: translate in place and transmit straight back out (XDP_TX) or to another
//! interface (XDP_REDIRECT) when the FIB resolves the next hop. What XDP cannot finish goes up:
//! DNAT-only packets (the client stays the source) to the stack, which forwards them like any
//! routed packet; source-NATed ones untranslated to the TC ingress program attached beside us,
//! which finds the conntrack entry we just made and resolves the neighbour itself.
use aya_ebpf::{
    EbpfContext,
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX},
    programs::XdpContext,
};
use nodeport_common::{Counter, IPPROTO_UDP};

use crate::{
    csum::Delta,
    fib::{self, Route},
    flow::{self, Decision, Nat, Translation},
    parse::{
        self, ETH_LEN, IP_CHECK, IP_DADDR, IP_SADDR, IP_TTL, L4_DPORT, L4_SPORT, Packet, ptr_at,
    },
    stats::{count, count_service},
};

/// Marks a packet XDP has fully judged before handing it to the stack, in XDP metadata: the TC
/// ingress program attached beside us (as fallback) then lets it through at once, so it is
/// neither processed nor counted twice. A packet handed up for TC to translate carries no mark.
pub const JUDGED_MARK: u32 = 0x4e50_4a44; // "NPJD"

#[inline(always)]
fn pass_judged(ctx: &XdpContext) -> u32 {
    // Best effort: a driver without metadata support just costs TC a second look.
    if unsafe { aya_ebpf::helpers::bpf_xdp_adjust_meta(ctx.ctx, -4) } == 0 {
        let (meta, data) = (ctx.metadata(), ctx.data());
        if meta + 4 <= data && data <= ctx.data_end() {
            store(meta, JUDGED_MARK);
        }
    }
    XDP_PASS
}

pub fn run(ctx: &XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    let len = (end - data) as u32;
    let p = match parse::parse(data, end, len as usize) {
        Ok(p) => p,
        Err(c) => {
            count(c, len);
            return pass_judged(ctx);
        }
    };
    match flow::ingress(&p) {
        Decision::Pass(c) => {
            count(c, len);
            pass_judged(ctx)
        }
        Decision::Drop(c) => {
            count(c, len);
            XDP_DROP
        }
        Decision::Translate(t) => forward(ctx, &p, &t, len),
    }
}

fn forward(ctx: &XdpContext, p: &Packet, t: &Translation, len: u32) -> u32 {
    let ifindex = ctx.ingress_ifindex() as u32;
    let (action, out_ifindex, macs) = match fib::lookup(ctx.as_ptr(), ifindex, p.proto, &t.nat) {
        Route::Resolved {
            ifindex: out,
            smac,
            dmac,
        } => (
            if out == ifindex { XDP_TX } else { XDP_REDIRECT },
            out,
            Some((smac, dmac)),
        ),
        Route::NoNeighbour { .. } | Route::None if !t.snat => (XDP_PASS, 0, None),
        _ => {
            count(Counter::PassFibMiss, len);
            return XDP_PASS;
        }
    };
    if !t.snat && action != XDP_TX {
        // Another interface (a local pod's veth): the stack forwards a DNAT-only packet fine,
        // and redirecting into a veth needs an XDP program on its peer, which a pod never has.
        // The same when the pod's neighbour is not resolved yet: the stack resolves it. Either
        // way the packet goes up marked, so TC ingress neither translates nor counts it again.
        if rewrite(ctx, p, &t.nat, None).is_err() {
            count(Counter::DropRewrite, len);
            return XDP_DROP;
        }
        count(t.counter, len);
        count_service(t.svc_id, len);
        return pass_judged(ctx);
    }
    if rewrite(ctx, p, &t.nat, macs).is_err() {
        count(Counter::DropRewrite, len);
        return XDP_DROP;
    }
    count(t.counter, len);
    count_service(t.svc_id, len);
    match action {
        XDP_REDIRECT => unsafe { aya_ebpf::helpers::bpf_redirect(out_ifindex, 0) as u32 },
        a => a,
    }
}

#[inline(always)]
fn store<T>(addr: usize, v: T) {
    unsafe { core::ptr::write_unaligned(addr as *mut T, v) }
}

#[inline(always)]
fn load<T: Copy>(addr: usize) -> T {
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

/// Rewrites addresses and ports with incremental checksums; when we transmit ourselves
/// (`macs` given) also the Ethernet addresses and the TTL, as a router would.
#[inline(always)]
fn rewrite(
    ctx: &XdpContext,
    p: &Packet,
    nat: &Nat,
    macs: Option<([u8; 6], [u8; 6])>,
) -> Result<(), ()> {
    let (data, end) = (ctx.data(), ctx.data_end());
    let ip = ptr_at(data, end, ETH_LEN, 20).ok_or(())?;
    let l4_len = if p.proto == IPPROTO_UDP { 8 } else { 20 };
    let l4 = ptr_at(data, end, p.l4_off & 0x7f, l4_len).ok_or(())?;
    let check_at = l4 + (p.l4_check_off() - p.l4_off);
    if check_at + 2 > end {
        return Err(());
    }

    let addrs = Delta::default()
        .dword(p.saddr, nat.saddr)
        .dword(p.daddr, nat.daddr);
    let ports = Delta::default()
        .word(p.sport, nat.sport)
        .word(p.dport, nat.dport);
    let mut ip_delta = addrs;
    if let Some((smac, dmac)) = macs {
        store(data, dmac);
        store(data + 6, smac);
        let old: u16 = load(ip + IP_TTL);
        // TTL is the first byte of the (TTL, protocol) word; p.ttl > 1 was checked on ingress.
        let new = {
            let mut b = old.to_ne_bytes();
            b[0] = b[0].wrapping_sub(1);
            u16::from_ne_bytes(b)
        };
        store(ip + IP_TTL, new);
        ip_delta = ip_delta.word(old, new);
    }
    let ip_check: u16 = load(ip + IP_CHECK);
    store(ip + IP_CHECK, ip_delta.apply(ip_check));
    store(ip + IP_SADDR, nat.saddr);
    store(ip + IP_DADDR, nat.daddr);

    let l4_check: u16 = load(check_at);
    // A zero UDP checksum means "none" and stays zero; a computed zero is sent as 0xffff.
    if !(p.proto == IPPROTO_UDP && l4_check == 0) {
        let mut c = addrs.plus(ports).apply(l4_check);
        if p.proto == IPPROTO_UDP && c == 0 {
            c = 0xffff;
        }
        store(check_at, c);
    }
    store(l4 + L4_SPORT, nat.sport);
    store(l4 + L4_DPORT, nat.dport);
    Ok(())
}
