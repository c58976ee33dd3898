//! The Linux capabilities the agent needs, checked at start-up so that a missing one is reported
//! by name before the kernel answers a bare EPERM (often buried in a verifier log).
//!
//! [`REQUIRED`] is the single source of truth: the DaemonSet's `securityContext.capabilities.add`
//! is tested against it (nodeport-agent/tests/deploy.rs), and nodeport-agent/tests/caps.rs runs the
//! real binary with exactly these capabilities (it loads, attaches and pins) and with each one
//! dropped (it fails, naming it). Measured on Linux 6.18, for `load` and `run`:
//!
//! * without `CAP_BPF`: creating the first map fails with EPERM;
//! * without `CAP_PERFMON`: the verifier rejects the programs (`pointer -= pointer prohibited`:
//!   computing a packet's length from `data_end - data` counts as a pointer leak unless
//!   `perfmon_capable()`, and Spectre v1 sanitation is forced on);
//! * without `CAP_NET_ADMIN`: loading XDP/TC programs fails (networking program types need it
//!   besides `CAP_BPF`), and so would attaching them (bpf_link, tcx, netlink).
//!
//! Nothing else is needed on Linux 5.11 and later: BPF memory is charged to the memory cgroup, not
//! to RLIMIT_MEMLOCK (raising that limit is attempted and may fail quietly; on 5.8 to 5.10 it needs
//! `CAP_SYS_RESOURCE`). Pins are files on bpffs owned by root, which the agent is, so no
//! `CAP_DAC_OVERRIDE`; the health port (10256) is above 1024. `CAP_SYS_ADMIN` implies `CAP_BPF`
//! and `CAP_PERFMON` in the kernel (`bpf_capable()`, `perfmon_capable()`), so a privileged
//! container or a kernel before 5.8 (which has neither) passes the check with it.

use std::fmt;

use caps::{CapSet, Capability, CapsHashSet};

/// One capability the agent needs, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Requirement {
    pub capability: Capability,
    /// What fails without it, for the error message.
    pub needed_for: &'static str,
    /// Capabilities the kernel accepts in its place.
    pub implied_by: &'static [Capability],
}

impl Requirement {
    /// The name Kubernetes uses in `securityContext.capabilities` (`CAP_BPF` → `BPF`).
    pub fn kubernetes_name(&self) -> String {
        kubernetes_name(self.capability)
    }

    fn satisfied_by(&self, effective: &CapsHashSet) -> bool {
        effective.contains(&self.capability)
            || self.implied_by.iter().any(|c| effective.contains(c))
    }
}

/// Every capability the agent's `load` and `run` need: no more (each was dropped in turn and the
/// agent failed), no less (with exactly these it loads, attaches and pins).
pub const REQUIRED: [Requirement; 3] = [
    Requirement {
        capability: Capability::CAP_BPF,
        needed_for: "needed to load the programs and create maps",
        implied_by: &[Capability::CAP_SYS_ADMIN],
    },
    Requirement {
        capability: Capability::CAP_NET_ADMIN,
        needed_for: "needed to load XDP/TC programs and attach them to interfaces",
        implied_by: &[],
    },
    Requirement {
        capability: Capability::CAP_PERFMON,
        needed_for: "needed for the verifier to accept packet pointer arithmetic (data_end - data)",
        implied_by: &[Capability::CAP_SYS_ADMIN],
    },
];

/// The Kubernetes spelling of a capability: the kernel's name without `CAP_`.
pub fn kubernetes_name(capability: Capability) -> String {
    let name = capability.to_string();
    name.strip_prefix("CAP_").unwrap_or(&name).to_owned()
}

/// The requirements `effective` does not meet, in [`REQUIRED`]'s order.
pub fn missing_from(effective: &CapsHashSet) -> Vec<Requirement> {
    REQUIRED
        .iter()
        .filter(|r| !r.satisfied_by(effective))
        .copied()
        .collect()
}

/// The capabilities the agent lacks, every one of them.
#[derive(Debug, PartialEq, Eq)]
pub struct MissingCapabilities(pub Vec<Requirement>);

impl fmt::Display for MissingCapabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for r in &self.0 {
            writeln!(f, "missing capability {}: {}", r.capability, r.needed_for)?;
        }
        let names: Vec<String> = REQUIRED.iter().map(Requirement::kubernetes_name).collect();
        write!(
            f,
            "run as root, or grant them (Kubernetes: securityContext.capabilities.add: [{}])",
            names.join(", ")
        )
    }
}

impl std::error::Error for MissingCapabilities {}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Missing(#[from] MissingCapabilities),
    #[error("reading this process's effective capabilities: {0}")]
    Read(#[from] caps::errors::CapsError),
}

/// Checks this process's effective capabilities against [`REQUIRED`].
pub fn check() -> Result<(), CheckError> {
    let effective = caps::read(None, CapSet::Effective)?;
    let missing = missing_from(&effective);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(MissingCapabilities(missing).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(caps: &[Capability]) -> CapsHashSet {
        caps.iter().copied().collect()
    }

    #[test]
    fn exactly_the_required_set_passes() {
        let all: Vec<Capability> = REQUIRED.iter().map(|r| r.capability).collect();
        assert!(missing_from(&set(&all)).is_empty());
    }

    #[test]
    fn every_missing_capability_is_named() {
        let missing = MissingCapabilities(missing_from(&set(&[Capability::CAP_NET_ADMIN])));
        let text = missing.to_string();
        assert!(
            text.contains("missing capability CAP_BPF: needed to load the programs"),
            "{text}"
        );
        assert!(text.contains("missing capability CAP_PERFMON: "), "{text}");
        assert!(!text.contains("CAP_NET_ADMIN:"), "{text}");
        assert!(text.contains("[BPF, NET_ADMIN, PERFMON]"), "{text}");
    }

    #[test]
    fn sys_admin_stands_in_for_bpf_and_perfmon_only() {
        let missing = missing_from(&set(&[Capability::CAP_SYS_ADMIN]));
        assert_eq!(
            missing.iter().map(|r| r.capability).collect::<Vec<_>>(),
            [Capability::CAP_NET_ADMIN]
        );
    }

    #[test]
    fn kubernetes_names_are_the_kernel_names_without_cap() {
        for r in REQUIRED {
            assert_eq!(
                format!("CAP_{}", r.kubernetes_name()),
                r.capability.to_string()
            );
        }
    }
}
