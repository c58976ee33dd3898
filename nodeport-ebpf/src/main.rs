//! nodeport-ebpf: the NodePort dataplane's kernel programs.
//!
//! Modules, one concern each: `parse` (headers), `flow` (the NodePort decision), `lb` (backend
//! selection), `conntrack` (state and expiry), `nat` (SNAT ports, reverse NAT), `fib` (next hop),
//! `csum` (incremental checksums for XDP), `stats` (counters), `maps`; the attach points `xdp`
//! and `tc`, which rewrite and forward; and `sock`, the cgroup hooks that serve nodePorts to the
//! node's own processes and pods at the syscall.
#![no_std]
#![no_main]
// aya-ebpf 0.3's #[classifier] expands to a safe `pub fn` taking the raw `*mut __sk_buff` the
// kernel passes; the lint fires on that generated wrapper, not on our code.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

mod conntrack;
mod csum;
mod fib;
mod flow;
mod lb;
mod maps;
mod nat;
mod parse;
mod sock;
mod stats;
mod tc;
mod xdp;

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};

/// NodePort ingress on a node interface, in XDP.
#[xdp]
pub fn np_xdp(ctx: XdpContext) -> u32 {
    xdp::run(&ctx)
}

/// NodePort ingress on a node interface, in TC (the fallback where XDP cannot transmit).
#[classifier]
pub fn np_tc_ingress(ctx: TcContext) -> i32 {
    tc::ingress(&ctx)
}

/// Reverse translation of local backends' replies, on a node interface's TC egress.
#[classifier]
pub fn np_tc_egress(ctx: TcContext) -> i32 {
    tc::egress(&ctx)
}

/// Socket load balancing: connect() to a node address at a nodePort reaches a backend.
#[cgroup_sock_addr(connect4)]
pub fn np_sk_connect4(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx, sock::Family::V4, false)
}

/// Socket load balancing: each datagram an unconnected UDP socket sends to a node address at a
/// nodePort goes to the socket's backend for it.
#[cgroup_sock_addr(sendmsg4)]
pub fn np_sk_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx, sock::Family::V4, true)
}

/// Socket load balancing: a datagram from the backend reads as from the node address:nodePort.
#[cgroup_sock_addr(recvmsg4)]
pub fn np_sk_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, sock::Family::V4)
}

/// Socket load balancing: the peer of a socket connected through a nodePort is the nodePort.
#[cgroup_sock_addr(getpeername4)]
pub fn np_sk_getpeer4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, sock::Family::V4)
}

/// The same four for IPv6 sockets naming a v4-mapped address (`::ffff:<node address>`).
#[cgroup_sock_addr(connect6)]
pub fn np_sk_connect6(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx, sock::Family::V4Mapped, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn np_sk_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx, sock::Family::V4Mapped, true)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn np_sk_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, sock::Family::V4Mapped)
}

#[cgroup_sock_addr(getpeername6)]
pub fn np_sk_getpeer6(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, sock::Family::V4Mapped)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
