//! Shared code for integration tests. Each test binary compiles this module
//! on its own and uses only part of it, hence the blanket `dead_code` allow.
#![allow(dead_code)]

pub mod daemon;
pub mod frontend;
pub mod handoff;
pub mod hvisor;
pub mod qsd;
pub mod stress;
