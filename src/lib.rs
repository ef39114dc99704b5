//! switchboard: STUN, TURN and WebSocket room signaling for WebRTC apps, behind one login.
//!
//! Protocol cores (`stun`, `turn`, `signaling`) are sans-IO: bytes and time go in,
//! decisions come out. The `listener` and `http` shells own the sockets.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod acme;
pub mod admin;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod crypto;
pub mod demux;
pub mod discover;
pub mod http;
pub mod https_client;
pub mod ice;
#[cfg(test)]
mod layering;
pub mod lifecycle;
pub mod listener;
pub mod metrics;
pub mod net;
pub mod peerjs;
pub mod secret;
pub mod server;
pub mod shared;
pub mod shared_port;
pub mod signaling;
pub mod stun;
pub mod tls;
pub mod turn;
pub mod udp_batch;
pub mod webhooks;

pub use config::Config;
pub use server::{RunningServer, Server};
