//! Room signaling: a sans-IO room core (`room`), the `Bus` that routes its output to
//! connections, and the per-connection WebSocket task (`conn`).

pub mod bus;
pub mod conn;
pub mod room;
