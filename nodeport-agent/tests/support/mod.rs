//! Helpers shared by the integration tests (`mod support;` in each).
// Each test crate uses only some of these helpers; the rest would warn as dead code (or, for
// the fake API server's re-export, as an unused import) there.
#![allow(dead_code, unused_imports)]

pub mod agent;
pub mod fake_api;
pub mod netns;
