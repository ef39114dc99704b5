//! The shared port (`shared_port.listen`, usually 443): one TCP port for networks that let out
//! only TCP 443. Each connection is admitted under the STUN/TURN stream caps, classified from
//! its first bytes and ALPN (the pure rules live in [`crate::demux`]), and handed to the TURN
//! stream handler or to the axum service. Plain HTTP is answered with a redirect to https.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::demux::{classify_inner, classify_opening, Inner, Opening, PlainHttp};
use crate::lifecycle::shutdown_signal;
use crate::listener::tcp::{OpenGuard, Stream};
use crate::shared::Shared;

/// A stream whose first bytes were already read to classify it: they are read again first.
#[derive(Debug)]
pub struct Prefixed<S> {
    head: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    /// Replay `head`, then read from `inner`.
    pub fn new(head: Vec<u8>, inner: S) -> Prefixed<S> {
        Prefixed {
            head,
            pos: 0,
            inner,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.pos < self.head.len() {
            let n = (self.head.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.head[start..start + n]);
            self.pos += n;
            if self.pos == self.head.len() {
                self.head = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

type HttpIo = Box<dyn Stream>;

/// What every connection task of one shared listener needs.
struct Ctx {
    shared: Arc<Shared>,
    acceptor: TlsAcceptor,
    handshakes: Semaphore,
    in_flight: prometheus::IntGauge,
    deadline: Duration,
    plain_turn: bool,
    https_port: u16,
    http: mpsc::Sender<(HttpIo, SocketAddr)>,
}

/// Serve the shared port on `listener` until shutdown; `tls` must offer [`crate::demux::ALPN_SHARED`].
pub async fn serve(shared: Arc<Shared>, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
    let deps = shared.listener.clone();
    let local = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let (tx, rx) = mpsc::channel(256);
    let http = tokio::spawn(crate::http::serve(
        shared.clone(),
        crate::tls::Accepted::from_channel(rx, local),
        crate::http::router_over_tls,
    ));
    let ctx = Arc::new(Ctx {
        acceptor: TlsAcceptor::from(tls),
        handshakes: Semaphore::new(deps.max_tls_handshakes.max(1)),
        in_flight: deps
            .metrics
            .tls_handshakes_active
            .with_label_values(&["shared"]),
        deadline: Duration::from_secs(deps.config.stream_first_message_timeout_secs.max(1)),
        plain_turn: shared.config.shared_port.plain_turn,
        https_port: shared
            .config
            .shared_port
            .public_port
            .unwrap_or(local.port()),
        http: tx,
        shared: shared.clone(),
    });
    let mut shutdown = std::pin::pin!(shutdown_signal(deps.lifecycle.subscribe()));
    while let Some((stream, peer, permit)) =
        crate::listener::tcp::accept_admitted(&deps, &listener, &mut shutdown).await
    {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let open = OpenGuard::new(&ctx.shared.metrics, "shared");
            if let Some(reason) = handle(&ctx, stream, peer, permit, open).await {
                ctx.shared.metrics.drops.with_label_values(&[reason]).inc();
            }
        });
    }
    drop(ctx);
    let _ = http.await;
}

/// Read more bytes into `buf` (at most `max` in all) before `until`: `Ok(false)` at EOF.
async fn read_more<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
    max: usize,
    until: Instant,
) -> Result<bool, &'static str> {
    // Small reads into a stack buffer: the Vec grows only as bytes arrive, so an idle
    // stranger costs a few bytes.
    let mut chunk = [0u8; 64];
    let take = max.saturating_sub(buf.len()).clamp(1, chunk.len());
    match tokio::time::timeout_at(until, s.read(&mut chunk[..take])).await {
        Err(_) => Err("stream_first_message_timeout"),
        Ok(Ok(0)) | Ok(Err(_)) => Ok(false),
        Ok(Ok(n)) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(true)
        }
    }
}

/// Classify and serve one admitted connection; the drop reason when it ends early.
async fn handle(
    ctx: &Ctx,
    mut stream: TcpStream,
    peer: SocketAddr,
    permit: crate::listener::tcp::StreamPermit,
    open: OpenGuard,
) -> Option<&'static str> {
    let started = Instant::now();
    let until = started + ctx.deadline;
    let local = stream.local_addr().ok();
    let deps = ctx.shared.listener.clone();
    let mut head = Vec::new();
    let opening = loop {
        match classify_opening(&head) {
            Opening::NeedMore => {}
            o => break o,
        }
        match read_more(&mut stream, &mut head, 64, until).await {
            Ok(true) => {}
            Ok(false) => return None,
            Err(reason) => return Some(reason),
        }
    };
    match opening {
        Opening::NeedMore | Opening::Garbage => {
            // Counted before the connection closes, so a client that sees it closed sees the
            // count.
            ctx.shared
                .metrics
                .drops
                .with_label_values(&["stream_garbage"])
                .inc();
            drop(stream);
            None
        }
        Opening::Stun if !ctx.plain_turn => Some("shared_plain_turn_off"),
        Opening::Stun => {
            let s = Prefixed::new(head, stream);
            // Boxed, like the branches below: an idle stranger's task holds only the
            // classifier's small state.
            let serve = crate::listener::tcp::serve_stream(deps, s, peer, local, "tcp", started);
            Box::pin(serve).await;
            drop((permit, open));
            None
        }
        Opening::Http => Box::pin(plain_http(ctx, stream, head, until)).await,
        Opening::Tls => Box::pin(tls(ctx, stream, head, peer, local, permit, open)).await,
    }
}

/// Answer a plain HTTP request with the redirect (or 400), then close.
async fn plain_http(
    ctx: &Ctx,
    mut stream: TcpStream,
    mut head: Vec<u8>,
    until: Instant,
) -> Option<&'static str> {
    let answer = loop {
        match crate::demux::plain_http_answer(&head, ctx.https_port) {
            PlainHttp::Answer(a) => break a,
            PlainHttp::NeedMore => {}
        }
        match read_more(&mut stream, &mut head, crate::demux::HTTP_HEAD_MAX, until).await {
            Ok(true) => {}
            Ok(false) => return None,
            Err(reason) => return Some(reason),
        }
    };
    // Counted before the answer goes out, so whoever has read the answer sees the count.
    ctx.shared
        .metrics
        .drops
        .with_label_values(&["shared_plain_http"])
        .inc();
    let _ = tokio::time::timeout_at(until, async {
        let _ = stream.write_all(&answer).await;
        let _ = stream.shutdown().await;
    })
    .await;
    None
}

/// Handshake, then route by ALPN or first bytes to TURN over TLS or to HTTPS.
async fn tls(
    ctx: &Ctx,
    stream: TcpStream,
    head: Vec<u8>,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    permit: crate::listener::tcp::StreamPermit,
    open: OpenGuard,
) -> Option<&'static str> {
    let deps = ctx.shared.listener.clone();
    let tls = match handshake(ctx, Prefixed::new(head, stream)).await {
        Ok(t) => t,
        Err(reason) => return Some(reason),
    };
    let done = Instant::now();
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let mut tls = tls;
    if classify_inner(alpn.as_deref(), &[]) == Inner::AcmeValidation {
        // The validator read the challenge certificate in the handshake; nothing follows.
        let _ = tokio::time::timeout(ctx.deadline, tls.shutdown()).await;
        return None;
    }
    let mut first = Vec::new();
    let inner = loop {
        match classify_inner(alpn.as_deref(), &first) {
            Inner::NeedMore => {}
            i => break i,
        }
        match read_more(&mut tls, &mut first, 64, done + ctx.deadline).await {
            Ok(true) => {}
            Ok(false) => return None,
            Err(reason) => return Some(reason),
        }
    };
    let s = Prefixed::new(first, tls);
    match inner {
        Inner::Turn => {
            let serve = crate::listener::tcp::serve_stream(deps, s, peer, local, "tls", done);
            Box::pin(serve).await;
            drop((permit, open));
            None
        }
        _ => {
            // HTTP connections live under the HTTP server's own rules (as on the HTTPS
            // listener), not under the TURN stream caps: free the TURN slot now.
            drop((permit, open));
            let _ = ctx.http.send((Box::new(s), peer)).await;
            None
        }
    }
}

/// The TLS handshake under the listener's cap: the permit is waited for and the handshake
/// run, each within the first-message deadline.
async fn handshake(
    ctx: &Ctx,
    s: Prefixed<TcpStream>,
) -> Result<tokio_rustls::server::TlsStream<Prefixed<TcpStream>>, &'static str> {
    let _permit = tokio::time::timeout(ctx.deadline, ctx.handshakes.acquire())
        .await
        .map_err(|_| "tls_handshake_timeout")?
        .map_err(|_| "tls_handshake_failed")?;
    ctx.in_flight.inc();
    let r = tokio::time::timeout(ctx.deadline, ctx.acceptor.accept(s)).await;
    ctx.in_flight.dec();
    match r {
        Err(_) => Err("tls_handshake_timeout"),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "shared port: TLS handshake failed");
            Err("tls_handshake_failed")
        }
        Ok(Ok(t)) => Ok(t),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn prefixed_replays_its_head_then_reads_on() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b" world").await.expect("write");
        drop(a);
        let mut p = Prefixed::new(b"hello".to_vec(), b);
        let mut out = String::new();
        p.read_to_string(&mut out).await.expect("read");
        assert_eq!(out, "hello world");
    }
}
