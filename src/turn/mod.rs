//! TURN relay (RFC 8656): the sans-IO allocation table and its socket drivers.

pub mod core;
pub mod members;
pub mod offload;
pub mod policy;
pub mod relay;
pub mod wire;
