//! The TLS shell of the STUN/TURN port (`turns:`): handshakes concurrently, then serves each
//! stream with the same framing and logic as plain TCP.

use std::sync::Arc;

use crate::server::Shared;
use crate::tls::TlsListener;

/// Serve STUN/TURN over every handshaken TLS stream until the listener shuts down.
pub async fn serve(shared: Arc<Shared>, mut listener: TlsListener) {
    let bound = axum::serve::Listener::local_addr(&listener).ok();
    while let Some((stream, peer)) = listener.next().await {
        // The accepted socket's address, not the (possibly wildcard) listener's.
        let local = stream.get_ref().0.local_addr().ok().or(bound);
        let shared = shared.clone();
        tokio::spawn(async move {
            super::tcp::serve_stream(shared, stream, peer, local, "tls").await;
        });
    }
}
