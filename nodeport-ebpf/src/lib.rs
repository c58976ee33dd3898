#![no_std]
// The library target exists so the agent can depend on this crate for rebuild tracking; the
// programs are in the `nodeport` binary (src/main.rs), built for bpfel-unknown-none by aya-build.
