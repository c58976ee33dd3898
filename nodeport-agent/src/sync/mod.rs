//! From desired state to map writes: stable ids (`ids`), a pure diff between what the maps hold
//! and what they should hold (`plan`), and the one place that writes (`apply`), in the order that
//! never exposes a half-written service to a packet.
pub mod apply;
pub mod ids;
pub mod plan;

pub use apply::Syncer;
pub use ids::Ids;
pub use plan::{MapState, Op, diff};
