//! The PeerJS server's HTTP side under `peerjs.path`: `GET <path>/<key>/id`, `GET
//! <path>/<key>/peers` (only with `peerjs.allow_discovery`), the WebSocket at
//! `<path>/peerjs?key=&id=&token=`, and the PeerJS demo page. Handlers only translate HTTP
//! into calls on [`crate::peerjs`].

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::net::SocketAddr;
use std::sync::Arc;
use tracing::Instrument;

use crate::shared::Shared;

/// Read buffer per PeerJS WebSocket (as for `/v1/ws`): small while idle, grown by an SDP.
const READ_BUFFER: usize = 1024;
/// Bytes buffered before a write goes to the socket.
const WRITE_BUFFER: usize = 16 * 1024;

/// The PeerJS routes, mounted only when `peerjs.enabled`.
pub fn routes(shared: &Shared) -> Router<Arc<Shared>> {
    let cfg = &shared.config.peerjs;
    if !cfg.enabled {
        return Router::new();
    }
    let p = cfg.path.as_str();
    let r = Router::new()
        .route(&format!("{p}/peerjs"), get(upgrade))
        .route(&format!("{p}/{{key}}/id"), get(new_id))
        .route(&format!("{p}/{{key}}/peers"), get(peers));
    if !shared.config.http.demo {
        return r;
    }
    r.route(
        "/peerjs.html",
        get(|| async {
            (
                [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                include_str!("../../web/peerjs.html"),
            )
        }),
    )
    .route(
        "/vendor/peerjs.min.js",
        get(|| async {
            (
                [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                include_str!("../../web/vendor/peerjs.min.js"),
            )
        }),
    )
}

/// A random version-4 UUID, the id shape the PeerJS server hands out.
fn uuid_v4() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

async fn new_id(State(s): State<Arc<Shared>>, Path(key): Path<String>) -> Response {
    if key != s.config.peerjs.key {
        return (StatusCode::UNAUTHORIZED, "Invalid key\n").into_response();
    }
    ([(header::CONTENT_TYPE, "text/plain")], uuid_v4()).into_response()
}

async fn peers(State(s): State<Arc<Shared>>, Path(key): Path<String>) -> Response {
    if key != s.config.peerjs.key || !s.config.peerjs.allow_discovery {
        return (StatusCode::UNAUTHORIZED, "Unauthorized\n").into_response();
    }
    Json(s.peerjs.ids()).into_response()
}

async fn upgrade(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(params): Query<crate::peerjs::conn::Params>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if let Some(refused) = super::ws::origin_refused(&shared, &headers) {
        return refused;
    }
    let limit = shared.config.signaling.max_frame_bytes;
    // Messages up to 4x the limit are read and answered with an ERROR; larger ones close.
    let hard = limit.saturating_mul(4);
    let client =
        super::client_ip::client_ip(peer.ip(), &headers, &shared.config.http.trusted_proxies);
    let ip = super::client_ip::limit_key(client);
    let sig = shared.signaling.clone();
    let pj = shared.peerjs.clone();
    let deps = crate::peerjs::Deps {
        auth: shared.auth.clone(),
        metrics: shared.metrics.clone(),
        lifecycle: shared.lifecycle.clone(),
    };
    let span = tracing::debug_span!("peerjs", peer = %peer, client = %client);
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(WRITE_BUFFER + 2 * limit)
        .max_message_size(hard)
        .max_frame_size(hard)
        .on_upgrade(move |mut socket| {
            async move {
                // The per-IP cap counts PeerJS and /v1/ws connections together.
                if !sig.admit(ip) {
                    deps.metrics
                        .drops
                        .with_label_values(&["ws_connections_per_ip"])
                        .inc();
                    let t = crate::peerjs::conn::notice(
                        "ERROR",
                        "Too many connections from this address",
                    );
                    let _ = socket
                        .send(axum::extract::ws::Message::Text(t.into()))
                        .await;
                    return;
                }
                crate::peerjs::conn::serve(pj, deps, socket, params).await;
                sig.release(ip);
            }
            .instrument(span)
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_v4_uuids_the_client_accepts() {
        let a = super::uuid_v4();
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!(crate::peerjs::conn::valid_peer_id(&a));
        assert_ne!(a, super::uuid_v4());
    }
}
