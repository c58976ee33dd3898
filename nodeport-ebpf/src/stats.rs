//! Per-CPU counters: what happened to each packet, and traffic per service.
use nodeport_common::{Counter, Traffic};

use crate::maps::{COUNTERS, SERVICE_COUNTERS};

#[inline(always)]
fn add(slot: Option<*mut Traffic>, bytes: u32) {
    if let Some(t) = slot {
        // Per-CPU slot: no other CPU writes it, so plain adds are exact.
        unsafe {
            (*t).packets += 1;
            (*t).bytes += u64::from(bytes);
        }
    }
}

#[inline(always)]
pub fn count(counter: Counter, bytes: u32) {
    add(COUNTERS.get_ptr_mut(counter as u32), bytes);
}

#[inline(always)]
pub fn count_service(svc_id: u32, bytes: u32) {
    add(SERVICE_COUNTERS.get_ptr_mut(svc_id), bytes);
}
