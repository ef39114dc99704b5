//! axum routes only: handlers translate HTTP into calls on auth, signaling and metrics.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::net::SocketAddr;
use std::sync::Arc;

use crate::lifecycle::shutdown_signal;
use crate::shared::Shared;

pub mod admin;
pub mod client_ip;
pub mod login;
pub mod peerjs;
pub mod ws;

/// Serve `make_router(shared)` on `listener` (plain TCP or TLS) until shutdown.
pub async fn serve<L>(shared: Arc<Shared>, listener: L, make_router: fn(Arc<Shared>) -> Router)
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    use axum::serve::ListenerExt;
    let app = make_router(shared.clone());
    let stop = shutdown_signal(shared.lifecycle.subscribe());
    // `tap_io` makes the client address available as `ConnectInfo<SocketAddr>` for any listener.
    let r = axum::serve(
        listener.tap_io(|_| {}),
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(stop)
    .await;
    if let Err(e) = r {
        tracing::error!(error = %e, "HTTP server stopped");
    }
}

/// Marks requests that reached the shared port over TLS, so login answers name `wss://`.
#[derive(Debug, Clone, Copy)]
pub struct OverTls;

/// The main HTTP API as the shared port serves it (always behind TLS).
pub fn router_over_tls(shared: Arc<Shared>) -> Router {
    router(shared).layer(axum::Extension(OverTls))
}

/// The main HTTP API.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/v1/info", get(info))
        .route("/metrics", get(metrics))
        .merge(login::routes())
        .merge(ws::routes())
        .merge(admin::routes(shared.clone()))
        .merge(peerjs::routes(&shared))
        .merge(web_routes(shared.config.http.demo))
        .layer(cors(shared.clone()))
        .with_state(shared)
}

/// The demo page and the JS client, embedded in the binary.
fn web_routes(demo: bool) -> Router<Arc<Shared>> {
    fn file(ct: &'static str, body: &'static str) -> Response {
        ([(header::CONTENT_TYPE, ct)], body).into_response()
    }
    // The client library is useful without the demo page, so it is always served.
    let r = Router::new().route(
        "/switchboard.js",
        get(|| async {
            file(
                "text/javascript; charset=utf-8",
                include_str!("../../clients/js/switchboard.js"),
            )
        }),
    );
    if !demo {
        return r;
    }
    r.route(
        "/",
        get(|| async {
            file(
                "text/html; charset=utf-8",
                include_str!("../../web/index.html"),
            )
        }),
    )
    .route("/favicon.svg", get(favicon))
    // Browsers ask for /favicon.ico on their own; an SVG answered there is drawn just as well.
    .route("/favicon.ico", get(favicon))
    .route(
        "/demo.js",
        get(|| async {
            file(
                "text/javascript; charset=utf-8",
                include_str!("../../web/demo.js"),
            )
        }),
    )
}

/// The demo page's icon, so that browsers do not log a 404 for every visit.
async fn favicon() -> Response {
    (
        [
            (header::CONTENT_TYPE, "image/svg+xml"),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        include_str!("../../web/favicon.svg"),
    )
        .into_response()
}

/// CORS for browser apps on other origins, following `http.allowed_origins` (reloadable).
fn cors(shared: Arc<Shared>) -> tower_http::cors::CorsLayer {
    use axum::http::Method;
    use tower_http::cors::{AllowOrigin, CorsLayer};
    CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(move |origin, _| {
            origin
                .to_str()
                .map(|o| shared.origin_allowed(o))
                .unwrap_or(false)
        }))
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION])
        .expose_headers([header::RETRY_AFTER])
        .max_age(std::time::Duration::from_secs(600))
}

/// Only `/metrics`, for a separate scrape address.
pub fn metrics_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(shared)
}

async fn livez() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<Arc<Shared>>) -> Response {
    if s.lifecycle.is_ready() {
        match &s.cluster {
            // Still ready: TURN works. The body says what does not.
            Some(c) if c.node_id_in_use() => (
                StatusCode::OK,
                "ready (degraded: another live process uses this cluster.node_id; this node \
                 owns no room)\n",
            )
                .into_response(),
            // Still ready: local rooms work. The body says what does not.
            Some(c) if !c.is_up() => (
                StatusCode::OK,
                "ready (degraded: cluster Redis unreachable; cross-node rooms unavailable)\n",
            )
                .into_response(),
            _ => (StatusCode::OK, "ready\n").into_response(),
        }
    } else if s.lifecycle.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    }
}

async fn info(State(s): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let c = &s.config;
    let b = s.bound.get().cloned().unwrap_or_default();
    Json(serde_json::json!({
        "name": "switchboard",
        "version": env!("CARGO_PKG_VERSION"),
        "services": {
            "stun": { "udp": b.udp, "tcp": b.tcp, "tls": b.tls, "shared": b.shared },
            "turn": { "enabled": c.turn.relay, "realm": c.turn.realm },
            "signaling": { "path": "/v1/ws" },
            "login": { "backends": c.auth.backends },
        },
        "ready": s.lifecycle.is_ready(),
    }))
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}
