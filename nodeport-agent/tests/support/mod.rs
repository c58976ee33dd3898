//! Helpers shared by the integration tests (`mod support;` in each).
// Each test crate uses only some of these helpers; the rest would warn as dead code there.
#![allow(dead_code)]

pub mod agent;
pub mod fake_api;
pub mod netns;
