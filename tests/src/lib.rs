//! Shared pieces of the kernel tests (tests/tests/*.rs): a root/bpffs check that fails loudly,
//! throwaway network namespaces and pin directories that clean up after themselves (also when a
//! test panics), and hand-built frames (`packet`).
//!
//! Kernel tests never skip: on a machine where they cannot run they fail and say why, so a green
//! run always means the programs ran in a kernel.

pub mod fixture_net;
pub mod fuzz;
pub mod harness;
pub mod netns;
pub mod packet;
pub mod pins;

use std::path::Path;

/// Panics with instructions unless this process can load BPF programs and pin them.
pub fn require_kernel() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "kernel tests need root (euid is {euid}): run them through `bash scripts/test.sh` as root, \
         or `sudo -E cargo test`"
    );
    if let Err(e) = nodeport_agent::pin::ensure_bpffs(Path::new("/sys/fs/bpf")) {
        panic!("kernel tests need bpffs at /sys/fs/bpf ({e}); `bash scripts/setup.sh` mounts it");
    }
}

/// A number unique within this process, for names of namespaces, interfaces and pin dirs.
pub fn unique() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
