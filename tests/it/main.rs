//! The integration tests, as one binary: each file of this folder is a module, the helpers they
//! share live in `tests/support/` (one `support` module), and the whole crate is linked once
//! instead of once per file. `tests/README.md` explains the layout and how to add a test.
//!
//! All tests of this binary share one process. Tests that launch browsers take
//! [`support::browser_slot`] so that only one browser pair runs at a time; `scripts/test.sh`
//! runs the browser modules and `turn_tls` apart from the rest (its `BROWSERS` and `ALONE`).
//! Two test files stay binaries of their own, because they measure the process itself:
//! `tests/attack_login.rs` (its thread count) and `tests/attack_streams.rs` (its RSS and
//! open-file budget).

#[path = "../support/mod.rs"]
mod support;

mod admin;
mod browser;
mod cli;
mod cluster;
mod deploy;
mod faults;
mod lab_acme;
mod lab_admin;
mod lab_browser;
mod lab_cluster_browser;
mod lab_cluster_turn;
mod lab_offload;
mod lab_port443;
mod lab_proxy;
mod lab_turn;
mod lifecycle;
mod login;
mod metrics;
mod peerjs;
mod peerjs_browser;
mod peerjs_cluster;
mod reflector;
mod shared_port;
mod signaling;
mod stun;
mod tls;
mod turn_ipv6;
mod turn_negative;
mod turn_tcp;
mod turn_tls;
mod turn_uclient;
mod turn_webrtc;
