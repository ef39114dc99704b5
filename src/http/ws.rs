//! `GET /v1/ws`: checks Origin, takes the session token from `Sec-WebSocket-Protocol` when
//! offered there (never from the URL), and hands the socket to the signaling service.

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::net::SocketAddr;
use std::sync::Arc;
use tracing::Instrument;

use crate::shared::Shared;

/// The WebSocket subprotocol of this signaling protocol version.
pub const PROTOCOL: &str = "switchboard.v1";

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

/// Whether header `key` contains `token` (case-insensitive), as in `Connection: keep-alive,
/// Upgrade`.
fn header_has(headers: &HeaderMap, key: header::HeaderName, token: &str) -> bool {
    headers.get_all(key).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.to_ascii_lowercase().contains(token))
    })
}

/// The HTTP/1.1 WebSocket handshake (RFC 6455 section 4.2): the `Sec-WebSocket-Accept` of
/// the 101 answer, or the status and text of the refusal (as axum's extractor answers).
fn handshake(
    headers: &HeaderMap,
    method: &Method,
) -> Result<HeaderValue, (StatusCode, &'static str)> {
    let bad = |why: &'static str| (StatusCode::BAD_REQUEST, why);
    if method != Method::GET {
        return Err((
            StatusCode::METHOD_NOT_ALLOWED,
            "WebSocket upgrades use GET\n",
        ));
    }
    if !header_has(headers, header::CONNECTION, "upgrade") {
        return Err(bad("Connection header did not include 'upgrade'\n"));
    }
    if !header_has(headers, header::UPGRADE, "websocket") {
        return Err(bad("`Upgrade` header did not include 'websocket'\n"));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err(bad("`Sec-WebSocket-Version` header did not include '13'\n"));
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or_else(|| bad("`Sec-WebSocket-Key` header missing\n"))?;
    HeaderValue::from_str(&crate::signaling::socket::accept_key(key.as_bytes()))
        .map_err(|_| bad("bad `Sec-WebSocket-Key`\n"))
}

async fn upgrade(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut req: Request,
) -> Response {
    let headers = req.headers();
    if let Some(refused) = origin_refused(&shared, headers) {
        return refused;
    }
    let accept = match handshake(headers, req.method()) {
        Ok(a) => a,
        Err(r) => return r.into_response(),
    };
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
        super::client_ip::client_ip(peer.ip(), headers, &shared.config.http.trusted_proxies);
    let key = super::client_ip::limit_key(client);
    let sig = shared.signaling.clone();
    let deps = signaling_deps(&shared);
    let span = tracing::debug_span!("ws", peer = %peer, client = %client);
    let protocol = offered.iter().any(|p| p == PROTOCOL);
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return (StatusCode::UPGRADE_REQUIRED, "connection not upgradable\n").into_response();
    };
    // Boxed until the upgrade completes, so that the task does not keep a second copy of the
    // arguments next to the `serve` future that takes them (a task is as large as its state).
    let args = Box::new((sig, deps, key, token, host));
    tokio::spawn(
        async move {
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            let (sig, deps, key, token, host) = *args;
            // Frames up to `hard` are read; a larger one is refused from its header. The socket
            // holds no read or write buffer while idle (see `signaling::socket`).
            let socket =
                crate::signaling::socket::Socket::new(hyper_util::rt::TokioIo::new(upgraded), hard);
            crate::signaling::conn::serve(sig, deps, socket, key, token, host).await
        }
        .instrument(span),
    );
    let mut res = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let h = res.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    if protocol {
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(PROTOCOL),
        );
    }
    res
}
