//! The NodePort dataplane's userspace side: loading the eBPF object into the kernel, attaching it
//! to interfaces, and reading its maps back. `main.rs` is a thin CLI over these modules; the
//! Kubernetes side (watching Services and EndpointSlices, writing the service maps) lands as
//! further modules next to them.

pub mod attach;
pub mod caps;
pub mod cgroup;
pub mod cli;
pub mod error;
pub mod http;
pub mod iface;
pub mod inspect;
mod link;
pub mod loader;
pub mod metrics;
pub mod model;
pub mod pin;
pub mod run;
pub mod source;
pub mod stats;
pub mod sync;
pub mod tables;

pub use attach::{AttachPlan, Attached, Ingress, TcBackend, TcDirection, XdpAttachMode, unload};
pub use error::Error;
pub use loader::{Dataplane, object};
pub use pin::PinLayout;
pub use stats::Stats;
