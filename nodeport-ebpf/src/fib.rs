//! Next-hop lookup in the kernel's FIB for a translated packet.
use core::ffi::c_void;

use aya_ebpf::bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup};

use crate::flow::Nat;

const AF_INET: u8 = 2;

pub enum Route {
    /// Next hop resolved: egress interface and the MAC addresses to use.
    Resolved {
        ifindex: u32,
        smac: [u8; 6],
        dmac: [u8; 6],
    },
    /// Route found but the neighbour is not (yet) resolved: only the stack or
    /// bpf_redirect_neigh can send it.
    NoNeighbour { ifindex: u32 },
    /// No route, forwarding disabled, blackhole, ...
    None,
}

/// Looks up the route of a packet addressed as `nat`, arriving on `ifindex`. The MTU check is
/// skipped (tot_len 0): we forward to the interfaces of the cluster network, which share one MTU.
#[inline(always)]
pub fn lookup(ctx: *mut c_void, ifindex: u32, proto: u8, nat: &Nat) -> Route {
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = proto;
    params.sport = nat.sport;
    params.dport = nat.dport;
    params.ifindex = ifindex;
    params.__bindgen_anon_3.ipv4_src = nat.saddr;
    params.__bindgen_anon_4.ipv4_dst = nat.daddr;
    let ret = unsafe {
        aya_ebpf::helpers::bpf_fib_lookup(
            ctx,
            &mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if ret < 0 {
        return Route::None;
    }
    match ret as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            let macs = unsafe { params.__bindgen_anon_6.__bindgen_anon_2 };
            Route::Resolved {
                ifindex: params.ifindex,
                smac: macs.smac,
                dmac: macs.dmac,
            }
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => Route::NoNeighbour {
            ifindex: params.ifindex,
        },
        _ => Route::None,
    }
}
