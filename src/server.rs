//! The embeddable server: binds every configured listener on the current tokio runtime
//! and hands back the bound addresses, so tests can run it in-process on port 0.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::auth::Auth;
use crate::config::Config;
use crate::metrics::Metrics;

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

/// Readiness and shutdown signals shared by every task.
#[derive(Debug)]
pub struct Lifecycle {
    ready: AtomicBool,
    draining: AtomicBool,
    shutdown: watch::Sender<bool>,
}

impl Lifecycle {
    fn new() -> Lifecycle {
        Lifecycle {
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            shutdown: watch::channel(false).0,
        }
    }
    /// True once every listener is bound and until draining starts.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.is_draining()
    }
    /// True after SIGTERM: refuse new work, let existing work finish.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
    /// Stop taking new work.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::Release);
    }
    /// Tell every task to stop now.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }
    /// A receiver that flips to `true` on shutdown.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }
    /// Whether shutdown was requested.
    pub fn is_shutdown(&self) -> bool {
        *self.shutdown.borrow()
    }
}

/// Resolve when `rx` sees shutdown (or its sender is gone).
pub async fn shutdown_signal(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
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
    pub lifecycle: Lifecycle,
    /// Addresses actually bound, filled in at start.
    pub bound: std::sync::OnceLock<Bound>,
    /// Login backends; swapped on SIGHUP (JWT keys and static users).
    pub login: arc_swap::ArcSwap<crate::auth::login::Login>,
    /// Password checks allowed at once (`auth.max_concurrent_password_checks`).
    pub password_checks: Arc<tokio::sync::Semaphore>,
    /// Room signaling.
    pub signaling: Arc<crate::signaling::conn::Signaling>,
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
}

/// TURN state shared by every STUN/TURN listener.
#[derive(Debug)]
pub struct TurnShared {
    /// Relay addressing, limits and peer policy, derived from config once.
    pub settings: Arc<crate::turn::core::Settings>,
    /// Allocation quotas, used relay ports and the nonce key.
    pub pool: Arc<crate::turn::core::Pool>,
    /// RFC 6062 peer connections waiting for ConnectionBind.
    pub conns: Arc<crate::turn::relay::Conns>,
}

impl TurnShared {
    fn new(config: &Config) -> TurnShared {
        let allow_loopback = config.loopback_only() && config.turn.allow_peers.is_empty();
        if allow_loopback && config.turn.relay {
            tracing::info!(
                "every listener is on loopback and turn.allow_peers is empty: \
                 the TURN relay allows loopback peers (127.0.0.0/8, ::1) for local use"
            );
        }
        let mut settings = crate::turn::core::Settings::from_config(&config.turn, allow_loopback);
        let t = &config.turn;
        let mut own = crate::listener::host_addresses();
        own.extend(t.listen.iter().chain(&t.tls_listen).map(|a| a.ip()));
        own.extend(t.relay_bind.iter().chain(&t.relay_bind_v6));
        own.extend(
            t.relay_ip
                .iter()
                .flat_map(|r| [Some(r.public), r.private])
                .flatten(),
        );
        own.push(config.http.listen.ip());
        settings
            .policy
            .set_own(&own, t.relay_port_min..=t.relay_port_max);
        TurnShared {
            settings: Arc::new(settings),
            pool: Arc::new(crate::turn::core::Pool::new()),
            conns: Arc::new(crate::turn::relay::Conns::new(
                config.turn.max_pending_connections_per_allocation,
            )),
        }
    }
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
}

impl Shared {
    /// Apply what SIGHUP reloads: auth secrets (TURN REST secrets, static TURN users, session
    /// keys), the login backends (static users, JWT keys), the server API tokens, the allowed
    /// origins and the TLS
    /// certificate. Everything is checked before anything is swapped, so a bad reload
    /// changes nothing; live sessions are untouched.
    pub fn reload(&self, new: &Config) -> Result<(), ReloadError> {
        new.validate()?;
        let login = crate::auth::login::Login::new(&new.auth)?;
        let admin_tokens = admin_tokens(new)?;
        if let Some(tls) = &self.tls {
            tls.reload()?;
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
    fn build(
        config: Arc<Config>,
        tls: Option<Arc<crate::tls::ReloadableCert>>,
    ) -> Result<Arc<Shared>, StartError> {
        let login = crate::auth::login::Login::new(&config.auth)?;
        let offload = if config.turn.relay && config.turn.udp {
            let mut addrs: Vec<std::net::IpAddr> =
                config.turn.listen.iter().map(|a| a.ip()).collect();
            addrs.extend(config.turn.relay_bind);
            crate::turn::offload::Offload::enable(config.turn.kernel_offload, &addrs)?.map(Arc::new)
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
        let metrics = Arc::new(Metrics::new());
        let (signaling, cluster) = if config.cluster.enabled() {
            let (s, c) = crate::cluster::Cluster::build(&config, metrics.clone())?;
            (s, Some(c))
        } else {
            (
                Arc::new(crate::signaling::conn::Signaling::new(&config.signaling)),
                None,
            )
        };
        let webhooks = crate::webhooks::Webhooks::start(&config.webhooks, &metrics)?;
        signaling.set_webhooks(webhooks.clone());
        let admin_tokens = admin_tokens(&config)?;
        if config.http.admin_api && admin_tokens.is_empty() {
            tracing::warn!(
                "the server API (/v1/admin/) is on without auth.admin_tokens: every local \
                 process may use it (loopback only)"
            );
        }
        Ok(Arc::new(Shared {
            login: arc_swap::ArcSwap::from_pointee(login),
            password_checks: Arc::new(tokio::sync::Semaphore::new(
                config.auth.password_check_slots(),
            )),
            signaling,
            cluster,
            webhooks,
            admin_tokens: arc_swap::ArcSwap::from_pointee(admin_tokens),
            login_limiter: crate::auth::login::RateLimiter::new(config.auth.login_rate_per_minute),
            tls,
            auth: Arc::new(Auth::new(&config.auth)),
            metrics,
            lifecycle: Lifecycle::new(),
            bound: std::sync::OnceLock::new(),
            origins: arc_swap::ArcSwap::from_pointee(config.http.allowed_origins.clone()),
            turn: TurnShared::new(&config),
            streams: crate::listener::tcp::StreamLimits::new(
                config.turn.max_stream_connections,
                config.turn.max_stream_connections_per_ip,
            ),
            offload,
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
}

/// Builder for a switchboard server.
#[derive(Debug)]
pub struct Server {
    config: Config,
}

/// A started server; dropping it does not stop it, call [`RunningServer::shutdown`].
pub struct RunningServer {
    shared: Arc<Shared>,
    tasks: JoinSet<()>,
}

impl Server {
    /// Prepare a server for `config` (already validated).
    pub fn new(config: Config) -> Server {
        Server { config }
    }

    /// Bind every listener and start serving on the current runtime.
    pub async fn start(self) -> Result<RunningServer, StartError> {
        let config = Arc::new(self.config);
        let tls = if config.http.tls || !config.turn.tls_listen.is_empty() {
            match (&config.tls.cert_file, &config.tls.key_file) {
                (Some(c), Some(k)) => Some(Arc::new(crate::tls::ReloadableCert::load(c, k)?)),
                // Config validation requires both; keep the error explicit anyway.
                _ => {
                    return Err(crate::tls::TlsError::Config(
                        "tls.cert_file and tls.key_file are required".into(),
                    )
                    .into())
                }
            }
        } else {
            None
        };
        let shared = Shared::build(config.clone(), tls.clone())?;
        let mut tasks = JoinSet::new();
        let mut bound = Bound::default();

        for &addr in &config.turn.listen {
            let (udp, tcp) = bind_stun_pair(addr, config.turn.udp, config.turn.tcp)?;
            if let Some(sock) = udp {
                let local = sock.local_addr().unwrap_or(addr);
                tracing::info!(addr = %local, "STUN/TURN listening on UDP");
                bound.udp.push(local);
                tasks.spawn(crate::listener::udp::serve(shared.clone(), sock));
            }
            if let Some(l) = tcp {
                let local = l.local_addr().unwrap_or(addr);
                tracing::info!(addr = %local, "STUN/TURN listening on TCP");
                bound.tcp.push(local);
                tasks.spawn(crate::listener::tcp::serve(shared.clone(), l));
            }
        }
        let handshake_timeout =
            std::time::Duration::from_secs(config.turn.tcp_idle_timeout_secs.max(1));
        if let Some(cert) = &tls {
            for &addr in &config.turn.tls_listen {
                let l = crate::listener::tcp::bind(addr).map_err(|source| StartError::Bind {
                    what: "STUN/TURN TLS",
                    addr,
                    source,
                })?;
                let local = l.local_addr().unwrap_or(addr);
                let turns_config = cert.server_config(&[])?;
                tracing::info!(addr = %local, "STUN/TURN listening on TLS");
                bound.tls.push(local);
                tasks.spawn(crate::listener::tls::serve(shared.clone(), l, turns_config));
            }
        }

        let http = tokio::net::TcpListener::bind(config.http.listen)
            .await
            .map_err(|source| StartError::Bind {
                what: "HTTP",
                addr: config.http.listen,
                source,
            })?;
        let http_addr = http.local_addr().unwrap_or(config.http.listen);
        bound.http = Some(http_addr);
        match (&tls, config.http.tls) {
            (Some(cert), true) => {
                let l = crate::tls::TlsListener::new(
                    http,
                    cert.server_config(&[b"http/1.1"])?,
                    handshake_timeout,
                    config.tls.max_concurrent_handshakes,
                    shared
                        .metrics
                        .tls_handshakes_active
                        .with_label_values(&["https"]),
                    shutdown_signal(shared.lifecycle.subscribe()),
                )
                .map_err(|source| StartError::Bind {
                    what: "HTTPS",
                    addr: http_addr,
                    source,
                })?;
                tracing::info!(addr = %http_addr, "HTTPS listening (login, signaling over wss, probes, metrics)");
                tasks.spawn(crate::http::serve(shared.clone(), l, crate::http::router));
            }
            _ => {
                tracing::info!(addr = %http_addr, "HTTP listening (login, signaling, probes, metrics)");
                tasks.spawn(crate::http::serve(
                    shared.clone(),
                    http,
                    crate::http::router,
                ));
            }
        }

        if let Some(maddr) = config.http.metrics_listen {
            let l = tokio::net::TcpListener::bind(maddr)
                .await
                .map_err(|source| StartError::Bind {
                    what: "metrics HTTP",
                    addr: maddr,
                    source,
                })?;
            let local = l.local_addr().unwrap_or(maddr);
            tracing::info!(addr = %local, "metrics listening");
            bound.metrics = Some(local);
            tasks.spawn(crate::http::serve(
                shared.clone(),
                l,
                crate::http::metrics_router,
            ));
        }

        tasks.spawn(shared.signaling.clone().run_timers(shared.clone()));
        if let Some(offload) = shared.offload.clone() {
            tasks.spawn(offload_counters(
                offload,
                shared.metrics.clone(),
                shared.lifecycle.subscribe(),
            ));
        }
        if let Some(c) = &shared.cluster {
            tasks.spawn(c.clone().run(shared.clone()));
        }
        let _ = shared.bound.set(bound);
        shared.lifecycle.ready.store(true, Ordering::Release);
        Ok(RunningServer { shared, tasks })
    }
}

/// Once a second, add what the kernel fast path relayed to the relay metrics, until shutdown.
async fn offload_counters(
    offload: Arc<crate::turn::offload::Offload>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let stop = shutdown_signal(shutdown);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {}
        }
        let deltas = offload.take_deltas();
        crate::turn::offload::Offload::record_metrics(&deltas, &metrics);
    }
    // The last second's worth, so a drain's final scrape is complete.
    crate::turn::offload::Offload::record_metrics(&offload.take_deltas(), &metrics);
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

/// Bind UDP and TCP on the same port; with port 0 the TCP side follows the port UDP got.
fn bind_stun_pair(
    addr: SocketAddr,
    udp: bool,
    tcp: bool,
) -> Result<(Option<std::net::UdpSocket>, Option<tokio::net::TcpListener>), StartError> {
    let udp_err = |source| StartError::Bind {
        what: "STUN/TURN UDP",
        addr,
        source,
    };
    let tcp_err = |source| StartError::Bind {
        what: "STUN/TURN TCP",
        addr,
        source,
    };
    if !(udp && tcp) || addr.port() != 0 {
        let u = udp
            .then(|| crate::listener::udp::bind(addr))
            .transpose()
            .map_err(udp_err)?;
        let t = tcp
            .then(|| crate::listener::tcp::bind(addr))
            .transpose()
            .map_err(tcp_err)?;
        return Ok((u, t));
    }
    // An ephemeral UDP port may already be taken on TCP; try a few.
    let mut last = None;
    for _ in 0..16 {
        let u = crate::listener::udp::bind(addr).map_err(udp_err)?;
        let port = u.local_addr().map_err(udp_err)?.port();
        match crate::listener::tcp::bind(SocketAddr::new(addr.ip(), port)) {
            Ok(t) => return Ok((Some(u), Some(t))),
            Err(e) => last = Some(e),
        }
    }
    Err(tcp_err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::AddrInUse, "no common port")
    })))
}

impl RunningServer {
    /// Shared state, for tests and the binary.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
    /// Bound addresses.
    pub fn bound(&self) -> Bound {
        self.shared.bound.get().cloned().unwrap_or_default()
    }
    /// HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.bound()
            .http
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)))
    }
    /// Stop every listener and connection now.
    pub fn shutdown(&self) {
        self.shared.lifecycle.shutdown();
    }
    /// Wait until every task has ended (after [`RunningServer::shutdown`]).
    pub async fn wait(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}
