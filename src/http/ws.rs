//! `GET /v1/ws`: checks Origin, takes the session token from `Sec-WebSocket-Protocol` when
//! offered there (never from the URL), and hands the socket to the signaling service.

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::net::SocketAddr;
use std::sync::Arc;
use tracing::Instrument;

use crate::shared::Shared;

/// The WebSocket subprotocol of this signaling protocol version.
pub const PROTOCOL: &str = "switchboard.v1";

/// Read buffer per WebSocket: a few ICE candidates; an SDP frame grows it.
const READ_BUFFER: usize = 1024;
/// Bytes buffered before a write goes to the socket (a flush writes earlier).
const WRITE_BUFFER: usize = 16 * 1024;

/// The handles the signaling part uses, taken from the server's state; the `iceServers` of
/// its refresh pushes come from the app layer ([`crate::ice`]), which knows what is bound.
pub fn signaling_deps(shared: &Arc<Shared>) -> crate::signaling::Deps {
    crate::signaling::Deps {
        auth: shared.auth.clone(),
        metrics: shared.metrics.clone(),
        lifecycle: shared.lifecycle.clone(),
        cluster: shared
            .cluster
            .clone()
            .map(|c| c as Arc<dyn crate::signaling::router::RoomRouter>),
        ice: shared.clone(),
    }
}

/// The signaling route.
pub fn routes() -> Router<Arc<Shared>> {
    Router::new().route("/v1/ws", get(upgrade))
}

/// The 403 for a browser `Origin` that may not open a signaling socket (`/v1/ws` and the
/// PeerJS socket alike); a present but unreadable Origin is refused, not treated as none.
pub(crate) fn origin_refused(shared: &Shared, headers: &HeaderMap) -> Option<Response> {
    let origin = headers.get(header::ORIGIN)?;
    if origin.to_str().is_ok_and(|o| shared.origin_allowed(o)) {
        return None;
    }
    shared.metrics.drops.with_label_values(&["ws_origin"]).inc();
    Some((StatusCode::FORBIDDEN, "origin not allowed\n").into_response())
}

async fn upgrade(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if let Some(refused) = origin_refused(&shared, &headers) {
        return refused;
    }
    // `Sec-WebSocket-Protocol: switchboard.v1, <session token>` keeps the token out of URLs.
    let offered: Vec<String> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_string())
        .collect();
    let token = offered.iter().find(|p| p.starts_with("sb1.")).cloned();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string);
    let limit = shared.config.signaling.max_frame_bytes;
    // Frames up to 4x the limit are read and answered with a typed `too_large` error; a
    // larger one is refused from its header (nothing buffered) and closed with 1009.
    let hard = limit.saturating_mul(4);
    // Connection limits key on the real client behind a trusted proxy, IPv6 by its /64.
    let client =
        super::client_ip::client_ip(peer.ip(), &headers, &shared.config.http.trusted_proxies);
    let key = super::client_ip::limit_key(client);
    let sig = shared.signaling.clone();
    let deps = signaling_deps(&shared);
    let span = tracing::debug_span!("ws", peer = %peer, client = %client);
    ws.protocols([PROTOCOL])
        // Signaling frames are small: a 1 KiB read buffer per idle connection instead of the
        // 128 KiB default (which is also zero-filled before every read). A larger frame grows
        // it as needed, up to `hard`.
        .read_buffer_size(READ_BUFFER)
        // Frames queued together are flushed in one write once this much is buffered.
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(WRITE_BUFFER + 2 * limit)
        .max_message_size(hard)
        .max_frame_size(hard)
        .on_upgrade(move |socket| {
            crate::signaling::conn::serve(sig, deps, socket, key, token, host).instrument(span)
        })
}
