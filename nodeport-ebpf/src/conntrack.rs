//! Connection tracking: state and expiry of translated flows. Entries live in LRU maps, so a
//! full table evicts old flows instead of refusing new ones; expiry is checked on lookup, and the
//! agent sweeps expired entries.
use nodeport_common::{
    Config, CtEntry, IPPROTO_TCP, TCP_FIN_BACKEND, TCP_FIN_CLIENT, TCP_RST, TCP_SEEN_REPLY,
    TCP_SEEN_SYN,
};

use crate::parse::{TCP_ACK, TCP_FIN, TCP_RST as F_RST, TCP_SYN};

const NS_PER_SEC: u64 = 1_000_000_000;

#[inline(always)]
pub fn now_ns() -> u64 {
    unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() }
}

/// Which side sent the packet being accounted.
#[derive(Copy, Clone, PartialEq, Eq)]
pub enum Dir {
    Client,
    Backend,
}

#[inline(always)]
pub fn is_syn_only(flags: u8) -> bool {
    flags & (TCP_SYN | TCP_ACK | F_RST | TCP_FIN) == TCP_SYN
}

/// A TCP flow that has ended: reset, or FIN seen both ways.
#[inline(always)]
pub fn ended(tcp_state: u8) -> bool {
    tcp_state & TCP_RST != 0
        || tcp_state & (TCP_FIN_CLIENT | TCP_FIN_BACKEND) == TCP_FIN_CLIENT | TCP_FIN_BACKEND
}

/// Initial TCP state of a new flow from its first packet's flags.
#[inline(always)]
pub fn initial_tcp_state(proto: u8, flags: u8) -> u8 {
    if proto == IPPROTO_TCP && flags & TCP_SYN != 0 {
        TCP_SEEN_SYN
    } else {
        0
    }
}

/// Folds a packet's TCP flags into the entry's state and moves its expiry: a closed connection
/// (RST, or FIN both ways) goes within the close timeout, an unanswered SYN within the SYN
/// timeout, an answered one lives for the established timeout. UDP uses its own timeout.
#[inline(always)]
pub fn account(ct: &mut CtEntry, proto: u8, flags: u8, dir: Dir, cfg: &Config, now: u64) {
    let timeout_s = if proto == IPPROTO_TCP {
        let mut st = ct.tcp_state;
        if dir == Dir::Client
            && is_syn_only(flags)
            && st & (TCP_RST | TCP_FIN_CLIENT | TCP_FIN_BACKEND) != 0
        {
            // The client reuses the tuple for a new connection. The forward path balances such a
            // SYN anew before it gets here (`flow::reopens`); this keeps the state right for
            // any other caller.
            st = TCP_SEEN_SYN;
        }
        if flags & F_RST != 0 {
            st |= TCP_RST;
        }
        if flags & TCP_FIN != 0 {
            st |= if dir == Dir::Client {
                TCP_FIN_CLIENT
            } else {
                TCP_FIN_BACKEND
            };
        }
        if dir == Dir::Backend {
            st |= TCP_SEEN_REPLY;
        }
        ct.tcp_state = st;
        if ended(st) {
            cfg.tcp_close_timeout_s
        } else if st & TCP_SEEN_REPLY != 0 {
            cfg.tcp_established_timeout_s
        } else {
            cfg.tcp_syn_timeout_s
        }
    } else {
        cfg.udp_timeout_s
    };
    ct.expires_ns = now + u64::from(timeout_s) * NS_PER_SEC;
}

#[inline(always)]
pub fn seconds_to_ns(s: u32) -> u64 {
    u64::from(s) * NS_PER_SEC
}
