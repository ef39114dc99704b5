//! `/v1/admin/…` routes: the server API for app backends (see docs/http-api.md). Each
//! handler checks nothing itself: the bearer check is a layer, the work is in `admin` and
//! `signaling`.

use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::sync::Arc;

use crate::admin::AdminError;
use crate::shared::Shared;

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let status = match self {
            AdminError::Unauthorized => StatusCode::UNAUTHORIZED,
            AdminError::UnknownRoom | AdminError::UnknownPeer => StatusCode::NOT_FOUND,
            AdminError::BadRequest(_) => StatusCode::BAD_REQUEST,
        };
        let body = Json(serde_json::json!({
            "error": { "code": self.code(), "message": self.to_string() }
        }));
        if status == StatusCode::UNAUTHORIZED {
            return (status, [(header::WWW_AUTHENTICATE, "Bearer")], body).into_response();
        }
        (status, body).into_response()
    }
}

/// The server API routes, every one behind the admin bearer check; empty when
/// `http.admin_api` is off.
pub fn routes(shared: Arc<Shared>) -> Router<Arc<Shared>> {
    if !shared.config.http.admin_api {
        return Router::new();
    }
    Router::new()
        .route("/v1/admin/rooms", get(list_rooms))
        .route("/v1/admin/rooms/{room}", get(get_room))
        .route("/v1/admin/rooms/{room}/close", post(close_room))
        .route("/v1/admin/rooms/{room}/peers/{peer}/kick", post(kick_peer))
        .route("/v1/admin/users/{user}/revoke", post(revoke_user))
        .route("/v1/admin/nodes", get(list_nodes))
        .route("/v1/admin/peerjs/{id}/kick", post(kick_peerjs))
        .layer(axum::middleware::from_fn_with_state(shared, require_admin))
}

/// Whether a request comes from this host itself: its client address, as
/// `http.trusted_proxies` resolves it, is loopback, and no proxy relayed it (a reverse proxy
/// on the same host connects from loopback for clients anywhere). A request without a known
/// peer address (driven in-process, not served) is not local.
pub fn is_local(
    peer: Option<std::net::IpAddr>,
    headers: &axum::http::HeaderMap,
    trusted: &[String],
) -> bool {
    let Some(peer) = peer else {
        return false;
    };
    let relayed = ["forwarded", "x-forwarded-for", "x-real-ip"]
        .iter()
        .any(|h| headers.contains_key(*h));
    !relayed && super::client_ip::client_ip(peer, headers, trusted).is_loopback()
}

async fn require_admin(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    let local = is_local(peer, req.headers(), &s.config.http.trusted_proxies);
    let h = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    // A listed admin token, or a JWT from the app backend with `admin: true`.
    let by_jwt = || {
        crate::admin::bearer(h)
            .and_then(|t| std::str::from_utf8(t).ok())
            .is_some_and(|t| s.login.load().admin_jwt(t, crate::auth::unix_now()))
    };
    if let Err(e) = crate::admin::authorize(&s.admin_tokens.load(), h, local).or_else(|e| {
        if by_jwt() {
            Ok(())
        } else {
            Err(e)
        }
    }) {
        s.metrics
            .admin_requests
            .with_label_values(&[e.result()])
            .inc();
        return e.into_response();
    }
    let r = next.run(req).await;
    let result = match r.status() {
        s if s.is_success() => "ok",
        StatusCode::NOT_FOUND => "not_found",
        _ => "bad_request",
    };
    s.metrics.admin_requests.with_label_values(&[result]).inc();
    r
}

async fn list_rooms(State(s): State<Arc<Shared>>) -> Response {
    Json(serde_json::json!({ "rooms": s.signaling.rooms() })).into_response()
}

/// The TURN membership records this node sees (itself included); empty outside cluster mode.
async fn list_nodes(State(s): State<Arc<Shared>>) -> Response {
    let snap = s.turn.settings.live.members.load();
    Json(serde_json::json!({ "nodes": snap.nodes })).into_response()
}

async fn get_room(State(s): State<Arc<Shared>>, Path(room): Path<String>) -> Response {
    match s.signaling.room(&room) {
        Some(r) => Json(r).into_response(),
        None => AdminError::UnknownRoom.into_response(),
    }
}

async fn close_room(State(s): State<Arc<Shared>>, Path(room): Path<String>) -> Response {
    match s.signaling.close_room(&room, &s.metrics) {
        Ok(n) => Json(serde_json::json!({ "room": room, "closed": true, "peersRemoved": n }))
            .into_response(),
        Err(e) => AdminError::from(e).into_response(),
    }
}

async fn kick_peer(
    State(s): State<Arc<Shared>>,
    Path((room, peer)): Path<(String, String)>,
) -> Response {
    match s.signaling.kick_peer(&room, &peer, &s.metrics) {
        Ok(()) => {
            Json(serde_json::json!({ "room": room, "peer": peer, "kicked": true })).into_response()
        }
        Err(e) => AdminError::from(e).into_response(),
    }
}

/// Close a PeerJS connection by its id and free the id (docs/peerjs.md).
async fn kick_peerjs(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    if s.peerjs.kick(&id) {
        Json(serde_json::json!({ "peerjsId": id, "kicked": true })).into_response()
    } else {
        crate::admin::AdminError::UnknownPeer.into_response()
    }
}

async fn revoke_user(State(s): State<Arc<Shared>>, Path(user): Path<String>) -> Response {
    match crate::admin::revoke_user(&s, &user) {
        Ok(r) => Json(r).into_response(),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::is_local;
    use axum::http::HeaderMap;

    #[test]
    fn only_unrelayed_loopback_clients_are_local() {
        let none = HeaderMap::new();
        let mut xff = HeaderMap::new();
        xff.insert("x-forwarded-for", "203.0.113.30".parse().unwrap());
        let lo = Some("127.0.0.1".parse().unwrap());
        let v6 = Some("::ffff:127.0.0.1".parse().unwrap());
        let public = Some("203.0.113.10".parse().unwrap());
        assert!(is_local(lo, &none, &[]));
        assert!(is_local(v6, &none, &[]));
        assert!(!is_local(public, &none, &[]));
        assert!(!is_local(None, &none, &[]), "in-process, no peer");
        // A proxy on this host relays someone else: not local, trusted or not.
        assert!(!is_local(lo, &xff, &[]));
        assert!(!is_local(lo, &xff, &["127.0.0.1/32".to_string()]));
        let mut real = HeaderMap::new();
        real.insert("x-real-ip", "203.0.113.30".parse().unwrap());
        assert!(!is_local(lo, &real, &[]));
    }
}
