//! The fake Kubernetes API server lives in its own workspace crate (fake-apiserver), shared with
//! the agent's cost benchmark (nodeport-bench).
pub use fake_apiserver::*;
