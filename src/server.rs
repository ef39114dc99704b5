//! The embeddable server: binds every configured listener on the current tokio runtime
//! and hands back the bound addresses, so tests can run it in-process on port 0.

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::metrics::Metrics;

pub use crate::lifecycle::{shutdown_signal, Lifecycle};
pub use crate::listener::TurnShared;
pub use crate::shared::{Bound, ReloadError, Shared, StartError};

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
        let tls = if config.http.tls
            || !config.turn.tls_listen.is_empty()
            || !config.shared_port.listen.is_empty()
        {
            match (&config.tls.cert_file, &config.tls.key_file) {
                (Some(c), Some(k)) => Some(Arc::new(crate::tls::ReloadableCert::load(c, k)?)),
                // ACME fills the slot (from its cache at once when it can).
                _ if config.tls.acme.is_some() => {
                    Some(Arc::new(crate::tls::ReloadableCert::acme()))
                }
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
        let acme = match (&config.tls.acme, &tls) {
            (Some(a), Some(cert)) => Some(crate::acme::Acme::new(
                a,
                config.cluster.enabled(),
                cert.clone(),
                shared.metrics.acme.clone(),
            )?),
            _ => {
                crate::acme::record_expiry(tls.as_deref(), &shared.metrics.acme);
                None
            }
        };
        if let Some(c) = &shared.cluster {
            // Refuse to start as a second live process under one node id.
            c.claim_node_id().await?;
        }
        // `"auto"` addresses are learnt before anything is handed out.
        crate::discover::initial(&config, &shared.turn.settings.live)
            .await
            .map_err(|e| crate::config::ConfigError::Key {
                key: e.key.into(),
                message: e.to_string(),
            })?;
        let mut tasks = JoinSet::new();
        let mut bound = Bound::default();

        for &addr in &config.turn.listen {
            let (udp, tcp) = bind_stun_pair(addr, config.turn.udp, config.turn.tcp)?;
            if let Some(sock) = udp {
                let local = sock.local_addr().unwrap_or(addr);
                tracing::info!(addr = %local, "STUN/TURN listening on UDP");
                bound.udp.push(local);
                tasks.spawn(crate::listener::udp::serve(shared.listener.clone(), sock));
            }
            if let Some(l) = tcp {
                let local = l.local_addr().unwrap_or(addr);
                tracing::info!(addr = %local, "STUN/TURN listening on TCP");
                bound.tcp.push(local);
                tasks.spawn(crate::listener::tcp::serve(shared.listener.clone(), l));
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
                tasks.spawn(crate::listener::tls::serve(
                    shared.listener.clone(),
                    l,
                    turns_config,
                ));
            }
        }

        if let Some(cert) = &tls {
            for &addr in &config.shared_port.listen {
                let l = crate::listener::tcp::bind(addr).map_err(|source| StartError::Bind {
                    what: "shared port",
                    addr,
                    source,
                })?;
                let local = l.local_addr().unwrap_or(addr);
                let cfg = cert.server_config(&crate::demux::ALPN_SHARED)?;
                tracing::info!(addr = %local, "shared port listening (https, wss, turns, turn over tcp)");
                bound.shared.push(local);
                tasks.spawn(crate::shared_port::serve(shared.clone(), l, cfg));
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

        tasks.spawn(
            shared
                .signaling
                .clone()
                .run_timers(crate::http::ws::signaling_deps(&shared)),
        );
        if let Some(offload) = shared.offload.clone() {
            tasks.spawn(offload_counters(
                offload,
                shared.metrics.clone(),
                shared.lifecycle.subscribe(),
            ));
        }
        if let Some(c) = &shared.cluster {
            tasks.spawn(c.clone().run());
        }
        if let Some(acme) = acme {
            tasks.spawn(acme.run(shared.lifecycle.subscribe()));
        }
        if let Some(jwks) = &shared.jwks {
            tasks.spawn(jwks.clone().run(shared.lifecycle.subscribe()));
        }
        let _ = shared.bound.set(bound);
        tasks.spawn(crate::discover::run(
            config.clone(),
            shared.turn.settings.live.clone(),
            shared.lifecycle.clone(),
        ));
        if let Some(c) = &shared.cluster {
            let live = shared.turn.settings.live.clone();
            let _ = live.cluster.set(crate::turn::members::ClusterId {
                me: c.node().to_string(),
                tls_domain: config.public.turns_host.clone(),
            });
            let me = Arc::downgrade(&shared);
            let m = crate::cluster::members::Membership {
                node: c.node().to_string(),
                redis_url: config.cluster.redis_url.clone(),
                ttl: std::time::Duration::from_millis(config.cluster.node_ttl_ms),
                live,
                pool: shared.turn.pool.clone(),
                metrics: shared.metrics.clone(),
                lifecycle: shared.lifecycle.clone(),
                describe: Box::new(move || {
                    me.upgrade()
                        .map(|s| crate::ice::own_record(&s))
                        .unwrap_or_else(crate::ice::empty_record)
                }),
            };
            tasks.spawn(m.run());
        }
        shared.lifecycle.set_ready();
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
