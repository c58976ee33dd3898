//! nodeport-ebpf: the NodePort dataplane's kernel programs.
//!
//! Modules, one concern each: `parse` (headers), `flow` (the NodePort decision), `lb` (backend
//! selection), `conntrack` (state and expiry), `nat` (SNAT ports, reverse NAT), `fib` (next hop),
//! `csum` (incremental checksums for XDP), `stats` (counters), `maps`; and the attach points
//! `xdp` and `tc`, which rewrite and forward.
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
mod stats;
mod tc;
mod xdp;

use aya_ebpf::{
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
