//! A pin root of its own per test, so tests neither collide with each other nor with an agent
//! running on the machine, and are removed even when the test panics.

use std::path::PathBuf;

use nodeport_agent::PinLayout;

use crate::{require_kernel, unique};

pub struct TestPins {
    layout: PinLayout,
}

impl TestPins {
    /// `/sys/fs/bpf/nodeport-test-<pid>-<n>`. Checks for root and bpffs first.
    pub fn new() -> Self {
        require_kernel();
        static SWEEP: std::sync::Once = std::sync::Once::new();
        SWEEP.call_once(sweep_stale);
        let root = PathBuf::from(format!(
            "/sys/fs/bpf/nodeport-test-{}-{}",
            std::process::id(),
            unique()
        ));
        Self {
            layout: PinLayout::new(root),
        }
    }

    pub fn layout(&self) -> &PinLayout {
        &self.layout
    }
}

/// Removes pin roots left by test processes that died before their guards ran (the pid in the
/// name no longer exists), so they neither pile up nor keep programs attached.
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("nodeport-test-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !PathBuf::from(format!("/proc/{pid}")).exists() {
            let layout = PinLayout::new(entry.path());
            let _ = nodeport_agent::unload(&layout, true);
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

impl Default for TestPins {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestPins {
    fn drop(&mut self) {
        // unload detaches netlink filters it finds; the tests' namespaces are deleted anyway.
        if let Err(e) = nodeport_agent::unload(&self.layout, true) {
            eprintln!("cleanup: unload {}: {e}", self.layout.root().display());
        }
        let root = self.layout.root();
        if root.exists()
            && let Err(e) = std::fs::remove_dir_all(root)
        {
            eprintln!("cleanup: removing {}: {e}", root.display());
        }
    }
}
