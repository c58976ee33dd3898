//! Backend selection for a new flow: uniform random over the frontend's slots (kube-proxy's
//! `statistic --mode random` chain has the same distribution), or the client's previous backend
//! under ClientIP session affinity while its entry is fresh.
use nodeport_common::{
    Affinity, AffinityKey, Backend, BackendKey, CLUSTER_SLOTS, Counter, FRONTEND_AFFINITY,
    FRONTEND_ETP_LOCAL, Frontend, SlotKey,
};

use crate::{
    conntrack::seconds_to_ns,
    maps::{AFFINITY, BACKENDS, SLOTS},
};

#[inline(always)]
pub fn backend(id: u32) -> Option<Backend> {
    unsafe { BACKENDS.get(&BackendKey { id }) }.copied()
}

/// Picks the backend of a new flow from `client_addr`. Returns its id and value. `own_node`: the
/// flow comes from this node's own processes or pods (the socket programs), which an
/// externalTrafficPolicy=Local frontend balances over its cluster slots; the packet path passes a
/// constant `false`, so this costs it nothing.
#[inline(always)]
pub fn select(
    fe: &Frontend,
    client_addr: u32,
    now: u64,
    own_node: bool,
) -> Result<(u32, Backend), Counter> {
    let (slots_of, count) =
        if own_node && fe.flags & FRONTEND_ETP_LOCAL != 0 && fe.cluster_count != 0 {
            (fe.svc_id | CLUSTER_SLOTS, fe.cluster_count)
        } else {
            (fe.svc_id, fe.count)
        };
    // NonZero division compiles without a panic path (the verifier would reject one).
    let Some(count) = core::num::NonZeroU32::new(u32::from(count)) else {
        return Err(if fe.flags & FRONTEND_ETP_LOCAL != 0 {
            Counter::DropNoLocalBackend
        } else {
            Counter::DropNoBackend
        });
    };
    let aff_key = AffinityKey {
        svc_id: fe.svc_id,
        client_addr,
    };
    if fe.flags & FRONTEND_AFFINITY != 0
        && let Some(a) = unsafe { AFFINITY.get(&aff_key) }
        // The agent removes affinity entries of backends that leave the service, so an
        // existing backend here is still one of the service's.
        && now.wrapping_sub(a.last_used_ns) <= seconds_to_ns(fe.affinity_timeout_s)
        && let Some(b) = backend(a.backend_id)
    {
        let id = a.backend_id;
        remember(&aff_key, id, now);
        return Ok((id, b));
    }
    let rnd = unsafe { aya_ebpf::helpers::bpf_get_prandom_u32() };
    let slot = rnd % count + 1;
    let id = unsafe {
        SLOTS.get(&SlotKey {
            svc_id: slots_of,
            slot,
        })
    }
    .map(|s| s.backend_id)
    .ok_or(Counter::DropStaleSlot)?;
    let b = backend(id).ok_or(Counter::DropStaleSlot)?;
    if fe.flags & FRONTEND_AFFINITY != 0 {
        remember(&aff_key, id, now);
    }
    Ok((id, b))
}

#[inline(always)]
fn remember(key: &AffinityKey, backend_id: u32, now: u64) {
    let v = Affinity {
        last_used_ns: now,
        backend_id,
        _pad: 0,
    };
    // Best effort: a failed insert only costs affinity for this one flow.
    let _ = AFFINITY.insert(key, &v, 0);
}
