//! Room signaling: a sans-IO room core (`room`), the `Bus` and outboxes that carry its output to
//! connections (`bus`), the sharded service around the core (`service`), and the
//! per-connection WebSocket task (`conn`).

pub mod admin;
pub mod bus;
pub mod conn;
pub mod room;
pub mod service;
