//! `POST /v1/login`, `GET /v1/ice-servers` and `GET /v1/turn-credentials`: HTTP in,
//! calls on `auth` and `ice` out. Every error is `{"error":{"code","message"}}`.

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::login::{backend_label, Credentials, LoginError};
use crate::auth::{unix_now, AuthError};
use crate::ice::{ice_config, IceServer};
use crate::shared::Shared;

/// Routes of the login API.
pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/login", post(login))
        .route("/v1/ice-servers", get(ice_servers))
        .route("/v1/turn-credentials", get(turn_credentials))
}

/// An API error with its HTTP status and a stable machine-readable code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: malformed JSON, a missing field, a bad parameter.
    #[error("{0}")]
    BadRequest(String),
    /// 401: missing or invalid credentials.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: authenticated but not allowed.
    #[error("{0}")]
    Forbidden(String),
    /// 415: the body is not JSON.
    #[error("expected Content-Type: application/json")]
    UnsupportedMediaType,
    /// 429: too many attempts from this address.
    #[error("too many login attempts; retry later")]
    RateLimited(Duration),
    /// 503: every password-check slot is busy; retry after the given time.
    #[error("the server is busy checking other logins; retry shortly")]
    Busy(Duration),
    /// 500: something on our side.
    #[error("internal error")]
    Internal,
}

impl ApiError {
    fn status_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::UnsupportedMediaType => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
            ApiError::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_code();
        let body = Json(serde_json::json!({
            "error": { "code": code, "message": self.to_string() }
        }));
        let mut r = (status, body).into_response();
        if let ApiError::RateLimited(d) | ApiError::Busy(d) = self {
            if let Ok(v) = HeaderValue::from_str(&d.as_secs().max(1).to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

impl From<LoginError> for ApiError {
    fn from(e: LoginError) -> Self {
        match e {
            LoginError::BadName => ApiError::BadRequest(e.to_string()),
            LoginError::BackendDisabled(_) => ApiError::BadRequest(e.to_string()),
            LoginError::BadPassword | LoginError::Jwt(_) => ApiError::Unauthorized(e.to_string()),
        }
    }
}

/// What a successful login returns.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoginResponse {
    /// Session token for the signaling WebSocket.
    pub token: String,
    /// Unix time the session token expires.
    pub expires_at: u64,
    /// Where to open the signaling WebSocket.
    pub signaling_url: String,
    /// `RTCIceServer` list for `new RTCPeerConnection({iceServers})`.
    pub ice_servers: Vec<IceServer>,
    /// Seconds the TURN credentials in `iceServers` stay valid.
    pub ttl: u64,
    /// The user id the session carries.
    pub user_id: String,
    /// The only room the session may join, when limited by the JWT.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn request_host(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::HOST).and_then(|h| h.to_str().ok())
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

fn signaling_url(shared: &Shared, headers: &HeaderMap, over_tls: bool) -> String {
    if let Some(u) = &shared.config.public.signaling_url {
        return u.clone();
    }
    let scheme = if shared.config.http.tls || over_tls {
        "wss"
    } else {
        "ws"
    };
    let host = request_host(headers)
        .map(str::to_string)
        .unwrap_or_else(|| {
            shared
                .bound
                .get()
                .and_then(|b| b.http)
                .unwrap_or(shared.config.http.listen)
                .to_string()
        });
    format!("{scheme}://{host}/v1/ws")
}

/// Owned form of the login body, parsed before the (blocking) credential check.
enum Presented {
    Name(String),
    Password(String, String),
    Bearer(String),
}

fn field<'a>(
    obj: &'a serde_json::Map<String, serde_json::Value>,
    k: &str,
) -> Result<&'a str, ApiError> {
    match obj.get(k) {
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(_) => Err(ApiError::BadRequest(format!(
            "field `{k}` must be a string"
        ))),
        None => Err(ApiError::BadRequest(format!("missing field `{k}`"))),
    }
}

fn presented(shared: &Shared, headers: &HeaderMap, body: &[u8]) -> Result<Presented, ApiError> {
    if let Some(t) = bearer(headers) {
        return Ok(Presented::Bearer(t.to_string()));
    }
    if !is_json(headers) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("malformed JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| ApiError::BadRequest("body must be a JSON object".into()))?;
    if obj.contains_key("password") || obj.contains_key("username") {
        let u = field(obj, "username")?;
        let p = field(obj, "password")?;
        return Ok(Presented::Password(u.to_string(), p.to_string()));
    }
    if obj.contains_key("name") {
        return Ok(Presented::Name(field(obj, "name")?.to_string()));
    }
    if shared.login.load().enabled(crate::config::Backend::Users) {
        return Err(ApiError::BadRequest("missing field `username`".into()));
    }
    if shared.login.load().enabled(crate::config::Backend::Open) {
        return Err(ApiError::BadRequest("missing field `name`".into()));
    }
    Err(ApiError::Unauthorized(
        "send Authorization: Bearer <token from your app backend>".into(),
    ))
}

async fn login(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    over_tls: Option<axum::Extension<super::OverTls>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<LoginResponse>, ApiError> {
    let started = Instant::now();
    let m = &shared.metrics;
    let r = login_inner(&shared, peer, &headers, body, over_tls.is_some()).await;
    m.login_duration.observe(started.elapsed().as_secs_f64());
    match &r {
        Ok((_, backend)) => m.logins.with_label_values(&[backend, "ok"]).inc(),
        Err((e, backend)) => {
            let result = match e {
                ApiError::RateLimited(_) => "rate_limited",
                ApiError::Busy(_) => "busy",
                ApiError::Unauthorized(_) => "denied",
                ApiError::Internal => "error",
                _ => "bad_request",
            };
            m.logins.with_label_values(&[backend, result]).inc();
        }
    }
    r.map(|(resp, _)| Json(resp)).map_err(|(e, _)| e)
}

async fn login_inner(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    headers: &HeaderMap,
    body: Bytes,
    over_tls: bool,
) -> Result<(LoginResponse, &'static str), (ApiError, &'static str)> {
    let client =
        super::client_ip::client_ip(peer.ip(), headers, &shared.config.http.trusted_proxies);
    shared
        .login_limiter
        .check(super::client_ip::limit_key(client))
        .map_err(|d| (ApiError::RateLimited(d), "none"))?;
    let p = presented(shared, headers, &body).map_err(|e| (e, "none"))?;
    let label = match &p {
        Presented::Name(_) => "open",
        Presented::Password(..) => "users",
        Presented::Bearer(_) => "jwt",
    };
    let now = unix_now();
    let login = shared.login.load_full();
    let identity = match p {
        // argon2 is deliberately slow: keep it off the async workers, and run at most
        // `auth.max_concurrent_password_checks` at once; beyond, answer 503 at once rather
        // than queue blocking threads (each argon2id check holds about 19 MiB).
        Presented::Password(u, pw) => {
            let Ok(permit) = shared.password_checks.clone().try_acquire_owned() else {
                return Err((ApiError::Busy(Duration::from_secs(1)), label));
            };
            let slot = CheckSlot::new(permit, shared.metrics.password_checks_active.clone());
            let r = tokio::task::spawn_blocking(move || {
                let _slot = slot;
                login.authenticate(
                    &Credentials::Password {
                        username: &u,
                        password: &pw,
                    },
                    now,
                )
            })
            .await;
            r.map_err(|_| (ApiError::Internal, label))?
        }
        // A name check and a signature check take microseconds: no thread hop needed.
        Presented::Name(n) => login.authenticate(&Credentials::Name(&n), now),
        Presented::Bearer(t) => login.authenticate_bearer(&t, now).await,
    }
    .map_err(|e| {
        tracing::info!(backend = label, error = %e, "login refused");
        (ApiError::from(e), label)
    })?;
    let (token, session) = shared
        .auth
        .issue_session(&identity.user, identity.room.as_deref(), now);
    let ice = crate::ice::ice_config_until(
        shared,
        request_host(headers),
        &identity.user,
        now,
        Some(shared.auth.session_end(&session)),
    );
    if ice.credentials.is_some() {
        shared
            .metrics
            .turn_credentials_issued
            .with_label_values(&["login"])
            .inc();
    }
    tracing::info!(backend = backend_label(identity.backend), user = %identity.user, "login");
    Ok((
        LoginResponse {
            token,
            expires_at: session.expires_at,
            signaling_url: signaling_url(shared, headers, over_tls),
            ice_servers: ice.servers,
            ttl: shared.auth.turn_ttl(),
            user_id: identity.user,
            room: identity.room,
        },
        label,
    ))
}

/// Fresh `iceServers` for a logged-in session (long calls outlive TURN credentials).
async fn ice_servers(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let token = bearer(&headers).ok_or_else(|| {
        ApiError::Unauthorized("send Authorization: Bearer <session token>".into())
    })?;
    let now = unix_now();
    let session = shared.auth.verify_session(token, now).map_err(|e| {
        shared
            .metrics
            .auth_failures
            .with_label_values(&[e.reason()])
            .inc();
        ApiError::Unauthorized(format!("session token refused: {e}"))
    })?;
    // TURN credentials never outlast the login they are handed to.
    let end = shared.auth.session_end(&session);
    let ice = crate::ice::ice_refresh(&shared, request_host(&headers), &session.user, now, end);
    shared
        .metrics
        .turn_credentials_issued
        .with_label_values(&["ice_servers"])
        .inc();
    Ok(Json(serde_json::json!({
        "iceServers": ice.servers,
        "ttl": ice.credentials.as_ref().map_or(shared.auth.turn_ttl(), |c| c.ttl),
        "expiresAt": ice.credentials.map(|c| c.expires_at),
    })))
}

/// Query of the draft-uberti-behave-turn-rest endpoint.
#[derive(Debug, Deserialize)]
pub struct RestQuery {
    service: Option<String>,
    username: Option<String>,
    key: Option<String>,
}

/// draft-uberti-behave-turn-rest: `{username, password, ttl, uris}` for an API key holder.
async fn turn_credentials(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<RestQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let key = q
        .key
        .as_deref()
        .ok_or_else(|| ApiError::Unauthorized("missing query parameter `key`".into()))?;
    // Compared against every key so timing does not reveal which prefix matched.
    if !shared.auth.api_key_ok(key) {
        shared
            .metrics
            .auth_failures
            .with_label_values(&[AuthError::BadSignature.reason()])
            .inc();
        return Err(if !shared.auth.has_api_keys() {
            ApiError::Forbidden("no API keys are configured (auth.api_keys)".into())
        } else {
            ApiError::Unauthorized("invalid API key".into())
        });
    }
    match q.service.as_deref() {
        Some("turn") | None => {}
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "unsupported service `{other}`; only `turn`"
            )))
        }
    }
    let user = q.username.as_deref().filter(|u| !u.is_empty());
    if user.is_some_and(|u| u.len() > 128 || u.chars().any(char::is_control)) {
        return Err(ApiError::BadRequest(
            "`username` must be at most 128 printable characters".into(),
        ));
    }
    let now = unix_now();
    let ice = ice_config(&shared, request_host(&headers), user.unwrap_or(""), now);
    let Some(cred) = ice.credentials else {
        return Err(ApiError::Forbidden("the TURN relay is disabled".into()));
    };
    shared
        .metrics
        .turn_credentials_issued
        .with_label_values(&["rest_api"])
        .inc();
    let uris: Vec<String> = ice.servers.into_iter().flat_map(|s| s.urls).collect();
    Ok(Json(serde_json::json!({
        "username": cred.username,
        "password": cred.password,
        "ttl": cred.ttl,
        "uris": uris,
    })))
}

/// A password-check slot: the semaphore permit and the `password_checks_active` gauge move
/// together into the blocking task, so the gauge falls before the permit is released (it
/// never reads above the cap) and also when the client goes away mid-check.
struct CheckSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    active: prometheus::IntGauge,
}

impl CheckSlot {
    fn new(permit: tokio::sync::OwnedSemaphorePermit, active: prometheus::IntGauge) -> CheckSlot {
        active.inc();
        CheckSlot {
            _permit: permit,
            active,
        }
    }
}

impl Drop for CheckSlot {
    fn drop(&mut self) {
        // Runs before the fields drop, so before the permit goes back.
        self.active.dec();
    }
}
