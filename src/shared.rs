//! The state the parts of the server share, built once from the configuration before
//! anything is bound. `server.rs` wires it to the listeners; the parts take what they use.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::auth::Auth;
use crate::config::Config;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;

use crate::listener::TurnShared;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not bind.
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// TLS material could not be loaded.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The JWT public key could not be loaded.
    #[error(transparent)]
    JwtKey(#[from] crate::auth::jwt::KeyError),
    /// `turn.kernel_offload = "on"` and the kernel fast path cannot start.
    #[error("turn.kernel_offload = \"on\" but the kernel fast path cannot start")]
    Offload(#[from] crate::turn::offload::OffloadError),
    /// Cluster mode could not be set up.
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    /// A secret file or the webhook client could not be set up.
    #[error(transparent)]
    Webhooks(#[from] crate::webhooks::WebhookError),
    /// A secret file named in the configuration could not be read.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// Everything the listeners and handlers share.
#[derive(Debug)]
pub struct Shared {
    /// Effective configuration.
    pub config: Arc<Config>,
    /// The auth service.
    pub auth: Arc<Auth>,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    /// Readiness and shutdown.
    pub lifecycle: Arc<Lifecycle>,
    /// Addresses actually bound, filled in at start.
    pub bound: std::sync::OnceLock<Bound>,
    /// Login backends; swapped on SIGHUP (JWT keys and static users).
    pub login: arc_swap::ArcSwap<crate::auth::login::Login>,
    /// Password checks allowed at once (`auth.max_concurrent_password_checks`).
    pub password_checks: Arc<tokio::sync::Semaphore>,
    /// Room signaling.
    pub signaling: Arc<crate::signaling::conn::Signaling>,
    /// The PeerJS realm (`[peerjs]`): one per server, so an id is unique on the node.
    pub peerjs: Arc<crate::peerjs::PeerJs>,
    /// This node's part of the cluster, in cluster mode.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Per-IP login attempt limiter.
    pub login_limiter: crate::auth::login::RateLimiter,
    /// The certificate of every TLS listener, when any is configured; reloaded on SIGHUP.
    pub tls: Option<Arc<crate::tls::ReloadableCert>>,
    /// Allowed origins for CORS and the WebSocket Origin check; swapped on SIGHUP.
    pub origins: arc_swap::ArcSwap<Vec<String>>,
    /// TURN relay settings and the process-wide quota/port pool.
    pub turn: TurnShared,
    /// Global and per-IP caps on TCP/TLS connections to the STUN/TURN ports.
    pub streams: Arc<crate::listener::tcp::StreamLimits>,
    /// The kernel fast path for ChannelData, when `turn.kernel_offload` enabled it.
    pub offload: Option<Arc<crate::turn::offload::Offload>>,
    /// Webhook delivery to the app backend (a no-op handle when none is configured).
    pub webhooks: crate::webhooks::Webhooks,
    /// Bearer tokens of the server API (`auth.admin_tokens` plus `auth.admin_tokens_file`);
    /// swapped on SIGHUP so tokens can be rotated without a restart.
    pub admin_tokens: arc_swap::ArcSwap<Vec<crate::secret::Secret>>,
    /// What the STUN/TURN listeners use, and nothing else (the same handles as above).
    pub listener: Arc<crate::listener::Deps>,
    /// The issuer's JWT key set (`auth.jwt.jwks_url`), kept across reloads; `server.rs`
    /// runs its refresh task.
    pub jwks: Option<Arc<crate::auth::jwks::Jwks>>,
}

/// Why a reload was refused (the running configuration stays in force).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The new certificate or key cannot be used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The new JWT public key cannot be used.
    #[error(transparent)]
    JwtKey(#[from] crate::auth::jwt::KeyError),
    /// The new configuration changes something fixed at start (routes, bound sockets).
    #[error("{key} changed; it is fixed at start, restart to apply it")]
    NeedsRestart {
        /// The configuration key that changed.
        key: &'static str,
    },
}

/// Keys that decide what is mounted or bound at start; a reload must not change them, or the
/// running routes and sockets would no longer match the configuration (a server API turned
/// off by reload would stay mounted, with whatever tokens the new file has).
fn fixed_at_start(old: &Config, new: &Config) -> Result<(), ReloadError> {
    let changed = [
        ("http.admin_api", old.http.admin_api != new.http.admin_api),
        ("http.listen", old.http.listen != new.http.listen),
        (
            "http.metrics_listen",
            old.http.metrics_listen != new.http.metrics_listen,
        ),
        ("turn.listen", old.turn.listen != new.turn.listen),
        (
            "turn.tls_listen",
            old.turn.tls_listen != new.turn.tls_listen,
        ),
        (
            "shared_port.listen",
            old.shared_port.listen != new.shared_port.listen,
        ),
        // The ACME task is started at start with these settings (files vs ACME too).
        ("tls.acme", old.tls.acme != new.tls.acme),
        // Delivery lanes are started per URL at start; only the secret is reloaded.
        ("webhooks.urls", old.webhooks.urls != new.webhooks.urls),
        // The key set and its refresh task are built at start.
        (
            "auth.jwt.jwks_url",
            old.auth.jwt.jwks_url != new.auth.jwt.jwks_url,
        ),
    ];
    match changed.iter().find(|(_, c)| *c) {
        Some((key, _)) => Err(ReloadError::NeedsRestart { key }),
        None => Ok(()),
    }
}

impl Shared {
    /// Apply what SIGHUP reloads: auth secrets (TURN REST secrets, static TURN users, session
    /// keys), the login backends (static users, JWT keys), the server API tokens, the webhook
    /// signing secret, the allowed origins and the TLS
    /// certificate. Everything is checked before anything is swapped, so a bad reload
    /// changes nothing; live sessions are untouched. A reload that changes `http.admin_api`
    /// or a listen address is refused: those are fixed at start.
    pub fn reload(&self, new: &Config) -> Result<(), ReloadError> {
        new.validate()?;
        fixed_at_start(&self.config, new)?;
        let login = crate::auth::login::Login::new(&new.auth)?.with_jwks(self.jwks.clone());
        let admin_tokens = admin_tokens(new)?;
        let hook_secret = if self.webhooks.enabled() {
            Some(crate::webhooks::signing_secret(&new.webhooks)?)
        } else {
            None
        };
        if let Some(tls) = &self.tls {
            tls.reload()?;
            if !tls.is_acme() {
                crate::acme::record_expiry(Some(tls), &self.metrics.acme);
            }
        }
        if let Some(secret) = hook_secret {
            self.webhooks.set_secret(secret);
        }
        self.admin_tokens.store(Arc::new(admin_tokens));
        self.login.store(Arc::new(login));
        self.auth.reload(&new.auth);
        self.origins
            .store(Arc::new(new.http.allowed_origins.clone()));
        Ok(())
    }

    /// Work that a drain waits for: TURN allocations and signaling connections.
    pub fn active_work(&self) -> i64 {
        let m = &self.metrics;
        let allocs: i64 = ["udp", "tcp", "tls"]
            .iter()
            .map(|t| m.turn_allocations_active.with_label_values(&[t]).get())
            .sum();
        allocs + m.ws_connections_active.get()
    }

    /// Whether a browser `Origin` may use the HTTP API and signaling.
    pub fn origin_allowed(&self, origin: &str) -> bool {
        let list = self.origins.load();
        list.iter()
            .any(|o| o == "*" || o.eq_ignore_ascii_case(origin.trim_end_matches('/')))
    }
}

impl Shared {
    /// The state every part shares, before anything is bound.
    pub(crate) fn build(
        config: Arc<Config>,
        tls: Option<Arc<crate::tls::ReloadableCert>>,
    ) -> Result<Arc<Shared>, StartError> {
        let metrics = Arc::new(Metrics::new());
        let jwks =
            crate::auth::jwks::Jwks::new(&config.auth.jwt, &metrics.jwks_fetches).map_err(|e| {
                crate::config::ConfigError::Key {
                    key: "auth.jwt.jwks_url".into(),
                    message: e.to_string(),
                }
            })?;
        let login = crate::auth::login::Login::new(&config.auth)?.with_jwks(jwks.clone());
        let offload = if config.turn.relay && config.turn.udp {
            let mut addrs: Vec<std::net::IpAddr> =
                config.turn.listen.iter().map(|a| a.ip()).collect();
            addrs.extend(config.turn.relay_bind);
            crate::turn::offload::Offload::enable_with(
                config.turn.kernel_offload,
                config.turn.kernel_offload_attach,
                &addrs,
            )?
            .map(Arc::new)
        } else {
            None
        };
        if config.auth.backends.contains(&crate::config::Backend::Open)
            && !config.http.listen.ip().is_loopback()
        {
            tracing::warn!(
                listen = %config.http.listen,
                "the `open` login backend is enabled on a non-loopback address: anyone can log in \
                 (auth.allow_open_on_public = true)"
            );
        }
        let lifecycle = Arc::new(Lifecycle::new());
        let (signaling, cluster) = if config.cluster.enabled() {
            let deps = crate::cluster::Deps {
                metrics: metrics.clone(),
                lifecycle: lifecycle.clone(),
            };
            let (s, c) = crate::cluster::Cluster::build(&config, deps)?;
            (s, Some(c))
        } else {
            (
                Arc::new(crate::signaling::conn::Signaling::new(&config.signaling)),
                None,
            )
        };
        let webhooks = crate::webhooks::Webhooks::start(&config.webhooks, &metrics)?;
        signaling.set_webhooks(webhooks.clone());
        // In cluster mode PeerJS ids are claimed and relayed through the cluster.
        let router = cluster.as_ref().map(|c| {
            Arc::new(crate::cluster::peerjs::Router(c.clone()))
                as Arc<dyn crate::peerjs::router::PeerjsRouter>
        });
        let peerjs = Arc::new(crate::peerjs::PeerJs::new(
            &config.peerjs,
            &config.signaling,
            webhooks.clone(),
            router,
        ));
        if let Some(c) = &cluster {
            c.attach_peerjs(&peerjs);
        }
        let admin_tokens = admin_tokens(&config)?;
        if config.http.admin_api && admin_tokens.is_empty() {
            tracing::warn!(
                "the server API (/v1/admin/) is on without auth.admin_tokens: every local \
                 process may use it (loopback only)"
            );
        }
        let auth = Arc::new(Auth::new(&config.auth));
        let turn = TurnShared::new(&config);
        let streams = crate::listener::tcp::StreamLimits::new(
            config.turn.max_stream_connections,
            config.turn.max_stream_connections_per_ip,
        );
        let listener = Arc::new(crate::listener::Deps {
            config: config.turn.clone(),
            max_tls_handshakes: config.tls.max_concurrent_handshakes,
            auth: auth.clone(),
            metrics: metrics.clone(),
            lifecycle: lifecycle.clone(),
            turn: turn.clone(),
            streams: streams.clone(),
            offload: offload.clone(),
            webhooks: webhooks.clone(),
        });
        Ok(Arc::new(Shared {
            login: arc_swap::ArcSwap::from_pointee(login),
            password_checks: Arc::new(tokio::sync::Semaphore::new(
                config.auth.password_check_slots(),
            )),
            peerjs,
            signaling,
            cluster,
            webhooks,
            admin_tokens: arc_swap::ArcSwap::from_pointee(admin_tokens),
            login_limiter: crate::auth::login::RateLimiter::new(config.auth.login_rate_per_minute),
            tls,
            auth,
            metrics,
            lifecycle,
            bound: std::sync::OnceLock::new(),
            origins: arc_swap::ArcSwap::from_pointee(config.http.allowed_origins.clone()),
            turn,
            streams,
            offload,
            listener,
            jwks,
            config,
        }))
    }

    /// Shared state that binds nothing and is never ready: fuzz targets and load tools drive
    /// the HTTP router and the signaling handler in-process with it.
    #[doc(hidden)]
    pub fn unbound(config: Config) -> Result<Arc<Shared>, StartError> {
        Shared::build(Arc::new(config), None)
    }
}

/// Addresses actually bound by a running server.
#[derive(Debug, Clone, Default)]
pub struct Bound {
    /// HTTP listener.
    pub http: Option<SocketAddr>,
    /// Separate metrics listener, if configured.
    pub metrics: Option<SocketAddr>,
    /// STUN/TURN over UDP.
    pub udp: Vec<SocketAddr>,
    /// STUN/TURN over TCP.
    pub tcp: Vec<SocketAddr>,
    /// STUN/TURN over TLS.
    pub tls: Vec<SocketAddr>,
    /// The shared port (HTTPS, WSS, `turns:`, `turn:` over TCP).
    pub shared: Vec<SocketAddr>,
}

/// The server API's tokens: `auth.admin_tokens` and the lines of `auth.admin_tokens_file`.
/// Off loopback the API needs at least one (the file may turn out empty).
fn admin_tokens(config: &Config) -> Result<Vec<crate::secret::Secret>, crate::config::ConfigError> {
    let mut tokens = config.auth.admin_tokens.clone();
    if let Some(p) = &config.auth.admin_tokens_file {
        tokens.extend(crate::secret::read_list(p).map_err(|e| {
            crate::config::ConfigError::Key {
                key: "auth.admin_tokens_file".into(),
                message: e.to_string(),
            }
        })?);
    }
    if let Some(short) = tokens.iter().find(|t| t.len() < 16) {
        return Err(crate::config::ConfigError::Key {
            key: "auth.admin_tokens_file".into(),
            message: format!(
                "a token of {} characters; at least 16 are required",
                short.len()
            ),
        });
    }
    if config.http.admin_api && tokens.is_empty() && !config.http.listen.ip().is_loopback() {
        return Err(crate::config::ConfigError::Key {
            key: "auth.admin_tokens".into(),
            message: "http.admin_api is on off loopback and no admin token is set".into(),
        });
    }
    Ok(tokens)
}
