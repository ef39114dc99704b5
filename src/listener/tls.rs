//! The TLS shell of the STUN/TURN port (`turns:`): admits connections under the same caps as
//! plain TCP, handshakes a bounded number at once, then serves each stream with the same
//! framing and logic as plain TCP.

use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use super::Deps;
use crate::lifecycle::shutdown_signal;

/// Accept, handshake and serve STUN/TURN over TLS until shutdown.
///
/// Before each `accept` the loop takes a global stream slot (the mini-redis shape), and a
/// connection over its address's cap is closed at once. A handshake permit is taken only once
/// the client has sent its first bytes, so silent sockets never hold one, and is returned as
/// soon as the handshake ends. Waiting for the permit and the handshake may each take
/// `turn.stream_first_message_timeout_secs`, so a stalled handshake holds a permit at most
/// that long.
pub async fn serve(deps: Arc<Deps>, listener: TcpListener, config: Arc<rustls::ServerConfig>) {
    let bound = listener.local_addr().ok();
    let acceptor = TlsAcceptor::from(config);
    let handshakes = Arc::new(Semaphore::new(deps.max_tls_handshakes.max(1)));
    let deadline = Duration::from_secs(deps.config.stream_first_message_timeout_secs.max(1));
    let in_flight = deps
        .metrics
        .tls_handshakes_active
        .with_label_values(&["turns"]);
    let mut shutdown = std::pin::pin!(shutdown_signal(deps.lifecycle.subscribe()));
    while let Some((stream, peer, permit)) =
        super::tcp::accept_admitted(&deps, &listener, &mut shutdown).await
    {
        // The accepted socket's address, not the (possibly wildcard) listener's.
        let local = stream.local_addr().ok().or(bound);
        let deps = deps.clone();
        let acceptor = acceptor.clone();
        let in_flight = in_flight.clone();
        let handshakes = handshakes.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _open = super::tcp::OpenGuard::new(&deps.metrics, "tls");
            let r =
                crate::tls::bounded_handshake(&acceptor, stream, &handshakes, &in_flight, deadline)
                    .await;
            let reason = match r {
                Ok(tls) => {
                    let started = tokio::time::Instant::now();
                    super::tcp::serve_stream(deps, tls, peer, local, "tls", started).await;
                    return;
                }
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    "tls_handshake_timeout"
                }
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    "tls_handshake_failed"
                }
            };
            deps.metrics.drops.with_label_values(&[reason]).inc();
        });
    }
}
