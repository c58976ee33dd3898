//! Socket load balancing (Cilium's "socket LB", kube-proxy's OUTPUT-chain NodePort path): the
//! node's own processes and its pods reach a nodePort on the node's own address. Their packets
//! never cross a node interface's ingress, so instead of translating packets the cgroup hooks
//! translate the address at the syscall: connect() and sendmsg() to a node address at a nodePort
//! go to a backend, and getpeername() and recvmsg() show the node address again. Nothing is
//! rewritten on the wire, so the backend sees the client's own address (no SNAT is needed: its
//! replies go straight back), and no conntrack entry is made.
//!
//! Every hook returns 1 (carry on): a socket this code does not translate proceeds untouched,
//! so a nodePort with no backend is refused by the node's own stack, as before.
//!
//! IPv6 sockets reach IPv4 addresses as `::ffff:a.b.c.d` (dual-stack clients: Java, Go with
//! `tcp6` listeners' peers, anything that opens AF_INET6 and connects to a mapped address); their
//! calls come through the `…6` hooks, which translate the embedded IPv4 address the same way, as
//! Cilium's sock6 hooks do. Real IPv6 destinations are left alone (this dataplane is IPv4).
use aya_ebpf::{EbpfContext as _, bindings::bpf_sock_addr, programs::SockAddrContext};
use nodeport_common::{
    FrontendKey, IPPROTO_TCP, IPPROTO_UDP, NodeAddrKey, SOCK_FORWARD, SOCK_REVERSE, SockCounter,
    SockNat, SockNatKey,
};

use crate::{
    conntrack::now_ns,
    lb,
    maps::{CONFIG, FRONTENDS, NODE_ADDRS, SOCK_COUNTERS, SOCK_NAT},
};

const ALLOW: i32 = 1;

#[inline(always)]
fn count(counter: SockCounter) {
    if let Some(n) = SOCK_COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU slot: no other CPU writes it.
        unsafe { *n += 1 };
    }
}

/// The socket's protocol, if it is one nodePorts serve.
#[inline(always)]
fn protocol(sa: *const bpf_sock_addr) -> Option<u8> {
    let proto = unsafe { (*sa).protocol };
    if proto == u32::from(IPPROTO_TCP) || proto == u32::from(IPPROTO_UDP) {
        Some(proto as u8)
    } else {
        None
    }
}

/// Which address field of `bpf_sock_addr` a hook uses.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `user_ip4`: connect4, sendmsg4, recvmsg4, getpeername4.
    V4,
    /// The IPv4 address inside a v4-mapped `user_ip6`: the `…6` hooks.
    V4Mapped,
}

/// Word 2 of `::ffff:0:0` as the kernel stores it (network byte order, read natively).
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The IPv4 address a call names (network byte order), if it names one.
#[inline(always)]
fn addr(sa: *mut bpf_sock_addr, family: Family) -> Option<u32> {
    // The verifier allows 4-byte accesses to these fields; volatile keeps them so.
    unsafe {
        match family {
            Family::V4 => Some(core::ptr::read_volatile(&(*sa).user_ip4)),
            Family::V4Mapped => {
                let w0 = core::ptr::read_volatile(&(*sa).user_ip6[0]);
                let w1 = core::ptr::read_volatile(&(*sa).user_ip6[1]);
                let w2 = core::ptr::read_volatile(&(*sa).user_ip6[2]);
                (w0 == 0 && w1 == 0 && w2 == V4_MAPPED_WORD)
                    .then(|| core::ptr::read_volatile(&(*sa).user_ip6[3]))
            }
        }
    }
}

/// Rewrites the address and port a call names (the address stays v4-mapped on an IPv6 socket).
#[inline(always)]
fn set_addr(sa: *mut bpf_sock_addr, family: Family, addr: u32, port: u16) {
    unsafe {
        match family {
            Family::V4 => core::ptr::write_volatile(&mut (*sa).user_ip4, addr),
            Family::V4Mapped => core::ptr::write_volatile(&mut (*sa).user_ip6[3], addr),
        }
        core::ptr::write_volatile(&mut (*sa).user_port, u32::from(port));
    }
}

/// `user_port` holds the big-endian port in its low 16 bits; the verifier wants the whole u32
/// read (Cilium's ctx_dst_port reads it through a volatile for the same reason).
#[inline(always)]
fn user_port(sa: *const bpf_sock_addr) -> u16 {
    unsafe { core::ptr::read_volatile(&(*sa).user_port) as u16 }
}

/// connect4 and sendmsg4: the destination, if it is a node address at a nodePort, becomes a
/// backend. `sticky`: reuse the backend this socket got for this destination before (each
/// datagram of an unconnected UDP socket comes through here; a conntrack'd UDP flow would keep
/// its backend too).
#[inline(always)]
pub fn forward(ctx: &SockAddrContext, family: Family, sticky: bool) -> i32 {
    let sa = ctx.sock_addr;
    let Some(proto) = protocol(sa) else {
        return ALLOW;
    };
    let Some(daddr) = addr(sa, family) else {
        return ALLOW;
    };
    if unsafe { NODE_ADDRS.get(&NodeAddrKey { addr: daddr }) }.is_none() {
        return ALLOW;
    }
    if CONFIG.get(0).is_none_or(|c| c.snat_port_min == 0) {
        return ALLOW;
    }
    let dport = user_port(sa);
    let Some(fe) = (unsafe {
        FRONTENDS.get(&FrontendKey {
            port: dport,
            proto,
            _pad: 0,
        })
    }) else {
        return ALLOW;
    };
    let cookie = unsafe { aya_ebpf::helpers::bpf_get_socket_cookie(ctx.as_ptr()) };
    let fwd_key = SockNatKey {
        cookie,
        addr: daddr,
        port: dport,
        dir: SOCK_FORWARD,
        proto,
    };
    let mut chosen = None;
    if sticky
        && let Some(prev) = unsafe { SOCK_NAT.get(&fwd_key) }
        && let Some(b) = lb::backend(prev.backend_id)
        && b.addr == prev.addr
        && b.port == prev.port
    {
        chosen = Some((prev.backend_id, b));
    }
    let (backend_id, b) = match chosen {
        Some(x) => x,
        None => {
            // ClientIP affinity keys on the client's network namespace: a pod has one address,
            // and an unbound socket has none yet. Cookies are small counters, so the key cannot
            // meet a real client address (those are never in 0.0.0.0/8).
            let client = unsafe { aya_ebpf::helpers::bpf_get_netns_cookie(ctx.as_ptr()) } as u32;
            match lb::select(fe, client, now_ns(), true) {
                Ok(x) => x,
                Err(_) => {
                    count(SockCounter::NoBackend);
                    return ALLOW;
                }
            }
        }
    };
    set_addr(sa, family, b.addr, b.port);
    count(SockCounter::Translated);
    let rev_key = SockNatKey {
        cookie,
        addr: b.addr,
        port: b.port,
        dir: SOCK_REVERSE,
        proto,
    };
    let rev = SockNat {
        addr: daddr,
        port: dport,
        _pad: 0,
        backend_id,
    };
    let mut ok = SOCK_NAT.insert(&rev_key, &rev, 0).is_ok();
    if sticky {
        let fwd = SockNat {
            addr: b.addr,
            port: b.port,
            _pad: 0,
            backend_id,
        };
        ok &= SOCK_NAT.insert(&fwd_key, &fwd, 0).is_ok();
    }
    if !ok {
        count(SockCounter::NatInsertFailed);
    }
    ALLOW
}

/// recvmsg4 and getpeername4: a backend this socket was sent to reads as the node
/// address:nodePort the application asked for.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext, family: Family) -> i32 {
    let sa = ctx.sock_addr;
    let Some(proto) = protocol(sa) else {
        return ALLOW;
    };
    let Some(from) = addr(sa, family) else {
        return ALLOW;
    };
    let key = SockNatKey {
        cookie: unsafe { aya_ebpf::helpers::bpf_get_socket_cookie(ctx.as_ptr()) },
        addr: from,
        port: user_port(sa),
        dir: SOCK_REVERSE,
        proto,
    };
    if let Some(orig) = unsafe { SOCK_NAT.get(&key) } {
        set_addr(sa, family, orig.addr, orig.port);
        count(SockCounter::Restored);
    }
    ALLOW
}
