//! Layout tests: the eBPF programs and the agent must agree byte for byte, and map keys must have
//! no implicit padding (uninitialised padding would make equal keys hash differently).
use core::mem::{align_of, size_of};

use super::*;

/// Asserts a type's size and alignment, and that its size equals the sum of its fields' sizes
/// (given by the caller), which rules out implicit padding.
macro_rules! layout {
    ($t:ty, size $size:expr, align $align:expr, fields [$($f:ty),* $(,)?]) => {{
        assert_eq!(size_of::<$t>(), $size, concat!("size of ", stringify!($t)));
        assert_eq!(align_of::<$t>(), $align, concat!("align of ", stringify!($t)));
        let sum = 0 $(+ size_of::<$f>())*;
        assert_eq!(sum, size_of::<$t>(), concat!("implicit padding in ", stringify!($t)));
    }};
}

#[test]
fn map_types_have_fixed_layouts_without_padding() {
    layout!(Config, size 24, align 4, fields [u16, u16, u32, u32, u32, u32, u32]);
    layout!(NodeAddrKey, size 4, align 4, fields [u32]);
    layout!(NodeAddr, size 4, align 4, fields [u32]);
    layout!(FrontendKey, size 4, align 2, fields [u16, u8, u8]);
    layout!(Frontend, size 16, align 4, fields [u32, u16, u16, u32, u8, u8, u16]);
    const {
        assert!(
            capacity::SERVICES <= CLUSTER_SLOTS,
            "service ids must not reach CLUSTER_SLOTS"
        )
    };
    layout!(SlotKey, size 8, align 4, fields [u32, u32]);
    layout!(Slot, size 4, align 4, fields [u32]);
    layout!(BackendKey, size 4, align 4, fields [u32]);
    layout!(Backend, size 8, align 4, fields [u32, u16, u8, u8]);
    layout!(FlowKey, size 16, align 4, fields [u32, u32, u16, u16, u8, [u8; 3]]);
    layout!(CtEntry, size 32, align 8, fields [u64, u32, u32, u16, u16, u32, u32, u8, u8, [u8; 2]]);
    layout!(RevNat, size 16, align 4, fields [FlowKey]);
    layout!(AffinityKey, size 8, align 4, fields [u32, u32]);
    layout!(Affinity, size 16, align 8, fields [u64, u32, u32]);
    layout!(Traffic, size 16, align 8, fields [u64, u64]);
    layout!(SockNatKey, size 16, align 8, fields [u64, u32, u16, u8, u8]);
    layout!(SockNat, size 12, align 4, fields [u32, u16, u16, u32]);
}

#[test]
fn map_names_fit_the_kernel_limit_and_are_unique() {
    for (i, name) in map_names::ALL.iter().enumerate() {
        assert!(name.len() <= 15, "map name {name} longer than 15 bytes");
        assert!(
            !map_names::ALL[..i].contains(name),
            "duplicate map name {name}"
        );
    }
    for name in [
        program_names::XDP_INGRESS,
        program_names::TC_INGRESS,
        program_names::TC_EGRESS,
    ]
    .iter()
    .chain(program_names::SOCK.iter())
    {
        assert!(name.len() <= 15, "program name {name} longer than 15 bytes");
    }
}

#[test]
fn counters_are_dense_and_named_uniquely() {
    for (i, c) in Counter::ALL.iter().enumerate() {
        assert_eq!(*c as u32, i as u32, "{c:?} out of order");
        assert!(!Counter::ALL[..i].iter().any(|o| o.name() == c.name()));
    }
    assert!(Counter::DropNoBackend.is_drop());
    assert!(!Counter::PassNoBackend.is_drop());
    const { assert!(Counter::COUNT <= capacity::COUNTERS) };
    const { assert!(SockCounter::COUNT <= capacity::SOCK_COUNTERS) };
    assert!(!Counter::Reply.is_drop());
    assert!(
        Counter::ALL
            .iter()
            .filter(|c| c.is_drop())
            .all(|c| c.name().starts_with("drop_"))
    );
    assert!(
        Counter::ALL
            .iter()
            .filter(|c| !c.is_drop())
            .all(|c| !c.name().starts_with("drop_"))
    );
    for (i, c) in SockCounter::ALL.iter().enumerate() {
        assert_eq!(*c as u32, i as u32, "{c:?} out of order");
        assert!(c.name().starts_with("sock_"));
        assert!(!SockCounter::ALL[..i].iter().any(|o| o.name() == c.name()));
        assert!(!Counter::ALL.iter().any(|o| o.name() == c.name()));
    }
}
