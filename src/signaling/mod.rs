//! Room signaling: a sans-IO room core (`room`), the `Bus` and outboxes that carry its output to
//! connections (`bus`), the sharded service around the core (`service`), and the
//! per-connection WebSocket task (`conn`) over a WebSocket that holds no buffer while idle
//! (`socket`).

pub mod admin;
pub mod bus;
pub mod conn;
pub mod room;
pub mod router;
pub mod service;
pub mod socket;

use std::sync::Arc;

/// The handles the signaling part uses, and nothing else. The app layer builds it from the
/// server's state, so this part never sees the TURN listeners, the login backends or the HTTP
/// side, and its connection handler can be driven in a test or a fuzz target without them.
#[derive(Debug, Clone)]
pub struct Deps {
    /// Session tokens, their renewal and revocations.
    pub auth: Arc<crate::auth::Auth>,
    /// The metrics registry.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Draining and shutdown.
    pub lifecycle: Arc<crate::lifecycle::Lifecycle>,
    /// This node's part of the cluster, in cluster mode.
    pub cluster: Option<Arc<dyn router::RoomRouter>>,
    /// Where `ice-servers` pushes get their `iceServers`.
    pub ice: Arc<dyn IceSource>,
}

/// Mints the `iceServers` of an `ice-servers` push. The app layer provides it: what it
/// advertises depends on the listeners actually bound and on the public host, which this part
/// does not know.
pub trait IceSource: Send + Sync + std::fmt::Debug {
    /// `iceServers` for `user`, who reached the server as `host`, with TURN credentials that
    /// end no later than the unix second `not_after`.
    fn ice_servers(
        &self,
        host: Option<&str>,
        user: &str,
        now_unix: u64,
        not_after: u64,
    ) -> IceGrant;
}

/// What an [`IceSource`] hands out.
#[derive(Debug, Clone, PartialEq)]
pub struct IceGrant {
    /// The `iceServers` array, in the browser `RTCIceServer` shape.
    pub servers: serde_json::Value,
    /// The TURN credentials inside it, if the relay is enabled.
    pub credentials: Option<crate::auth::TurnCredentials>,
}
